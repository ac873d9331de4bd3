"""Weight-only INT8 linear against torch.nn.functional.linear in fp64 on the dequantised weight.

On CPU the Triton launchers run in the Triton interpreter (small shapes); on CUDA they run compiled, and the
``cuda``-marked tests add Whisper large-v3 shapes (d_model 1280, FFN 5120, vocabulary 51866; decode batches
1..64 and one encoder window of 1500 frames).

Tolerances, every dtype: the kernel's max error against the fp64 result is at most twice the error of
PyTorch's own ``F.linear`` in that dtype with the weight dequantised to that dtype (fp32 too: a K-long fp32
sum carries an error that grows with K and with cancellation, which a fixed tolerance would not track; fp32
also gets 8 fp32 ulps of max |result|, as at small K both errors are a few ulps and their ratio is noise);
under the interpreter bf16 also gets one bf16 ulp of max |result| (its numpy emulation truncates
fp32 -> bf16 where the GPU rounds to nearest even).
"""

import pytest
import torch
import torch.nn.functional as F

from turboformer.kernels import KernelInputError, poison_buffers, utils
from turboformer.kernels.int8_linear import dequantize_weight, int8_linear_ref, int8_linear_triton, quantize_weight

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def assert_close_to_gold(out, gold, torch_lowp):
    """The tolerance rule of this file's docstring; ``gold`` is fp64, ``torch_lowp`` PyTorch's op in out's dtype."""
    assert not out.isnan().any(), "kernel left NaN (unwritten or poisoned) elements"
    err = (out.double() - gold).abs().max().item()
    bound = 2 * (torch_lowp.double() - gold).abs().max().item() + 1e-6
    if out.dtype == torch.float32:
        bound += 8 * torch.finfo(torch.float32).eps * gold.abs().max().item()
    if out.dtype == torch.bfloat16 and utils.interpreting():
        bound += gold.abs().max().item() * 2**-7
    assert err <= bound, f"{out.dtype}: max error {err:.3g} > bound {bound:.3g}"


def check_int8_linear(x, w_int8, scale, bias):
    w = dequantize_weight(w_int8, scale).double()
    gold = F.linear(x.double(), w, None if bias is None else bias.double())
    torch_lowp = F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))
    with poison_buffers():
        out = int8_linear_triton(x, w_int8, scale, bias)
    assert out.shape == (*x.shape[:-1], w_int8.shape[0]) and out.dtype == x.dtype
    assert_close_to_gold(out, gold, torch_lowp)
    assert_close_to_gold(int8_linear_ref(x, w_int8, scale, bias), gold, torch_lowp)


def make_weight(n, k, group=None):
    """A quantised weight with per-row magnitudes spread over 100x, as in trained layers."""
    w = torch.randn(n, k, device=DEVICE) * torch.logspace(-2, 0, n, device=DEVICE)[:, None]
    return quantize_weight(w, group)


# (x shape, N): M = 1, 2 (GEMV kernel; split-K at M = 2), 3 (decode tile, split-K), 17 (odd M),
# 70 (the large-M tile), and an [2, 3, K] input.
SHAPES = [((1, 77), 100), ((2, 1100), 20), ((3, 256), 64), ((17, 1000), 200), ((70, 90), 150), ((2, 3, 130), 40)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_shape,n", SHAPES)
def test_int8_linear(x_shape, n, dtype):
    x = torch.randn(x_shape, device=DEVICE).to(dtype)
    w_int8, scale = make_weight(n, x_shape[-1])
    check_int8_linear(x, w_int8, scale, torch.randn(n, device=DEVICE).to(dtype))


# Group-wise scales: the same kernels with the scale applied per [BLOCK_N, BLOCK_K] tile (K a multiple of the
# group; blocks and splits need not align with the groups: 1088 = 17 x 64 splits at 512 and 128).
# Groups of 48 (not a power of two) take the per-element scale path, the others the packed one.
GROUPED_SHAPES = [((1, 192), 100, 32), ((2, 1088), 20, 64), ((3, 256), 64, 32), ((17, 960), 200, 64), ((70, 96), 150, 32),
                  ((1, 240), 30, 48), ((5, 240), 40, 48), ((70, 144), 20, 48)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_shape,n,group", GROUPED_SHAPES)
def test_int8_linear_group_wise(x_shape, n, group, dtype):
    x = torch.randn(x_shape, device=DEVICE).to(dtype)
    w_int8, scale = make_weight(n, x_shape[-1], group)
    assert scale.shape == (n, x_shape[-1] // group)
    check_int8_linear(x, w_int8, scale, torch.randn(n, device=DEVICE).to(dtype))


def test_group_wise_quantisation_bounds_and_fallback():
    w = torch.randn(6, 128, device=DEVICE)
    w[2, 5] = 40.0  # one outlier: per channel it coarsens the whole row, group-wise only its group
    w_int8, scale = quantize_weight(w, 32)
    assert scale.shape == (6, 4) and w_int8.shape == (6, 128)
    step = scale.repeat_interleave(32, dim=1)
    assert ((dequantize_weight(w_int8, scale) - w).abs() <= step * 0.50001).all()
    per_channel = dequantize_weight(*quantize_weight(w))
    assert (dequantize_weight(w_int8, scale) - w)[2, 32:].abs().max() < (per_channel - w)[2, 32:].abs().max()
    assert quantize_weight(w, 48)[1].shape == (6,)  # 48 does not divide 128: per-channel scales
    with pytest.raises(KernelInputError, match="group must be >= 1"):
        quantize_weight(w, 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_no_bias_and_strided_input(dtype):
    x = torch.randn(5, 3 * 96, device=DEVICE).to(dtype)[:, 96:192]  # a column slice: row stride 288
    w_int8, scale = make_weight(48, 96)
    check_int8_linear(x, w_int8, scale, None)
    check_int8_linear(x.t().contiguous().t(), w_int8, scale, None)  # column-major x: stride along K = 5


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_weight(dtype):
    w = (torch.randn(40, 33, device=DEVICE) * torch.rand(40, 1, device=DEVICE) * 3).to(dtype)
    w[7] = 0  # an all-zero output channel
    w_int8, scale = quantize_weight(w)
    assert w_int8.dtype == torch.int8 and w_int8.shape == w.shape
    assert scale.dtype == torch.float32 and scale.shape == (40,)
    amax = w.double().abs().amax(dim=1)
    nonzero = amax > 0
    torch.testing.assert_close(scale.double()[nonzero], amax[nonzero] / 127)
    assert w_int8.abs().max() <= 127 and (w_int8[7] == 0).all()
    # round to nearest: within half a step of the weight; each row's largest weight maps to +-127
    assert ((w_int8.double() * scale.double()[:, None] - w.double()).abs() <= scale.double()[:, None] * 0.50001).all()
    assert (w_int8.abs().amax(dim=1) == 127)[nonzero].all()


def test_bad_inputs_raise():
    x = torch.randn(2, 16, device=DEVICE)
    w_int8, scale = make_weight(8, 16)
    cases = [
        ((x, w_int8.float(), scale), "w_int8 must be a 2-D int8"),
        ((x[:, :15], w_int8, scale), "x must be"),
        ((x, w_int8, scale.half()), "scale must be float32"),
        ((x, w_int8, torch.ones(8, 3, device=DEVICE)), "divisible into the groups"),
        ((x, w_int8, scale, torch.randn(7, device=DEVICE)), "bias must have shape"),
        ((x.to(torch.int8), w_int8, scale), "x must be float32"),
    ]
    for args, message in cases:
        for fn in (int8_linear_triton, int8_linear_ref):
            with pytest.raises(KernelInputError, match=message):
                fn(*args)
    with pytest.raises(KernelInputError, match="K > 0"):
        quantize_weight(torch.randn(4, 0, device=DEVICE))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 16, 64, 1500])
@pytest.mark.parametrize("n,k", [(1280, 1280), (5120, 1280), (1280, 5120), (51866, 1280)])
@pytest.mark.parametrize("group", [None, 64])
def test_whisper_large_v3_shapes(m, n, k, dtype, group):
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    w_int8, scale = make_weight(n, k, group)
    check_int8_linear(x, w_int8, scale, torch.randn(n, device=DEVICE).to(dtype))
