"""norm_linear: the Triton kernel (the interpreter on CPU, the GPU where there is one) against the fp32 PyTorch
reference (add rounded to the dtype, F.layer_norm in fp32, F.linear in fp32), over dtypes, awkward shapes and
every prologue / epilogue; and the dispatcher's choice."""

from __future__ import annotations

import pytest
import torch

from turboformer.kernels import KernelInputError, poison_buffers, use_reference
from turboformer.kernels.norm_linear import MAX_FEATURES, norm_linear, norm_linear_ref, norm_linear_triton
from turboformer.kernels.utils import launch_on_cpu

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # relative to the output's scale
MODES = {
    "plain": dict(),
    "relu": dict(relu=True),
    "ln": dict(ln=True),  # pre-norm's first layer: LayerNorm of x, x stays the residual
    "ln_norm": dict(ln=True, keep="norm"),
    "add_ln_norm": dict(delta=True, ln=True, keep="norm", relu=True),  # post-norm
    "add_ln_sum": dict(delta=True, ln=True, keep="sum"),  # pre-norm
}


def _inputs(M, N, K, dtype, mode, seed=0, stream=None):
    """x, weight, bias and the op's keywords; ``stream``: the residual stream's dtype (x, delta, LayerNorm
    parameters; default the weight's)."""
    stream = stream or dtype
    g = torch.Generator().manual_seed(seed)
    spec = MODES[mode]
    x = torch.randn(M, K, generator=g) * 2 + 0.5
    weight = torch.randn(N, K, generator=g) / K**0.5
    bias = torch.randn(N, generator=g)
    kwargs = {"relu": spec.get("relu", False), "keep": spec.get("keep", "norm")}
    if spec.get("delta"):
        kwargs["delta"] = (torch.randn(M, K, generator=g)).to(DEVICE, stream)
    if spec.get("ln"):
        kwargs["ln"] = ((1 + 0.3 * torch.randn(K, generator=g)).to(DEVICE, stream),
                        (0.2 * torch.randn(K, generator=g)).to(DEVICE, stream))  # fmt: skip
    return x.to(DEVICE, stream), weight.to(DEVICE, dtype), bias.to(DEVICE, dtype), kwargs


@pytest.mark.parametrize("dtype, stream", [(d, None) for d in DTYPES] + [(d, torch.float32) for d in DTYPES[1:]])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("M, N, K", [(1, 7, 24), (5, 40, 100), (64, 100, 496), (70, 33, 64)])
def test_kernel_matches_reference(M, N, K, mode, dtype, stream):
    """``stream`` float32: the fp32 residual stream (x, delta, LayerNorm parameters) with fp16/bf16 weights."""
    x, weight, bias, kwargs = _inputs(M, N, K, dtype, mode, stream=stream)
    want_y, want_res = norm_linear_ref(x, weight, bias, **kwargs)
    with poison_buffers():
        got_y, got_res = norm_linear_triton(x, weight, bias, **kwargs)
    scale = want_y.float().abs().max().item()
    torch.testing.assert_close(got_y.float(), want_y.float(), rtol=0, atol=TOL[dtype] * scale)
    assert got_y.dtype == weight.dtype and got_res.dtype == x.dtype
    torch.testing.assert_close(got_res.float(), want_res.float(), rtol=TOL[x.dtype], atol=TOL[x.dtype])
    if mode in ("add_ln_norm", "add_ln_sum"):  # the residual stream really is the sum / its LayerNorm
        s = (x.float() + kwargs["delta"].float()).to(x.dtype)
        if mode == "add_ln_sum":
            torch.testing.assert_close(got_res, s)
        else:
            assert not torch.allclose(got_res.float(), s.float(), atol=0.1)
    if mode == "relu":
        assert (got_y >= 0).all() and (want_y == 0).any()


@pytest.mark.parametrize("block_m, block_n, num_warps", [(32, 16, 4), (64, 64, 8)])
def test_other_tiles(block_m, block_n, num_warps):
    x, weight, bias, kwargs = _inputs(50, 90, 200, torch.float16, "add_ln_norm", seed=2)
    want_y, want_res = norm_linear_ref(x, weight, bias, **kwargs)
    got_y, got_res = norm_linear_triton(x, weight, bias, **kwargs, block_m=block_m, block_n=block_n,
                                        num_warps=num_warps)  # fmt: skip
    torch.testing.assert_close(got_y, want_y, rtol=0, atol=2e-3 * want_y.float().abs().max().item())
    torch.testing.assert_close(got_res, want_res)


def test_dispatcher():
    x, weight, bias, kwargs = _inputs(8, 16, 32, torch.float32, "add_ln_norm", seed=3)
    want = norm_linear_ref(x, weight, bias, **kwargs)
    with launch_on_cpu():
        got = norm_linear(x, weight, bias, **kwargs)
    with use_reference():
        forced = norm_linear(x, weight, bias, **kwargs)
    for g, f, w in zip(got, forced, want):
        torch.testing.assert_close(g, w)
        assert torch.equal(f, w)
    wide = torch.zeros(2, MAX_FEATURES + 1, device=DEVICE)
    y, res = norm_linear(wide, torch.ones(3, MAX_FEATURES + 1, device=DEVICE))  # beyond the kernel: the reference
    assert y.shape == (2, 3) and res is wide


def test_bad_input():
    x, weight, bias, kwargs = _inputs(4, 8, 16, torch.float32, "add_ln_norm")
    with pytest.raises(KernelInputError, match="needs ln"):
        norm_linear_triton(x, weight, bias, delta=kwargs["delta"])
    with pytest.raises(KernelInputError, match="x must be float32 or the weight's dtype"):
        norm_linear_triton(x.half(), weight.bfloat16(), bias)
    with pytest.raises(KernelInputError, match=r"weight \[N, K\]"):
        norm_linear_triton(x, weight[:, :-1], bias)
    with pytest.raises(KernelInputError, match="keep"):
        norm_linear_triton(x, weight, bias, ln=kwargs["ln"], keep="both")
    with pytest.raises(KernelInputError, match="delta must have"):
        norm_linear_triton(x, weight, bias, delta=kwargs["delta"][:2], ln=kwargs["ln"])
