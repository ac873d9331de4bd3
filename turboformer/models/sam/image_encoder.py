"""SAM image encoder: a ViTDet-style ViT with windowed/global attention and a convolutional neck.

Kirillov et al., "Segment Anything" (arXiv 2304.02643), Appendix A; the backbone is the plain ViT of
ViTDet (Li et al., arXiv 2203.16527): 14 x 14 windowed attention in most blocks, global attention in
four, and decomposed relative positions in every attention (MViTv2, arXiv 2112.01526, Sec. 4.1).

A 1024 x 1024 image becomes a 64 x 64 grid of tokens; the neck maps it to a ``[B, 256, 64, 64]``
image embedding. All attention maths goes through :func:`attention`, the single place where the fused kernel
(``turboformer/kernels/window_attention.py``: the windows, their padding and the rel-pos bias inside one flash
attention that reads the qkv projection of the unpadded grid) replaces upstream's maths on CUDA.
"""

import contextlib
import contextvars
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from turboformer.kernels import utils
from turboformer.kernels.layer_norm import add_layer_norm, layer_norm
from turboformer.kernels.window_attention import (
    decomposed_rel_pos,
    merge_heads,
    split_heads,
    window_attention,
    window_attention_ref,
    window_attention_triton,
    window_shape,
)

from .config import SamConfig
from .layers import FeedForward, LayerNorm2d

# How the encoder's attention runs (see attention); "auto" outside attention_backend().
ATTENTION_BACKENDS = ("auto", "kernel", "sdpa", "reference")
_ATTENTION_BACKEND: contextvars.ContextVar[str] = contextvars.ContextVar("sam_attention_backend", default="auto")


@contextlib.contextmanager
def attention_backend(name: str) -> Iterator[None]:
    """Within this block the encoder's attention runs on ``name``: "kernel" (the fused Triton kernel, on CUDA
    or under the Triton interpreter), "sdpa" (upstream's window partition and rel-pos einsums, then torch SDPA
    with the bias as an explicit ``[BH, N, N]`` additive mask: segment-anything-fast's fallback, a benchmark
    baseline), "reference" (upstream's fp32 maths) or "auto" (see :func:`attention`). Thread/task-local."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend must be one of {ATTENTION_BACKENDS}, got {name!r}")
    token = _ATTENTION_BACKEND.set(name)
    try:
        yield
    finally:
        _ATTENTION_BACKEND.reset(token)


def sdpa_attention(
    qkv: torch.Tensor,
    qkv_bias: torch.Tensor | None,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    heads: int,
    window: int,
) -> torch.Tensor:
    """The attention as upstream lays it out, with ``F.scaled_dot_product_attention`` for the core: windows
    partitioned (padding = the bias), rel-pos terms by einsum, expanded to an additive ``[BH, N, N]`` mask in
    qkv's dtype, windows merged. ``[B, H, W, 3C]`` -> ``[B, H, W, C]``."""
    q, k, v = split_heads(qkv, qkv_bias, heads, window)  # [BW, heads, N, D]
    grid = window_shape(qkv.shape[1:3], window)
    rel_h, rel_w = decomposed_rel_pos(q, rel_pos_h, rel_pos_w, grid)  # [BW, heads, S, S, S]
    bias = (rel_h[..., :, None] + rel_w[..., None, :]).flatten(-2).flatten(2, 3)  # [BW, heads, N, N]
    return merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=bias), tuple(qkv.shape[1:3]), window)


def attention(
    qkv: torch.Tensor,
    qkv_bias: torch.Tensor | None,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    heads: int,
    window: int,
) -> torch.Tensor:
    """``softmax(q k^T / sqrt(D) + rel-pos bias) v`` over ``window``-sized squares (0: the whole grid) from the
    qkv projection of the unpadded tokens, ``[B, H, W, 3C]`` -> token-major ``[B, H, W, C]``.

    "auto" (the default) runs the dispatcher :func:`turboformer.kernels.window_attention.window_attention`:
    the fused Triton kernel on CUDA, upstream's maths in fp32 on the CPU and under ``use_reference()``, except
    that fp16/bf16 CUDA tensors under ``use_reference()`` take torch SDPA with an explicit bias mask (never the
    reference's ``[BH, N, N]`` fp32 scores at low precision). :func:`attention_backend` picks one explicitly.
    """
    args = (qkv, qkv_bias, rel_pos_h, rel_pos_w, heads, window)
    backend = _ATTENTION_BACKEND.get()
    if backend == "auto":
        if utils.use_triton(qkv) or qkv.device.type != "cuda" or qkv.dtype == torch.float32:
            return window_attention(*args)
        backend = "sdpa"  # CUDA fp16/bf16 with the kernels forced off (use_reference)
    if backend == "kernel":
        return window_attention_triton(*args)
    if backend == "sdpa":
        return sdpa_attention(*args)
    return window_attention_ref(*args)


class RelPosAttention(nn.Module):
    """Multi-head self-attention over a token grid, in windows or global, with decomposed rel-pos bias.

    The projection runs on the unpadded ``[B, H, W, C]`` tokens; upstream's zero padding of the windows is the
    projection's bias at the padded tokens, which :func:`attention` supplies.
    """

    def __init__(self, dim: int, num_heads: int, window: int, grid: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.window = window  # 0: global
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        side = window if window > 0 else grid
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * side - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * side - 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, H, W, C]`` -> ``[B, H, W, C]``."""
        qkv = self.qkv(x)  # [B, H, W, 3C]
        bias = self.qkv.bias  # a padded token's q/k/v, in qkv's dtype (an Int8Linear keeps an fp32 bias buffer)
        bias = None if bias is None else bias.to(qkv.dtype)
        out = attention(qkv, bias, self.rel_pos_h, self.rel_pos_w, self.num_heads, self.window)
        return self.proj(out)


class EncoderBlock(nn.Module):
    """Pre-norm ViT block; attention runs in ``window x window`` squares, or globally if window is 0.

    In an fp16/bf16 model the residual stream stays fp32 and only the two branches (attention, MLP) run in
    the low precision: the LayerNorms read the fp32 stream and write their output in the branch dtype, and
    the first residual add is fused with the second LayerNorm (``add_layer_norm``, Triton on CUDA). An fp32
    model runs upstream's ops in upstream's order (the parity path).
    """

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, window: int, grid: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = RelPosAttention(dim, num_heads, window, grid)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = FeedForward(dim, mlp_dim, nn.GELU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, H, W, C]`` -> ``[B, H, W, C]`` (fp32 for a low-precision block)."""
        dtype = self.norm1.weight.dtype
        if dtype == torch.float32:
            x = x + self.attn(self.norm1(x))
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
        x, h = add_layer_norm(x, self.attn(h), self.norm2.weight, self.norm2.bias, self.norm2.eps, out_dtype=dtype)
        return x, self.mlp(h)

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
