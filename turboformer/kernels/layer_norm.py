"""LayerNorm and the fused residual add + LayerNorm (Ba et al. 2016, arXiv 1607.06450).

``y = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias`` over the last axis, statistics in fp32 whatever
the storage dtype. In a pre-norm transformer block every sublayer ends with ``h = h + sublayer(...)`` and
the next one starts with ``LayerNorm(h)``: :func:`add_layer_norm` does both in one pass, reading ``x`` and
``delta`` once and writing ``h`` and ``y`` once, instead of four reads and two writes over two kernels.

Kernel layout: one program per row, the whole row in registers (rows up to ``MAX_ROW`` features). Whisper
rows are 384..1280 features: at decode (1..64 rows) the op is launch-bound, at the encoder (1500 rows per
window) it streams at memory speed.
"""

from __future__ import annotations

import torch

from turboformer.kernels import utils
from turboformer.kernels.utils import KernelInputError, tl, triton

MAX_ROW = 32768  # features per row held in one program's registers (16 warps x 32 lanes x 64 fp32 each)


@triton.jit
def _layer_norm_kernel(
    x_ptr,  # [M, N] rows, unit stride along N
    delta_ptr,  # [M, N] residual branch (read only when ADD)
    h_ptr,  # [M, N] out: x + delta in x's dtype (written only when ADD)
    y_ptr,  # [M, N] out: LayerNorm of the (rounded) row
    w_ptr,  # [N]
    b_ptr,  # [N]
    stride_x,
    stride_delta,
    stride_h,
    stride_y,
    N,
    eps,
    ADD: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if ADD:
        delta = tl.load(delta_ptr + row * stride_delta + cols, mask=mask, other=0.0).to(tl.float32)
        # The residual stream is stored in the model dtype; normalise exactly what is stored, as the unfused
        # `h = x + delta; y = layer_norm(h)` would.
        h = (x + delta).to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + row * stride_h + cols, h, mask=mask)
        x = h.to(tl.float32)
    # Two-pass statistics over registers (no E[x^2] - E[x]^2 cancellation): mean, then centred variance.
    mean = tl.sum(x, axis=0) / N
    centred = tl.where(mask, x - mean, 0.0)
    var = tl.sum(centred * centred, axis=0) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = centred * rstd * w + b
    tl.store(y_ptr + row * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, delta: torch.Tensor | None = None) -> None:
    utils.check_float("x", x)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise KernelInputError(f"x must have a non-empty last (feature) axis, got shape {list(x.shape)}")
    utils.check_vector("weight", weight, x.shape[-1])
    utils.check_vector("bias", bias, x.shape[-1])
    if delta is not None:
        utils.check_float("delta", delta)
        if delta.shape != x.shape:
            raise KernelInputError(f"delta must have x's shape {list(x.shape)}, got {list(delta.shape)}")


def _launch(x, delta, weight, bias, eps, out_dtype=None):
    """Shared launcher body: returns ``y`` (in ``out_dtype``, default x's) and, when ``delta`` is given, ``h``
    (in x's dtype); both shaped like ``x``."""
    utils.check_launchable(*(t for t in (x, delta, weight, bias) if t is not None))
    n = x.shape[-1]
    if n > MAX_ROW:
        raise KernelInputError(f"rows of {n} features exceed the kernel's {MAX_ROW}; use layer_norm_ref")
    x2 = utils.as_rows("x", x)  # [M, N]
    m = x2.shape[0]
    y = utils.empty((m, n), out_dtype or x.dtype, x.device)
    add = delta is not None
    d2 = utils.as_rows("delta", delta) if add else x2
    h = utils.empty((m, n), x.dtype, x.device) if add else y
    if m > 0:
        block_n = utils.next_power_of_2(n)
        _layer_norm_kernel[(m,)](
            x2, d2, h, y, weight, bias,
            x2.stride(0), d2.stride(0), h.stride(0), y.stride(0),
            n, float(eps),
            ADD=add, BLOCK_N=block_n,
            num_warps=min(max(block_n // 256, 1), 16),
        )  # fmt: skip
    y = y.view(x.shape)
    return (h.view(x.shape), y) if add else y


def layer_norm_triton(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """LayerNorm of ``x [..., N]`` over N with the Triton kernel; ``weight, bias [N]``; returns x's shape, in
    ``out_dtype`` (default x's dtype)."""
    _check(x, weight, bias)
    return _launch(x, None, weight, bias, eps, out_dtype)


def add_layer_norm_triton(
    x: torch.Tensor,
    delta: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = x + delta`` (in x's dtype) and ``y = LayerNorm(h)`` (in ``out_dtype``, default x's) in one Triton
    pass; ``x, delta [..., N]`` may differ in dtype (an fp32 residual stream with bf16 branches)."""
    _check(x, weight, bias, delta)
    return _launch(x, delta, weight, bias, eps, out_dtype)


def layer_norm_ref(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """PyTorch reference: LayerNorm over the last axis in fp32, cast to ``out_dtype`` (default x's dtype)."""
    _check(x, weight, bias)
    xf = x.float()
    mean = xf.mean(dim=-1, keepdim=True)
    var = (xf - mean).square().mean(dim=-1, keepdim=True)
    y = (xf - mean) * torch.rsqrt(var + eps) * weight.float() + bias.float()
    return y.to(out_dtype or x.dtype)


def add_layer_norm_ref(
    x: torch.Tensor,
    delta: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch reference: ``h = x + delta`` rounded to x's dtype, then ``y = layer_norm_ref(h)``."""
    _check(x, weight, bias, delta)
    h = (x.float() + delta.float()).to(x.dtype)
    return h, layer_norm_ref(h, weight, bias, eps, out_dtype)


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """LayerNorm of ``x [..., N]`` over N: Triton on CUDA (rows up to ``MAX_ROW``), the reference otherwise."""
    if utils.use_triton(x) and x.shape[-1] <= MAX_ROW:
        return layer_norm_triton(x, weight, bias, eps, out_dtype)
    return layer_norm_ref(x, weight, bias, eps, out_dtype)


def add_layer_norm(
    x: torch.Tensor,
    delta: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float = 1e-5,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add + LayerNorm: returns ``(h, y)`` with ``h = x + delta`` in x's dtype and ``y = LayerNorm(h)``
    in ``out_dtype`` (default x's), both ``[..., N]``. Triton on CUDA (rows up to ``MAX_ROW``), the reference
    otherwise."""
    if utils.use_triton(x) and x.shape[-1] <= MAX_ROW:
        return add_layer_norm_triton(x, delta, weight, bias, eps, out_dtype)
    return add_layer_norm_ref(x, delta, weight, bias, eps, out_dtype)
