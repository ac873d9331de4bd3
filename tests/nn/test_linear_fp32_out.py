"""linear_fp32_out: the product of fp16/bf16 operands returned from the fp32 accumulator, not rounded first."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from turboformer.nn.linear import linear_fp32_out


def _operands(dtype, device, bias=True):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 96, generator=g).to(device, dtype)
    w = torch.randn(40, 96, generator=g).to(device, dtype)
    b = torch.randn(40, generator=g).to(device) if bias else None
    return x, w, b


def _exact(x, w, b):
    y = x.double() @ w.double().T
    return y if b is None else y + b.double()


def test_cpu_fp32_is_f_linear():
    x, w, b = _operands(torch.float32, "cpu")
    y = linear_fp32_out(x, w, b)
    assert y.dtype == torch.float32 and y.shape == (3, 5, 40)
    assert torch.allclose(y, F.linear(x, w, b), atol=1e-5)
    assert torch.allclose(linear_fp32_out(x, w, None), F.linear(x, w), atol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_gpu_fp32_out_is_closer_than_rounded(dtype, bias):
    x, w, b = _operands(dtype, "cuda", bias)
    y = linear_fp32_out(x, w, b)
    assert y.dtype == torch.float32 and y.shape == (3, 5, 40)
    exact = _exact(x, w, b)
    rounded = F.linear(x, w, None if b is None else b.to(dtype)).double()
    error, rounded_error = (y.double() - exact).abs().max(), (rounded - exact).abs().max()
    assert error < 1e-3 < rounded_error  # fp32 accumulation only vs an output rounded to 8-11 bits


@pytest.mark.parametrize("int8", [False, True])
def test_packed_linear_fp32_out(int8):
    """PackedLinear.fp32_out: the fp32 product with the fp32 bias (fp16/bf16/fp32 weights), or the INT8 kernel's
    output in x's dtype."""
    from turboformer.nn.linear import PackedLinear

    x, w, b = _operands(torch.float32, "cpu")
    packed = PackedLinear(w, b, torch.float32, int8=int8)
    y = packed.fp32_out(x)
    assert y.dtype == torch.float32 and y.shape == (3, 5, 40)
    assert torch.allclose(y, packed(x), atol=1e-5)
    if not int8:
        assert torch.allclose(y, F.linear(x, w, b), atol=1e-5)
