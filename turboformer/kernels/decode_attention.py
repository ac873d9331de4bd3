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

In a chain of kernels launched with programmatic dependent launch (the batch-1 Whisper step) two more options
pay: ``prefetch`` lets a split program load its first key tile before it waits for the previous kernel (at batch
1 a cross-attention split is one 64-key tile, so the whole K/V stream overlaps the previous GEMV), and
``counters`` replace the merge kernel by a "last block" reduction: each split takes an acquire-release ticket per
(batch, head) row after storing its partial, and the program with the last ticket merges. Beam search can leave
its cache in place and pass ``rows``, a table of the cache row that holds each key of each sequence.

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
from turboformer.kernels.kv_cache_write import kv_cache_write_ref
from turboformer.kernels.utils import KernelInputError, tl, triton

LOG2E = 1.4426950408889634  # softmax in base 2: exp(x) = exp2(x * log2(e)), one MUFU.EX2 per element
MAX_HEAD_DIM = 256
MAX_SPLITS = 64


# What a split program may load before it waits for the previous kernel (``prefetch``; the kernel's PREFETCH):
# nothing; all of K, V, lengths and int8 scales; all but each row's newest key/value (column lengths - 1).
PREFETCH = {"none": 0, "all": 1, "all_but_last": 2}


@triton.jit
def _attend_tile(q, k, v, s_mask, m_j, l_j, acc_j):
    """One key tile into the per-slot online softmax: q [BLOCK_D] (scaled, base 2), k, v [BLOCK_S, BLOCK_D] fp32,
    s_mask [BLOCK_S] (keys attended); returns the updated (m_j, l_j, acc_j)."""
    qk = tl.where(s_mask, tl.sum(q[None, :] * k, axis=1), -float("inf"))  # [BLOCK_S], base-2 logits
    m_new = tl.maximum(m_j, qk)
    m_ref = tl.where(m_new == -float("inf"), 0.0, m_new)  # a slot with no key yet: keep 2^(-inf) = 0
    alpha = tl.exp2(m_j - m_ref)
    p = tl.exp2(qk - m_ref)
    return m_new, l_j * alpha + p, acc_j * alpha[:, None] + p[:, None] * v


@triton.jit
def _key_offsets(rows_ptr, b, keys, mask, stride_rb, stride_b, stride_s, ROWS: tl.constexpr):
    """[BLOCK_S, 1] int64 offsets of keys [BLOCK_S] of sequence b: from the start of sequence b's cache row, or
    (ROWS) from the start of the cache, in row rows[b, s]."""
    if ROWS:
        row = tl.load(rows_ptr + b * stride_rb + keys, mask=mask, other=0).to(tl.int64)
        return row[:, None] * stride_b + keys.to(tl.int64)[:, None] * stride_s
    else:
        return keys.to(tl.int64)[:, None] * stride_s


@triton.jit
def _split_end(lengths_ptr, b, S, start, split_size, HAS_LENGTHS: tl.constexpr):
    """(length, end): the keys row b attends (``lengths[b]`` clamped to S: never read past the view) and the end
    of this split's part of them."""
    length = S
    if HAS_LENGTHS:
        length = tl.minimum(tl.load(lengths_ptr + b).to(tl.int32), S)
    return length, tl.minimum(start + split_size, length)


@triton.jit
def _merge_splits(m_ptr, l_ptr, acc_ptr, bh, num_splits, D, d, d_mask, BLOCK_SPLITS: tl.constexpr):
    """out [BLOCK_D] = sum_i 2^(m_i - M) acc_i / sum_i 2^(m_i - M) l_i over the splits of row bh, M = max_i m_i;
    empty splits (m_i = -inf) get weight 0. Loads bypass L1 (.cg): other programs wrote the workspace."""
    i = tl.arange(0, BLOCK_SPLITS)
    i_mask = i < num_splits
    slot = bh * num_splits + i
    m = tl.load(m_ptr + slot, mask=i_mask, other=-float("inf"), cache_modifier=".cg")
    l = tl.load(l_ptr + slot, mask=i_mask, other=0.0, cache_modifier=".cg")
    acc = tl.load(acc_ptr + slot[:, None] * D + d[None, :], mask=i_mask[:, None] & d_mask[None, :], other=0.0,
                  cache_modifier=".cg")  # fmt: skip
    w = tl.exp2(m - tl.max(m, axis=0))  # [BLOCK_SPLITS]
    return tl.sum(w[:, None] * acc, axis=0) / tl.sum(w * l, axis=0)  # [BLOCK_D]


@triton.jit
def _split_kernel(
    q_ptr,  # [B, H, D]
    k_ptr,  # [B, H, S, D] fp16/bf16/fp32, or int8 when INT8
    v_ptr,  # [B, H, S, D]
    k_scale_ptr,  # [B, H, 1, D] fp32 (read only when INT8)
    v_scale_ptr,  # [B, H, 1, D] fp32 (read only when INT8)
    lengths_ptr,  # [B] int (read only when HAS_LENGTHS)
    rows_ptr,  # [B, >= S] int: the cache row that holds key s of sequence b (read only when ROWS)
    m_ptr,  # [B * H, num_splits] fp32 out: running max of the scaled logits, base-2 units
    l_ptr,  # [B * H, num_splits] fp32 out: softmax denominator relative to m
    acc_ptr,  # [B * H, num_splits, D] fp32 out: unnormalised output relative to m
    counter_ptr,  # [>= B * H] int32, zero between launches (read only when COUNTED)
    out_ptr,  # [B, H, D_out] out (written when WRITE_OUT or COUNTED): the first D_out <= D lanes
    k_new_ptr,  # [B, H, D] this step's key (NEW_KV): stored at column lengths[b] - 1 of row b, attended from here
    v_new_ptr,  # [B, H, D] this step's value (NEW_KV)
    H,
    S,
    D,
    D_out,
    num_splits,
    split_size,  # keys per split, a multiple of BLOCK_S
    qk_scale,  # softmax scale * log2(e)
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ksb, stride_ksh, stride_ksd,
    stride_vsb, stride_vsh, stride_vsd,
    stride_ob, stride_oh, stride_od,
    stride_rb,
    stride_knb, stride_knh, stride_knd,
    stride_vnb, stride_vnh, stride_vnd,
    WRITE_OUT: tl.constexpr,  # one split: normalise and write `out`, no workspace
    ROWS: tl.constexpr,  # keys gathered through rows_ptr (beams that share a prefix, no cache reorder)
    COUNTED: tl.constexpr,  # several splits: the last one of a row to finish merges them (no merge launch)
    HAS_LENGTHS: tl.constexpr,
    INT8: tl.constexpr,
    NEW_KV: tl.constexpr,  # the newest key/value come from k_new/v_new (no separate cache write launch)
    PDL: tl.constexpr,
    PREFETCH: tl.constexpr,  # 0 none, 1 all, 2 all but the last key (PREFETCH): what may load before the wait
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SPLITS: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < D
    start = split * split_size
    k_row = k_ptr + h * stride_kh + d[None, :] * stride_kd  # + the offsets of _key_offsets
    v_row = v_ptr + h * stride_vh + d[None, :] * stride_vd
    if not ROWS:  # sequence b's own cache row
        k_row += b * stride_kb
        v_row += b * stride_vb
    keys0 = start + tl.arange(0, BLOCK_S)  # the split's first key tile

    # Under PDL the kernel starts while the previous one runs. The first key tile of a split is loaded before the
    # wait when the caller says it was written earlier (PREFETCH): for cross-attention ("all") a program
    # of a 1500-frame split often has only this one tile, so its whole K/V stream overlaps the previous kernel.
    # (prefetch and rows are exclusive: k_row, v_row are row b's.)
    if PREFETCH == 1:
        length, end = _split_end(lengths_ptr, b, S, start, split_size, HAS_LENGTHS)
        bound = end
    elif PREFETCH == 2:  # the length is not known yet: load the tile as far as the cache goes
        bound = tl.minimum(start + split_size, S)
    if PREFETCH != 0:
        first = (keys0 < bound)[:, None] & d_mask[None, :]
        k0 = tl.load(k_row + keys0[:, None].to(tl.int64) * stride_ks, mask=first, other=0.0)
        v0 = tl.load(v_row + keys0[:, None].to(tl.int64) * stride_vs, mask=first, other=0.0)
    if PDL:  # wait for the previous kernel's writes (q, a new key), then let the next kernel launch and start its
        # own loads while this one streams K and V
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    if PREFETCH != 1:
        length, end = _split_end(lengths_ptr, b, S, start, split_size, HAS_LENGTHS)
    if PREFETCH == 2:  # the newest key/value (column length - 1), written by the previous
        # kernel: read it again past L1 (.cg; the prefetch may have cached the line before it was written)
        last = length - 1
        fresh_mask = d < tl.where((last >= start) & (last < start + BLOCK_S), D, 0)  # d < D in this tile
        k_last = tl.load(k_ptr + b * stride_kb + h * stride_kh + last.to(tl.int64) * stride_ks + d * stride_kd,
                         mask=fresh_mask, other=0.0, cache_modifier=".cg")  # fmt: skip
        v_last = tl.load(v_ptr + b * stride_vb + h * stride_vh + last.to(tl.int64) * stride_vs + d * stride_vd,
                         mask=fresh_mask, other=0.0, cache_modifier=".cg")  # fmt: skip
        k0 = tl.where((keys0 == last)[:, None], k_last[None, :], k0)
        v0 = tl.where((keys0 == last)[:, None], v_last[None, :], v0)
    if NEW_KV:  # the newest key/value (column length - 1) come from the projection, in the cache's dtype: the
        # tile that holds the column takes them from registers; the split that owns it stores them at the end
        new_at = length - 1
        own = d < tl.where((new_at >= start) & (new_at < start + split_size), D, 0)  # d < D in the owning split
        k_new = tl.load(k_new_ptr + b * stride_knb + h * stride_knh + d * stride_knd, mask=own, other=0.0)
        v_new = tl.load(v_new_ptr + b * stride_vnb + h * stride_vnh + d * stride_vnd, mask=own, other=0.0)
        k_new = k_new.to(k_ptr.dtype.element_ty)
        v_new = v_new.to(v_ptr.dtype.element_ty)

    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + d * stride_qd, mask=d_mask, other=0.0).to(tl.float32)
    if INT8:
        q = q * tl.load(k_scale_ptr + b * stride_ksb + h * stride_ksh + d * stride_ksd, mask=d_mask, other=0.0)
    q = q * qk_scale  # [BLOCK_D]

    # Online softmax kept per key slot (s mod BLOCK_S), not per program: every slot j carries its own running
    # max m_j, sum l_j and output row acc_j, so the loop body has no reduction across the key axis (no
    # cross-warp shared-memory round trip per block); only q . k reduces, along D, inside a warp. The slots
    # are merged once after the loop, with the same rescaling as the splits in _merge_splits.
    m_j = tl.full([BLOCK_S], -float("inf"), dtype=tl.float32)
    l_j = tl.zeros([BLOCK_S], dtype=tl.float32)
    acc_j = tl.zeros([BLOCK_S, BLOCK_D], dtype=tl.float32)
    loop_start = start
    if PREFETCH != 0:  # the prefetched first tile, then the loop from the second. (Without a prefetch the loop
        # runs every tile: peeling the first one measured up to 1.5x slower on the H200 for 12-tile splits.)
        m_j, l_j, acc_j = _attend_tile(q, k0.to(tl.float32), v0.to(tl.float32), keys0 < end, m_j, l_j, acc_j)
        loop_start = start + BLOCK_S
    for s0 in range(loop_start, end, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        s_mask = s < end
        tile_mask = s_mask[:, None] & d_mask[None, :]
        k_at = k_row + _key_offsets(rows_ptr, b, s, s_mask, stride_rb, stride_kb, stride_ks, ROWS)
        v_at = v_row + _key_offsets(rows_ptr, b, s, s_mask, stride_rb, stride_vb, stride_vs, ROWS)
        k = tl.load(k_at, mask=tile_mask, other=0.0).to(tl.float32)  # [BLOCK_S, BLOCK_D]
        v = tl.load(v_at, mask=tile_mask, other=0.0).to(tl.float32)
        if NEW_KV:
            k = tl.where((s == new_at)[:, None], k_new[None, :].to(tl.float32), k)
            v = tl.where((s == new_at)[:, None], v_new[None, :].to(tl.float32), v)
        m_j, l_j, acc_j = _attend_tile(q, k, v, s_mask, m_j, l_j, acc_j)
    # Merge the slots. A split past the sequence's length attended no key: it stores (-inf, 0, 0).
    m_i = tl.max(m_j, axis=0)
    w = tl.exp2(m_j - tl.where(m_i == -float("inf"), 0.0, m_i))  # [BLOCK_S]
    l_i = tl.sum(w * l_j, axis=0)
    acc = tl.sum(w[:, None] * acc_j, axis=0)  # [BLOCK_D]
    if INT8:
        acc = acc * tl.load(v_scale_ptr + b * stride_vsb + h * stride_vsh + d * stride_vsd, mask=d_mask, other=0.0)

    if NEW_KV:  # after every load of this launch: no program reads the column while it is written
        new_col = new_at.to(tl.int64)
        tl.store(k_ptr + b * stride_kb + h * stride_kh + new_col * stride_ks + d * stride_kd, k_new, mask=own)
        tl.store(v_ptr + b * stride_vb + h * stride_vh + new_col * stride_vs + d * stride_vd, v_new, mask=own)

    out_at = out_ptr + b * stride_ob + h * stride_oh + d * stride_od
    out_mask = d < D_out
    if WRITE_OUT:
        tl.store(out_at, (acc / l_i).to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        slot = bh * num_splits + split
        tl.store(m_ptr + slot, m_i)
        tl.store(l_ptr + slot, l_i)
        tl.store(acc_ptr + slot * D + d, acc, mask=d_mask)
        if COUNTED:  # "last block" reduction: the atomic (acquire-release, GPU scope) orders this program's
            # stores before its ticket, and the program that draws the last ticket sees every other split's
            ticket = tl.atomic_add(counter_ptr + bh, 1, sem="acq_rel", scope="gpu")
            if ticket == num_splits - 1:
                out = _merge_splits(m_ptr, l_ptr, acc_ptr, bh, num_splits, D, d, d_mask, BLOCK_SPLITS)
                tl.store(out_at, out.to(out_ptr.dtype.element_ty), mask=out_mask)
                tl.store(counter_ptr + bh, 0)  # zero again for the next launch (every split has drawn)


@triton.jit
def _merge_kernel(
    m_ptr,  # [B * H, num_splits] fp32
    l_ptr,  # [B * H, num_splits] fp32
    acc_ptr,  # [B * H, num_splits, D] fp32
    out_ptr,  # [B, H, D_out] out, D_out <= D
    H,
    D,
    D_out,
    num_splits,
    stride_ob, stride_oh, stride_od,
    BLOCK_SPLITS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    if PDL:  # as in _split_kernel: the next kernel (a decode_linear GEMV) loads its weight while this one merges
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    # The workspace is tiny (B * H * num_splits * (D + 2) floats) and stays in L2.
    bh = tl.program_id(0)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < D
    out = _merge_splits(m_ptr, l_ptr, acc_ptr, bh, num_splits, D, d, d_mask, BLOCK_SPLITS)
    tl.store(out_ptr + (bh // H) * stride_ob + (bh % H) * stride_oh + d * stride_od, out.to(out_ptr.dtype.element_ty),
             mask=d < D_out)  # fmt: skip


def _out_dim(out: torch.Tensor | None, dim: int) -> int:
    """The lanes ``out`` takes: all D, or its narrower last axis (heads stored padded: the first D' lanes)."""
    if out is None or out.dim() != 3 or out.shape[-1] > dim:
        return dim  # (a wrong shape is reported by utils.output)
    return max(1, out.shape[-1])


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


def _check_launch(q, k, lengths, prefetch: str, counters: torch.Tensor | None, rows: torch.Tensor | None,
                  new_kv: tuple | None = None) -> None:  # fmt: skip
    """The options of :func:`decode_attention` beyond the attention's inputs."""
    if new_kv is not None:
        if len(new_kv) != 2 or any(t.shape != q.shape or not t.dtype.is_floating_point for t in new_kv):
            raise KernelInputError(f"new_kv must be (k, v), each a float [B, H, D] = {list(q.shape)} tensor")
        if lengths is None or prefetch != "none" or k.dtype == torch.int8:
            raise KernelInputError("new_kv (the newest key at lengths - 1) needs lengths, prefetch='none', float k/v")
    if prefetch not in PREFETCH:
        raise KernelInputError(f"prefetch must be one of {sorted(PREFETCH)}, got {prefetch!r}")
    if rows is not None:
        b, s = k.shape[0], k.shape[2]
        if rows.dim() != 2 or rows.shape[0] != b or rows.shape[1] < s or rows.dtype not in (torch.int32, torch.int64):
            raise KernelInputError(f"rows must be int32/int64 [B={b}, >= S={s}], got {rows.dtype} {list(rows.shape)}")
        if rows.stride(1) != 1:
            raise KernelInputError("rows must have unit stride along the keys")
        if prefetch != "none" or k.dtype == torch.int8:
            raise KernelInputError("rows (keys gathered from other cache rows) take prefetch='none' and float k/v")
    if prefetch == "all_but_last" and lengths is None:
        raise KernelInputError("prefetch='all_but_last' needs lengths (the newest key is at lengths - 1)")
    if counters is not None:
        bh = q.shape[0] * q.shape[1]
        if counters.dtype != torch.int32 or counters.dim() != 1 or not counters.is_contiguous():
            raise KernelInputError(f"counters must be a contiguous 1-D int32 tensor, got {counters.dtype} "
                                   f"{list(counters.shape)}")  # fmt: skip
        if counters.numel() < bh or counters.device != q.device:
            raise KernelInputError(
                f"counters must hold >= B * H = {bh} zeros on {q.device}, got {counters.numel()} on {counters.device}"
            )


def split_counters(rows: int, device) -> torch.Tensor:
    """Zeroed int32 counters for ``decode_attention(..., counters=)`` over up to ``rows`` (batch x head) rows.
    Each launch leaves them zero again. One set serves any number of launches on one stream, one after another
    (as in an engine's decode step); launches that may run at the same time need a set each."""
    return torch.zeros(rows, dtype=torch.int32, device=device)


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
    prefetch: str = "none",
    counters: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
    new_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    out: torch.Tensor | None = None,
    block_s: int | None = None,
    num_splits: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """Flash-decoding attention with the Triton kernels; see :func:`decode_attention`.

    ``block_s`` (keys per loop step, a power of two), ``num_splits`` (programs along the key axis) and
    ``num_warps`` override the shape-based defaults, for tests and tuning.
    """
    _check(q, k, v, lengths, k_scale, v_scale)
    _check_launch(q, k, lengths, prefetch, counters, rows, new_kv)
    utils.check_launchable(*(t for t in (q, k, v, lengths, k_scale, v_scale, rows, *(new_kv or ())) if t is not None))
    if block_s is not None and (block_s < 16 or block_s & (block_s - 1)):
        raise KernelInputError(f"block_s must be a power of two >= 16, got {block_s}")
    batch, heads, seq, dim = k.shape
    scale = dim**-0.5 if scale is None else scale
    int8 = k.dtype == torch.int8
    block_s, block_d, splits, split_size, planned_warps = _plan(
        batch * heads, seq, dim, int8, q.device, block_s, num_splits
    )
    num_warps = planned_warps if num_warps is None else num_warps

    out = utils.output(out, (batch, heads, _out_dim(out, dim)), q.dtype, q.device)
    if splits == 1:  # no workspace: the split kernel normalises and writes `out` itself
        m = l = acc = out
    else:
        m = utils.empty((batch * heads, splits), torch.float32, q.device)
        l = utils.empty((batch * heads, splits), torch.float32, q.device)
        acc = utils.empty((batch * heads, splits, dim), torch.float32, q.device)
    pdl = utils.pdl_supported(q.device)  # programmatic dependent launch on Hopper (see decode_linear)
    launch = {"launch_pdl": True} if pdl else {}
    ks = k_scale if int8 else q  # placeholders: never read unless INT8 / HAS_LENGTHS / COUNTED
    vs = v_scale if int8 else q
    counted = splits > 1 and counters is not None
    k_new, v_new = new_kv if new_kv is not None else (q, q)
    _split_kernel[(batch * heads, splits)](
        q, k, v, ks, vs, lengths if lengths is not None else q, rows if rows is not None else q,
        m, l, acc, counters if counted else q, out, k_new, v_new,
        heads, seq, dim, out.shape[-1], splits, split_size, scale * LOG2E,
        *q.stride(), *k.stride(), *v.stride(),
        *(ks.stride(0), ks.stride(1), ks.stride(-1)),
        *(vs.stride(0), vs.stride(1), vs.stride(-1)),
        *out.stride(), rows.stride(0) if rows is not None else 0, *k_new.stride(), *v_new.stride(),
        WRITE_OUT=splits == 1, ROWS=rows is not None, COUNTED=counted, HAS_LENGTHS=lengths is not None,
        INT8=int8, NEW_KV=new_kv is not None, PDL=pdl, PREFETCH=PREFETCH[prefetch], BLOCK_S=block_s, BLOCK_D=block_d,
        BLOCK_SPLITS=utils.next_power_of_2(splits), num_warps=num_warps, **launch,
    )  # fmt: skip
    if splits > 1 and not counted:
        _merge_kernel[(batch * heads,)](
            m, l, acc, out, heads, dim, out.shape[-1], splits, *out.stride(),
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
    prefetch: str = "none",
    counters: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
    new_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """PyTorch reference in fp32: store ``new_kv`` (:func:`.kv_cache_write`), gather the keys' cache rows
    (``rows``), dequantise, masked softmax over the keys ``s < lengths[b]``, weighted sum. ``prefetch`` and
    ``counters`` (launch options) are checked only."""
    _check(q, k, v, lengths, k_scale, v_scale)
    _check_launch(q, k, lengths, prefetch, counters, rows, new_kv)
    batch, heads, seq, dim = k.shape
    if new_kv is not None:
        kv_cache_write_ref(new_kv[0], new_kv[1], k, v, lengths.long().clamp(1, seq) - 1)
    scale = dim**-0.5 if scale is None else scale
    if rows is not None:  # k[b, h, s] <- k[rows[b, s], h, s]
        index = rows[:, None, :seq, None].long().expand(batch, heads, seq, dim)
        k, v = k.gather(0, index), v.gather(0, index)
    kf, vf = k.float(), v.float()  # [B, H, S, D]
    if k.dtype == torch.int8:
        kf, vf = kf * k_scale, vf * v_scale
    scores = torch.einsum("bhd,bhsd->bhs", q.float(), kf) * scale  # [B, H, S]
    if lengths is not None:
        keep = torch.arange(seq, device=q.device) < lengths[:, None]  # [B, S]
        scores = scores.masked_fill(~keep[:, None, :], -math.inf)
    probs = torch.softmax(scores, dim=-1)
    result = torch.einsum("bhs,bhsd->bhd", probs, vf).to(q.dtype)
    if out is None:
        return result
    width = _out_dim(out, dim)
    return utils.output(out, (batch, heads, width), q.dtype, q.device).copy_(result[..., :width])


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor | None = None,
    scale: float | None = None,
    *,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    prefetch: str = "none",
    counters: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
    new_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    out: torch.Tensor | None = None,
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
        prefetch: what was written before the previous kernel on the stream, so that under programmatic
            dependent launch (Hopper) the kernel may load it while that kernel still runs: ``"none"``;
            ``"all"`` (k, v, lengths and scales: cross-attention over a fixed encoder output); ``"all_but_last"``
            (all but each row's newest key and value, column ``lengths[b] - 1``: self-attention right after
            the projection that wrote the new token's k and v). A wrong promise reads stale keys.
        counters: from :func:`split_counters`: when the keys are split over programs, the last program of each
            row to finish merges the splits (no second launch). None: a merge kernel follows.
        rows: ``[B, >= S]`` int32/int64: key s of sequence b is read from cache row ``rows[b, s]`` (the same
            column s). Beam search keeps a table instead of reordering the cache: each beam's keys stay in
            the row of the beam that computed them. None: row b.
        new_kv: ``(k, v)``, each ``[B, H, D]``: this step's key and value, stored in place at column
            ``lengths[b] - 1`` of row b (``lengths[b] >= 1``) and attended, instead of a separate
            :func:`.kv_cache_write` launch before the attention (float k/v, ``prefetch="none"``).
        out: an optional ``[B, H, D]`` destination in q's dtype (any strides with unit stride along D, e.g. a
            branch's columns of a wider buffer), or a narrower ``[B, H, D']`` (D' < D) that takes the first D'
            lanes: for heads stored padded to an aligned width (zeros in q's or k's extra lanes), whose output
            goes on unpadded.

    Returns:
        ``[B, H, D]`` in q's dtype (``out`` when given, with its width). Triton on CUDA, the PyTorch reference
        otherwise.
    """
    options = dict(k_scale=k_scale, v_scale=v_scale, prefetch=prefetch, counters=counters, rows=rows,
                   new_kv=new_kv, out=out)  # fmt: skip
    if utils.use_triton(q):
        return decode_attention_triton(q, k, v, lengths, scale, **options)
    return decode_attention_ref(q, k, v, lengths, scale, **options)


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
