"""The linear layer of a decode step (a few rows), with its neighbours fused: LayerNorm before, bias, GELU,
residual add or the KV-cache write after.

``y = epilogue(prologue(x) @ W^T + bias)`` for ``x [M, K]`` with M small (one token per sequence, M <= 8):

    prologue  LN:        h = LayerNorm(x) over K, fp32 statistics, rounded to the activation dtype (x may be
                         the fp32 residual stream); otherwise h = x in the activation dtype
    epilogue  GELU:      y = gelu(y) (exact erf GELU, Hendrycks & Gimpel arXiv 1606.08415), stored
              residual:  residual += y in place (fp32 add; nothing else is stored)
              kv_cache:  y = [q | k | v] (N = 3 C): q stored as the output [M, C]; k and v written to the caches
                         k_cache[m, head, pos[m], :] (the ``kv_cache_write`` op, fused)
              (none)     y stored in ``out_dtype``

Why: at batch 1 a Whisper large-v3 decode step streams 1.6 GB of weights through ~190 matrix products of 3 to 13
MB each. cuBLAS's M = 1 tiles stream 3.3 MB matrices at ~0.65 TB/s (5.1 us each, profiled on an H200) and the
LayerNorms, bias + GELU, residual adds and cache writes around them are another ~8 launches per layer of 1-2 us
each. Here each product is one launch that streams its weight, and the small ops ride along in registers.

Kernel layout: a GEMV without tensor cores, one program per ``BLOCK_N`` output features. A program loads its
weight rows whole, ``[BLOCK_N, K]`` (K rounded up to a power of two, at most ``MAX_FEATURES``; 16-byte vector
loads along K), in one go: it waits for one memory round trip, not one per K step (a looped version streamed
only ~1.2 TB/s on an H200). Then, for each of the M rows against that register tile: the activation row
(normalised in fp32 when LN, from L2), the products in fp32, one reduction over K, the epilogue. The weight is
read once for all rows, but the rows are serial passes: on an H200 4 rows of large-v3 take 2.4x one row's time and
lose to cuBLAS, so the Whisper engine uses this op for one-row steps. No split-K: each output belongs to one
program, so the epilogue can add into the residual in place and the result is deterministic.

On Hopper the kernel is launched with programmatic dependent launch (PDL): it starts while the previous kernel
is still running, issues its weight loads (the weights never depend on earlier kernels), and only then waits
(``griddepcontrol.wait``) for the previous kernel's writes before it reads x. A chain of decode-step GEMVs so
overlaps each kernel's launch and first memory round trip with its predecessor's tail. Every kernel in the
step either waits this way or is launched normally, so the stream order stays intact.

Weight-only INT8 weights (``scale`` given, as made by ``int8_linear.quantize_weight``) are dequantised in
registers: group-wise scales per tile, per-channel scales once per output.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from turboformer.kernels import utils
from turboformer.kernels.int8_linear import dequantize_tile, dequantize_weight, group_size
from turboformer.kernels.kv_cache_write import kv_cache_write_ref
from turboformer.kernels.layer_norm import layer_norm_ref
from turboformer.kernels.utils import KernelInputError, tl, triton

MAX_ROWS = 8  # rows per launch; the engines take their batched (cuBLAS) path above this
MAX_FEATURES = 8192  # K: a program holds whole weight rows (and the activation row) in registers
_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _decode_linear_kernel(
    x_ptr,  # [M, K] activations (any float; fp32 residual stream when LN)
    w_ptr,  # [N, K] weight, unit stride along K (fp16/bf16/fp32, or int8 with scale_ptr)
    scale_ptr,  # int8 scales: [N] per channel or [N, K / GROUP]
    bias_ptr,  # [N]
    ln_w_ptr, ln_b_ptr,  # [K] LayerNorm gain and bias
    out_ptr,  # [M, N] output, or [M, N] residual updated in place (RESIDUAL), or [M, q_cols] q (KV)
    k_cache_ptr, v_cache_ptr,  # [M, H, T, D] caches, unit stride along D (KV)
    pos_ptr,  # [M] cache column of each row (KV)
    M, N, K,
    q_cols,  # KV: features of q (= of k = of v)
    stride_xm, stride_wn, stride_sn, stride_om,
    stride_cb, stride_ch, stride_ct,
    eps,
    HAS_BIAS: tl.constexpr, LN: tl.constexpr, GELU: tl.constexpr, RESIDUAL: tl.constexpr, KV: tl.constexpr,
    INT8: tl.constexpr, GROUP: tl.constexpr, PACKED: tl.constexpr,
    HEAD_DIM: tl.constexpr, ACT_DTYPE: tl.constexpr, PDL: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    k = tl.arange(0, BLOCK_K)  # the whole row: BLOCK_K = K rounded up to a power of two
    k_mask = k < K
    # The weight does not depend on the previous kernel: load all of it now, one round trip for the program.
    w = tl.load(w_ptr + rn.to(tl.int64)[:, None] * stride_wn + k[None, :], mask=n_mask[:, None] & k_mask[None, :],
                other=0)  # [BLOCK_N, BLOCK_K]  # fmt: skip
    if INT8 and GROUP > 0:
        w = dequantize_tile(w, scale_ptr, rn, n_mask, 0, k, k_mask, K, stride_sn, GROUP, BLOCK_N, BLOCK_K, PACKED)
    channel_scale = tl.load(scale_ptr + rn, mask=n_mask, other=0.0) if INT8 and GROUP == 0 else 1.0
    bias = tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32) if HAS_BIAS else 0.0
    if LN:
        gain = tl.load(ln_w_ptr + k, mask=k_mask, other=0.0).to(tl.float32)
        shift = tl.load(ln_b_ptr + k, mask=k_mask, other=0.0).to(tl.float32)
    if PDL:  # launched early (programmatic dependent launch): wait until the previous kernel's writes are visible,
        # then let the next kernel launch and start its own weight loads while this one finishes
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()

    for row in range(M):  # every row against the weight tile held in registers
        h = tl.load(x_ptr + row * stride_xm + k, mask=k_mask, other=0.0).to(tl.float32)  # [BLOCK_K]
        if LN:  # fp32 statistics: mean, then the centred variance (no E[x^2] - E[x]^2 cancellation)
            mean = tl.sum(h, axis=0) / K
            centred = tl.where(k_mask, h - mean, 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / K + eps)
            h = centred * rstd * gain + shift
        # the activations are rounded where the unfused layer would store them (fp16/bf16); products in fp32
        h = h.to(ACT_DTYPE).to(tl.float32)
        y = tl.sum(w.to(tl.float32) * h[None, :], axis=1) * channel_scale + bias  # [BLOCK_N]
        if GELU:
            y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))  # 1/sqrt(2)
        if RESIDUAL:
            at = out_ptr + row * stride_om + rn
            total = tl.load(at, mask=n_mask, other=0.0).to(tl.float32) + y
            tl.store(at, total.to(out_ptr.dtype.element_ty), mask=n_mask)
        elif KV:
            part = rn // q_cols  # 0: q, 1: k, 2: v
            col = rn - part * q_cols
            tl.store(out_ptr + row * stride_om + col, y.to(out_ptr.dtype.element_ty), mask=n_mask & (part == 0))
            pos = tl.load(pos_ptr + row).to(tl.int64)
            cache = row * stride_cb + pos * stride_ct + (col // HEAD_DIM) * stride_ch + col % HEAD_DIM
            tl.store(k_cache_ptr + cache, y.to(k_cache_ptr.dtype.element_ty), mask=n_mask & (part == 1))
            tl.store(v_cache_ptr + cache, y.to(v_cache_ptr.dtype.element_ty), mask=n_mask & (part == 2))
        else:
            tl.store(out_ptr + row * stride_om + rn, y.to(out_ptr.dtype.element_ty), mask=n_mask)


class KVCache(NamedTuple):
    """Where the kv_cache epilogue writes: ``k[m, :, pos[m], :]`` and ``v[...]`` of ``[M, H, T, D]`` caches."""

    k: torch.Tensor
    v: torch.Tensor
    pos: torch.Tensor  # [M] int32/int64


class Tile(NamedTuple):
    """Launch shape: output features per program and warps (each program reads its weight rows whole)."""

    block_n: int
    num_warps: int


def _plan(n: int, k: int, int8: bool = False) -> Tile:
    """From the shapes alone (capturable). Tuned on an H200 at Whisper shapes (K 384..5120, N 384..51866) with
    ``benchmarks/kernels/bench_decode_linear.py --sweep``."""
    if k > 2048:  # fc2 [1280, 5120]: 2 x 8192 padded features on 8 warps
        return Tile(2, 8)
    if int8:  # the group-dequantised tile is fp32: 4 features keep it at 64 registers a thread (untuned)
        return Tile(4, 4)
    return Tile(8 if n >= 2048 else 4, 4)  # qkv, fc1, vocabulary: 8 output features a program; 1280 wide: 4


def _check(x, weight, scale, bias, ln, residual, kv_cache, act_dtype) -> tuple[int, int, int]:
    utils.check_float("x", x)
    if x.dim() != 2:
        raise KernelInputError(f"x must be [M, K], got {list(x.shape)}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[1] or weight.stride(1) != 1:
        raise KernelInputError(f"weight must be [N, K={x.shape[1]}] with unit stride along K, got {list(weight.shape)}")
    m, (n, k) = x.shape[0], weight.shape
    if weight.dtype == torch.int8:
        if scale is None or scale.dtype != torch.float32 or scale.shape[0] != n or scale.dim() not in (1, 2):
            raise KernelInputError(f"an int8 weight needs float32 scales [{n}] or [{n}, K / group]")
        if act_dtype is None:
            raise KernelInputError("an int8 weight needs act_dtype (the dtype the activations are rounded to)")
    else:
        utils.check_float("weight", weight)
        if scale is not None:
            raise KernelInputError("scale is for int8 weights only")
    if bias is not None:
        utils.check_vector("bias", bias, n)
    if ln is not None:
        utils.check_vector("LayerNorm weight", ln[0], k)
        utils.check_vector("LayerNorm bias", ln[1], k)
    if residual is not None and kv_cache is not None:
        raise KernelInputError("residual and kv_cache are two different epilogues: give one")
    if residual is not None:
        utils.check_float("residual", residual)
        if residual.shape != (m, n) or residual.stride(1) != 1:
            raise KernelInputError(f"residual must be [{m}, {n}] with unit stride along N, got {list(residual.shape)}")
    if kv_cache is not None:
        kc, vc, pos = kv_cache
        if n % 3:
            raise KernelInputError(f"the kv_cache epilogue needs N = 3 C ([q | k | v]), got N = {n}")
        if kc.dim() != 4 or kc.shape[0] != m or kc.shape[1] * kc.shape[3] != n // 3 or vc.shape != kc.shape:
            raise KernelInputError(f"caches must be [{m}, H, T, D] with H * D = {n // 3}, got {list(kc.shape)}")
        if kc.stride() != vc.stride() or kc.stride(3) != 1:
            raise KernelInputError("the k and v caches must share strides, with unit stride along D")
        if pos.shape != (m,) or pos.dtype not in (torch.int32, torch.int64):
            raise KernelInputError(f"pos must be int32/int64 of shape [{m}], got {list(pos.shape)} {pos.dtype}")
    return m, n, k


def _act_dtype(x: torch.Tensor, weight: torch.Tensor, act_dtype: torch.dtype | None) -> torch.dtype:
    if act_dtype is not None:
        return act_dtype
    return weight.dtype if weight.dtype != torch.int8 else x.dtype


def decode_linear_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    scale: torch.Tensor | None = None,
    ln: tuple[torch.Tensor, torch.Tensor] | None = None,
    eps: float = 1e-5,
    gelu: bool = False,
    residual: torch.Tensor | None = None,
    kv_cache: KVCache | None = None,
    act_dtype: torch.dtype | None = None,
    out_dtype: torch.dtype | None = None,
    tile: Tile | None = None,
) -> torch.Tensor:
    """With the Triton kernel; see :func:`decode_linear`. ``tile`` overrides the launch shape (tuning sweeps)."""
    m, n, k = _check(x, weight, scale, bias, ln, residual, kv_cache, act_dtype)
    if m > MAX_ROWS or k > MAX_FEATURES:
        raise KernelInputError(
            f"decode_linear_triton takes at most {MAX_ROWS} rows of {MAX_FEATURES} features, got [{m}, {k}]; "
            "use decode_linear, which falls back to the reference"
        )
    act = _act_dtype(x, weight, act_dtype)
    tensors = [t for t in (x, weight, scale, bias, residual, *(ln or ()), *(kv_cache or ())) if t is not None]
    utils.check_launchable(*tensors)
    x = x if x.stride(1) == 1 else x.contiguous()
    if residual is not None:
        out = residual
    else:
        out = utils.empty((m, n // 3 if kv_cache is not None else n), out_dtype or act, x.device)
    if m == 0 or n == 0:
        return out
    int8 = weight.dtype == torch.int8
    plan = tile or _plan(n, k, int8)
    block_k = utils.next_power_of_2(k)
    group = group_size(weight, scale) if int8 else 0
    packed = bool(group) and group & (group - 1) == 0 and block_k % group == 0
    kc, vc, pos = kv_cache if kv_cache is not None else (out, out, out)
    head_dim = kc.shape[3] if kv_cache is not None else 1
    pdl = utils.pdl_supported(x.device)
    dummy = weight  # an unread pointer for absent operands
    grid = (utils.cdiv(n, plan.block_n),)
    _decode_linear_kernel[grid](
        x, weight, scale if int8 else dummy, bias if bias is not None else dummy,
        ln[0] if ln is not None else dummy, ln[1] if ln is not None else dummy,
        out, kc, vc, pos,
        m, n, k, n // 3,
        x.stride(0), weight.stride(0), scale.stride(0) if int8 else 0, out.stride(0),
        *(kc.stride()[:3] if kv_cache is not None else (0, 0, 0)),
        float(eps),
        HAS_BIAS=bias is not None, LN=ln is not None, GELU=gelu, RESIDUAL=residual is not None,
        KV=kv_cache is not None, INT8=int8, GROUP=group, PACKED=packed, HEAD_DIM=head_dim, ACT_DTYPE=_TL_DTYPES[act],
        PDL=pdl, BLOCK_N=plan.block_n, BLOCK_K=block_k, num_warps=plan.num_warps,
        **({"launch_pdl": True} if pdl else {}),
    )  # fmt: skip
    return out


def decode_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    scale: torch.Tensor | None = None,
    ln: tuple[torch.Tensor, torch.Tensor] | None = None,
    eps: float = 1e-5,
    gelu: bool = False,
    residual: torch.Tensor | None = None,
    kv_cache: KVCache | None = None,
    act_dtype: torch.dtype | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """PyTorch reference (any number of rows): the unfused ops, fp32 math, the same rounding points."""
    m, n, k = _check(x, weight, scale, bias, ln, residual, kv_cache, act_dtype)
    act = _act_dtype(x, weight, act_dtype)
    if ln is not None:
        h = layer_norm_ref(x, *ln, eps, out_dtype=act)
    else:
        h = x.to(act)
    w = dequantize_weight(weight, scale) if weight.dtype == torch.int8 else weight.float()
    y = h.float() @ w.t()  # [M, N] fp32
    if bias is not None:
        y = y + bias.float()
    if gelu:
        y = F.gelu(y)
    if residual is not None:
        residual.copy_(residual.float() + y)
        return residual
    if kv_cache is not None:
        kc, vc, pos = kv_cache
        y, key, value = y.split(n // 3, dim=1)  # [q | k | v]
        heads = (m, kc.shape[1], kc.shape[3])
        kv_cache_write_ref(key.reshape(heads), value.reshape(heads), kc, vc, pos)
    return y.to(out_dtype or act)


def decode_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    scale: torch.Tensor | None = None,
    ln: tuple[torch.Tensor, torch.Tensor] | None = None,
    eps: float = 1e-5,
    gelu: bool = False,
    residual: torch.Tensor | None = None,
    kv_cache: KVCache | None = None,
    act_dtype: torch.dtype | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``epilogue(prologue(x) @ W^T + bias)`` for a decode step's few rows (see the module docstring).

    Args:
        x: ``[M, K]``; the fp32 residual stream when ``ln`` is given, else activations.
        weight: ``[N, K]`` fp16/bf16/fp32, or int8 with ``scale`` (``[N]`` or ``[N, K / group]`` fp32).
        bias: ``[N]`` or None.
        ln: ``(gain, bias)`` ``[K]`` of a LayerNorm applied to x first (fp32 statistics, ``eps``).
        gelu: exact GELU after the bias.
        residual: ``[M, N]``: add the result into it in place and return it (nothing else is written).
        kv_cache: ``KVCache(k, v, pos)``: the result is ``[q | k | v]``; k and v go to column ``pos[m]`` of the
            ``[M, H, T, D]`` caches and q ``[M, N / 3]`` is returned.
        act_dtype: the dtype the (normalised) activations are rounded to before the product, as the unfused
            layer stores them; default the weight's (x's for int8 weights).
        out_dtype: the returned tensor's dtype (default ``act_dtype``); e.g. fp32 logits.

    Triton on CUDA for up to ``MAX_ROWS`` rows; the PyTorch reference otherwise.
    """
    kwargs = dict(scale=scale, ln=ln, eps=eps, gelu=gelu, residual=residual, kv_cache=kv_cache, act_dtype=act_dtype,
                  out_dtype=out_dtype)  # fmt: skip
    if utils.use_triton(x) and x.shape[0] <= MAX_ROWS and x.shape[1] <= MAX_FEATURES:
        return decode_linear_triton(x, weight, bias, **kwargs)
    return decode_linear_ref(x, weight, bias, **kwargs)
