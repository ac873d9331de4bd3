"""Flash attention with SAM's decomposed relative-position bias fused in.

For queries, keys and values ``q, k, v [BH, N, D]`` on an ``H x W`` token grid (``N = H * W``, token
``j`` at row ``j // W``, column ``j % W``) and the per-query terms ``rel_h [BH, N, H]``, ``rel_w [BH, N, W]``::

    score(i, j) = scale * q_i . k_j + rel_h[i, j // W] + rel_w[i, j % W]
    out_i = sum_j softmax_j(score(i, j)) v_j

This is the attention of every block of SAM's image encoder (Kirillov et al. 2023, arXiv 2304.02643):
the decomposed relative positions of MViTv2 (Li et al. 2022, arXiv 2112.01526, Eq. 4; upstream
``add_decomposed_rel_pos``), with ``rel_h[i, kh] = q_i . R_h[qh - kh]`` computed beforehand by
:func:`turboformer.models.sam.image_encoder.decomposed_rel_pos` (a small [N, D] x [D, H] product). Windowed
blocks attend over 14 x 14 = 196 tokens, the four global blocks over 64 x 64 = 4096, head dim 64 (ViT-B/L/H).

The eager form builds the ``[BH, N, N]`` score matrix (8 GiB in fp32 for a ViT-H global block at batch 8 x
16 heads) and writes it three times (matmul, bias add, softmax). Here each program owns ``BLOCK_M`` queries
and streams the keys in ``BLOCK_N`` tiles with an online softmax in fp32 (Milakov & Gimelshein 2018, arXiv
1805.02867; Dao et al. 2022 FlashAttention, arXiv 2205.14135), so the score matrix never leaves registers.

The bias of a ``[BLOCK_M, BLOCK_N]`` tile is a gather ``rel_h[i, row(j)]``; instead of gathering from memory
per element it is computed on the tensor cores as a product with a one-hot matrix built from the key
indices: ``bias = rel_h_tile [BLOCK_M, BLOCK_H] @ onehot_h [BLOCK_H, BLOCK_N] + rel_w_tile @ onehot_w`` with
``onehot_h[r, j] = (j // W == r)``. The ``rel_h``/``rel_w`` tiles of a program's queries are loaded once,
before the key loop; a one-hot product has a single non-zero term, so it is exact in every dtype.
At the global blocks (H = W = 64) this adds two [M, 64] x [64, N] products to the q.k^T one; at windowed
blocks (H = W = 14, padded to 16) a quarter of that each.

fp32 inputs use IEEE fp32 products unless ``torch.backends.cuda.matmul.allow_tf32`` is set (as
``torch.matmul``), so the fp32 model on a GPU stays within 1e-4 of upstream on the CPU.
"""

from __future__ import annotations

import torch

from turboformer.kernels import utils
from turboformer.kernels.utils import KernelInputError, tl, triton

LOG2E = 1.4426950408889634  # softmax in base 2: exp(x) = exp2(x * log2(e))
MAX_HEAD_DIM = 256
MAX_GRID_SIDE = 128  # rel_h / rel_w tiles are held in registers for the whole key loop


@triton.jit
def _rel_pos_attention_kernel(
    q_ptr,  # [B, HEADS, N, D]
    k_ptr,  # [B, HEADS, N, D]
    v_ptr,  # [B, HEADS, N, D]
    rh_ptr,  # [B, HEADS, N, GRID_H]: rel_h[i, key row]
    rw_ptr,  # [B, HEADS, N, GRID_W]: rel_w[i, key column]
    o_ptr,  # [B, HEADS, N, D] out
    N,
    D,
    GRID_H,
    GRID_W,
    HEADS,  # program (b, h) = divmod(program_id(1), HEADS); 1 for [BH, N, D] inputs
    qk_scale,  # softmax scale * log2(e)
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_hb, stride_hh, stride_hn, stride_hr,
    stride_wb, stride_wh, stride_wn, stride_wc,
    stride_ob, stride_oh, stride_on, stride_od,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
    DOT_DTYPE: tl.constexpr,  # the inputs' dtype; fp32 for bf16 under the interpreter (numpy has no bf16 dot)
    PRECISION: tl.constexpr,  # tl.dot input precision for fp32 operands: "ieee" (true fp32) or "tf32"
):  # fmt: skip
    pid_m = tl.program_id(0)
    b = (tl.program_id(1) // HEADS).to(tl.int64)
    head = (tl.program_id(1) % HEADS).to(tl.int64)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # query indices
    m_mask = m < N
    d = tl.arange(0, BLOCK_D)
    d_mask = d < D
    r_h = tl.arange(0, BLOCK_H)  # key rows
    r_w = tl.arange(0, BLOCK_W)  # key columns

    q = tl.load(
        q_ptr + b * stride_qb + head * stride_qh + m[:, None] * stride_qn + d[None, :] * stride_qd,
        mask=m_mask[:, None] & d_mask[None, :], other=0.0,
    ).to(DOT_DTYPE)  # [BLOCK_M, BLOCK_D]
    rel_h = tl.load(
        rh_ptr + b * stride_hb + head * stride_hh + m[:, None] * stride_hn + r_h[None, :] * stride_hr,
        mask=m_mask[:, None] & (r_h < GRID_H)[None, :], other=0.0,
    ).to(DOT_DTYPE)  # [BLOCK_M, BLOCK_H]
    rel_w = tl.load(
        rw_ptr + b * stride_wb + head * stride_wh + m[:, None] * stride_wn + r_w[None, :] * stride_wc,
        mask=m_mask[:, None] & (r_w < GRID_W)[None, :], other=0.0,
    ).to(DOT_DTYPE)  # [BLOCK_M, BLOCK_W]

    m_i = tl.full([BLOCK_M], -float("inf"), dtype=tl.float32)  # running max, base-2 units
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # softmax denominator relative to m_i
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # unnormalised output relative to m_i
    k_base = k_ptr + b * stride_kb + head * stride_kh + d[:, None] * stride_kd
    v_base = v_ptr + b * stride_vb + head * stride_vh + d[None, :] * stride_vd
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)  # key indices
        n_mask = n < N
        kt = tl.load(k_base + n[None, :] * stride_kn, mask=d_mask[:, None] & n_mask[None, :], other=0.0).to(DOT_DTYPE)  # [BLOCK_D, BLOCK_N]
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        # Decomposed rel-pos bias as two one-hot products (exact: one non-zero term each). Keys past N have
        # row >= GRID_H: an all-zero one-hot column, masked to -inf below anyway.
        onehot_h = (r_h[:, None] == (n // GRID_W)[None, :]).to(DOT_DTYPE)  # [BLOCK_H, BLOCK_N]
        onehot_w = (r_w[:, None] == (n % GRID_W)[None, :]).to(DOT_DTYPE)  # [BLOCK_W, BLOCK_N]
        bias = tl.dot(rel_h, onehot_h, input_precision=PRECISION)
        bias = tl.dot(rel_w, onehot_w, acc=bias, input_precision=PRECISION)
        s = tl.where(n_mask[None, :], s + bias * 1.4426950408889634, -float("inf"))
        # (1.44... = LOG2E, written out: a @triton.jit function cannot read a plain module global)
        # Online softmax: the first tile holds key 0, so m_new is finite from the first iteration on.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + n[:, None] * stride_vn, mask=n_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
        # p rounded to v's dtype for the tensor cores (FlashAttention's choice), accumulated in fp32.
        p = p.to(v_ptr.dtype.element_ty).to(DOT_DTYPE)
        acc = tl.dot(p, v.to(DOT_DTYPE), acc=acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new

    out = acc / l_i[:, None]
    tl.store(
        o_ptr + b * stride_ob + head * stride_oh + m[:, None] * stride_on + d[None, :] * stride_od,
        out.to(o_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :],
    )


def _check(q, k, v, rel_h, rel_w) -> tuple[int, int]:
    """Validate the inputs (all 3-D ``[BH, N, .]`` or all 4-D ``[B, heads, N, .]``); return the grid ``(H, W)``."""
    dims = q.dim()
    for name, t in (("q", q), ("k", k), ("v", v), ("rel_h", rel_h), ("rel_w", rel_w)):
        utils.check_float(name, t)
        if t.dim() not in (3, 4) or t.dim() != dims:
            raise KernelInputError(f"{name} must be [BH, N, .] or [B, heads, N, .] like q, got shape {list(t.shape)}")
    if q.shape != k.shape or q.shape != v.shape:
        raise KernelInputError(f"q, k, v must share a [BH, N, D] shape, got {list(q.shape)}, {list(k.shape)}, {list(v.shape)}")
    if len({q.dtype, k.dtype, v.dtype, rel_h.dtype, rel_w.dtype}) != 1:
        raise KernelInputError("q, k, v, rel_h and rel_w must share a dtype")
    lead, (n, d) = tuple(q.shape[:-2]), q.shape[-2:]
    grid_h, grid_w = rel_h.shape[-1], rel_w.shape[-1]
    if tuple(rel_h.shape[:-1]) != (*lead, n) or tuple(rel_w.shape[:-1]) != (*lead, n) or grid_h * grid_w != n:
        raise KernelInputError(
            f"rel_h [.., N, H] and rel_w [.., N, W] must lead with {[*lead, n]}, N = H * W, "
            f"got {list(rel_h.shape)} and {list(rel_w.shape)}"
        )
    if n == 0 or d == 0:
        raise KernelInputError(f"empty attention: N = {n}, D = {d}")
    if d > MAX_HEAD_DIM:
        raise KernelInputError(f"head_dim {d} exceeds {MAX_HEAD_DIM}")
    if max(grid_h, grid_w) > MAX_GRID_SIDE:
        raise KernelInputError(f"grid side {max(grid_h, grid_w)} exceeds {MAX_GRID_SIDE}")
    return grid_h, grid_w


def _strides4(t: torch.Tensor) -> tuple[int, ...]:
    """(batch, head, row, column) strides; a 3-D ``[BH, N, .]`` tensor is one head per batch row."""
    return (t.stride(0), 0, t.stride(1), t.stride(2)) if t.dim() == 3 else t.stride()


def _plan(n: int, d: int, dtype: torch.dtype, block_m: int | None, block_n: int | None):
    """Tile sizes and warps from the shapes alone (capturable in a CUDA graph).

    Untuned starting points, not yet measured on a GPU (``turboformer bench sam`` times them): [128, 64]
    tiles on 8 warps for 16-bit inputs at the global blocks (the FlashAttention-2 Triton tutorial's choice for
    D = 64 on Hopper), [64, 64] on 4 warps for the 196-token windows (4 query tiles per window, so a ViT-B
    batch-1 windowed block launches 25 * 12 * 4 = 1200 programs); fp32 halves the key tile (twice the bytes).
    Returns ``(block_m, block_n, block_d, num_warps, num_stages)``.
    """
    block_d = max(16, utils.next_power_of_2(d))
    big = n >= 1024
    if block_m is None:
        block_m = 128 if big and dtype != torch.float32 else 64
    if block_n is None:
        block_n = 64 if dtype != torch.float32 else 32
    num_warps = 8 if block_m >= 128 else 4
    return block_m, block_n, block_d, num_warps, 3 if big else 2


def rel_pos_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_h: torch.Tensor,
    rel_w: torch.Tensor,
    scale: float | None = None,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Fused flash attention with the decomposed rel-pos bias; see :func:`rel_pos_attention`.

    ``block_m`` (queries per program) and ``block_n`` (keys per loop step), powers of two >= 16, override the
    shape-based defaults, for tests and tuning.
    """
    grid_h, grid_w = _check(q, k, v, rel_h, rel_w)
    utils.check_launchable(q, k, v, rel_h, rel_w)
    for name, block in (("block_m", block_m), ("block_n", block_n)):
        if block is not None and (block < 16 or block & (block - 1)):
            raise KernelInputError(f"{name} must be a power of two >= 16, got {block}")
    n, d = q.shape[-2:]
    batch, heads = (q.shape[0], 1) if q.dim() == 3 else q.shape[:2]
    scale = d**-0.5 if scale is None else scale
    block_m, block_n, block_d, num_warps, num_stages = _plan(n, d, q.dtype, block_m, block_n)
    dot_dtype, precision = utils.dot_settings(q.dtype)

    if q.dim() == 3:
        out = utils.empty((batch, n, d), q.dtype, q.device)
    else:  # token-major: [B, N, heads, D] memory, so the output projection reads it without a copy
        out = utils.empty((batch, n, heads, d), q.dtype, q.device).transpose(1, 2)
    _rel_pos_attention_kernel[(utils.cdiv(n, block_m), batch * heads)](
        q, k, v, rel_h, rel_w, out,
        n, d, grid_h, grid_w, heads, scale * LOG2E,
        *_strides4(q), *_strides4(k), *_strides4(v), *_strides4(rel_h), *_strides4(rel_w), *_strides4(out),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        BLOCK_H=max(16, utils.next_power_of_2(grid_h)), BLOCK_W=max(16, utils.next_power_of_2(grid_w)),
        DOT_DTYPE=dot_dtype, PRECISION=precision, num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out


def rel_pos_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_h: torch.Tensor,
    rel_w: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """PyTorch reference in fp32: SAM's own maths (upstream ``Attention.forward`` with
    ``add_decomposed_rel_pos``): the explicit ``[BH, N, N]`` scores, the bias broadcast over the key grid,
    softmax, weighted sum. For fp32 inputs it is exactly upstream's sequence of operations."""
    grid_h, grid_w = _check(q, k, v, rel_h, rel_w)
    if q.dim() == 4:  # [B, heads, N, .]: the same maths over B * heads rows
        flat = [t.reshape(-1, *t.shape[2:]) for t in (q, k, v, rel_h, rel_w)]
        return rel_pos_attention_ref(*flat, scale).view(q.shape)
    bh, n, d = q.shape
    scale = d**-0.5 if scale is None else scale
    qf, kf, vf = q.float(), k.float(), v.float()
    attn = (qf * scale) @ kf.transpose(-2, -1)  # [BH, N, N]
    attn = (
        attn.view(bh, n, grid_h, grid_w)
        + rel_h.float().reshape(bh, n, grid_h, 1)
        + rel_w.float().reshape(bh, n, 1, grid_w)
    )
    attn = attn.view(bh, n, n).softmax(dim=-1)
    return (attn @ vf).to(q.dtype)


def rel_pos_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_h: torch.Tensor,
    rel_w: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Self-attention over an ``H x W`` token grid with SAM's decomposed relative-position bias.

    Args:
        q, k, v: ``[BH, N, D]`` or ``[B, heads, N, D]`` (fp32/fp16/bf16, any strides: the 4-D form reads the
            heads straight out of a fused qkv projection), ``N = H * W`` tokens in row-major grid order.
        rel_h: ``[BH, N, H]`` (or ``[B, heads, N, H]``), the bias of query i on every key in key-row r
            (``q_i . R_h[row(i) - r]``).
        rel_w: ``[BH, N, W]`` (or ``[B, heads, N, W]``), the bias of query i on every key in key-column c.
        scale: softmax scale of ``q . k``, default ``D ** -0.5`` (the bias is not scaled).

    Returns:
        q's shape, in q's dtype. Triton on CUDA, the PyTorch reference otherwise. The Triton kernel returns a
        4-D output as a view of ``[B, N, heads, D]`` memory (token-major: ``out.transpose(1, 2)`` is
        contiguous).
    """
    if utils.use_triton(q):
        return rel_pos_attention_triton(q, k, v, rel_h, rel_w, scale)
    return rel_pos_attention_ref(q, k, v, rel_h, rel_w, scale)
