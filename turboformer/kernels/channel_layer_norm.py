"""LayerNorm over the channels of an NCHW map, optionally followed by exact GELU (SAM's LayerNorm2d).

For ``x [B, C, H, W]``, per pixel ``(b, h, w)`` (ConvNeXt's "channels first" LayerNorm, Liu et al. 2022,
arXiv 2201.03545; SAM's ``LayerNorm2d``)::

    x = x + shift[c]   (optional: a preceding convolution's bias, added in fp32 here instead of in its own pass)
    u = mean_c x[b, c, h, w]                   s = mean_c (x[b, c, h, w] - u)^2
    y[b, c, h, w] = weight[c] * (x[b, c, h, w] - u) / sqrt(s + eps) + bias[c]
    out = gelu(y) if gelu else y               gelu(z) = z * (1 + erf(z / sqrt(2))) / 2

Statistics and the affine map (and the GELU) run in fp32 and the result is rounded once to x's dtype.

Why a kernel: SAM's mask decoder normalises a ``[B, 64, 128, 128]`` map (268 MB in fp16 at 64 prompts) and
then applies GELU. Written with PyTorch ops (upcast, mean, sub, pow, mean, add, sqrt, div, mul, add, cast,
GELU) that is about a dozen full passes over the map in fp32 (~3.5 ms on an H200); here it is one read and
one write (~0.15 ms at the H200's ~4 TB/s).

Kernel layout: programs over (tiles of ``BLOCK_P`` pixels, batch). Each loads a ``[BLOCK_C, BLOCK_P]`` tile
and reduces over the channels (axis 0) in registers. The map may be NCHW (pixels contiguous along a tile row)
or channels-last (channels contiguous along a tile column, what a transposed convolution of the decoder's
token-major image gives): any layout whose pixels are ``stride_p`` apart in row-major order (``stride_h ==
W * stride_w``). The output keeps the input's layout.
"""

from __future__ import annotations

import torch

from turboformer.kernels import utils
from turboformer.kernels.utils import KernelInputError, tl, triton

MAX_CHANNELS = 256  # a [256, 32] fp32 tile = 64 registers per thread at 4 warps
_TILE = 8192  # elements per program (BLOCK_C * BLOCK_P): 64 per thread at 4 warps


@triton.jit
def _channel_layer_norm_kernel(
    x_ptr,  # [B, C, HW], strides (stride_xb, stride_xc, stride_xp)
    w_ptr,  # [C]
    b_ptr,  # [C]
    out_ptr,  # [B, C, HW] out, x's dtype and layout
    shift_ptr,  # [C], read when SHIFT
    C,
    HW,
    stride_xb, stride_xc, stride_xp,
    stride_ob, stride_oc, stride_op,
    eps,
    GELU: tl.constexpr,
    SHIFT: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)  # pixel indices in the image
    batch = tl.program_id(1).to(tl.int64)
    c = tl.arange(0, BLOCK_C)
    c_mask = c < C
    mask = c_mask[:, None] & (p < HW)[None, :]
    c64, p64 = c[:, None].to(tl.int64), p[None, :].to(tl.int64)
    x = tl.load(x_ptr + batch * stride_xb + c64 * stride_xc + p64 * stride_xp, mask=mask, other=0.0).to(tl.float32)
    if SHIFT:
        x += tl.load(shift_ptr + c, mask=c_mask, other=0.0).to(tl.float32)[:, None]
    # Two-pass statistics in registers (no E[x^2] - E[x]^2 cancellation); padded channels count as 0 in the
    # sums and are divided out by the true C.
    mean = tl.sum(x, axis=0) / C  # [BLOCK_P]
    centred = tl.where(c_mask[:, None], x - mean[None, :], 0.0)  # (padded channels: x = 0, shift = 0)
    var = tl.sum(centred * centred, axis=0) / C  # biased, as upstream
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(w_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    y = centred * rstd[None, :] * w[:, None] + b[:, None]
    if GELU:
        y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))  # exact GELU, 1/sqrt(2)
    tl.store(out_ptr + batch * stride_ob + c64 * stride_oc + p64 * stride_op, y.to(out_ptr.dtype.element_ty), mask=mask)


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, shift: torch.Tensor | None = None) -> None:
    utils.check_float("x", x)
    if x.dim() != 4:
        raise KernelInputError(f"x must be a [B, C, H, W] map, got shape {list(x.shape)}")
    if x.shape[1] == 0:
        raise KernelInputError("x must have at least one channel")
    utils.check_vector("weight", weight, x.shape[1])
    utils.check_vector("bias", bias, x.shape[1])
    if shift is not None:
        utils.check_vector("shift", shift, x.shape[1])


def channel_layer_norm_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    gelu: bool = False,
    shift: torch.Tensor | None = None,
    *,
    block_p: int | None = None,
) -> torch.Tensor:
    """:func:`channel_layer_norm` with the Triton kernel (up to ``MAX_CHANNELS`` channels). NCHW and
    channels-last maps are read in place and the output has x's layout; any other ``x`` is copied to NCHW
    first. ``block_p`` (pixels per program, a power of two) overrides the default (``8192 / BLOCK_C``, at
    least 32: 128 pixels = 256 contiguous bytes per fp16 channel row at C = 64), for tests and tuning."""
    _check(x, weight, bias, shift)
    utils.check_launchable(*(t for t in (x, weight, bias, shift) if t is not None))
    batch, channels, height, width = x.shape
    if channels > MAX_CHANNELS:
        raise KernelInputError(f"{channels} channels exceed the kernel's {MAX_CHANNELS}; use channel_layer_norm_ref")
    if block_p is not None and (block_p < 1 or block_p & (block_p - 1)):
        raise KernelInputError(f"block_p must be a power of two, got {block_p}")
    x, channels_last = utils.dense_map(x)
    if channels_last:
        out = utils.empty((batch, height, width, channels), x.dtype, x.device).permute(0, 3, 1, 2)
    else:
        out = utils.empty(tuple(x.shape), x.dtype, x.device)
    hw = height * width
    if batch > 0 and hw > 0:
        block_c = utils.next_power_of_2(channels)
        block_p = block_p or min(max(_TILE // block_c, 32), utils.next_power_of_2(hw))
        grid = (utils.cdiv(hw, block_p), batch)
        _channel_layer_norm_kernel[grid](
            x, weight, bias, out, bias if shift is None else shift, channels, hw,
            *utils.map_strides(x), *utils.map_strides(out), float(eps),
            GELU=gelu, SHIFT=shift is not None, BLOCK_C=block_c, BLOCK_P=block_p, num_warps=4,
        )  # fmt: skip
    return out


def channel_layer_norm_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    gelu: bool = False,
    shift: torch.Tensor | None = None,
) -> torch.Tensor:
    """PyTorch reference: upstream SAM's ``LayerNorm2d`` formula in fp32 (then exact GELU in fp32), rounded
    once to x's dtype. For fp32 without GELU it is exactly upstream's sequence of operations."""
    _check(x, weight, bias, shift)
    xf = x.float() if shift is None else x.float() + shift.float()[:, None, None]
    mean = xf.mean(1, keepdim=True)  # [B, 1, H, W]
    var = (xf - mean).pow(2).mean(1, keepdim=True)
    y = (xf - mean) / torch.sqrt(var + eps)
    y = weight.float()[:, None, None] * y + bias.float()[:, None, None]
    if gelu:
        y = torch.nn.functional.gelu(y)
    return y.to(x.dtype)


def channel_layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float = 1e-6,
    gelu: bool = False,
    shift: torch.Tensor | None = None,
) -> torch.Tensor:
    """LayerNorm over the channels of ``x + shift`` (``x [B, C, H, W]``; ``weight, bias`` and the optional
    ``shift``: ``[C]``), then exact GELU if ``gelu``;
    fp32 statistics, result in x's dtype, shape and layout (NCHW or channels-last). Triton on CUDA (up to
    ``MAX_CHANNELS`` channels), the reference otherwise."""
    if utils.use_triton(x) and x.dim() == 4 and x.shape[1] <= MAX_CHANNELS:
        return channel_layer_norm_triton(x, weight, bias, eps, gelu, shift)
    return channel_layer_norm_ref(x, weight, bias, eps, gelu, shift)
