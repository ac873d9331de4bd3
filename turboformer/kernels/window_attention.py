"""SAM's encoder attention read straight from the fused qkv projection: windows, padding and rel-pos in one kernel.

Each block of SAM's image encoder (Kirillov et al. 2023, arXiv 2304.02643; the ViTDet backbone, Li et al.
2022, arXiv 2203.16527) runs multi-head self-attention either globally over its ``H x W`` token grid or in
``S x S`` windows (S = 14 on the 64 x 64 grid of a 1024-pixel image). Upstream, a windowed block

1. zero-pads the normalised tokens ``[B, H, W, C]`` to a multiple of S (64 -> 70) and copies them into
   ``[B * nWindows, S, S, C]`` windows,
2. projects every padded token (``qkv``: a padded token's q, k and v are the projection's bias),
3. adds the decomposed relative-position bias of MViTv2 (Li et al. 2022, arXiv 2112.01526, Eq. 4)::

       score(i, j) = scale * q_i . k_j + q_i . R_h[row(i) - row(j)] + q_i . R_w[col(i) - col(j)]

   built from two ``einsum`` products and broadcast to the ``[N, N]`` scores,
4. softmaxes, weighs v, and copies the windows back (dropping the padded queries).

Here the projection runs on the unpadded tokens and this kernel does the rest. A program owns ``BLOCK_M`` of
one window's real queries for one head: it reads them, and its window's keys and values, from the
``[B, H, W, 3C]`` projection by grid coordinates (a padded key's k and v are the bias, loaded once), writes
its output token-major into ``[B, H, W, C]`` for the output projection, and never touches a padded query.
The rel-pos terms start as one small strided batched matmul before the kernel (:func:`rel_pos_products`):
``P = q @ [R_h; R_w]^T``, every query against every table row, rounded to the input dtype as upstream's einsum
output is; a program then loads its queries' ``rel_h[i, r] = P[i, row(i) - r + S - 1]`` (and ``rel_w``) with
gathered addresses, once. Keys stream in ``BLOCK_N`` tiles with an online softmax in fp32 (Milakov &
Gimelshein 2018, arXiv 1805.02867; FlashAttention, Dao et al. 2022, arXiv 2205.14135); each tile's bias is

- where a key tile is one whole key row (``ROW_TILES``: ``BLOCK_N == S_w``, the global blocks), ``rel_w`` as
  is (the same ``[BLOCK_M, S_w]`` tile for every key row) plus the ``rel_h`` column of that row, both moved
  into the scores' register layout once before the key loop;
- otherwise (the 14 x 14 windows) two products with one-hot matrices of the keys' rows and columns,
  ``rel_h [BLOCK_M, 16] @ onehot_h [16, BLOCK_N] + rel_w @ onehot_w``, exact (one non-zero term each).

A padded key's k and v are not materialised: keys load as zeros there (plain masked loads, which Triton
pipelines; a select between the load and the product would stop that), its score gets ``q . k_bias`` added,
and the padded keys' softmax mass times ``v_bias`` is added to the output at the end: exact, fp32.

The head dim is padded to a power of two (ViT-H: 80 -> 128). Splitting it 64 + 16 passed the interpreter but
read out of bounds on an H200 with Triton 3.6 (fp16/bf16 only): not used.

The reference :func:`window_attention_ref` is upstream's maths in fp32, and its pieces
(:func:`decomposed_rel_pos`, :func:`window_partition`, :func:`window_unpartition`) are the ones the encoder's
fp32 path runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from turboformer.kernels import utils
from turboformer.kernels.utils import KernelInputError, tl, triton

LOG2E = 1.4426950408889634  # softmax in base 2: exp(x) = exp2(x * log2(e))
MAX_HEAD_DIM = 256
MAX_WINDOW_SIDE = 128  # rel_h / rel_w tiles are held in registers for the whole key loop


@triton.jit
def _window_attention_kernel(
    qkv_ptr,  # [B, H, W, 3 * C] the fused projection, C = HEADS * D; channels contiguous
    bias_ptr,  # [3 * C]: the projection's bias = q, k, v of a zero (padded) token
    p_ptr,  # [HEADS, B * H * W, RH + RW]: q . R_h[t] for t < RH = 2 SH - 1, then q . R_w[t - RH]
    o_ptr,  # [B, H, W, C] out, channels contiguous
    H, W,  # token grid
    SH, SW,  # window (= H, W in a global block)
    NWH, NWW,  # windows per column and per row
    HEADS, D, C,
    qk_scale,  # softmax scale * log2(e)
    stride_b, stride_h, stride_w,  # qkv token strides
    stride_ob, stride_oh, stride_ow,
    stride_ph, stride_pt,  # p: head and token strides (table offsets contiguous)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SH: tl.constexpr,  # >= SH: rel_h columns (key rows)
    BLOCK_SW: tl.constexpr,  # >= SW: rel_w columns (key columns)
    ROW_TILES: tl.constexpr,  # BLOCK_N == SW (== BLOCK_SW): key tile t is key row t
    DOT_DTYPE: tl.constexpr,  # the inputs' dtype; fp32 for bf16 under the interpreter (numpy has no bf16 dot)
    PRECISION: tl.constexpr,  # tl.dot input precision for fp32 operands: "ieee" (true fp32) or "tf32"
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid = tl.program_id(1)  # (image, window, head), head fastest
    head = pid % HEADS
    window = (pid // HEADS) % (NWH * NWW)
    b = pid // HEADS // (NWH * NWW)
    y0 = (window // NWW) * SH  # the window's top-left token
    x0 = (window % NWW) * SW
    rows_real = tl.minimum(SH, H - y0)  # the window's tokens inside the grid: its top-left rows_real x cols_real
    cols_real = tl.minimum(SW, W - x0)

    # This program's queries: real tokens of the window, row-major over the rows_real x cols_real block.
    i = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q_mask = i < rows_real * cols_real
    qr = i // cols_real  # window-local row and column
    qc = i % cols_real
    q_tok = b.to(tl.int64) * stride_b + (y0 + qr).to(tl.int64) * stride_h + (x0 + qc).to(tl.int64) * stride_w
    head_col = head * D
    d = tl.arange(0, BLOCK_D)
    d_mask = d < D
    q = tl.load(qkv_ptr + q_tok[:, None] + head_col + d[None, :], mask=q_mask[:, None] & d_mask[None, :], other=0.0)
    # A padded key's k and v are the bias. Keys load as zeros where padded (plain masked loads, which the
    # compiler pipelines), and the bias comes back exactly: its score q . k_bias is added to the padded columns,
    # and the softmax mass of the padded keys (pad) times v_bias is added to the output at the end.
    k_bias = tl.load(bias_ptr + C + head_col + d, mask=d_mask, other=0.0).to(tl.float32)
    v_bias = tl.load(bias_ptr + 2 * C + head_col + d, mask=d_mask, other=0.0).to(tl.float32)
    q_kbias = tl.sum(q.to(tl.float32) * k_bias[None, :], axis=1) * qk_scale  # [BLOCK_M], base-2 units
    q = q.to(DOT_DTYPE)

    # The rel-pos terms of these queries, gathered from p: rel_h[i, r] = q_i . R_h[row(i) - r + SH - 1].
    c_h = tl.arange(0, BLOCK_SH)  # key rows
    c_w = tl.arange(0, BLOCK_SW)  # key columns
    q_grid = (b * H + y0 + qr).to(tl.int64) * W + x0 + qc  # token index in the [B, H, W] grid
    p_row = p_ptr + head.to(tl.int64) * stride_ph + q_grid * stride_pt  # [BLOCK_M]
    rel_h = tl.load(p_row[:, None] + (qr[:, None] - c_h[None, :] + SH - 1),
                    mask=q_mask[:, None] & (c_h < SH)[None, :], other=0.0).to(DOT_DTYPE)  # [BLOCK_M, BLOCK_SH]
    rel_w = tl.load(p_row[:, None] + (2 * SH - 1) + (qc[:, None] - c_w[None, :] + SW - 1),
                    mask=q_mask[:, None] & (c_w < SW)[None, :], other=0.0).to(DOT_DTYPE)  # [BLOCK_M, BLOCK_SW]
    if ROW_TILES:
        # Key tile t is key row t: its bias is rel_w as is (the same every tile) plus one rel_h column. Both
        # are moved into the scores' layout once, as products with the identity (exact).
        bias_w = tl.dot(rel_w, (c_w[:, None] == c_w[None, :]).to(DOT_DTYPE), input_precision=PRECISION)
        bias_h = tl.dot(rel_h, (c_h[:, None] == c_h[None, :]).to(DOT_DTYPE), input_precision=PRECISION)

    m_i = tl.full([BLOCK_M], -float("inf"), dtype=tl.float32)  # running max, base-2 units
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # softmax denominator relative to m_i
    pad = tl.zeros([BLOCK_M], dtype=tl.float32)  # the padded keys' share of l_i
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # unnormalised output relative to m_i
    # The window's last query tiles can be empty (edge windows hold 112 or 64 real queries of 196): no keys.
    n_end = tl.where(pid_m * BLOCK_M < rows_real * cols_real, SH * SW, 0)
    for n0 in range(0, n_end, BLOCK_N):
        j = n0 + tl.arange(0, BLOCK_N)
        kr = j // SW
        kc = j % SW
        k_valid = j < SH * SW
        k_real = k_valid & (kr < rows_real) & (kc < cols_real)
        k_tok = b.to(tl.int64) * stride_b + (y0 + kr).to(tl.int64) * stride_h + (x0 + kc).to(tl.int64) * stride_w
        kt = tl.load(qkv_ptr + C + head_col + k_tok[None, :] + d[:, None], mask=k_real[None, :] & d_mask[:, None],
                     other=0.0).to(DOT_DTYPE)  # [BLOCK_D, BLOCK_N]
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
        if ROW_TILES:
            bias = bias_w + tl.sum(tl.where(c_h[None, :] == n0 // SW, bias_h, 0.0), axis=1)[:, None]
        else:  # one-hot products: bias[i, j] = rel_h[i, row(j)] + rel_w[i, col(j)], exact (one term each)
            onehot_h = (c_h[:, None] == kr[None, :]).to(DOT_DTYPE)  # [BLOCK_SH, BLOCK_N]
            onehot_w = (c_w[:, None] == kc[None, :]).to(DOT_DTYPE)  # [BLOCK_SW, BLOCK_N]
            bias = tl.dot(rel_h, onehot_h, input_precision=PRECISION)
            bias = tl.dot(rel_w, onehot_w, acc=bias, input_precision=PRECISION)
        # (1.44... = LOG2E, written out: a @triton.jit function cannot read a plain module global)
        s = s + bias * 1.4426950408889634 + tl.where(k_real[None, :], 0.0, q_kbias[:, None])
        s = tl.where(k_valid[None, :], s, -float("inf"))
        # Online softmax; the first tile holds key 0 (real in every window), so m_new is finite from the start.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        pad = pad * alpha + tl.sum(tl.where(k_real[None, :], 0.0, p), axis=1)
        v = tl.load(qkv_ptr + 2 * C + head_col + k_tok[:, None] + d[None, :], mask=k_real[:, None] & d_mask[None, :],
                    other=0.0).to(DOT_DTYPE)  # [BLOCK_N, BLOCK_D]
        # p rounded to the inputs' dtype for the tensor cores (FlashAttention's choice), accumulated in fp32
        p = p.to(qkv_ptr.dtype.element_ty).to(DOT_DTYPE)
        acc = tl.dot(p, v, acc=acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new

    out = (acc + pad[:, None] * v_bias[None, :]) / l_i[:, None]
    o_tok = b.to(tl.int64) * stride_ob + (y0 + qr).to(tl.int64) * stride_oh + (x0 + qc).to(tl.int64) * stride_ow
    tl.store(o_ptr + o_tok[:, None] + head_col + d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=q_mask[:, None] & d_mask[None, :])


def rel_pos_products(qkv: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, heads: int) -> torch.Tensor:
    """``p [heads, B * H * W, (2 SH - 1) + (2 SW - 1)]``: every query's dot product with every row of both
    rel-pos tables, in qkv's dtype (upstream's einsum computes these same products and rounds them so). One
    strided batched matmul over the q part of the projection, no copy of q: ~0.3 MFLOP per token, against the
    einsums' permuted copies of q and their [S, S, D] expanded tables."""
    b, h, w, c3 = qkv.shape
    d = c3 // (3 * heads)
    q = qkv.view(b * h * w, 3 * heads, d)[:, :heads].transpose(0, 1)  # [heads, T, D], rows 3C apart
    tables = torch.cat([rel_pos_h, rel_pos_w]).t()  # [D, RH + RW]
    return torch.bmm(q, tables.expand(heads, *tables.shape))


def _check(qkv, bias, rel_pos_h, rel_pos_w, heads: int, window: int) -> tuple[int, int, int]:
    """Validate the inputs; return ``(head_dim, SH, SW)``."""
    for name, t in (("qkv", qkv), ("rel_pos_h", rel_pos_h), ("rel_pos_w", rel_pos_w)):
        utils.check_float(name, t)
    if qkv.dim() != 4:
        raise KernelInputError(f"qkv must be [B, H, W, 3 * C], got shape {list(qkv.shape)}")
    b, h, w, c3 = qkv.shape
    if heads <= 0 or c3 % (3 * heads):
        raise KernelInputError(f"qkv width {c3} is not 3 * heads * head_dim for {heads} heads")
    d = c3 // (3 * heads)
    if window < 0:
        raise KernelInputError(f"window must be >= 0 (0: global attention), got {window}")
    sh, sw = window_shape((h, w), window)
    if b == 0 or h == 0 or w == 0 or d == 0:
        raise KernelInputError(f"empty attention: qkv shape {list(qkv.shape)}")
    if d > MAX_HEAD_DIM:
        raise KernelInputError(f"head_dim {d} exceeds {MAX_HEAD_DIM}")
    if max(sh, sw) > MAX_WINDOW_SIDE:
        raise KernelInputError(f"window side {max(sh, sw)} exceeds {MAX_WINDOW_SIDE}")
    if rel_pos_h.shape != (2 * sh - 1, d) or rel_pos_w.shape != (2 * sw - 1, d):
        raise KernelInputError(
            f"rel-pos tables must be [{2 * sh - 1}, {d}] and [{2 * sw - 1}, {d}] for a {sh} x {sw} window, got "
            f"{list(rel_pos_h.shape)} and {list(rel_pos_w.shape)}"
        )
    if bias is not None:
        utils.check_vector("qkv_bias", bias, c3)
    if len({t.dtype for t in (qkv, rel_pos_h, rel_pos_w) + ((bias,) if bias is not None else ())}) != 1:
        raise KernelInputError("qkv, its bias and the rel-pos tables must share a dtype")
    return d, sh, sw


def _plan(sh: int, sw: int, d: int, dtype: torch.dtype, block_m: int | None, block_n: int | None):
    """Tile sizes, warps and pipeline stages from the shapes alone, as measured on an H200 at batch 8 in bf16
    (``benchmarks/tune_window_attention.py``, ``results/NVIDIA-H200/tune_window_attention.md``): [128, 64]
    tiles everywhere; 8 warps and 3 stages except at head dim <= 64 in the windows (4 warps, 2 stages). A
    key tile is one whole key row where the row is a power of two the size of the key tile (the 64 x 64
    global blocks). A window's 196 real queries take two programs, an edge window's 112 one, the corner's 64
    one. fp32 runs [64, 32] tiles (twice the bytes). Returns ``(block_m, block_n, warps, stages, row_tiles)``."""
    low = dtype != torch.float32
    if block_m is None:
        block_m = 128 if low else 64
    if block_n is None:
        block_n = 64 if low else 32
    row_tiles = block_n == sw
    wide = sh * sw >= 1024 or d > 64
    return block_m, block_n, 8 if block_m >= 128 and wide else 4, 3 if wide else 2, row_tiles


def window_attention_triton(
    qkv: torch.Tensor,
    qkv_bias: torch.Tensor | None,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    heads: int,
    window: int,
    scale: float | None = None,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """The fused kernel; see :func:`window_attention`. ``block_m`` (queries per program) and ``block_n`` (keys
    per loop step), powers of two >= 16, ``num_warps`` and ``num_stages`` override the shape-based defaults,
    for tests and tuning (``benchmarks/tune_window_attention.py``)."""
    d, sh, sw = _check(qkv, qkv_bias, rel_pos_h, rel_pos_w, heads, window)
    bias = qkv_bias if qkv_bias is not None else torch.zeros(qkv.shape[-1], dtype=qkv.dtype, device=qkv.device)
    utils.check_launchable(qkv, bias, rel_pos_h, rel_pos_w)
    for name, block in (("block_m", block_m), ("block_n", block_n)):
        if block is not None and (block < 16 or block & (block - 1)):
            raise KernelInputError(f"{name} must be a power of two >= 16, got {block}")
    if qkv.stride(3) != 1:
        qkv = qkv.contiguous()
    if bias.stride(0) != 1:
        bias = bias.contiguous()
    b, h, w, c3 = qkv.shape
    c = c3 // 3
    nwh, nww = utils.cdiv(h, sh), utils.cdiv(w, sw)
    scale = d**-0.5 if scale is None else scale
    block_m, block_n, warps, stages, row_tiles = _plan(sh, sw, d, qkv.dtype, block_m, block_n)
    num_warps, num_stages = num_warps or warps, num_stages or stages
    dot_dtype, precision = utils.dot_settings(qkv.dtype)
    p = rel_pos_products(qkv, rel_pos_h, rel_pos_w, heads)  # [heads, T, RH + RW]
    out = utils.empty((b, h, w, c), qkv.dtype, qkv.device)
    grid = (utils.cdiv(sh * sw, block_m), b * nwh * nww * heads)
    _window_attention_kernel[grid](
        qkv, bias, p, out,
        h, w, sh, sw, nwh, nww, heads, d, c, scale * LOG2E,
        qkv.stride(0), qkv.stride(1), qkv.stride(2), out.stride(0), out.stride(1), out.stride(2),
        p.stride(0), p.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, utils.next_power_of_2(d)),
        BLOCK_SH=max(16, utils.next_power_of_2(sh)), BLOCK_SW=max(16, utils.next_power_of_2(sw)),
        ROW_TILES=row_tiles, DOT_DTYPE=dot_dtype, PRECISION=precision, num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out


# --- the reference: upstream's maths ------------------------------------------------------------------------


def relative_position_index(size: int, device: torch.device) -> torch.Tensor:
    """``[size, size]`` table of ``q - k + size - 1``: the row of a rel-pos table for each (q, k) pair.

    SAM always attends within equal query and key grids, so this is the whole of upstream's
    ``get_rel_pos`` (its interpolation branch only runs when a table has the wrong length, which the
    loader rejects instead).
    """
    coords = torch.arange(size, device=device)
    return coords[:, None] - coords[None, :] + (size - 1)


def decomposed_rel_pos(
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, grid: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decomposed relative-position terms of MViTv2 (arXiv 2112.01526, Eq. 4; upstream
    ``add_decomposed_rel_pos``).

    The bias of query (qh, qw) on key (kh, kw) is ``q . Rh[qh - kh] + q . Rw[qw - kw]``; it is
    returned as its two factors so a kernel can add them per tile without building ``[N, N]``.

    Args:
        q: queries, ``[..., H * W, D]`` (unscaled; ``[B * heads, ...]`` or ``[B, heads, ...]``, any strides).
        rel_pos_h, rel_pos_w: tables ``[2H - 1, D]`` and ``[2W - 1, D]``.
        grid: ``(H, W)``, the token grid the queries and keys lie on.

    Returns:
        ``rel_h`` ``[..., H, W, H]`` (indexed by key row) and ``rel_w`` ``[..., H, W, W]`` (indexed by key
        column).
    """
    h, w = grid
    r_h = rel_pos_h[relative_position_index(h, q.device)]  # [H(q), H(k), D]
    r_w = rel_pos_w[relative_position_index(w, q.device)]  # [W(q), W(k), D]
    r_q = q.reshape(*q.shape[:-2], h, w, q.shape[-1])  # [..., H, W, D]
    rel_h = torch.einsum("...hwc,hkc->...hwk", r_q, r_h)
    rel_w = torch.einsum("...hwc,wkc->...hwk", r_q, r_w)
    return rel_h, rel_w


def window_partition(
    x: torch.Tensor, window: int, pad: torch.Tensor | None = None
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Split ``[B, H, W, C]`` into ``[B * nWindows, window, window, C]``, padding H and W up to a multiple of
    ``window`` (64 -> 70 for SAM's 14-token windows) with zeros, or with the vector ``pad [C]`` (a projection's
    bias: the projection of a zero token). Also returns the padded ``(Hp, Wp)``."""
    b, h, w, c = x.shape
    pad_h = (window - h % window) % window
    pad_w = (window - w % window) % window
    if pad is not None and (pad_h or pad_w):
        padded = pad.to(x.dtype).expand(b, h + pad_h, w + pad_w, c).clone()
        padded[:, :h, :w] = x
        x = padded
    elif pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(b, hp // window, window, wp // window, window, c)
    windows = x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, window, window, c)
    return windows, (hp, wp)


def window_unpartition(
    windows: torch.Tensor, window: int, padded_hw: tuple[int, int], hw: tuple[int, int]
) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``[B * nWindows, window, window, C]`` -> ``[B, H, W, C]``."""
    hp, wp = padded_hw
    h, w = hw
    b = windows.shape[0] // (hp * wp // window // window)
    x = windows.view(b, hp // window, wp // window, window, window, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).contiguous().view(b, hp, wp, -1)
    if hp > h or wp > w:
        x = x[:, :h, :w, :].contiguous()
    return x


def window_shape(hw: tuple[int, int], window: int) -> tuple[int, int]:
    """``(SH, SW)``, the attention's square of ``window`` tokens, or the whole ``(H, W)`` grid for window 0."""
    return (window, window) if window > 0 else tuple(hw)


def split_heads(
    qkv: torch.Tensor, qkv_bias: torch.Tensor | None, heads: int, window: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Upstream's layout of the attention inputs: q, k, v ``[B * nWindows, heads, S * S, D]`` (one window per
    image in a global block), padded tokens' q/k/v being the bias, from the projection ``[B, H, W, 3 C]``."""
    c3 = qkv.shape[-1]
    if window > 0:  # padded with the bias, or zeros without one
        qkv, _ = window_partition(qkv, window, pad=qkv_bias)  # [B * nW, S, S, 3C]
    n = qkv.shape[1] * qkv.shape[2]
    return qkv.reshape(-1, n, 3, heads, c3 // (3 * heads)).permute(2, 0, 3, 1, 4).unbind(0)


def merge_heads(out: torch.Tensor, hw: tuple[int, int], window: int) -> torch.Tensor:
    """Inverse of :func:`split_heads` for the attention output: ``[B * nW, heads, S * S, D]`` -> ``[B, H, W,
    heads * D]`` (windows joined, padded queries dropped)."""
    h, w = hw
    sh, sw = window_shape(hw, window)
    out = out.transpose(1, 2).reshape(-1, sh, sw, out.shape[1] * out.shape[3])
    if window > 0:
        out = window_unpartition(out, window, (utils.cdiv(h, sh) * sh, utils.cdiv(w, sw) * sw), hw)
    return out


def window_attention_ref(
    qkv: torch.Tensor,
    qkv_bias: torch.Tensor | None,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    heads: int,
    window: int,
    scale: float | None = None,
) -> torch.Tensor:
    """PyTorch reference in fp32, upstream's sequence (``Block`` + ``Attention`` + ``add_decomposed_rel_pos``):
    the projection of the zero-padded grid (real tokens' q/k/v, the bias at padded ones), window partition,
    explicit ``[N, N]`` scores + the decomposed rel-pos bias, softmax, weighted sum, unpartition and crop."""
    d, sh, sw = _check(qkv, qkv_bias, rel_pos_h, rel_pos_w, heads, window)
    bias = qkv_bias.float() if qkv_bias is not None else None
    q, k, v = split_heads(qkv.float(), bias, heads, window)  # [BW, heads, N, D]
    rel_h, rel_w = decomposed_rel_pos(q, rel_pos_h.float(), rel_pos_w.float(), (sh, sw))
    scale = d**-0.5 if scale is None else scale
    attn = ((q * scale) @ k.transpose(-2, -1)).view(*q.shape[:2], sh, sw, sh, sw)
    attn = attn + rel_h[..., :, None] + rel_w[..., None, :]
    n = sh * sw
    out = attn.view(*q.shape[:2], n, n).softmax(dim=-1) @ v  # [BW, heads, N, D]
    return merge_heads(out, qkv.shape[1:3], window).to(qkv.dtype)


def window_attention(
    qkv: torch.Tensor,
    qkv_bias: torch.Tensor | None,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    heads: int,
    window: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Multi-head self-attention of SAM's encoder, windowed or global, with the decomposed rel-pos bias.

    Args:
        qkv: ``[B, H, W, 3 * heads * D]``, the fused projection of the unpadded normalised tokens (upstream's
            ``qkv`` layout: q, k, v blocks, heads within each), fp32/fp16/bf16.
        qkv_bias: ``[3 * heads * D]``, the projection's bias (a padded token's q/k/v), or None for zeros.
        rel_pos_h, rel_pos_w: ``[2 S - 1, D]`` tables of the window (S = window; H and W for a global block).
        heads: attention heads.
        window: the window side S (upstream pads the grid up to a multiple of it), or 0 for global attention.
        scale: softmax scale of ``q . k``, default ``D ** -0.5`` (the rel-pos bias is not scaled).

    Returns:
        ``[B, H, W, heads * D]`` token-major, in qkv's dtype: Triton on CUDA, the PyTorch reference otherwise.
    """
    if utils.use_triton(qkv):
        return window_attention_triton(qkv, qkv_bias, rel_pos_h, rel_pos_w, heads, window, scale)
    return window_attention_ref(qkv, qkv_bias, rel_pos_h, rel_pos_w, heads, window, scale)
