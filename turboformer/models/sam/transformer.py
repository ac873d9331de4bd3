"""SAM's two-way transformer: prompt tokens and image tokens attend to each other.

Kirillov et al., "Segment Anything" (arXiv 2304.02643), Appendix A, Fig. 14. Each layer runs
(1) self-attention of the tokens, (2) token-to-image cross-attention, (3) an MLP on the tokens and
(4) image-to-token cross-attention; a last token-to-image attention follows the layers. Position
encodings are re-added to queries and keys at every attention. Cross-attention projects to half the
width (``attention_downsample_rate``) to save compute over the 4096 image tokens.
"""

import math

import torch
from torch import nn

from turboformer.kernels.heads_attention import heads_attention
from turboformer.kernels.layer_norm import add_layer_norm, layer_norm

from .config import SamConfig
from .layers import FeedForward


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``softmax(q k^T / sqrt(D)) v`` on ``[B, heads, N, D]`` tensors (a batch of 1 broadcasts): upstream's
    maths op for op, the fp32 parity path. fp16/bf16 decoders run
    :func:`~turboformer.kernels.heads_attention.heads_attention` instead (see :class:`Attention`)."""
    attn = q @ k.permute(0, 1, 3, 2)  # [B, heads, Nq, Nk]
    attn = torch.softmax(attn / math.sqrt(q.shape[-1]), dim=-1)
    return attn @ v


class Attention(nn.Module):
    """Multi-head attention whose q/k/v projections may shrink the width by ``downsample_rate``."""

    def __init__(self, dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        self.num_heads = num_heads
        internal_dim = dim // downsample_rate
        self.q_proj = nn.Linear(dim, internal_dim)
        self.k_proj = nn.Linear(dim, internal_dim)
        self.v_proj = nn.Linear(dim, internal_dim)
        self.out_proj = nn.Linear(internal_dim, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, N, heads * D]`` -> ``[B, heads, N, D]``."""
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``q`` ``[B, Nq, C]``, ``k`` and ``v`` ``[B, Nk, C]`` -> ``[B, Nq, C]``; a batch of 1 on either side is
        shared by the other's B.

        fp16/bf16: one fused attention over the projections' ``[B, N, heads * D]`` outputs, fp32 softmax
        (:func:`~turboformer.kernels.heads_attention.heads_attention`: Triton on CUDA; the decoder's attentions
        pit ~7 prompt tokens against 4096 image tokens, which batched matmuls handle badly). fp32: upstream's
        ops."""
        q, k, v = self.q_proj(q), self.k_proj(k), self.v_proj(v)
        if q.dtype != torch.float32:
            return self.out_proj(heads_attention(q, k, v, self.num_heads))
        out = attention(self._heads(q), self._heads(k), self._heads(v))
        b, heads, n, d = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, heads * d))


def add_norm(x: torch.Tensor, delta: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """``norm(x + delta)``. In fp16/bf16 with equal shapes it is one fused pass (``add_layer_norm``: Triton on
    CUDA) with the same rounding: the sum rounded to the dtype, then fp32 statistics. Used on the image tokens
    (``[B, 4096, C]``: two full passes saved per layer at 64 prompts). A shared x (batch 1, the first layer)
    is added first and normalised by the Triton LayerNorm (PyTorch's took 0.7 ms for ``[64, 4096, 256]``
    fp16 on the H200, ~5x the Triton pass)."""
    if x.dtype == torch.float32:
        return norm(x + delta)
    if x.shape == delta.shape:
        return add_layer_norm(x, delta, norm.weight, norm.bias, norm.eps)[1]
    return layer_norm(x + delta, norm.weight, norm.bias, norm.eps)


class TwoWayAttentionBlock(nn.Module):
    """One two-way layer (post-norm). The first layer's self-attention sees no position encoding."""

    def __init__(self, config: SamConfig, skip_first_layer_pe: bool) -> None:
        super().__init__()
        dim, heads, rate = config.prompt_embed_dim, config.decoder_num_heads, config.attention_downsample_rate
        self.skip_first_layer_pe = skip_first_layer_pe
        self.self_attn = Attention(dim, heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn_token_to_image = Attention(dim, heads, rate)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim, config.decoder_mlp_dim, nn.ReLU)
        self.norm3 = nn.LayerNorm(dim)
        self.norm4 = nn.LayerNorm(dim)
        self.cross_attn_image_to_token = Attention(dim, heads, rate)

    def forward(
        self, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor, key_pe: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``queries``/``query_pe`` ``[B, Nt, C]`` tokens, ``keys`` ``[B or 1, 4096, C]`` image (a batch of 1
        is shared by every prompt: it becomes B wide at the image-to-token update), ``key_pe`` ``[1, 4096, C]``."""
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)  # replaces, no residual (upstream)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)

        k = keys + key_pe  # both cross-attentions use it; upstream computes it twice (same values)
        q = queries + query_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))

        queries = self.norm3(queries + self.mlp(queries))

        q = queries + query_pe
        keys = add_norm(keys, self.cross_attn_image_to_token(k, q, queries), self.norm4)
        return queries, keys


class TwoWayTransformer(nn.Module):
    """Layers of :class:`TwoWayAttentionBlock` and a final token-to-image attention."""

    def __init__(self, config: SamConfig) -> None:
        super().__init__()
        dim = config.prompt_embed_dim
        self.layers = nn.ModuleList(TwoWayAttentionBlock(config, i == 0) for i in range(config.decoder_depth))
        self.final_attn_token_to_image = Attention(dim, config.decoder_num_heads, config.attention_downsample_rate)
        self.norm_final_attn = nn.LayerNorm(dim)

    def forward(
        self, image: torch.Tensor, image_pe: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the decoder transformer.

        Args:
            image: ``[B, C, h, w]`` image embedding (plus dense prompt), or ``[1, C, h, w]`` shared by the B
                prompts (their image-side work up to the first image-to-token attention is done once).
            image_pe: ``[1, C, h, w]`` its position encoding.
            tokens: ``[B, Nt, C]`` output tokens and sparse prompt tokens (also their own "pe").

        Returns:
            tokens ``[B, Nt, C]`` and image tokens ``[B, h * w, C]``.
        """
        keys = image.flatten(2).permute(0, 2, 1)  # [B or 1, hw, C]
        key_pe = image_pe.flatten(2).permute(0, 2, 1).contiguous()  # [1, hw, C]
        queries = tokens
        for layer in self.layers:
            queries, keys = layer(queries, keys, tokens, key_pe)
        q, k = queries + tokens, keys + key_pe
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q, k, keys))
        return queries, keys
