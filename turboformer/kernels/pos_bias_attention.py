"""Flash attention with the Transformer-XL position bias and the key mask fused in (Conformer self-attention).

For one (batch b, head h), queries ``q_i`` (``i < T``), keys and values ``k_j, v_j`` and positional rows
``p_j`` (``j < S``), and the learned per-head biases ``u`` (content) and ``w`` (position)::

    score(i, j) = ((q_i + u) . k_j + (q_i + w) . p_j) / sqrt(D)
    prob(i, :)  = softmax_j(score(i, j) over the keys with mask(i, j)), 0 on masked keys
    out_i       = sum_j prob(i, j) v_j

This is the self-attention of every WeNet Conformer encoder block (``RelPositionMultiHeadedAttention``;
:class:`turboformer.models.conformer.attention.RelPositionAttention`): Transformer-XL's terms (a) + (c) and
(b) + (d) (Dai et al. 2019, arXiv 1901.02860, Section 3.3) with WeNet's ``p_j = W_pos . pe[j]`` taken at the
keys' own positions, so both terms are plain ``[T, S]`` products and no ``rel_shift`` is needed. The mask is
``[B, 1, S]`` key padding (offline batches) or ``[B, T, S]`` (chunk masks of streaming / dynamic-chunk
models); a query row with no allowed key gives a zero output, as upstream (``masked_fill`` after softmax).

The eager form writes the ``[B, H, T, S]`` scores five times (two matmuls, sum and scale, masked fill, fp32
softmax, masked fill). Here each program owns ``BLOCK_M`` queries of one (b, h): it loads the query tile once,
forms ``q + u`` and ``q + w`` (added in fp32 and rounded to the input dtype, as the eager fp16 add does),
and streams the keys in ``BLOCK_N`` tiles: ``s = (q+u) k^T + (q+w) p^T`` as two tensor-core products into one
fp32 accumulator, scaled, masked to -inf, then an online softmax in base 2 (Milakov & Gimelshein 2018,
arXiv 1805.02867; Dao et al. 2022 FlashAttention, arXiv 2205.14135) with the probabilities rounded to v's
dtype for the ``prob @ v`` product. The score matrix never leaves registers; the position term costs one more
``[M, D] x [D, N]`` product per tile (4/3 the FLOPs of plain attention, 6 T S D per head in all).

Output is ``[B, T, H, D]`` (the layout of ``linear_q``'s output), so the caller's ``[B, T, H * D]`` view
for ``linear_out`` needs no transpose copy. fp32 inputs use IEEE fp32 products unless
``torch.backends.cuda.matmul.allow_tf32`` is set (as ``torch.matmul``).
"""

from __future__ import annotations

import math

import torch

from turboformer.kernels import utils
from turboformer.kernels.utils import KernelInputError, tl, triton

LOG2E = 1.4426950408889634  # softmax in base 2: exp(x) = exp2(x * log2(e))
MAX_HEAD_DIM = 256


@triton.jit
def _pos_bias_attention_kernel(
    q_ptr,  # [B, T, H, D]
    k_ptr,  # [B, H, S, D]
    v_ptr,  # [B, H, S, D]
    p_ptr,  # [1 | B, H, S, D] positional rows (batch stride 0 when shared)
    u_ptr,  # [H, D] content bias
    w_ptr,  # [H, D] position bias
    mask_ptr,  # [1 | B, 1 | T, S] uint8, 1 = may attend (read only when HAS_MASK)
    o_ptr,  # [B, T, H, D] out
    H,
    T,
    S,
    D,
    qk_scale,  # 1 / sqrt(D) * log2(e)
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_pb, stride_ph, stride_ps, stride_pd,
    stride_uh, stride_ud,
    stride_wh, stride_wd,
    stride_mb, stride_mt, stride_ms,  # stride_mt = 0 for a [B, 1, S] key-padding mask
    stride_ob, stride_ot, stride_oh, stride_od,
    HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr,  # the inputs' dtype; fp32 for bf16 under the interpreter (numpy has no bf16 dot)
    PRECISION: tl.constexpr,  # tl.dot input precision for fp32 operands: "ieee" (true fp32) or "tf32"
):  # fmt: skip
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # query indices
    m_mask = m < T
    d = tl.arange(0, BLOCK_D)
    d_mask = d < D

    # q + u and q + w: added in fp32, rounded to the input dtype (the eager fp16/bf16 add), once per program.
    q = tl.load(
        q_ptr + b * stride_qb + h * stride_qh + m[:, None] * stride_qt + d[None, :] * stride_qd,
        mask=m_mask[:, None] & d_mask[None, :], other=0.0,
    ).to(tl.float32)  # [BLOCK_M, BLOCK_D]
    u = tl.load(u_ptr + h * stride_uh + d * stride_ud, mask=d_mask, other=0.0).to(tl.float32)  # [BLOCK_D]
    w = tl.load(w_ptr + h * stride_wh + d * stride_wd, mask=d_mask, other=0.0).to(tl.float32)
    qu = (q + u[None, :]).to(q_ptr.dtype.element_ty).to(DOT_DTYPE)  # padded D columns stay 0
    qw = (q + w[None, :]).to(q_ptr.dtype.element_ty).to(DOT_DTYPE)

    m_i = tl.full([BLOCK_M], -float("inf"), dtype=tl.float32)  # running max, base-2 units
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # softmax denominator relative to m_i
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # unnormalised output relative to m_i
    k_base = k_ptr + b * stride_kb + h * stride_kh + d[:, None] * stride_kd
    p_base = p_ptr + b * stride_pb + h * stride_ph + d[:, None] * stride_pd
    v_base = v_ptr + b * stride_vb + h * stride_vh + d[None, :] * stride_vd
    mask_base = mask_ptr + b * stride_mb + m[:, None] * stride_mt
    for n0 in range(0, S, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)  # key indices
        n_mask = n < S
        kd_mask = d_mask[:, None] & n_mask[None, :]
        kt = tl.load(k_base + n[None, :] * stride_ks, mask=kd_mask, other=0.0).to(DOT_DTYPE)  # [BLOCK_D, BLOCK_N]
        pt = tl.load(p_base + n[None, :] * stride_ps, mask=kd_mask, other=0.0).to(DOT_DTYPE)  # [BLOCK_D, BLOCK_N]
        s = tl.dot(qu, kt, input_precision=PRECISION)  # (a) + (c): content
        s = tl.dot(qw, pt, acc=s, input_precision=PRECISION)  # (b) + (d): position
        s = s * qk_scale  # [BLOCK_M, BLOCK_N]
        allowed = m_mask[:, None] & n_mask[None, :]
        if HAS_MASK:
            tile = tl.load(mask_base + n[None, :] * stride_ms, mask=allowed, other=0)  # [BLOCK_M, BLOCK_N]
            allowed = allowed & (tile != 0)
        s = tl.where(allowed, s, -float("inf"))
        # Online softmax. A row may have no allowed key so far (m_new = -inf): shift by 0 instead, so that
        # exp2(-inf - 0) = 0 rather than exp2(-inf + inf) = NaN; such a row keeps l_i = 0 and acc = 0.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_shift = tl.where(m_new == -float("inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_shift)
        prob = tl.exp2(s - m_shift[:, None])
        l_i = l_i * alpha + tl.sum(prob, axis=1)
        v = tl.load(v_base + n[:, None] * stride_vs, mask=n_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
        # prob rounded to v's dtype for the tensor cores (the eager path's weights.to(value.dtype)), fp32 sum.
        prob = prob.to(v_ptr.dtype.element_ty).to(DOT_DTYPE)
        acc = tl.dot(prob, v.to(DOT_DTYPE), acc=acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new

    # A row with no allowed key has l_i = 0 and acc = 0 (every prob was exp2(-inf) = 0): divide by 1 there,
    # giving 0, as upstream's masked_fill after softmax.
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(
        o_ptr + b * stride_ob + h * stride_oh + m[:, None] * stride_ot + d[None, :] * stride_od,
        out.to(o_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :],
    )


def _check(q, k, v, p, u, w, mask) -> None:
    """Validate shapes and dtypes (see :func:`pos_bias_attention`)."""
    for name, t in (("q", q), ("k", k), ("v", v), ("p", p), ("pos_bias_u", u), ("pos_bias_v", w)):
        utils.check_float(name, t)
        if t.dim() != (2 if name.startswith("pos_bias") else 4):
            raise KernelInputError(f"{name} must be {2 if name.startswith('pos_bias') else 4}-D, got shape {list(t.shape)}")
    if len({q.dtype, k.dtype, v.dtype, p.dtype, u.dtype, w.dtype}) != 1:
        raise KernelInputError("q, k, v, p, pos_bias_u and pos_bias_v must share a dtype")
    batch, t, heads, d = q.shape
    if k.shape != v.shape or k.shape[0] != batch or k.shape[1] != heads or k.shape[3] != d:
        raise KernelInputError(
            f"k and v must be [B, H, S, D] = [{batch}, {heads}, S, {d}] for q [B, T, H, D] = {list(q.shape)}, "
            f"got {list(k.shape)} and {list(v.shape)}"
        )
    s = k.shape[2]
    if p.shape[0] not in (1, batch) or p.shape[1:] != k.shape[1:]:
        raise KernelInputError(f"p must be [1 | B, H, S, D] with [H, S, D] = {list(k.shape[1:])}, got {list(p.shape)}")
    if u.shape != (heads, d) or w.shape != (heads, d):
        raise KernelInputError(
            f"pos_bias_u and pos_bias_v must be [H, D] = [{heads}, {d}], got {list(u.shape)} and {list(w.shape)}"
        )
    if mask is not None and (
        mask.dtype != torch.bool or mask.dim() != 3 or mask.shape[0] not in (1, batch)
        or mask.shape[1] not in (1, t) or mask.shape[2] != s
    ):  # fmt: skip
        raise KernelInputError(
            f"mask must be a bool [B, 1 | T, S] = [{batch}, 1 | {t}, {s}] tensor, got {mask.dtype} {list(mask.shape)}"
        )
    if t == 0 or s == 0 or d == 0:
        raise KernelInputError(f"empty attention: T = {t}, S = {s}, D = {d}")
    if d > MAX_HEAD_DIM:
        raise KernelInputError(f"head_dim {d} exceeds {MAX_HEAD_DIM}")


def _plan(s: int, d: int, dtype: torch.dtype, block_m: int | None, block_n: int | None):
    """Tile sizes and warps from the shapes alone (capturable in a CUDA graph).

    Untuned starting points, not yet measured on a GPU (``bench_pos_bias_attention.py`` times them):
    [64, 64] tiles on 4 warps for 16-bit inputs at D = 64, the FlashAttention-2 Triton tutorial's smaller
    Hopper config: the extra position tile (p^T, [D, BLOCK_N]) and the two query tiles (q + u, q + w) raise
    register use over plain attention, and AISHELL's T <= ~400 frames at batch 16 x 4 heads already gives
    7 x 64 = 448 programs for 132 SMs. fp32 halves the key tile (twice the bytes). Returns
    ``(block_m, block_n, block_d, num_warps, num_stages)``.
    """
    block_d = max(16, utils.next_power_of_2(d))
    if block_m is None:
        block_m = 64
    if block_n is None:
        block_n = 64 if dtype != torch.float32 and block_d <= 128 else 32
    num_warps = 8 if block_m >= 128 or block_d > 128 else 4
    return block_m, block_n, block_d, num_warps, 3 if s >= 512 else 2


def pos_bias_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    p: torch.Tensor,
    pos_bias_u: torch.Tensor,
    pos_bias_v: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Fused flash attention with the Transformer-XL position bias and mask; see :func:`pos_bias_attention`.

    ``block_m`` (queries per program) and ``block_n`` (keys per loop step), powers of two >= 16, override the
    shape-based defaults, for tests and tuning.
    """
    _check(q, k, v, p, pos_bias_u, pos_bias_v, mask)
    utils.check_launchable(q, k, v, p, pos_bias_u, pos_bias_v, *([] if mask is None else [mask]))
    for name, block in (("block_m", block_m), ("block_n", block_n)):
        if block is not None and (block < 16 or block & (block - 1)):
            raise KernelInputError(f"{name} must be a power of two >= 16, got {block}")
    batch, t, heads, d = q.shape
    s = k.shape[2]
    block_m, block_n, block_d, num_warps, num_stages = _plan(s, d, q.dtype, block_m, block_n)
    dot_dtype, precision = utils.dot_settings(q.dtype)

    # Broadcast dimensions read with stride 0: a shared p (batch 1), a key-padding mask (one row for all T).
    p_strides = (0 if p.shape[0] == 1 else p.stride(0), *p.stride()[1:])
    if mask is not None:
        mask_u8 = mask.view(torch.uint8)  # same bytes and strides; Triton loads bool tensors as bytes here
        mask_strides = (
            0 if mask.shape[0] == 1 else mask.stride(0), 0 if mask.shape[1] == 1 else mask.stride(1), mask.stride(2)
        )
    else:
        mask_u8, mask_strides = q, (0, 0, 0)  # q: never read (HAS_MASK is False)

    out = utils.empty((batch, t, heads, d), q.dtype, q.device)
    _pos_bias_attention_kernel[(utils.cdiv(t, block_m), batch * heads)](
        q, k, v, p, pos_bias_u, pos_bias_v, mask_u8, out,
        heads, t, s, d, d**-0.5 * LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *p_strides, *pos_bias_u.stride(), *pos_bias_v.stride(),
        *mask_strides, *out.stride(),
        HAS_MASK=mask is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        DOT_DTYPE=dot_dtype, PRECISION=precision, num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out


def pos_bias_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    p: torch.Tensor,
    pos_bias_u: torch.Tensor,
    pos_bias_v: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """PyTorch reference: WeNet's own sequence of operations (``RelPositionMultiHeadedAttention.forward``
    without ``rel_shift``, then ``forward_attention``): the biased queries in the activation dtype, two
    ``[B, H, T, S]`` matmuls, their sum divided by sqrt(D), a masked softmax in float32, masked_fill(0),
    the weights cast to v's dtype and multiplied with v. Returns ``[B, T, H, D]`` contiguous."""
    _check(q, k, v, p, pos_bias_u, pos_bias_v, mask)
    q_u = (q + pos_bias_u).transpose(1, 2)  # [B, H, T, D]
    q_v = (q + pos_bias_v).transpose(1, 2)
    matrix_ac = torch.matmul(q_u, k.transpose(-2, -1))  # [B, H, T, S] content terms
    matrix_bd = torch.matmul(q_v, p.transpose(-2, -1))  # [B, H, T, S] position terms
    scores = ((matrix_ac + matrix_bd) / math.sqrt(q.size(-1))).float()
    if mask is not None:
        blocked = ~mask.unsqueeze(1)  # [B, 1, 1 | T, S]
        weights = torch.softmax(scores.masked_fill(blocked, -math.inf), dim=-1).masked_fill(blocked, 0.0)
    else:
        weights = torch.softmax(scores, dim=-1)
    out = torch.matmul(weights.to(v.dtype), v)  # [B, H, T, D]
    return out.transpose(1, 2).contiguous()


def pos_bias_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    p: torch.Tensor,
    pos_bias_u: torch.Tensor,
    pos_bias_v: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Conformer relative-position self-attention: ``softmax(((q+u) k^T + (q+w) p^T) / sqrt(D), mask) v``.

    Args:
        q: ``[B, T, H, D]`` queries (``linear_q``'s output viewed per head, not transposed); any strides.
        k, v: ``[B, H, S, D]`` keys and values (may be views of one fused tensor); any strides.
        p: ``[1 | B, H, S, D]`` positional rows of the S keys (``linear_pos(pos_emb)`` per head).
        pos_bias_u, pos_bias_v: ``[H, D]`` the content and position biases (Transformer-XL's u and v).
        mask: ``[1 | B, 1 | T, S]`` bool, True = may attend; None attends everywhere. Query rows with no
            allowed key give zeros.
        All float tensors share one dtype (fp32/fp16/bf16).

    Returns:
        ``[B, T, H, D]`` contiguous, in q's dtype. Triton on CUDA, the PyTorch reference otherwise.
    """
    if utils.use_triton(q):
        return pos_bias_attention_triton(q, k, v, p, pos_bias_u, pos_bias_v, mask)
    return pos_bias_attention_ref(q, k, v, p, pos_bias_u, pos_bias_v, mask)
