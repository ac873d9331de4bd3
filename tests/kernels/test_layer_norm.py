"""LayerNorm and fused add + LayerNorm kernels against torch.nn.functional.layer_norm in fp64.

On CPU the Triton launchers run in the Triton interpreter (small shapes); on CUDA they run compiled, and the
``cuda``-marked tests add Whisper large-v3 shapes.

Tolerances: fp32 within atol = rtol = 1e-5 of the fp64 result. fp16/bf16: the kernel's max error against
the fp64 result is at most twice the error of PyTorch's own layer_norm run in that dtype; under the
interpreter bf16 also gets one bf16 ulp of max |result| (its numpy emulation truncates fp32 -> bf16 where
the GPU rounds to nearest even).
"""

import pytest
import torch
from kernel_tolerance import assert_close_to_gold
import torch.nn.functional as F

from turboformer.kernels import KernelInputError, poison_buffers
from turboformer.kernels.layer_norm import (
    MAX_ROW,
    add_layer_norm_ref,
    add_layer_norm_triton,
    layer_norm_ref,
    layer_norm_triton,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPS = 1e-5


def make_rows(shape, dtype, strided=False):
    """Random rows with a non-zero mean (as in a residual stream); strided: a column slice of a wider buffer."""
    if strided:
        wide = torch.randn(*shape[:-1], shape[-1] + 24, device=DEVICE) * 2 + 0.5
        return wide.to(dtype)[..., 7 : 7 + shape[-1]]
    return (torch.randn(shape, device=DEVICE) * 2 + 0.5).to(dtype)


def affine(n):
    return torch.randn(n, device=DEVICE) * 0.5 + 1, torch.randn(n, device=DEVICE) * 0.1


SHAPES = [((1, 37), False), ((3, 384), False), ((5, 1000), False), ((2, 3, 100), False), ((4, 130), True)]


def check_layer_norm(x, weight, bias):
    n = x.shape[-1]
    gold = F.layer_norm(x.double(), (n,), weight.double(), bias.double(), EPS)
    torch_lowp = F.layer_norm(x, (n,), weight.to(x.dtype), bias.to(x.dtype), EPS)
    with poison_buffers():
        out = layer_norm_triton(x, weight, bias, EPS)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert_close_to_gold(out, gold, torch_lowp)
    assert_close_to_gold(layer_norm_ref(x, weight, bias, EPS), gold, torch_lowp)


def check_add_layer_norm(x, delta, weight, bias):
    n = x.shape[-1]
    with poison_buffers():
        h, y = add_layer_norm_triton(x, delta, weight, bias, EPS)
    h_ref, y_ref = add_layer_norm_ref(x, delta, weight, bias, EPS)
    for h_out in (h, h_ref):  # the residual stream: PyTorch's own add in x's dtype, to rounding
        assert h_out.dtype == x.dtype and not h_out.isnan().any()
        torch.testing.assert_close(h_out, x + delta)
    for h_out, y_out in ((h, y), (h_ref, y_ref)):  # y normalises exactly the stored h
        gold = F.layer_norm(h_out.double(), (n,), weight.double(), bias.double(), EPS)
        torch_lowp = F.layer_norm(h_out, (n,), weight.to(x.dtype), bias.to(x.dtype), EPS)
        assert_close_to_gold(y_out, gold, torch_lowp)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,strided", SHAPES)
def test_layer_norm(shape, strided, dtype):
    check_layer_norm(make_rows(shape, dtype, strided), *affine(shape[-1]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,strided", SHAPES)
def test_add_layer_norm(shape, strided, dtype):
    x = make_rows(shape, dtype, strided)
    delta = make_rows(shape, dtype)
    check_add_layer_norm(x, delta, *affine(shape[-1]))


def test_fp16_weights_with_fp32_rows():
    x = make_rows((3, 200), torch.float32)
    weight, bias = affine(200)
    check_layer_norm(x, weight.half(), bias.half())


def test_bad_inputs_raise():
    x = make_rows((2, 16), torch.float32)
    weight, bias = affine(16)
    with pytest.raises(KernelInputError, match="weight must have shape"):
        layer_norm_triton(x, weight[:8], bias, EPS)
    with pytest.raises(KernelInputError, match="x must be float32"):
        layer_norm_ref(x.to(torch.int32), weight, bias, EPS)
    with pytest.raises(KernelInputError, match="delta must have x's shape"):
        add_layer_norm_triton(x, x[:1], weight, bias, EPS)
    wide = torch.zeros(1, MAX_ROW + 1, device=DEVICE)
    with pytest.raises(KernelInputError, match="exceed"):
        layer_norm_triton(wide, *affine(MAX_ROW + 1), EPS)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 16, 64, 1500])  # decode batches and one encoder window
def test_whisper_large_v3_shapes(rows, dtype):
    x, delta = make_rows((rows, 1280), dtype), make_rows((rows, 1280), dtype)
    weight, bias = affine(1280)
    check_layer_norm(x, weight, bias)
    check_add_layer_norm(x, delta, weight, bias)


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
def test_fp32_residual_stream_with_low_precision_output(out_dtype):
    """x (the residual stream) in fp32, delta and y in fp16/bf16: h stays fp32, y is LayerNorm(h) rounded once."""
    from turboformer.kernels.layer_norm import add_layer_norm_ref, add_layer_norm_triton, layer_norm_triton

    x = torch.randn(5, 384, device=DEVICE)
    delta = torch.randn(5, 384, device=DEVICE).to(out_dtype)
    weight, bias = torch.randn(384, device=DEVICE), torch.randn(384, device=DEVICE)
    h = x.double() + delta.double()
    gold = torch.nn.functional.layer_norm(h, (384,), weight.double(), bias.double(), 1e-5)
    for fn in (add_layer_norm_triton, add_layer_norm_ref):
        with poison_buffers():
            out_h, out_y = fn(x, delta, weight, bias, 1e-5, out_dtype)
        assert out_h.dtype == torch.float32 and out_y.dtype == out_dtype
        torch.testing.assert_close(out_h.double(), h, atol=1e-6, rtol=1e-6)
        assert (out_y.double() - gold).abs().max() <= gold.abs().max() * 2**-7  # one rounding to out_dtype
    y = layer_norm_triton(x, weight, bias, 1e-5, out_dtype)
    assert y.dtype == out_dtype
