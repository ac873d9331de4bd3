"""Weight-only INT8 linear layer: ``y = x @ (w_int8 * scale[:, None])^T + bias`` with fp32 accumulation.

Weights are quantised once at engine build, symmetric per output channel (``scale[n] = max_k |w[n, k]| /
127``, round to nearest, clamp to [-127, 127]) or per group of G consecutive inputs (``scale [N, K / G]``,
``GROUP`` below: the tile is dequantised in registers before the dot, and the epilogue skips the scale);
activations stay in the model dtype. At decode (M = 1..64
tokens) a linear layer is a GEMV-like stream over its weight: int8 halves the bytes of fp16, and the
dequantisation is free in registers. ``(x @ w_int8^T)[m, n] * scale[n]`` equals ``x @ (w_int8 *
scale)^T``, so the kernel multiplies int8 (converted exactly to the activation dtype) on the tensor cores
and applies the per-channel scale once per output, in the epilogue.

Kernel layout: ``[BLOCK_M, BLOCK_N]`` output tiles over a ``(N tiles, M tiles, split_k)`` grid. For small M
the output has few tiles (e.g. 1280 / 32 = 40 at d_model 1280), far fewer than the 132 multiprocessors,
so the K axis is split over programs (split-K) until about two waves of programs stream the weight; each
split writes an fp32 partial, and a small kernel sums the partials in fixed order (deterministic), scales,
adds the bias and casts. For large M (the encoder, M = 1500 per window) tiles alone fill the GPU.
At M <= 2 (batch-1/2 decode) a GEMV kernel without tensor cores is faster still: one x row per program,
[16, 512] int8 weight tiles multiplied and accumulated elementwise in fp32, reduced once at the end.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from turboformer.kernels import utils
from turboformer.kernels.utils import KernelInputError, tl, triton

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
_MAX_SPLIT_K = 16
GEMV_MAX_M = 2  # up to this many rows, the GEMV kernel beats the tensor-core tile (H200: 5.9 vs 8.4 us at fc1)


@triton.jit
def dequantize_tile(w, scale_ptr, rn, n_mask, k0, rk, k_mask, K, stride_sn,
                     GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PACKED: tl.constexpr):
    """A [BLOCK_N, BLOCK_K] int8 tile (columns k0 + rk) times its group scales, in fp32.

    PACKED (GROUP a power of two dividing BLOCK_K; tiles start on multiples of BLOCK_K): one scale per group is
    loaded, [BLOCK_N, BLOCK_K / GROUP], and broadcast over its GROUP columns in registers. Otherwise the scale is
    gathered per element, [BLOCK_N, BLOCK_K] fp32 (always correct; 4 bytes of scale traffic per weight byte).
    """
    if PACKED:
        rg = k0 // GROUP + tl.arange(0, BLOCK_K // GROUP)  # [BLOCK_K / GROUP] groups of this tile
        s = tl.load(scale_ptr + rn.to(tl.int64)[:, None] * stride_sn + rg[None, :],
                    mask=n_mask[:, None] & (rg * GROUP < K)[None, :], other=0.0)  # [BLOCK_N, BLOCK_K / GROUP]
        w3 = tl.reshape(w.to(tl.float32), (BLOCK_N, BLOCK_K // GROUP, GROUP)) * s[:, :, None]
        return tl.reshape(w3, (BLOCK_N, BLOCK_K))
    else:
        s = tl.load(scale_ptr + rn.to(tl.int64)[:, None] * stride_sn + ((k0 + rk) // GROUP)[None, :],
                    mask=n_mask[:, None] & k_mask[None, :], other=0.0)  # [BLOCK_N, BLOCK_K]
        return w.to(tl.float32) * s


@triton.jit
def _int8_linear_kernel(
    x_ptr,  # [M, K] activations
    w_ptr,  # [N, K] int8 weight
    scale_ptr,  # [N] fp32 per-output-channel scale
    bias_ptr,  # [N] (read only when HAS_BIAS)
    y_ptr,  # [M, N] out, contiguous (written only when not SPLIT)
    partial_ptr,  # [split_k, M, N] fp32 out (written only when SPLIT)
    M,
    N,
    K,
    k_per_split,  # a multiple of BLOCK_K
    stride_xm, stride_xk,
    stride_wn, stride_wk,
    stride_sn,  # scale row stride (group-wise scales [N, K / GROUP])
    HAS_BIAS: tl.constexpr,
    SPLIT: tl.constexpr,  # split-K: write fp32 partials for the epilogue kernel
    GROUP: tl.constexpr,  # 0: per-channel scales [N], applied in the epilogue; G: [N, K / G], applied per tile
    PACKED: tl.constexpr,  # group scales loaded once per group (see dequantize_tile)
    DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_mask = rm < M
    n_mask = rn < N
    # Each weight row is contiguous along K: a [BLOCK_N, BLOCK_K] int8 tile is BLOCK_N runs of BLOCK_K
    # bytes, loaded as 16-byte vectors.
    x_ptrs = x_ptr + rm.to(tl.int64)[:, None] * stride_xm + rk[None, :] * stride_xk  # [BLOCK_M, BLOCK_K]
    w_ptrs = w_ptr + rn.to(tl.int64)[:, None] * stride_wn + rk[None, :] * stride_wk  # [BLOCK_N, BLOCK_K]

    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        k_mask = (k0 + rk) < k_end
        x = tl.load(x_ptrs + k0 * stride_xk, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs + k0 * stride_wk, mask=n_mask[:, None] & k_mask[None, :], other=0)
        if GROUP > 0:  # group-wise: dequantise the tile (fp32 product, rounded once to the dot dtype)
            w = dequantize_tile(w, scale_ptr, rn, n_mask, k0, rk, k_mask, K, stride_sn, GROUP, BLOCK_N, BLOCK_K, PACKED)
        # int8 -> fp16/bf16 is exact (|w| <= 127 < 2^8); products and sums in fp32 on the tensor cores.
        acc = tl.dot(x.to(DOT_DTYPE), tl.trans(w.to(DOT_DTYPE)), acc, input_precision="ieee")

    if not SPLIT:
        y = acc
        if GROUP == 0:
            y = y * tl.load(scale_ptr + rn, mask=n_mask, other=0.0)[None, :]
        if HAS_BIAS:
            y += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        out = rm.to(tl.int64)[:, None] * N + rn[None, :]
        tl.store(y_ptr + out, y.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])
    else:
        out = (pid_k * M + rm.to(tl.int64))[:, None] * N + rn[None, :]
        tl.store(partial_ptr + out, acc, mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _int8_gemv_kernel(
    x_ptr,  # [M, K] activations, M <= GEMV_MAX_M
    w_ptr,  # [N, K] int8 weight
    scale_ptr,  # [N] fp32
    bias_ptr,  # [N] (read only when HAS_BIAS)
    y_ptr,  # [M, N] out, contiguous (written only when not SPLIT)
    partial_ptr,  # [split_k, M, N] fp32 out (written only when SPLIT)
    M,
    N,
    K,
    k_per_split,  # a multiple of BLOCK_K
    stride_xm, stride_xk,
    stride_wn, stride_wk,
    stride_sn,
    HAS_BIAS: tl.constexpr,
    SPLIT: tl.constexpr,
    GROUP: tl.constexpr,  # as in _int8_linear_kernel
    PACKED: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    m = tl.program_id(1).to(tl.int64)  # one activation row per program: the weight tile is reread from L2
    pid_k = tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    n_mask = rn < N
    w_ptrs = w_ptr + rn.to(tl.int64)[:, None] * stride_wn + rk[None, :] * stride_wk  # [BLOCK_N, BLOCK_K]
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    # Elementwise products accumulate in a [BLOCK_N, BLOCK_K] fp32 tile: no reduction inside the loop.
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        k_mask = (k0 + rk) < k_end
        w = tl.load(w_ptrs + k0 * stride_wk, mask=n_mask[:, None] & k_mask[None, :], other=0)
        x = tl.load(x_ptr + m * stride_xm + (k0 + rk) * stride_xk, mask=k_mask, other=0.0)
        if GROUP > 0:
            w = dequantize_tile(w, scale_ptr, rn, n_mask, k0, rk, k_mask, K, stride_sn, GROUP, BLOCK_N, BLOCK_K, PACKED)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    y = tl.sum(acc, axis=1)  # [BLOCK_N]
    if SPLIT:
        tl.store(partial_ptr + (pid_k * M + m) * N + rn, y, mask=n_mask)
    else:
        if GROUP == 0:
            y = y * tl.load(scale_ptr + rn, mask=n_mask, other=0.0)
        if HAS_BIAS:
            y += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + m * N + rn, y.to(y_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _split_k_epilogue_kernel(
    partial_ptr,  # [split_k, M, N] fp32
    scale_ptr,  # [N] fp32
    bias_ptr,  # [N] (read only when HAS_BIAS)
    y_ptr,  # [M, N] out, contiguous
    M,
    N,
    split_k,
    HAS_BIAS: tl.constexpr,
    GROUP: tl.constexpr,  # > 0: the partials are already scaled (group-wise)
    BLOCK: tl.constexpr,
):
    # y = (sum of the split_k partials, in split order) * scale + bias: the partials sit in L2.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # flat index into [M, N]
    mask = offs < M * N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for split in range(split_k):
        acc += tl.load(partial_ptr + split * M * N + offs, mask=mask, other=0.0)
    n = offs % N
    y = acc
    if GROUP == 0:
        y = y * tl.load(scale_ptr + n, mask=mask, other=0.0)
    if HAS_BIAS:
        y += tl.load(bias_ptr + n, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def _check(x: torch.Tensor, w_int8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
    utils.check_float("x", x)
    if w_int8.dtype != torch.int8 or w_int8.dim() != 2:
        raise KernelInputError(f"w_int8 must be a 2-D int8 [N, K] tensor, got {w_int8.dtype} {list(w_int8.shape)}")
    n, k = w_int8.shape
    if k == 0:
        raise KernelInputError("w_int8 has no input features (K = 0)")
    if x.dim() == 0 or x.shape[-1] != k:
        raise KernelInputError(f"x must be [..., K={k}] to match w_int8 [N={n}, K={k}], got {list(x.shape)}")
    if scale.dtype != torch.float32 or not (
        scale.shape == (n,) or (scale.dim() == 2 and scale.shape[0] == n and 0 < scale.shape[1] and k % scale.shape[1] == 0)
    ):
        raise KernelInputError(
            f"scale must be float32 [{n}] (per channel) or [{n}, K / group] with K={k} divisible into the groups, "
            f"got {scale.dtype} {list(scale.shape)}"
        )
    if bias is not None:
        utils.check_vector("bias", bias, n)


class _Plan(NamedTuple):
    gemv: bool  # the GEMV kernel (M <= GEMV_MAX_M) instead of the tensor-core tile
    block_m: int
    block_n: int
    block_k: int
    split_k: int
    k_per_split: int
    num_warps: int
    num_stages: int


def _plan(m: int, n: int, k: int, device: torch.device) -> _Plan:
    """Kernel, tile sizes and split-K from the shapes (never from tensor values: a CUDA graph can capture it).

    Tuned on an H200 (132 SMs) at Whisper large-v3 shapes, graphed with the L2 cold. M <= 2: the GEMV
    kernel with [16, 512] weight tiles on 8 warps. M <= 64 (decode): narrow [BLOCK_M, 32] output tiles
    with [32, 128] int8 weight tiles give the most programs and loads in flight; the M tile is padded to
    the tensor cores' 16 rows, which costs nothing here; where even 32-wide tiles outnumber two waves (the
    vocabulary projection at M > 16), wider tiles reread the activations less often. M > 64 (prefill,
    encoder): a compute tile. Split-K then tops the grid up to about two waves.
    """
    waves = 2 * utils.multiprocessor_count(device)
    if m <= GEMV_MAX_M:
        gemv, block_m, block_n, block_k, num_warps, num_stages = True, 1, 16, 512, 8, 3
    elif m <= 64:
        gemv, block_m, block_k, num_warps, num_stages = False, max(16, utils.next_power_of_2(m)), 128, 4, 3
        wide = [bn for bn in (128, 64) if m > 16 and utils.cdiv(n, bn) >= waves]
        block_n = wide[0] if wide else 32
    else:
        gemv, block_m, block_n, block_k, num_warps, num_stages = False, 128, 128, 64, 8, 3
    k_blocks = utils.cdiv(k, block_k)
    tiles = utils.cdiv(m, block_m) * utils.cdiv(n, block_n)
    split_k = max(1, min(utils.cdiv(waves, tiles), k_blocks, _MAX_SPLIT_K))
    k_per_split = utils.cdiv(k_blocks, split_k) * block_k
    split_k = utils.cdiv(k, k_per_split)  # drop splits that would be empty
    return _Plan(gemv, block_m, block_n, block_k, split_k, k_per_split, num_warps, num_stages)


def int8_linear_triton(
    x: torch.Tensor, w_int8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Weight-only INT8 linear with the Triton kernels; see :func:`int8_linear`."""
    _check(x, w_int8, scale, bias)
    utils.check_launchable(*(t for t in (x, w_int8, scale, bias) if t is not None))
    x2 = x.reshape(-1, x.shape[-1])  # [M, K], any strides
    (m, k), n = x2.shape, w_int8.shape[0]
    y = utils.empty((m, n), x.dtype, x.device)
    if m == 0 or n == 0:
        return y.view(*x.shape[:-1], n)
    plan = _plan(m, n, k, x.device)
    group = group_size(w_int8, scale)
    packed = bool(group) and group & (group - 1) == 0 and plan.block_k % group == 0
    if group and not packed:  # a [BLOCK_N, BLOCK_K] fp32 scale tile is pipelined too: one stage fewer fits
        plan = plan._replace(num_stages=2)
    split_k = plan.split_k
    partial = utils.empty((split_k, m, n), torch.float32, x.device) if split_k > 1 else y
    bias_arg = bias if bias is not None else scale
    grid = (utils.cdiv(n, plan.block_n), utils.cdiv(m, plan.block_m), split_k)
    args = (x2, w_int8, scale, bias_arg, y, partial, m, n, k, plan.k_per_split, *x2.stride(), *w_int8.stride(),
            scale.stride(0))  # fmt: skip
    meta = dict(
        HAS_BIAS=bias is not None, SPLIT=split_k > 1, GROUP=group, BLOCK_N=plan.block_n, BLOCK_K=plan.block_k,
        PACKED=packed,
        num_warps=plan.num_warps, num_stages=plan.num_stages,
    )  # fmt: skip
    if plan.gemv:
        _int8_gemv_kernel[grid](*args, **meta)
    else:
        # The Triton interpreter (numpy) cannot multiply bf16; there, bf16 dots run on exact fp32 copies.
        dot_dtype = tl.float32 if utils.interpreting() and x.dtype == torch.bfloat16 else _TL_DTYPES[x.dtype]
        _int8_linear_kernel[grid](*args, DOT_DTYPE=dot_dtype, BLOCK_M=plan.block_m, **meta)
    if split_k > 1:
        block = 1024
        _split_k_epilogue_kernel[(utils.cdiv(m * n, block),)](
            partial, scale, bias_arg, y, m, n, split_k, HAS_BIAS=bias is not None, GROUP=group, BLOCK=block,
            num_warps=4,
        )
    return y.view(*x.shape[:-1], n)


def int8_linear_ref(
    x: torch.Tensor, w_int8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """PyTorch reference in fp32: dequantise the weight, ``x @ w^T + bias``, cast to x's dtype."""
    _check(x, w_int8, scale, bias)
    w = dequantize_weight(w_int8, scale)  # [N, K] fp32
    y = x.float() @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def int8_linear(
    x: torch.Tensor, w_int8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Weight-only INT8 linear layer.

    Args:
        x: ``[..., K]`` activations, fp32/fp16/bf16.
        w_int8: ``[N, K]`` int8 weight and ``scale``: ``[N]`` (per channel) or ``[N, K / G]`` (groups of G
            inputs) fp32, from :func:`quantize_weight` (``w ~= dequantize_weight(w_int8, scale)``).
        bias: ``[N]`` or None.

    Returns:
        ``[..., N]`` in x's dtype, accumulated in fp32. Triton on CUDA, the PyTorch reference otherwise.
    """
    if utils.use_triton(x):
        return int8_linear_triton(x, w_int8, scale, bias)
    return int8_linear_ref(x, w_int8, scale, bias)


def group_size(w_int8: torch.Tensor, scale: torch.Tensor) -> int:
    """Input features per scale: 0 for per-channel scales ``[N]``, ``K / groups`` for group-wise ``[N, groups]``."""
    return 0 if scale.dim() == 1 else w_int8.shape[1] // scale.shape[1]


def dequantize_weight(w_int8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``w_int8 * scale`` in fp32, per channel (``scale [N]``) or per group (``scale [N, K / G]``)."""
    n, k = w_int8.shape
    if scale.dim() == 1:
        return w_int8.float() * scale[:, None]
    return (w_int8.float().view(n, scale.shape[1], -1) * scale[:, :, None]).view(n, k)


def quantize_weight(w: torch.Tensor, group: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantisation of a linear weight ``w [N, K]``, per output channel or per group of inputs.

    Per channel (``group=None``, or a group that does not divide K): ``scale[n] = max_k |w[n, k]| / 127`` (1 for
    an all-zero row), ``w_int8 = clamp(round(w / scale), -127, 127)`` (round half to even), so that ``w ~= w_int8 *
    scale[:, None]``; returns ``(w_int8 [N, K] int8, scale [N] float32)``. Group-wise (``group=G`` dividing K,
    as in GPTQ/AWQ, Frantar et al. arXiv 2210.17323): one scale per G consecutive inputs of a row, ``scale [N,
    K / G]``; a row whose few large weights would crush the step of all the others under one scale keeps its
    resolution elsewhere. Runs once at engine build, in PyTorch.
    """
    utils.check_float("w", w)
    if w.dim() != 2 or w.shape[1] == 0:
        raise KernelInputError(f"w must be a 2-D [N, K] weight with K > 0, got {list(w.shape)}")
    if group is not None and group < 1:
        raise KernelInputError(f"group must be >= 1 (or None for per-channel scales), got {group}")
    n, k = w.shape
    grouped = group is not None and group < k and k % group == 0
    wf = w.float().view(n, k // group, group) if grouped else w.float().view(n, 1, k)
    amax = wf.abs().amax(dim=2)  # [N, groups]
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    w_int8 = torch.round(wf / scale[:, :, None]).clamp_(-127, 127).to(torch.int8).view(n, k)
    return w_int8, (scale if grouped else scale[:, 0].contiguous())
