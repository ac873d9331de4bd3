"""A decode step's encoder-decoder attention with the LayerNorm and the query projection before it, in one launch.

For ``x [N, C]`` (the residual stream, fp32 or the weight's dtype), ``delta [N, C]`` (the previous sublayer's
output), the query projection ``W_q [H D, C]``, ``b_q [H D]``, and the encoder's keys and values
``k, v [N, H, S, D]``, where the rows come in groups of ``group`` that share them (the beams of one sentence):

    s = x + delta                 rounded to x's dtype (the residual add of the previous sublayer)
    n = LayerNorm(s)              fp32 statistics
    q = round(round(n) @ W_q^T + b_q)           [N, H, D]: n and q rounded to the weight's dtype, fp32 products
    out[r, h] = softmax(scale * q[r, h] . k[g, h, :L]^T) @ v[g, h, :L]
                                  g = the first row of r's group, L = lengths[g]; fp32 scores, softmax and sum
    res = n (keep="norm": post-norm) or s (keep="sum": pre-norm), in x's dtype

``out_dim`` keeps the first lanes of each head's output: an engine that stores heads padded to an aligned width
(62 -> 64: zero rows in ``W_q``, zero key lanes) passes the padded K/V, whose rows load as 16-byte vectors, and
gets the unpadded ``[N, H, out_dim]`` that its out-projection takes.

Returns ``(out, res)``: exactly ``norm_linear(x, W_q, b_q, delta=delta, ln=ln, keep=keep)`` followed by
``decode_attention(q, k, v, lengths, scale)``, which is the reference (:func:`norm_cross_attention_ref`).

Why: in the Lite Transformer decode step (16 sentences x beam 4 = 64 rows, C = 496, 8 heads of 62, S = 32 source
tokens on an H200) those were two launches per layer, each bound by latency, not bytes: the step lost ~4 us per
layer to each (measured by dropping the query projection's launch, outputs aside: 247.6 -> 223.0 us per step).
Here the query never leaves the program: each program projects its own head's query from the normalised rows.

Kernel layout: one program per (group of rows, head). Before it waits for the previous kernel (programmatic
dependent launch on Hopper) it loads everything that kernel cannot have written: its head's slice of ``W_q``
``[D, C]``, the bias, the LayerNorm parameters, the group's length and first key/value tile. Then the prologue
(as ``norm_linear``'s: :func:`.norm_linear.add_norm_rows`; the head-0 program stores ``res``), the query as one
``tl.dot`` over C (fp16/bf16 tensor cores, fp32 accumulation), and an online softmax (Milakov & Gimelshein 2018,
arXiv 1805.02867) over key tiles of the group's K/V, its two products on the tensor cores at fp32 accuracy (see
the kernel). The group's rows are the dot's M dimension (padded to 16).
"""

from __future__ import annotations

import torch

from turboformer.kernels import utils
from turboformer.kernels.decode_attention import decode_attention_ref
from turboformer.kernels.norm_linear import _check as _check_norm_linear
from turboformer.kernels.norm_linear import add_norm_rows, norm_linear_ref
from turboformer.kernels.utils import KernelInputError, tl, triton

MAX_FEATURES = 1024  # C: the rows and the projection's weight slice are held whole
MAX_HEAD_DIM = 128
LOG2E = 1.4426950408889634  # softmax in base 2: exp(x) = exp2(x * log2(e))


@triton.jit
def _norm_cross_attention_kernel(
    x_ptr,  # [N, C] the residual stream, fp32 or the weight's dtype
    delta_ptr,  # [N, C] the previous sublayer's output
    res_ptr,  # [N, C] out: the new residual stream, x's dtype
    w_ptr,  # [H D, C] query projection, unit stride along C
    bias_ptr,  # [H D]
    ln_w_ptr, ln_b_ptr,  # [C] LayerNorm gain and shift
    k_ptr, v_ptr,  # [N, H, S, D] keys and values, unit stride along D (row g of each group is read)
    lengths_ptr,  # [N] keys attended by each row
    out_ptr,  # [N, H, D_out] out, unit stride along D: the first D_out <= D lanes of each head
    N, C, S, D, D_out, GROUP_ROWS,
    stride_x, stride_delta, stride_res, stride_w,
    stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs, stride_ob, stride_oh,
    qk_scale,  # softmax scale * log2(e)
    eps,
    HAS_BIAS: tl.constexpr, KEEP_NORM: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    PDL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    group = tl.program_id(0)
    h = tl.program_id(1)
    c = tl.arange(0, BLOCK_C)
    c_mask = c < C
    d = tl.arange(0, BLOCK_D)
    d_mask = d < D
    feature = h * D + d  # this head's rows of W_q
    # nothing here depends on the previous kernel: load it before waiting for it
    w = tl.load(w_ptr + feature.to(tl.int64)[:, None] * stride_w + c[None, :], mask=d_mask[:, None] & c_mask[None, :],
                other=0.0)  # [BLOCK_D, BLOCK_C]  # fmt: skip
    bias = tl.zeros([BLOCK_D], tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + feature, mask=d_mask, other=0.0).to(tl.float32)
    gain = tl.load(ln_w_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    shift = tl.load(ln_b_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    first = group * GROUP_ROWS  # the row whose keys and values the group reads
    length = tl.minimum(tl.load(lengths_ptr + first).to(tl.int32), S)
    k_row = k_ptr + first.to(tl.int64) * stride_kb + h * stride_kh + d[None, :]
    v_row = v_ptr + first.to(tl.int64) * stride_vb + h * stride_vh + d[None, :]
    keys = tl.arange(0, BLOCK_S)
    tile = (keys < length)[:, None] & d_mask[None, :]
    k0 = tl.load(k_row + keys.to(tl.int64)[:, None] * stride_ks, mask=tile, other=0.0)  # [BLOCK_S, BLOCK_D]
    v0 = tl.load(v_row + keys.to(tl.int64)[:, None] * stride_vs, mask=tile, other=0.0)
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()

    # the prologue and the query projection: [BLOCK_M, BLOCK_D]
    rows = tl.arange(0, BLOCK_M)
    rm = first + rows
    m_mask = (rows < GROUP_ROWS) & (rm < N)
    rows_tile = m_mask[:, None] & c_mask[None, :]
    s, n = add_norm_rows(x_ptr, delta_ptr, rm, c, rows_tile, stride_x, stride_delta, gain, shift, C, eps, True, True)
    if h == 0:
        kept = n if KEEP_NORM else s
        tl.store(res_ptr + rm[:, None] * stride_res + c[None, :], kept.to(res_ptr.dtype.element_ty), mask=rows_tile)
    hidden = n.to(w_ptr.dtype.element_ty)  # rounded as the unfused LayerNorm would store it
    q = tl.dot(hidden.to(DOT_DTYPE), tl.trans(w.to(DOT_DTYPE)), input_precision=PRECISION) + bias[None, :]
    q = q.to(w_ptr.dtype.element_ty)  # [BLOCK_M, BLOCK_D], rounded as the unfused linear stores it

    # Online softmax over the key tiles, base 2; at least one key (lengths >= 1). The dots run on the tensor cores
    # at fp32 accuracy: q and k are in the weight's dtype, so their products are exact in the fp32 accumulator
    # (the scale is applied to the scores); the probabilities p (fp32) enter as p_hi + p_lo, two halves in the
    # value's dtype (bf16 loses ~2^-16 of p, fp16 ~2^-22, against the values' own rounding of 2^-8 / 2^-11).
    m_i = tl.full([BLOCK_M], -float("inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_tile, v_tile = k0, v0
    for start in range(0, length, BLOCK_S):
        if start > 0:
            at = start + keys
            tile = (at < length)[:, None] & d_mask[None, :]
            k_tile = tl.load(k_row + at.to(tl.int64)[:, None] * stride_ks, mask=tile, other=0.0)
            v_tile = tl.load(v_row + at.to(tl.int64)[:, None] * stride_vs, mask=tile, other=0.0)
        scores = tl.dot(q.to(DOT_DTYPE), tl.trans(k_tile.to(DOT_DTYPE)), input_precision=PRECISION) * qk_scale
        scores = tl.where((start + keys < length)[None, :], scores, -float("inf"))  # [BLOCK_M, BLOCK_S]
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        p_hi = p.to(v_ptr.dtype.element_ty)
        p_lo = (p - p_hi.to(tl.float32)).to(v_ptr.dtype.element_ty)
        values = v_tile.to(DOT_DTYPE)
        pv = tl.dot(p_hi.to(DOT_DTYPE), values, input_precision=PRECISION)
        acc = acc * alpha[:, None] + tl.dot(p_lo.to(DOT_DTYPE), values, acc=pv, input_precision=PRECISION)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(out_ptr + rm.to(tl.int64)[:, None] * stride_ob + h * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & (d < D_out)[None, :])  # fmt: skip


def _check(x, delta, weight, bias, ln, k, v, lengths, group, keep, out_dim) -> tuple[int, int, int, int, int, int]:
    """Returns (N, C, H, S, D, D_out): the prologue and projection's inputs as norm_linear checks them, then the
    rest."""
    if delta is None or ln is None:
        raise KernelInputError("norm_cross_attention needs delta and ln: the residual add + LayerNorm it fuses")
    N, _, C = _check_norm_linear(x, weight, None, delta, ln, keep)  # the bias once the heads are known
    if k.dim() != 4 or v.shape != k.shape or k.shape[0] != N:
        raise KernelInputError(f"k and v must be [N={N}, H, S, D], got {list(k.shape)} and {list(v.shape)}")
    if k.dtype != weight.dtype or v.dtype != weight.dtype:
        raise KernelInputError(f"k and v must have the weight's dtype {weight.dtype}, got {k.dtype}, {v.dtype}")
    _, H, S, D = k.shape
    if weight.shape[0] != H * D:
        raise KernelInputError(f"weight must be [H * D = {H * D}, C], got {list(weight.shape)}")
    if bias is not None:
        utils.check_vector("bias", bias, H * D)
    if lengths.shape != (N,) or lengths.dtype not in (torch.int32, torch.int64):
        raise KernelInputError(f"lengths must be int32/int64 of shape [{N}], got {list(lengths.shape)} {lengths.dtype}")
    if group < 1 or N % group:
        raise KernelInputError(f"group must be a positive divisor of the {N} rows, got {group}")
    if out_dim is not None and not 1 <= out_dim <= D:
        raise KernelInputError(f"out_dim must be in [1, D = {D}], got {out_dim}")
    return N, C, H, S, D, D if out_dim is None else out_dim


def norm_cross_attention_triton(
    x: torch.Tensor,
    delta: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    ln: tuple[torch.Tensor, torch.Tensor],
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor,
    scale: float | None = None,
    *,
    group: int = 1,
    eps: float = 1e-5,
    keep: str = "norm",
    out_dim: int | None = None,
    num_warps: int = 8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """With the Triton kernel; see :func:`norm_cross_attention`. ``num_warps``: for tuning sweeps (8: the
    weight slice, 64 KB at the Lite shapes, is held in registers)."""
    N, C, H, S, D, D_out = _check(x, delta, weight, bias, ln, k, v, lengths, group, keep, out_dim)
    if C > MAX_FEATURES or D > MAX_HEAD_DIM:
        raise KernelInputError(f"norm_cross_attention_triton takes at most {MAX_FEATURES} features and heads of "
                               f"{MAX_HEAD_DIM}, got {C} and {D}")  # fmt: skip
    utils.check_launchable(*(t for t in (x, delta, weight, bias, *ln, k, v, lengths) if t is not None))
    x, delta, weight = (t if t.stride(1) == 1 else t.contiguous() for t in (x, delta, weight))
    if k.stride(3) != 1 or v.stride(3) != 1:
        raise KernelInputError("k and v must have unit stride along D")
    out = utils.empty((N, H, D_out), weight.dtype, x.device)
    res = utils.empty((N, C), x.dtype, x.device)
    if N == 0:
        return out, res
    dot_dtype, precision = utils.dot_settings(weight.dtype)
    pdl = utils.pdl_supported(x.device)
    scale = D**-0.5 if scale is None else scale
    _norm_cross_attention_kernel[(N // group, H)](
        x, delta, res, weight, bias if bias is not None else weight, ln[0], ln[1], k, v, lengths, out,
        N, C, S, D, D_out, group,
        x.stride(0), delta.stride(0), res.stride(0), weight.stride(0),
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1),
        float(scale) * LOG2E, float(eps),
        HAS_BIAS=bias is not None, KEEP_NORM=keep == "norm", DOT_DTYPE=dot_dtype, PRECISION=precision, PDL=pdl,
        BLOCK_M=max(16, utils.next_power_of_2(group)), BLOCK_C=max(16, utils.next_power_of_2(C)),
        BLOCK_D=max(16, utils.next_power_of_2(D)), BLOCK_S=max(16, min(64, utils.next_power_of_2(S))),
        num_warps=num_warps, **({"launch_pdl": True} if pdl else {}),
    )  # fmt: skip
    return out, res


def norm_cross_attention_ref(
    x: torch.Tensor,
    delta: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    ln: tuple[torch.Tensor, torch.Tensor],
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor,
    scale: float | None = None,
    *,
    group: int = 1,
    eps: float = 1e-5,
    keep: str = "norm",
    out_dim: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch reference: the two ops it fuses, ``norm_linear_ref`` then ``decode_attention_ref`` on the keys and
    values of each group's first row."""
    N, C, H, S, D, D_out = _check(x, delta, weight, bias, ln, k, v, lengths, group, keep, out_dim)
    q, res = norm_linear_ref(x, weight, bias, delta=delta, ln=ln, eps=eps, keep=keep)
    first = torch.arange(N, device=x.device) // group * group
    out = decode_attention_ref(q.view(N, H, D), k[first], v[first], lengths[first], scale)
    return out[..., :D_out].contiguous(), res


def norm_cross_attention(
    x: torch.Tensor,
    delta: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    ln: tuple[torch.Tensor, torch.Tensor],
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor,
    scale: float | None = None,
    *,
    group: int = 1,
    eps: float = 1e-5,
    keep: str = "norm",
    out_dim: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [N, H, D], res [N, C])`` of the module docstring.

    Args:
        x: ``[N, C]`` the residual stream (fp32 or the weight's dtype); delta: ``[N, C]`` added to it first.
        weight, bias: the query projection ``[H * D, C]`` (fp16/bf16/fp32) and ``[H * D]`` (or None).
        ln: ``(gain [C], shift [C])`` of the LayerNorm (``eps``).
        k, v: ``[N, H, S, D]`` in the weight's dtype, unit stride along D; rows ``g * group`` are read, for the
            ``group`` rows from there on (the other rows' keys are never read).
        lengths: ``[N]`` int32/int64: row g attends keys ``s < lengths[g]`` (at least 1; above S acts as S).
        scale: softmax scale, default ``D ** -0.5``.
        keep: ``"norm"`` (post-norm: res is the LayerNorm's output) or ``"sum"`` (pre-norm: x + delta).
        out_dim: the lanes of each head that ``out`` keeps (default all D): heads stored padded to an aligned
            width (zero rows of the weight and zero bias there, zero key lanes) return ``[N, H, out_dim]``.

    Triton on CUDA (C <= ``MAX_FEATURES``, D <= ``MAX_HEAD_DIM``; on CPU inside :func:`.utils.launch_on_cpu` with
    the interpreter), the reference otherwise."""
    kwargs = dict(group=group, eps=eps, keep=keep, out_dim=out_dim)
    if utils.use_triton_or_interpreter(x) and x.shape[-1] <= MAX_FEATURES and k.shape[-1] <= MAX_HEAD_DIM:
        return norm_cross_attention_triton(x, delta, weight, bias, ln, k, v, lengths, scale, **kwargs)
    return norm_cross_attention_ref(x, delta, weight, bias, ln, k, v, lengths, scale, **kwargs)
