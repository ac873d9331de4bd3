"""Multi-head attention read and written in the projections' own ``[B, N, heads * D]`` layout (flash style).

For ``q [Bq, Nq, heads * D]`` and ``k, v [Bk, Nk, heads * D]`` (``Bq`` and ``Bk`` are B, or 1 for a side
shared by the whole batch), per batch row ``b`` and head ``h`` (columns ``h * D .. h * D + D - 1``)::

    out[b, i, h] = sum_j softmax_j(scale * q[b, i, h] . k[b, j, h]) v[b, j, h]        scale = D ** -0.5

This is the attention of SAM's mask decoder (Kirillov et al. 2023, arXiv 2304.02643, Appendix A: the
two-way transformer), whose attentions are lopsided: a few prompt tokens (5 output tokens + points/box
corners) against the 64 x 64 = 4096 image tokens, either way round, with head dim 16 (cross-attention at
half width, 8 heads) or 32. Written with PyTorch ops, each one is a head transpose copy of the inputs, a
batched product whose inner size of 7 tokens sends cuBLAS to an unaligned SIMT kernel, an fp32 upcast,
scale, softmax, downcast, a second such product and a transpose copy of the output: about ten passes over
``[64 prompts, 8 heads, 4096, 7]`` tensors, ~2 ms of the decoder's 6.4 ms at 64 prompts on an H200. Here it is
one pass: each program reads its queries' ``[BLOCK_M, D]`` tile straight from the projection output (the
head is a column offset), streams the keys in ``BLOCK_N`` tiles with an online softmax in fp32 (Milakov &
Gimelshein 2018, arXiv 1805.02867; Dao et al. 2022, arXiv 2205.14135) and writes its output tile where the
output projection reads it. A shared side (batch stride 0) is read by every batch row, never copied.

Rounding: the products accumulate in fp32, the softmax runs in fp32, the probabilities are rounded to v's
dtype for the second product (as flash attention and the reference below do).
"""

from __future__ import annotations

import torch

from turboformer.kernels import utils
from turboformer.kernels.utils import KernelInputError, tl, triton

LOG2E = 1.4426950408889634  # softmax in base 2: exp(x) = exp2(x * log2(e))
MAX_HEAD_DIM = 128


@triton.jit
def _heads_attention_kernel(
    q_ptr,  # [Bq, Nq, heads * D]
    k_ptr,  # [Bk, Nk, heads * D]
    v_ptr,  # [Bk, Nk, heads * D]
    o_ptr,  # [B, Nq, heads * D] out
    NQ,
    NK,
    HEADS,
    D,
    qk_scale,  # softmax scale * log2(e)
    stride_qb, stride_qn, stride_qc,  # stride_qb = 0: q shared by the batch
    stride_kb, stride_kn, stride_kc,
    stride_vb, stride_vn, stride_vc,
    stride_ob, stride_on, stride_oc,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr,  # the inputs' dtype; fp32 for bf16 under the interpreter (numpy has no bf16 dot)
    PRECISION: tl.constexpr,  # tl.dot input precision for fp32 operands: "ieee" or "tf32"
):  # fmt: skip
    pid_bh = tl.program_id(1)
    b = (pid_bh // HEADS).to(tl.int64)
    col0 = (pid_bh % HEADS) * D  # the head's first column
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # query rows
    m_mask = m < NQ
    d = tl.arange(0, BLOCK_D)
    d_mask = d < D
    cols = col0 + d

    q = tl.load(
        q_ptr + b * stride_qb + m[:, None] * stride_qn + cols[None, :] * stride_qc,
        mask=m_mask[:, None] & d_mask[None, :], other=0.0,
    ).to(DOT_DTYPE)  # [BLOCK_M, BLOCK_D]
    m_i = tl.full([BLOCK_M], -float("inf"), dtype=tl.float32)  # running max, base-2 units
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # softmax denominator relative to m_i
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # unnormalised output relative to m_i
    k_base = k_ptr + b * stride_kb + cols[:, None] * stride_kc
    v_base = v_ptr + b * stride_vb + cols[None, :] * stride_vc
    for n0 in range(0, NK, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)  # key rows
        n_mask = n < NK
        kt = tl.load(k_base + n[None, :] * stride_kn, mask=d_mask[:, None] & n_mask[None, :], other=0.0)
        s = tl.dot(q, kt.to(DOT_DTYPE), input_precision=PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N] fp32
        s = tl.where(n_mask[None, :], s, -float("inf"))
        # Online softmax: the first tile holds key 0, so m_new is finite from the first iteration on.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + n[:, None] * stride_vn, mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        p = p.to(v_ptr.dtype.element_ty).to(DOT_DTYPE)  # rounded to v's dtype for the tensor cores
        acc = tl.dot(p, v.to(DOT_DTYPE), acc=acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new

    out = acc / l_i[:, None]
    tl.store(
        o_ptr + b * stride_ob + m[:, None] * stride_on + cols[None, :] * stride_oc,
        out.to(o_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :],
    )


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> int:
    """Validate the inputs; return the batch B."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        utils.check_float(name, t)
        if t.dim() != 3:
            raise KernelInputError(f"{name} must be [B, N, heads * D], got shape {list(t.shape)}")
    if len({q.dtype, k.dtype, v.dtype}) != 1:
        raise KernelInputError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise KernelInputError(f"k and v must share a shape, got {list(k.shape)} and {list(v.shape)}")
    width = q.shape[2]
    if k.shape[2] != width:
        raise KernelInputError(f"q and k must have the same width heads * D, got {width} and {k.shape[2]}")
    if heads < 1 or width % heads:
        raise KernelInputError(f"the width {width} does not split into {heads} heads")
    if width // heads > MAX_HEAD_DIM:
        raise KernelInputError(f"head dim {width // heads} exceeds {MAX_HEAD_DIM}")
    bq, bk = q.shape[0], k.shape[0]
    if bq != bk and min(bq, bk) != 1:
        raise KernelInputError(f"batches must match or one of them be 1 (shared), got q {bq} and k/v {bk}")
    if k.shape[1] == 0:
        raise KernelInputError("attention over no keys")
    return max(bq, bk)


def _plan(num_q: int, num_k: int, head_dim: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """``(block_m, block_n, block_d, num_warps)`` from the shapes alone (capturable). Many queries against few
    keys (image-to-token): 64 queries per program, one key tile of the padded key count; few queries against
    many keys (token-to-image): one query tile of the padded query count, 64 keys per step (fp32: 32). The
    tiles are at least 16 (tl.dot's minimum)."""
    block_d = max(16, utils.next_power_of_2(head_dim))
    block_m = min(64, max(16, utils.next_power_of_2(num_q)))
    cap = 64 if dtype != torch.float32 else 32
    block_n = min(cap, max(16, utils.next_power_of_2(num_k)))
    return block_m, block_n, block_d, 4


def heads_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """:func:`heads_attention` with the Triton kernel."""
    batch = _check(q, k, v, heads)
    utils.check_launchable(q, k, v)
    num_q, width = q.shape[1], q.shape[2]
    num_k, head_dim = k.shape[1], width // heads
    out = utils.empty((batch, num_q, width), q.dtype, q.device)
    if batch == 0 or num_q == 0:
        return out
    block_m, block_n, block_d, num_warps = _plan(num_q, num_k, head_dim, q.dtype)
    dot_dtype, precision = utils.dot_settings(q.dtype)

    def batch_strides(t: torch.Tensor) -> tuple[int, int, int]:
        return (0 if t.shape[0] == 1 else t.stride(0)), t.stride(1), t.stride(2)

    _heads_attention_kernel[(utils.cdiv(num_q, block_m), batch * heads)](
        q, k, v, out, num_q, num_k, heads, head_dim, head_dim**-0.5 * LOG2E,
        *batch_strides(q), *batch_strides(k), *batch_strides(v), *out.stride(),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        DOT_DTYPE=dot_dtype, PRECISION=precision, num_warps=num_warps,
    )  # fmt: skip
    return out


def heads_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """PyTorch reference: the heads split off as a view, both products and the softmax in fp32 (products of
    fp16/bf16 inputs are exact in fp32, as on the tensor cores), the probabilities rounded to v's dtype for the
    second product, the output rounded once; a batch of 1 broadcasts."""
    batch = _check(q, k, v, heads)

    def split(t: torch.Tensor) -> torch.Tensor:  # [B, N, heads * D] -> [B, heads, N, D]
        return t.unflatten(2, (heads, -1)).transpose(1, 2)

    qh, kh, vh = split(q.float()), split(k.float()), split(v.float())
    scores = (qh @ kh.transpose(-2, -1)) * (qh.shape[-1] ** -0.5)  # [B, heads, Nq, Nk]
    probs = torch.softmax(scores, dim=-1).to(v.dtype).float()
    out = probs @ vh  # [B, heads, Nq, D]
    return out.transpose(1, 2).reshape(batch, q.shape[1], q.shape[2]).to(q.dtype)


def heads_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """``softmax(q k^T / sqrt(D)) v`` per head, on tensors in their projection layout.

    Args:
        q: ``[Bq, Nq, heads * D]`` queries (any strides); ``Bq`` is B or 1 (shared by the batch).
        k, v: ``[Bk, Nk, heads * D]`` keys and values; ``Bk`` is B or 1.
        heads: number of heads; head ``h`` is columns ``h * D .. h * D + D - 1``.

    Returns:
        ``[B, Nq, heads * D]`` in q's dtype, contiguous. Triton on CUDA, the reference otherwise.
    """
    if utils.use_triton(q):
        return heads_attention_triton(q, k, v, heads)
    return heads_attention_ref(q, k, v, heads)
