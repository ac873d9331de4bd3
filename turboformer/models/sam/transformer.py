"""SAM's two-way transformer: prompt tokens and image tokens attend to each other.

Kirillov et al., "Segment Anything" (arXiv 2304.02643), Appendix A, Fig. 14. Each layer runs
(1) self-attention of the tokens, (2) token-to-image cross-attention, (3) an MLP on the tokens and
(4) image-to-token cross-attention; a last token-to-image attention follows the layers. Position
encodings are re-added to queries and keys at every attention. Cross-attention projects to half the
width (``attention_downsample_rate``) to save compute over the 4096 image tokens.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .config import SamConfig
from .layers import FeedForward

SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``softmax(q k^T / sqrt(D)) v`` on ``[B, heads, N, D]`` tensors.

    fp32 runs upstream's explicit maths op for op (the parity path). fp16/bf16 runs PyTorch's fused
    scaled-dot-product attention (flash / memory-efficient kernels on CUDA): the same maths with the
    softmax in fp32 and no ``[B, heads, Nq, Nk]`` score tensor in memory, which matters for the
    image-to-token attention (4096 queries per prompt) at a batch of 64 prompts.
    """
    if q.dtype != torch.float32:
        # not the cuDNN backend: on the H200 (torch 2.11) it failed inside CUDA-graph capture with
        # CUDNN_STATUS_INTERNAL_ERROR at some prompt-batch shapes
        with sdpa_kernel(SDPA_BACKENDS):
            return F.scaled_dot_product_attention(q, k, v)
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
        """``q`` ``[B, Nq, C]``, ``k`` and ``v`` ``[B, Nk, C]`` -> ``[B, Nq, C]``."""
        out = attention(self._heads(self.q_proj(q)), self._heads(self.k_proj(k)), self._heads(self.v_proj(v)))
        b, heads, n, d = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, heads * d))


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
        """``queries``/``query_pe`` ``[B, Nt, C]`` tokens, ``keys``/``key_pe`` ``[B, 4096, C]`` image."""
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)  # replaces, no residual (upstream)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)

        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))

        queries = self.norm3(queries + self.mlp(queries))

        q, k = queries + query_pe, keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
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
            image: ``[B, C, h, w]`` image embedding (plus dense prompt).
            image_pe: ``[B, C, h, w]`` its position encoding.
            tokens: ``[B, Nt, C]`` output tokens and sparse prompt tokens (also their own "pe").

        Returns:
            tokens ``[B, Nt, C]`` and image tokens ``[B, h * w, C]``.
        """
        keys = image.flatten(2).permute(0, 2, 1)  # [B, hw, C]
        key_pe = image_pe.flatten(2).permute(0, 2, 1)
        queries = tokens
        for layer in self.layers:
            queries, keys = layer(queries, keys, tokens, key_pe)
        q, k = queries + tokens, keys + key_pe
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q, k, keys))
        return queries, keys
