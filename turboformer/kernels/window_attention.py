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
  is (the same ``[BLOCK_M, S_w]`` tile for every key row, moved into the scores' register layout once before
  the key loop) plus the ``rel_h`` column of that row: one number per query, loaded per tile and folded into
  the row maximum (``p = exp2(s - (m - rel_h))``) instead of added to every score;
- otherwise (the 14 x 14 windows) two products with one-hot matrices of the keys' rows and columns,
  ``rel_h [BLOCK_M, 16] @ onehot_h [16, BLOCK_N] + rel_w @ onehot_w``, exact (one non-zero term each).

Whole key tiles run in the loop without a key mask; the window's last, partial tile (196 = 3 x 64 + 4) runs
after it in a tile of its own size (16), not a full one.

Two launches split the windows: those wholly inside the grid (16 of SAM's 25) run the plain loop; the last
row and column of windows cross the grid's edge and run the same code with the padding work compiled in
(``EDGE``). A padded key's k and v are not materialised: keys load as zeros there (plain masked loads, which
Triton pipelines; a select between the load and the product would stop that), its score gets ``q . k_bias``
added, and the padded keys' softmax mass times ``v_bias`` is added to the output at the end: exact, fp32.

A head dim that is not a power of two runs as two parts, each its own pair of products (ViT-H: 80 = 64 + 16,
against 128 padded: 37% fewer tensor-core operations, and half the shared memory, so two programs fit on an
SM). On an H200 at batch 8 this and the points above took the ViT-H window blocks from 0.84 to 0.56 ms and the
global ones from 4.4 to 3.1 ms (``benchmarks/results/NVIDIA-H200/tune_window_attention.md``).

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
def _attend_key_tile(
    q, q2, rel_h, rel_w, bias_w, q_kbias,  # the program's queries and their bias terms (loop invariant)
    m_i, l_i, pad, acc, acc2,  # online-softmax state
    n0,  # first key of the tile (window-local, row-major)
    k_ptr,  # k of the window's top-left token for this head (its v is C further)
    p_row,  # [BLOCK_M] this program's rows of p
    qr,  # [BLOCK_M] window-local query rows
    q_mask,
    rows_real, cols_real, SH, SW, D, C, stride_h, stride_w, qk_scale,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_D2: tl.constexpr,
    BLOCK_SH: tl.constexpr,
    BLOCK_SW: tl.constexpr,
    ROW_TILES: tl.constexpr,
    EDGE: tl.constexpr,
    MASK_N: tl.constexpr,  # the tile runs past the window's last key
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """One step of the online softmax over keys ``n0 .. n0 + BLOCK_N``; returns the updated state."""
    j = n0 + tl.arange(0, BLOCK_N)
    kr = j // SW  # window-local key row and column
    kc = j % SW
    k_valid = j < SH * SW  # the window holds the key
    k_real = k_valid
    if EDGE:
        k_real = k_valid & (kr < rows_real) & (kc < cols_real)
    k_off = kr * stride_h + kc * stride_w
    d = tl.arange(0, BLOCK_D)
    kt = tl.load(k_ptr + k_off[None, :] + d[:, None], mask=k_real[None, :] & (d < D)[:, None],
                 other=0.0).to(DOT_DTYPE)  # [BLOCK_D, BLOCK_N]
    s = tl.dot(q, kt, input_precision=PRECISION)
    if BLOCK_D2 > 0:  # the head dim's second part (ViT-H: 80 = 64 + 16)
        d2 = BLOCK_D + tl.arange(0, BLOCK_D2)
        kt2 = tl.load(k_ptr + k_off[None, :] + d2[:, None], mask=k_real[None, :] & (d2 < D)[:, None],
                      other=0.0).to(DOT_DTYPE)
        s = tl.dot(q2, kt2, acc=s, input_precision=PRECISION)
    # (1.44... = LOG2E, written out: a @triton.jit function cannot read a plain module global)
    if ROW_TILES:
        # Key tile t is key row t: its bias is rel_w as is (bias_w, base 2) plus rel_h[:, t], one number per
        # query, which is folded into the row maximum below instead of added to every score.
        s = s * qk_scale + bias_w
        row_bias = tl.load(p_row + (qr - n0 // SW + SH - 1), mask=q_mask, other=0.0).to(tl.float32)
        row_bias = row_bias * 1.4426950408889634
    else:  # one-hot products: bias[i, j] = rel_h[i, row(j)] + rel_w[i, col(j)], exact (one term each)
        c_h = tl.arange(0, BLOCK_SH)
        c_w = tl.arange(0, BLOCK_SW)
        bias = tl.dot(rel_h, (c_h[:, None] == kr[None, :]).to(DOT_DTYPE), input_precision=PRECISION)
        bias = tl.dot(rel_w, (c_w[:, None] == kc[None, :]).to(DOT_DTYPE), acc=bias, input_precision=PRECISION)
        s = s * qk_scale + bias * 1.4426950408889634
        row_bias = tl.zeros_like(m_i)
    if EDGE:  # a padded key's k is the bias: its score is q . k_bias (the load gave 0)
        s = s + tl.where(k_real[None, :], 0.0, q_kbias[:, None])
    if MASK_N:
        s = tl.where(k_valid[None, :], s, -float("inf"))
    # Online softmax in base 2; the first tile holds key 0 (real in every window): m_new is finite from the start.
    m_new = tl.maximum(m_i, tl.max(s, axis=1) + row_bias)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - (m_new - row_bias)[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if EDGE:  # the padded keys' share of l_i; their v (the bias) is added at the end
        pad = pad * alpha + tl.sum(tl.where(k_real[None, :], 0.0, p), axis=1)
    # p rounded to the inputs' dtype for the tensor cores (FlashAttention's choice), accumulated in fp32
    p = p.to(k_ptr.dtype.element_ty).to(DOT_DTYPE)
    v = tl.load(k_ptr + C + k_off[:, None] + d[None, :], mask=k_real[:, None] & (d < D)[None, :],
                other=0.0).to(DOT_DTYPE)  # [BLOCK_N, BLOCK_D]
    acc = tl.dot(p, v, acc=acc * alpha[:, None], input_precision=PRECISION)
    if BLOCK_D2 > 0:
        v2 = tl.load(k_ptr + C + k_off[:, None] + d2[None, :], mask=k_real[:, None] & (d2 < D)[None, :],
                     other=0.0).to(DOT_DTYPE)
        acc2 = tl.dot(p, v2, acc=acc2 * alpha[:, None], input_precision=PRECISION)
    return m_new, l_i, pad, acc, acc2


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
    BLOCK_TAIL: tl.constexpr,  # keys of the last, partial key tile (SH * SW % BLOCK_N, to a power of two), or 0
    BLOCK_D: tl.constexpr,  # head dim, first part (a power of two)
    BLOCK_D2: tl.constexpr,  # head dim, second part, or 0: D <= BLOCK_D + BLOCK_D2
    BLOCK_SH: tl.constexpr,  # >= SH: rel_h columns (key rows)
    BLOCK_SW: tl.constexpr,  # >= SW: rel_w columns (key columns)
    ROW_TILES: tl.constexpr,  # BLOCK_N == SW (== BLOCK_SW): key tile t is key row t
    EDGE: tl.constexpr,  # this launch runs the windows that cross the grid's edge (padded keys) instead of the rest
    DOT_DTYPE: tl.constexpr,  # the inputs' dtype; fp32 for bf16 under the interpreter (numpy has no bf16 dot)
    PRECISION: tl.constexpr,  # tl.dot input precision for fp32 operands: "ieee" (true fp32) or "tf32"
):  # fmt: skip
    # program -> (image, window, head, query tile), query tile fastest (its key tiles stay in L2), then head
    num_m = tl.cdiv(SH * SW, BLOCK_M)
    pid_m = tl.program_id(0) % num_m
    pid = tl.program_id(0) // num_m
    head = pid % HEADS
    full_h = H // SH  # windows wholly inside the grid: the top-left full_h x full_w
    full_w = W // SW
    if EDGE:  # the last column's windows above the last row (right), then the last row's (bottom)
        n_windows = NWH * NWW - full_h * full_w
        e = (pid // HEADS) % n_windows
        right = full_h * (NWW - full_w)
        wy = tl.where(e < right, e, full_h + (e - right) // NWW)
        wx = tl.where(e < right, full_w, (e - right) % NWW)
        rows_real = tl.minimum(SH, H - wy * SH)  # the window's tokens inside the grid: rows_real x cols_real
        cols_real = tl.minimum(SW, W - wx * SW)
    else:
        n_windows = full_h * full_w
        e = (pid // HEADS) % n_windows
        wy = e // full_w
        wx = e % full_w
        rows_real = SH
        cols_real = SW
    b = pid // HEADS // n_windows
    y0 = wy * SH  # the window's top-left token
    x0 = wx * SW

    # This program's queries: real tokens of the window, row-major over the rows_real x cols_real block.
    i = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q_mask = i < rows_real * cols_real
    qr = i // cols_real  # window-local row and column
    qc = i % cols_real
    head_col = head * D
    corner = b.to(tl.int64) * stride_b + y0 * stride_h + x0 * stride_w + head_col  # window's top-left, this head
    q_ptr = qkv_ptr + corner + qr * stride_h + qc * stride_w  # [BLOCK_M]
    d = tl.arange(0, BLOCK_D)
    q = tl.load(q_ptr[:, None] + d[None, :], mask=q_mask[:, None] & (d < D)[None, :], other=0.0)
    q_kbias = tl.zeros([BLOCK_M], dtype=tl.float32)
    if EDGE:
        # A padded key's k and v are the bias. Keys load as zeros where padded (plain masked loads, which the
        # compiler pipelines), and the bias comes back exactly: its score q . k_bias is added to the padded
        # columns, and the softmax mass of the padded keys (pad) times v_bias is added to the output at the end.
        k_bias = tl.load(bias_ptr + C + head_col + d, mask=d < D, other=0.0).to(tl.float32)
        q_kbias = tl.sum(q.to(tl.float32) * k_bias[None, :], axis=1)
    q = q.to(DOT_DTYPE)
    q2 = q
    if BLOCK_D2 > 0:
        d2 = BLOCK_D + tl.arange(0, BLOCK_D2)
        q2 = tl.load(q_ptr[:, None] + d2[None, :], mask=q_mask[:, None] & (d2 < D)[None, :], other=0.0)
        if EDGE:
            k_bias2 = tl.load(bias_ptr + C + head_col + d2, mask=d2 < D, other=0.0).to(tl.float32)
            q_kbias += tl.sum(q2.to(tl.float32) * k_bias2[None, :], axis=1)
        q2 = q2.to(DOT_DTYPE)
    q_kbias = q_kbias * qk_scale  # base-2 units

    # The rel-pos terms of these queries, gathered from p: rel_w[i, c] = q_i . R_w[col(i) - c + SW - 1] and
    # rel_h[i, r] = q_i . R_h[row(i) - r + SH - 1].
    q_grid = (b * H + y0 + qr).to(tl.int64) * W + x0 + qc  # token index in the [B, H, W] grid
    p_row = p_ptr + head.to(tl.int64) * stride_ph + q_grid * stride_pt  # [BLOCK_M]
    c_w = tl.arange(0, BLOCK_SW)  # key columns
    rel_w = tl.load(p_row[:, None] + (2 * SH - 1) + (qc[:, None] - c_w[None, :] + SW - 1),
                    mask=q_mask[:, None] & (c_w < SW)[None, :], other=0.0).to(DOT_DTYPE)  # [BLOCK_M, BLOCK_SW]
    if ROW_TILES:
        # Key tile t is key row t: its rel_w part is rel_w itself, moved into the scores' layout once as a
        # product with the identity (exact); the rel_h column is read per tile (see _attend_key_tile).
        bias_w = tl.dot(rel_w, (c_w[:, None] == c_w[None, :]).to(DOT_DTYPE), input_precision=PRECISION)
        bias_w = bias_w * 1.4426950408889634
        rel_h = rel_w
    else:
        c_h = tl.arange(0, BLOCK_SH)  # key rows
        rel_h = tl.load(p_row[:, None] + (qr[:, None] - c_h[None, :] + SH - 1),
                        mask=q_mask[:, None] & (c_h < SH)[None, :], other=0.0).to(DOT_DTYPE)  # [BLOCK_M, BLOCK_SH]
        bias_w = rel_w

    m_i = tl.full([BLOCK_M], -float("inf"), dtype=tl.float32)  # running max, base-2 units
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # softmax denominator relative to m_i
    pad = tl.zeros([BLOCK_M], dtype=tl.float32)  # the padded keys' share of l_i
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # unnormalised output relative to m_i
    acc2 = acc
    if BLOCK_D2 > 0:
        acc2 = tl.zeros([BLOCK_M, BLOCK_D2], dtype=tl.float32)
    k_ptr = qkv_ptr + C + corner
    # Whole key tiles, then the partial one (a 14 x 14 window: 3 x 64 keys, then 4 in a tile of 16).
    n_full = (SH * SW // BLOCK_N) * BLOCK_N
    if EDGE:  # the last query tiles of an edge window can be empty (112 or 64 real queries of 196): no keys
        n_full = tl.where(pid_m * BLOCK_M < rows_real * cols_real, n_full, 0)
    for n0 in range(0, n_full, BLOCK_N):
        m_i, l_i, pad, acc, acc2 = _attend_key_tile(
            q, q2, rel_h, rel_w, bias_w, q_kbias, m_i, l_i, pad, acc, acc2, n0, k_ptr, p_row, qr, q_mask,
            rows_real, cols_real, SH, SW, D, C, stride_h, stride_w, qk_scale,
            BLOCK_N, BLOCK_D, BLOCK_D2, BLOCK_SH, BLOCK_SW, ROW_TILES, EDGE, False, DOT_DTYPE, PRECISION,
        )  # fmt: skip
    if BLOCK_TAIL > 0:
        m_i, l_i, pad, acc, acc2 = _attend_key_tile(
            q, q2, rel_h, rel_w, bias_w, q_kbias, m_i, l_i, pad, acc, acc2, n_full, k_ptr, p_row, qr, q_mask,
            rows_real, cols_real, SH, SW, D, C, stride_h, stride_w, qk_scale,
            BLOCK_TAIL, BLOCK_D, BLOCK_D2, BLOCK_SH, BLOCK_SW, ROW_TILES, EDGE, True, DOT_DTYPE, PRECISION,
        )  # fmt: skip

    o_ptr_q = o_ptr + b.to(tl.int64) * stride_ob + (y0 + qr) * stride_oh + (x0 + qc) * stride_ow + head_col
    if EDGE:
        v_bias = tl.load(bias_ptr + 2 * C + head_col + d, mask=d < D, other=0.0).to(tl.float32)
        acc += pad[:, None] * v_bias[None, :]
    l_i = tl.where(l_i > 0, l_i, 1.0)  # an empty query tile's rows (stored nowhere)
    tl.store(o_ptr_q[:, None] + d[None, :], (acc / l_i[:, None]).to(o_ptr.dtype.element_ty),
             mask=q_mask[:, None] & (d < D)[None, :])
    if BLOCK_D2 > 0:
        if EDGE:
            v_bias2 = tl.load(bias_ptr + 2 * C + head_col + d2, mask=d2 < D, other=0.0).to(tl.float32)
            acc2 += pad[:, None] * v_bias2[None, :]
        tl.store(o_ptr_q[:, None] + d2[None, :], (acc2 / l_i[:, None]).to(o_ptr.dtype.element_ty),
                 mask=q_mask[:, None] & (d2 < D)[None, :])


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


def _plan(sh: int, sw: int, d: int, dtype: torch.dtype, block_m: int | None, block_n: int | None,
          split_head_dim: bool | None = None) -> dict:
    """Tile sizes, warps and pipeline stages from the shapes alone, as measured on an H200 at batch 8 in bf16
    (``benchmarks/tune_window_attention.py``, ``results/NVIDIA-H200/tune_window_attention.md``): 4 warps and
    3 stages; a window's queries in tiles of 128 (its 196 real queries take two programs, an edge window's 112
    one, the corner's 64 one), its keys in tiles of 64 (three, then a tail of 16), or of 32 at head dim > 64
    (six, then 16); a global block's in [64, 64] tiles, a key tile being one whole key row where the row is a
    power of two the size of the key tile (the 64 x 64 grid). fp32 runs [64, 32] tiles (twice the bytes). A
    head dim that is not a power of two runs as two parts (80 = 64 + 16) where that saves work over padding
    it (80 -> 128), unless ``split_head_dim`` is False. Returns the launch's constexprs, warps and stages."""
    low = dtype != torch.float32
    windowed = sh * sw < 1024
    if block_m is None:
        block_m = (128 if windowed else 64) if low else 64
    if block_n is None:
        block_n = (32 if windowed and d > 64 else 64) if low else 32
    warps, stages = (4, 3) if low else (4, 3 if not windowed or d > 64 else 2)
    tail = sh * sw % block_n
    block_d, block_d2 = utils.next_power_of_2(max(d, 16)), 0
    if split_head_dim is not False and d > 16 and block_d != d:
        low_part = block_d // 2  # the largest power of two below d
        high_part = max(16, utils.next_power_of_2(d - low_part))
        if low_part + high_part < block_d:
            block_d, block_d2 = low_part, high_part
    return dict(
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_TAIL=max(16, utils.next_power_of_2(tail)) if tail else 0,
        BLOCK_D=block_d, BLOCK_D2=block_d2, ROW_TILES=block_n == sw,
        num_warps=warps, num_stages=stages,
    )


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
    split_head_dim: bool | None = None,
) -> torch.Tensor:
    """The fused kernel; see :func:`window_attention`. ``block_m`` (queries per program) and ``block_n`` (keys
    per loop step), powers of two >= 16, ``num_warps``, ``num_stages`` and ``split_head_dim`` override the
    shape-based defaults, for tests and tuning (``benchmarks/tune_window_attention.py``).

    Two launches: the windows wholly inside the grid, then (where the window does not divide the grid) the
    last row and column of windows, whose padded keys and empty query tiles need the extra work."""
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
    plan = _plan(sh, sw, d, qkv.dtype, block_m, block_n, split_head_dim)
    plan["num_warps"] = num_warps or plan["num_warps"]
    plan["num_stages"] = num_stages or plan["num_stages"]
    dot_dtype, precision = utils.dot_settings(qkv.dtype)
    p = rel_pos_products(qkv, rel_pos_h, rel_pos_w, heads)  # [heads, T, RH + RW]
    out = utils.empty((b, h, w, c), qkv.dtype, qkv.device)
    full = (h // sh) * (w // sw)
    for edge, windows in ((False, full), (True, nwh * nww - full)):
        if windows == 0:
            continue
        grid = (utils.cdiv(sh * sw, plan["BLOCK_M"]) * b * windows * heads,)
        _window_attention_kernel[grid](
            qkv, bias, p, out,
            h, w, sh, sw, nwh, nww, heads, d, c, scale * LOG2E,
            qkv.stride(0), qkv.stride(1), qkv.stride(2), out.stride(0), out.stride(1), out.stride(2),
            p.stride(0), p.stride(1),
            BLOCK_SH=max(16, utils.next_power_of_2(sh)), BLOCK_SW=max(16, utils.next_power_of_2(sw)),
            EDGE=edge, DOT_DTYPE=dot_dtype, PRECISION=precision, **plan,
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
