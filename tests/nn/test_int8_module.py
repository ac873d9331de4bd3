"""``Int8Linear`` / ``quantize_linears``: the module form of weight-only INT8 used by the Conformer, Lite Transformer
and SAM engines, checked against ``nn.Linear`` on the dequantised weight (fp64) and against the per-channel
quantisation error bound (|w - w_int8 * scale| <= scale / 2 per element)."""

import pytest
import torch
from torch import nn

from turboformer.nn.linear import Int8Linear, quantize_linears

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_quantisation_error_is_half_a_step_per_element():
    torch.manual_seed(0)
    linear = nn.Linear(37, 11)
    q = Int8Linear(linear)
    assert q.weight.dtype == torch.int8 and q.scale.dtype == torch.float32
    dequant = q.weight.float() * q.scale[:, None]
    assert ((dequant - linear.weight).abs() <= q.scale[:, None] / 2 + 1e-7).all()
    assert (q.weight.abs().amax(dim=1) == 127).all()  # absmax maps to +-127 on every row


def test_forward_equals_linear_on_the_dequantised_weight():
    torch.manual_seed(1)
    linear = nn.Linear(24, 9)
    q = Int8Linear(linear)
    x = torch.randn(3, 5, 24)
    gold = torch.nn.functional.linear(x.double(), q.weight.double() * q.scale.double()[:, None], linear.bias.double())
    assert q(x).shape == (3, 5, 9)
    torch.testing.assert_close(q(x).double(), gold, atol=1e-5, rtol=1e-5)
    # and close to the unquantised layer (the quantisation error is small but non-zero)
    err = (q(x) - linear(x)).abs().max().item()
    assert 0 < err < 0.05


def test_quantize_linears_replaces_all_but_skipped_and_survives_dtype_casts():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4)))
    replaced = quantize_linears(model, skip=lambda name: name == "2.1")
    assert replaced == ["0", "2.0"]
    assert isinstance(model[0], Int8Linear) and isinstance(model[2][0], Int8Linear)
    assert type(model[2][1]) is nn.Linear
    scale = model[0].scale.clone()
    model.half()
    assert model[0].scale.dtype == torch.float32 and torch.equal(model[0].scale, scale)  # exact fp32 scales kept
    assert model[0].weight.dtype == torch.int8 and model[2][1].weight.dtype == torch.float16
    assert set(model.state_dict()) >= {"0.weight", "0.scale", "0.bias", "2.1.weight"}


@pytest.mark.cuda
def test_int8_module_on_cuda_matches_reference():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(1280, 5120), nn.GELU(), nn.Linear(5120, 1280))
    quantize_linears(model)
    model = model.to(DEVICE, torch.float16)
    x = torch.randn(64, 1280, device=DEVICE, dtype=torch.float16)
    with torch.no_grad():
        out = model(x)
        from turboformer.kernels import use_reference

        with use_reference():
            ref = model(x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
