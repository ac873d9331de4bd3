"""The tolerance rule shared by the kernel tests (each test file's docstring states its fp32 tolerance)."""

import torch

from turboformer.kernels import utils


def assert_close_to_gold(out, gold, torch_lowp, fp32_tol: float = 1e-5, bf16_truncations: int = 1):
    """``gold`` is the fp64 result, ``torch_lowp`` PyTorch's own op run in out's dtype.

    fp32: within ``fp32_tol`` (absolute and relative). fp16/bf16: the kernel's max error is at most twice
    PyTorch's own error in that dtype plus half an ulp of max |result| (its own output rounding); under the Triton interpreter bf16 also gets one bf16 ulp of max |result|
    (its numpy emulation truncates fp32 -> bf16 where the GPU rounds to nearest even) per intermediate rounding
    the kernel chains (``bf16_truncations``).
    """
    assert not out.isnan().any(), "kernel left NaN (unwritten or poisoned) elements"
    if out.dtype == torch.float32:
        torch.testing.assert_close(out.double(), gold, atol=fp32_tol, rtol=fp32_tol)
        return
    err = (out.double() - gold).abs().max().item()
    bound = 2 * (torch_lowp.double() - gold).abs().max().item() + 1e-6
    # plus the kernel's own output rounding (half an ulp of the largest result): on a small sample PyTorch's error
    # can happen to be far below it (a 15-element fp16 case failed on a new random draw, 0.000248 vs 0.000233)
    bound += 0.5 * torch.finfo(out.dtype).eps * gold.abs().max().item()
    if out.dtype == torch.bfloat16 and utils.interpreting():
        bound += bf16_truncations * gold.abs().max().item() * 2**-7
    assert err <= bound, f"{out.dtype}: max error {err:.3g} > bound {bound:.3g}"
