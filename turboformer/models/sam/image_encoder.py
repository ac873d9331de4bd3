"""SAM image encoder: a ViTDet-style ViT with windowed/global attention and a convolutional neck.

Kirillov et al., "Segment Anything" (arXiv 2304.02643), Appendix A; the backbone is the plain ViT of
ViTDet (Li et al., arXiv 2203.16527): 14 x 14 windowed attention in most blocks, global attention in
four, and decomposed relative positions in every attention (MViTv2, arXiv 2112.01526, Sec. 4.1).

A 1024 x 1024 image becomes a 64 x 64 grid of tokens; the neck maps it to a ``[B, 256, 64, 64]``
image embedding. All attention maths goes through :func:`attention_with_rel_pos`, the single place a
fused kernel (``turboformer/kernels/rel_pos_attention.py``: flash attention with the rel-pos bias added
per tile) replaces the reference on CUDA.
"""

import contextlib
import contextvars
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from turboformer.kernels import utils
from turboformer.kernels.layer_norm import add_layer_norm, layer_norm
from turboformer.kernels.rel_pos_attention import (
    rel_pos_attention,
    rel_pos_attention_ref,
    rel_pos_attention_triton,
)

from .config import SamConfig
from .layers import FeedForward, LayerNorm2d


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
    """Decomposed relative-position terms of MViTv2 (arXiv 2112.01526, Eq. 4).

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


# How the encoder's attention runs (see attention_with_rel_pos); "auto" outside attention_backend().
ATTENTION_BACKENDS = ("auto", "kernel", "sdpa", "reference")
_ATTENTION_BACKEND: contextvars.ContextVar[str] = contextvars.ContextVar("sam_attention_backend", default="auto")


@contextlib.contextmanager
def attention_backend(name: str) -> Iterator[None]:
    """Within this block the encoder's attention runs on ``name``: "kernel" (the fused Triton flash
    attention, on CUDA or under the Triton interpreter), "sdpa" (torch SDPA with the bias as an explicit
    ``[BH, N, N]`` additive mask: segment-anything-fast's fallback, a benchmark baseline), "reference"
    (upstream's fp32 maths) or "auto" (see :func:`attention_with_rel_pos`). Thread/task-local."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend must be one of {ATTENTION_BACKENDS}, got {name!r}")
    token = _ATTENTION_BACKEND.set(name)
    try:
        yield
    finally:
        _ATTENTION_BACKEND.reset(token)


def sdpa_with_rel_pos(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor
) -> torch.Tensor:
    """The same attention through ``F.scaled_dot_product_attention`` with the decomposed bias expanded to
    an additive ``[BH, N, N]`` mask in q's dtype (``rel_h [BH, N, H]``, ``rel_w [BH, N, W]``)."""
    bh, n, _ = q.shape
    grid_h, grid_w = rel_h.shape[-1], rel_w.shape[-1]
    bias = (rel_h.reshape(bh, n, grid_h, 1) + rel_w.reshape(bh, n, 1, grid_w)).reshape(bh, n, n)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def attention_with_rel_pos(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor
) -> torch.Tensor:
    """``softmax(q k^T / sqrt(D) + rel_h + rel_w) v``.

    "auto" (the default) runs the kernel dispatcher
    :func:`turboformer.kernels.rel_pos_attention.rel_pos_attention`: the fused Triton flash attention on CUDA,
    upstream's explicit-bias maths in fp32 on the CPU or under ``use_reference()``; for fp16/bf16 CUDA tensors
    under ``use_reference()``, torch SDPA with an explicit bias mask (never the fp32 reference's ``[BH, N, N]``
    fp32 scores at low precision). :func:`attention_backend` picks one explicitly.

    Args:
        q, k, v: ``[B, heads, N, D]`` with ``N = H * W`` (any strides: views of the fused qkv projection).
        rel_h: ``[B, heads, H, W, H]``, broadcast over key columns.
        rel_w: ``[B, heads, H, W, W]``, broadcast over key rows.

    Returns:
        ``[B, heads, N, D]``; from the kernel a view of token-major ``[B, N, heads, D]`` memory, so that
        ``out.transpose(1, 2)`` is contiguous for the output projection.
    """
    lead = q.shape[:-1]
    # [B, heads, H, W, H] -> [B, heads, N, H]: a view (decomposed_rel_pos returns contiguous terms)
    rel_h, rel_w = rel_h.reshape(*lead, -1), rel_w.reshape(*lead, -1)
    backend = _ATTENTION_BACKEND.get()
    if backend == "auto":
        if utils.use_triton(q) or q.device.type != "cuda" or q.dtype == torch.float32:
            return rel_pos_attention(q, k, v, rel_h, rel_w)
        backend = "sdpa"  # CUDA fp16/bf16 with the kernels forced off (use_reference)
    if backend == "kernel":
        return rel_pos_attention_triton(q, k, v, rel_h, rel_w)
    if backend == "sdpa":  # on [B * heads, N, .] (copies: a benchmark baseline)
        flat = [t.reshape(-1, *t.shape[-2:]) for t in (q, k, v, rel_h, rel_w)]
        return sdpa_with_rel_pos(*flat).view(q.shape)
    return rel_pos_attention_ref(q, k, v, rel_h, rel_w)


class RelPosAttention(nn.Module):
    """Multi-head self-attention over a ``grid x grid`` token square with decomposed rel-pos bias."""

    def __init__(self, dim: int, num_heads: int, grid: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * grid - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * grid - 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, H, W, C]`` (H = W = grid) -> ``[B, H, W, C]``."""
        b, h, w, _ = x.shape
        # [B, HW, 3, heads, D] -> three [B, heads, HW, D] views of the one projection (no copies)
        q, k, v = self.qkv(x).view(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        # The rel-pos terms' einsum wants q contiguous per (image, head): one copy of q (not of k and v); on the
        # strided view torch's einsum makes slower copies of its own (ViT-H batch 1: 30-39 vs 44 images/s)
        q = q.reshape(b * self.num_heads, h * w, -1).view(q.shape)
        rel_h, rel_w = decomposed_rel_pos(q, self.rel_pos_h, self.rel_pos_w, (h, w))
        x = attention_with_rel_pos(q, k, v, rel_h, rel_w)  # [B, heads, HW, D]
        x = x.transpose(1, 2).reshape(b, h, w, -1)  # a view of the kernel's token-major output
        return self.proj(x)


def window_partition(x: torch.Tensor, window: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Split ``[B, H, W, C]`` into ``[B * nWindows, window, window, C]``, zero-padding H and W up to a
    multiple of ``window`` (64 -> 70 for SAM's 14-token windows). Also returns the padded ``(Hp, Wp)``."""
    b, h, w, c = x.shape
    pad_h = (window - h % window) % window
    pad_w = (window - w % window) % window
    if pad_h or pad_w:
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


class EncoderBlock(nn.Module):
    """Pre-norm ViT block; attention runs in ``window x window`` squares, or globally if window is 0.

    In an fp16/bf16 model the residual stream stays fp32 and only the two branches (attention, MLP) run in
    the low precision: the LayerNorms read the fp32 stream and write their output in the branch dtype, and
    the first residual add is fused with the second LayerNorm (``add_layer_norm``, Triton on CUDA). An fp32
    model runs upstream's ops in upstream's order (the parity path).
    """

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, window: int, grid: int) -> None:
        super().__init__()
        self.window = window
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = RelPosAttention(dim, num_heads, window if window > 0 else grid)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = FeedForward(dim, mlp_dim, nn.GELU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, H, W, C]`` -> ``[B, H, W, C]`` (fp32 for a low-precision block)."""
        dtype = self.norm1.weight.dtype
        if dtype == torch.float32:
            x = x + self.attend(self.norm1(x))
            return x + self.mlp(self.norm2(x))
        x, mlp_out = self.forward_pending(x, None)
        return x + mlp_out  # fp32 + branch dtype -> fp32

    def forward_pending(self, x: torch.Tensor, pending: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The low-precision block with its last residual add left to the next block: takes the stream ``x``
        (fp32) and the previous block's unadded MLP output ``pending`` (or None), returns ``(x, mlp_out)``
        where the block's output is ``x + mlp_out``. The add is fused into the next block's first LayerNorm
        (``add_layer_norm``), saving a pass over the fp32 stream per block."""
        dtype = self.norm1.weight.dtype
        if pending is None:
            h = layer_norm(x, self.norm1.weight, self.norm1.bias, self.norm1.eps, out_dtype=dtype)
        else:
            x, h = add_layer_norm(x, pending, self.norm1.weight, self.norm1.bias, self.norm1.eps, out_dtype=dtype)
        x, h = add_layer_norm(x, self.attend(h), self.norm2.weight, self.norm2.bias, self.norm2.eps, out_dtype=dtype)
        return x, self.mlp(h)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """Windowed or global attention of normalised tokens ``[B, H, W, C]``."""
        if self.window <= 0:
            return self.attn(x)
        h, w = x.shape[1], x.shape[2]
        x, padded_hw = window_partition(x, self.window)  # [B * nW, win, win, C]
        x = self.attn(x)
        return window_unpartition(x, self.window, padded_hw, (h, w))


class Neck(nn.Module):
    """1x1 conv to the prompt width, LayerNorm2d, 3x3 conv, LayerNorm2d (no biases)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_dim, out_dim, kernel_size=1, bias=False)
        self.norm1 = LayerNorm2d(out_dim)
        self.conv2 = nn.Conv2d(out_dim, out_dim, kernel_size=3, padding=1, bias=False)
        self.norm2 = LayerNorm2d(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, C_in, H, W]`` -> ``[B, C_out, H, W]``."""
        return self.norm2(self.conv2(self.norm1(self.conv1(x))))


def embed_patches(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The patch embedding ``conv(x)`` (kernel = stride = p, no padding) as one matmul: ``[B, 3, S, S]`` ->
    ``[B, S / p, S / p, C]``. Each output token is its ``3 x p x p`` patch dotted with the flattened kernel, so
    the patches are gathered into ``[B, S/p, S/p, 3 p^2]`` rows (one copy) for a ``[.., 3 p^2] x [3 p^2, C]``
    product. Why: cuDNN runs this bf16 convolution as an implicit SIMT GEMM (3.6 ms for a ViT-H batch of 8 on
    an H200, against ~0.1 ms as a tensor-core matmul)."""
    p = conv.kernel_size[0]
    b, c, height, width = x.shape
    patches = x.view(b, c, height // p, p, width // p, p).permute(0, 2, 4, 1, 3, 5)  # [B, S/p, S/p, 3, p, p]
    patches = patches.reshape(b, height // p, width // p, c * p * p)
    return F.linear(patches, conv.weight.view(conv.out_channels, -1), conv.bias)


class ImageEncoder(nn.Module):
    """ViT image encoder: ``[B, 3, S, S]`` normalised pixels -> ``[B, prompt_dim, S / 16, S / 16]``."""

    def __init__(self, config: SamConfig) -> None:
        super().__init__()
        dim, grid = config.encoder_embed_dim, config.image_embedding_size
        self.image_size = config.image_size
        self.patch_embed = nn.Conv2d(3, dim, kernel_size=config.patch_size, stride=config.patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, dim))  # absolute, learned
        self.blocks = nn.ModuleList(
            EncoderBlock(
                dim,
                config.encoder_num_heads,
                config.encoder_mlp_dim,
                window=0 if i in config.encoder_global_attn_indexes else config.encoder_window_size,
                grid=grid,
            )
            for i in range(config.encoder_depth)
        )
        self.neck = Neck(dim, config.prompt_embed_dim)

    def embed_patches(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S]`` -> ``[B, S / 16, S / 16, C]``: upstream's convolution in fp32 (the parity path), the
        same maths as one matmul in fp16/bf16 (:func:`embed_patches`)."""
        if x.dtype == torch.float32:
            return self.patch_embed(x).permute(0, 2, 3, 1)
        return embed_patches(self.patch_embed, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, 3, S, S]`` -> ``[B, prompt_dim, S / 16, S / 16]``."""
        dtype = self.pos_embed.dtype
        x = self.embed_patches(x)  # [B, 64, 64, C]
        x = x + self.pos_embed
        if dtype == torch.float32:
            for block in self.blocks:
                x = block(x)
        else:
            x, pending = x.float(), None  # the residual stream of a low-precision encoder (see EncoderBlock)
            for block in self.blocks:
                x, pending = block.forward_pending(x, pending)
            x = x + pending
        return self.neck(x.to(dtype).permute(0, 3, 1, 2))  # [B, 256, 64, 64]
