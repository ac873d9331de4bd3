"""Bias + exact GELU kernel against torch.nn.functional.gelu (approximate="none") in fp64.

On CPU the Triton launcher runs in the Triton interpreter (small shapes); on CUDA it runs compiled, and the
``cuda``-marked tests add Whisper large-v3 FFN shapes ([tokens, 5120]).

Tolerances: fp32 within atol = rtol = 1e-6 of the fp64 result. fp16/bf16: the kernel's max error against
the fp64 result is at most twice the error of PyTorch's own ``gelu(x + bias)`` run in that dtype; under the
interpreter bf16 also gets one bf16 ulp of max |result| (its numpy emulation truncates fp32 -> bf16 where
the GPU rounds to nearest even).
"""

import pytest
import torch
import torch.nn.functional as F
from kernel_tolerance import assert_close_to_gold as shared_assert_close_to_gold

from turboformer.kernels import KernelInputError, poison_buffers
from turboformer.kernels.bias_gelu import bias_gelu_ref, bias_gelu_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def assert_close_to_gold(out, gold, torch_lowp):
    shared_assert_close_to_gold(out, gold, torch_lowp, fp32_tol=1e-6)


def check_bias_gelu(x, bias):
    gold = F.gelu(x.double() + bias.double(), approximate="none")
    torch_lowp = F.gelu(x + bias.to(x.dtype), approximate="none")
    with poison_buffers():
        out = bias_gelu_triton(x, bias)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert_close_to_gold(out, gold, torch_lowp)
    assert_close_to_gold(bias_gelu_ref(x, bias), gold, torch_lowp)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 37), (3, 1000), (5, 2100), (2, 3, 65), (9, 8)])
def test_bias_gelu(shape, dtype):
    # x * 3 covers the negative tail (gelu -> 0), the curved middle and the linear positive side.
    x = (torch.randn(shape, device=DEVICE) * 3).to(dtype)
    bias = torch.randn(shape[-1], device=DEVICE)
    check_bias_gelu(x, bias)


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_rows_and_low_precision_bias(dtype):
    wide = (torch.randn(6, 300, device=DEVICE) * 3).to(dtype)
    x = wide[:, 11:211]  # [6, 200] with row stride 300
    check_bias_gelu(x, torch.randn(200, device=DEVICE).to(dtype))


def test_bad_inputs_raise():
    x = torch.randn(2, 16, device=DEVICE)
    with pytest.raises(KernelInputError, match="bias must have shape"):
        bias_gelu_triton(x, torch.randn(15, device=DEVICE))
    with pytest.raises(KernelInputError, match="x must be float32"):
        bias_gelu_ref(x.to(torch.int64), torch.randn(16, device=DEVICE))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 16, 64, 1500])  # decode batches and one encoder window
def test_whisper_large_v3_shapes(rows, dtype):
    x = (torch.randn(rows, 5120, device=DEVICE) * 3).to(dtype)
    check_bias_gelu(x, torch.randn(5120, device=DEVICE).to(dtype))
