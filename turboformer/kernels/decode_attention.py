"""Decode-time attention: one query token per sequence against a key/value cache (flash-decoding).

``out[b, h] = softmax(scale * q[b, h] . k[b, h, :L_b]^T) @ v[b, h, :L_b]`` with ``L_b = lengths[b]`` (all S
keys when ``lengths`` is None). In Whisper's decoder this is self-attention over the growing token cache
(S up to 448) and cross-attention over the encoder output (S = 1500 frames), one new token per step.

With one query row there is no matmul to feed the tensor cores: the op streams K and V once and is bound by
memory bandwidth. At batch 1 there are only ``H`` = 6..20 (batch, head) rows, far fewer than the 132
multiprocessors of an H100/H200, so the key axis is split over programs as in flash-decoding (Dao et al.
2023, "Flash-Decoding for long-context inference"): each program runs an online softmax (Milakov &
Gimelshein 2018, arXiv 1805.02867) over its slice of keys and writes its running max ``m``, sum ``l`` and
unnormalised output ``acc`` in fp32; a second kernel rescales and merges the splits. When the (batch, head)
rows alone make four waves of programs (batch 64 at 20 heads on 132 SMs), there is one split per row and the
first kernel writes the output itself.

Measured on an H200 (graphed, L2 cold; ``benchmarks/results/NVIDIA-H200/kernels_decode_attention.md``):
fp16 cross-attention at batch 64 streams 3.9 TB/s (126 us, on par with ``F.scaled_dot_product_attention``),
self-attention over 448 keys runs 1.3-1.9x faster than SDPA, and int8 cross-KV is 1.3x faster than SDPA
on the fp16 cache at batch 64.

INT8 cross-KV: the cross-attention cache is written once per 30 s window and read at every step, and from
batch ~8 up it is the largest stream of a decode step. :func:`quantize_kv` stores it as int8 with one fp32
scale per (batch, head, channel), symmetric over the S frames: ``k ~= k_int8 * k_scale``. The kernel never
materialises dequantised keys: ``q . (k_int8 * k_scale) = (q * k_scale) . k_int8``, so the key scale is
folded into the query once, and ``sum_s p_s v_int8[s] * v_scale = v_scale * sum_s p_s v_int8[s]``, so the
value scale is applied once to each split's accumulator. Only int8 -> fp32 converts remain in registers.
"""

from __future__ import annotations

import math

import torch

from turboformer.kernels import utils
from turboformer.kernels.utils import KernelInputError, tl, triton

LOG2E = 1.4426950408889634  # softmax in base 2: exp(x) = exp2(x * log2(e)), one MUFU.EX2 per element
MAX_HEAD_DIM = 256
MAX_SPLITS = 64


@triton.jit
def _split_kernel(
    q_ptr,  # [B, H, D]
    k_ptr,  # [B, H, S, D] fp16/bf16/fp32, or int8 when INT8
    v_ptr,  # [B, H, S, D]
    k_scale_ptr,  # [B, H, 1, D] fp32 (read only when INT8)
    v_scale_ptr,  # [B, H, 1, D] fp32 (read only when INT8)
    lengths_ptr,  # [B] int (read only when HAS_LENGTHS)
    m_ptr,  # [B * H, num_splits] fp32 out: running max of the scaled logits, base-2 units
    l_ptr,  # [B * H, num_splits] fp32 out: softmax denominator relative to m
    acc_ptr,  # [B * H, num_splits, D] fp32 out: unnormalised output relative to m
    out_ptr,  # [B, H, D] out (written only when WRITE_OUT)
    H,
    S,
    D,
    num_splits,
    split_size,  # keys per split, a multiple of BLOCK_S
    qk_scale,  # softmax scale * log2(e)
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ksb, stride_ksh, stride_ksd,
    stride_vsb, stride_vsh, stride_vsd,
    stride_ob, stride_oh, stride_od,
    WRITE_OUT: tl.constexpr,  # one split: normalise and write `out`, no workspace
    HAS_LENGTHS: tl.constexpr,
    INT8: tl.constexpr,
    PDL: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    if PDL:  # launched early (programmatic dependent launch): wait for the previous kernel's writes (q, the new
        # key), then let the next kernel launch and start its own loads while this one streams K and V
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < D

    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + d * stride_qd, mask=d_mask, other=0.0).to(tl.float32)
    if INT8:
        k_scale = tl.load(k_scale_ptr + b * stride_ksb + h * stride_ksh + d * stride_ksd, mask=d_mask, other=0.0)
        q = q * k_scale
    q = q * qk_scale  # [BLOCK_D]

    if HAS_LENGTHS:
        length = tl.minimum(tl.load(lengths_ptr + b).to(tl.int32), S)  # clamp: never read past the view
    else:
        length = S
    start = split * split_size
    end = tl.minimum(start + split_size, length)

    k_row = k_ptr + b * stride_kb + h * stride_kh + d[None, :] * stride_kd
    v_row = v_ptr + b * stride_vb + h * stride_vh + d[None, :] * stride_vd
    # Online softmax kept per key slot (s mod BLOCK_S), not per program: every slot j carries its own running
    # max m_j, sum l_j and output row acc_j, so the loop body has no reduction across the key axis (no
    # cross-warp shared-memory round trip per block); only q . k reduces, along D, inside a warp. The slots
    # are merged once after the loop, with the same rescaling as the splits in _merge_kernel.
    m_j = tl.full([BLOCK_S], -float("inf"), dtype=tl.float32)
    l_j = tl.zeros([BLOCK_S], dtype=tl.float32)
    acc_j = tl.zeros([BLOCK_S, BLOCK_D], dtype=tl.float32)
    for s0 in range(start, end, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        s_mask = s < end
        tile_mask = s_mask[:, None] & d_mask[None, :]
        s = s.to(tl.int64)
        k = tl.load(k_row + s[:, None] * stride_ks, mask=tile_mask, other=0.0).to(tl.float32)  # [BLOCK_S, BLOCK_D]
        v = tl.load(v_row + s[:, None] * stride_vs, mask=tile_mask, other=0.0).to(tl.float32)
        qk = tl.where(s_mask, tl.sum(q[None, :] * k, axis=1), -float("inf"))  # [BLOCK_S], base-2 logits
        m_new = tl.maximum(m_j, qk)
        m_ref = tl.where(m_new == -float("inf"), 0.0, m_new)  # a slot with no key yet: keep 2^(-inf) = 0
        alpha = tl.exp2(m_j - m_ref)
        p = tl.exp2(qk - m_ref)
        l_j = l_j * alpha + p
        acc_j = acc_j * alpha[:, None] + p[:, None] * v
        m_j = m_new
    # Merge the slots. A split past the sequence's length ran no iteration: it stores (-inf, 0, 0).
    m_i = tl.max(m_j, axis=0)
    w = tl.exp2(m_j - tl.where(m_i == -float("inf"), 0.0, m_i))  # [BLOCK_S]
    l_i = tl.sum(w * l_j, axis=0)
    acc = tl.sum(w[:, None] * acc_j, axis=0)  # [BLOCK_D]
    if INT8:
        acc = acc * tl.load(v_scale_ptr + b * stride_vsb + h * stride_vsh + d * stride_vsd, mask=d_mask, other=0.0)

    if WRITE_OUT:
        out = acc / l_i
        tl.store(out_ptr + b * stride_ob + h * stride_oh + d * stride_od, out.to(out_ptr.dtype.element_ty), mask=d_mask)
    else:
        slot = bh * num_splits + split
        tl.store(m_ptr + slot, m_i)
        tl.store(l_ptr + slot, l_i)
        tl.store(acc_ptr + slot * D + d, acc, mask=d_mask)


@triton.jit
def _merge_kernel(
    m_ptr,  # [B * H, num_splits] fp32
    l_ptr,  # [B * H, num_splits] fp32
    acc_ptr,  # [B * H, num_splits, D] fp32
    out_ptr,  # [B, H, D] out
    H,
    D,
    num_splits,
    stride_ob, stride_oh, stride_od,
    BLOCK_SPLITS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    if PDL:  # as in _split_kernel: the next kernel (a decode_linear GEMV) loads its weight while this one merges
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    # out = sum_i 2^(m_i - M) acc_i / sum_i 2^(m_i - M) l_i with M = max_i m_i; empty splits (m_i = -inf)
    # get weight 0. The workspace is tiny (B * H * num_splits * (D + 2) floats) and stays in L2.
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    i = tl.arange(0, BLOCK_SPLITS)
    i_mask = i < num_splits
    d = tl.arange(0, BLOCK_D)
    d_mask = d < D
    slot = bh * num_splits + i
    m = tl.load(m_ptr + slot, mask=i_mask, other=-float("inf"))
    l = tl.load(l_ptr + slot, mask=i_mask, other=0.0)
    acc = tl.load(acc_ptr + slot[:, None] * D + d[None, :], mask=i_mask[:, None] & d_mask[None, :], other=0.0)
    w = tl.exp2(m - tl.max(m, axis=0))  # [BLOCK_SPLITS]
    out = tl.sum(w[:, None] * acc, axis=0) / tl.sum(w * l, axis=0)  # [BLOCK_D]
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d * stride_od, out.to(out_ptr.dtype.element_ty), mask=d_mask)


def _check(q, k, v, lengths, k_scale, v_scale) -> None:
    utils.check_float("q", q)
    if q.dim() != 3 or k.dim() != 4:
        raise KernelInputError(f"expected q [B, H, D] and k, v [B, H, S, D], got q {list(q.shape)}, k {list(k.shape)}")
    b, h, d = q.shape
    if k.shape != v.shape or k.shape[:2] != (b, h) or k.shape[3] != d:
        raise KernelInputError(
            f"k and v must both be [B={b}, H={h}, S, D={d}], got k {list(k.shape)}, v {list(v.shape)}"
        )
    if k.dtype != v.dtype:
        raise KernelInputError(f"k and v must share a dtype, got {k.dtype} and {v.dtype}")
    if k.shape[2] == 0:
        raise KernelInputError("the key/value cache is empty (S = 0)")
    if d > MAX_HEAD_DIM:
        raise KernelInputError(f"head_dim {d} exceeds {MAX_HEAD_DIM}")
    if k.dtype == torch.int8:
        for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
            if scale is None or scale.shape != (b, h, 1, d) or scale.dtype != torch.float32:
                got = "None" if scale is None else f"{list(scale.shape)} {scale.dtype}"
                raise KernelInputError(f"int8 k/v need {name} of shape [{b}, {h}, 1, {d}] float32, got {got}")
    else:
        utils.check_float("k", k)
        if k_scale is not None or v_scale is not None:
            raise KernelInputError(f"k_scale/v_scale are only for int8 k/v, but k is {k.dtype}")
    if lengths is not None:
        if lengths.shape != (b,) or lengths.dtype not in (torch.int32, torch.int64):
            got = f"{list(lengths.shape)} {lengths.dtype}"
            raise KernelInputError(f"lengths must be int32/int64 of shape [{b}], got {got}")


SHORT_KEYS = 128  # caches up to this many keys take the short plan when the rows fill the GPU


def _plan(bh: int, s: int, d: int, int8: bool, device, block_s: int | None, num_splits: int | None):
    """Pick the key block, the warps and the number of key splits from the shapes alone (so a CUDA graph can
    capture the launch): enough programs for four waves over the GPU's multiprocessors, at most one split
    per key block.

    Tuned on an H200 (132 SMs) at Whisper shapes (D = 64; S = 448, 1500; B = 1, 16, 64; graphed, L2 cold):
    [64 keys, 64] tiles on 2 warps are best or within 3% at B <= 16. Once the (batch, head) rows alone
    fill four waves (B = 64 at 20 heads), fp16 K/V prefer 32-key tiles (127 vs 136 us at S = 1500), and
    from two waves int8 K/V prefer 8 warps (96 vs 107 us at B = 64), which hide the int8 -> fp32 converts.

    Returns ``(block_s, block_d, num_splits, split_size, num_warps)``.
    """
    block_d = utils.next_power_of_2(d)
    sms = utils.multiprocessor_count(device)
    if s <= SHORT_KEYS and bh >= max(sms, 64) and block_s is None and num_splits is None:
        # Short caches with at least one wave of rows (Lite Transformer beams: 64 rows x 4-8 heads, 32-80 keys):
        # one split of 16-key tiles on 4 warps. Measured on the H200 (D = 62): 4.5 us at S = 32 (the general
        # plan's [64, 64] tiles on 2 warps: 11.7 us), 6.2 us at S = 80 (12.8 us with two splits).
        return 16, block_d, 1, utils.cdiv(s, 16) * 16, 4
    tile, num_warps = 4096, 2  # elements of a [block_s, block_d] tile: [64, 64] at D = 64
    if int8 and bh >= 2 * sms:
        num_warps = 8
    elif not int8 and bh >= 4 * sms:
        tile = 2048
    if block_s is None:
        block_s = max(16, min(128, tile // block_d))
    blocks = utils.cdiv(s, block_s)
    if num_splits is None:
        num_splits = utils.cdiv(4 * sms, bh)
    num_splits = max(1, min(num_splits, blocks, MAX_SPLITS))
    split_size = utils.cdiv(blocks, num_splits) * block_s
    return block_s, block_d, utils.cdiv(s, split_size), split_size, num_warps


def decode_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor | None = None,
    scale: float | None = None,
    *,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    block_s: int | None = None,
    num_splits: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """Flash-decoding attention with the Triton kernels; see :func:`decode_attention`.

    ``block_s`` (keys per loop step, a power of two), ``num_splits`` (programs along the key axis) and
    ``num_warps`` override the shape-based defaults, for tests and tuning.
    """
    _check(q, k, v, lengths, k_scale, v_scale)
    utils.check_launchable(*(t for t in (q, k, v, lengths, k_scale, v_scale) if t is not None))
    if block_s is not None and (block_s < 16 or block_s & (block_s - 1)):
        raise KernelInputError(f"block_s must be a power of two >= 16, got {block_s}")
    batch, heads, seq, dim = k.shape
    scale = dim**-0.5 if scale is None else scale
    int8 = k.dtype == torch.int8
    block_s, block_d, splits, split_size, planned_warps = _plan(
        batch * heads, seq, dim, int8, q.device, block_s, num_splits
    )
    num_warps = planned_warps if num_warps is None else num_warps

    out = utils.empty((batch, heads, dim), q.dtype, q.device)
    if splits == 1:  # no workspace: the split kernel normalises and writes `out` itself
        m = l = acc = out
    else:
        m = utils.empty((batch * heads, splits), torch.float32, q.device)
        l = utils.empty((batch * heads, splits), torch.float32, q.device)
        acc = utils.empty((batch * heads, splits, dim), torch.float32, q.device)
    pdl = utils.pdl_supported(q.device)  # programmatic dependent launch on Hopper (see decode_linear)
    launch = {"launch_pdl": True} if pdl else {}
    ks = k_scale if int8 else q  # placeholders: never read unless INT8 / HAS_LENGTHS
    vs = v_scale if int8 else q
    _split_kernel[(batch * heads, splits)](
        q, k, v, ks, vs, lengths if lengths is not None else q,
        m, l, acc, out,
        heads, seq, dim, splits, split_size, scale * LOG2E,
        *q.stride(), *k.stride(), *v.stride(),
        *(ks.stride(0), ks.stride(1), ks.stride(-1)),
        *(vs.stride(0), vs.stride(1), vs.stride(-1)),
        *out.stride(),
        WRITE_OUT=splits == 1, HAS_LENGTHS=lengths is not None, INT8=int8, PDL=pdl,
        BLOCK_S=block_s, BLOCK_D=block_d, num_warps=num_warps, **launch,
    )  # fmt: skip
    if splits > 1:
        _merge_kernel[(batch * heads,)](
            m, l, acc, out, heads, dim, splits, *out.stride(),
            BLOCK_SPLITS=utils.next_power_of_2(splits), BLOCK_D=block_d, PDL=pdl, num_warps=4, **launch,
        )  # fmt: skip
    return out


def decode_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor | None = None,
    scale: float | None = None,
    *,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """PyTorch reference in fp32: dequantise, masked softmax over the keys ``s < lengths[b]``, weighted sum."""
    _check(q, k, v, lengths, k_scale, v_scale)
    seq, dim = k.shape[2], k.shape[3]
    scale = dim**-0.5 if scale is None else scale
    kf, vf = k.float(), v.float()  # [B, H, S, D]
    if k.dtype == torch.int8:
        kf, vf = kf * k_scale, vf * v_scale
    scores = torch.einsum("bhd,bhsd->bhs", q.float(), kf) * scale  # [B, H, S]
    if lengths is not None:
        keep = torch.arange(seq, device=q.device) < lengths[:, None]  # [B, S]
        scores = scores.masked_fill(~keep[:, None, :], -math.inf)
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("bhs,bhsd->bhd", probs, vf).to(q.dtype)


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor | None = None,
    scale: float | None = None,
    *,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one query per (sequence, head) over a key/value cache.

    Args:
        q: ``[B, H, D]`` query of the current token (fp32/fp16/bf16, any strides).
        k, v: ``[B, H, S, D]`` caches, possibly strided views of a larger preallocated cache; float, or int8
            with ``k_scale``/``v_scale`` from :func:`quantize_kv`.
        lengths: ``[B]`` int32/int64, valid keys per sequence (keys ``s < lengths[b]`` are attended; values
            above S act as S). None attends all S keys. A length of 0 has no keys and gives NaN.
        scale: softmax scale, default ``D ** -0.5``.
        k_scale, v_scale: ``[B, H, 1, D]`` fp32 per-channel scales of int8 k/v (``k ~= k_int8 * k_scale``).

    Returns:
        ``[B, H, D]`` in q's dtype. Triton on CUDA, the PyTorch reference otherwise.
    """
    if utils.use_triton(q):
        return decode_attention_triton(q, k, v, lengths, scale, k_scale=k_scale, v_scale=v_scale)
    return decode_attention_ref(q, k, v, lengths, scale, k_scale=k_scale, v_scale=v_scale)


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-channel int8 quantisation of a cross-attention cache ``x [B, H, S, D]``.

    One scale per (b, h, d) channel over all S frames: ``scale = max_s |x| / 127`` (1 for an all-zero
    channel), ``x_int8 = clamp(round(x / scale), -127, 127)``, so that ``x ~= x_int8 * scale``.
    Returns ``(x_int8 [B, H, S, D] int8, scale [B, H, 1, D] float32)``. Runs once per audio window, in PyTorch.
    """
    utils.check_float("x", x)
    if x.dim() != 4:
        raise KernelInputError(f"x must be [B, H, S, D], got {list(x.shape)}")
    xf = x.float()
    amax = xf.abs().amax(dim=2, keepdim=True)  # [B, H, 1, D]
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    return torch.round(xf / scale).clamp_(-127, 127).to(torch.int8), scale
