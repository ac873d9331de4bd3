"""WeNet attention decoders: Transformer (left-to-right) and U2++ bi-directional (left + right-to-left).

Vaswani et al. (arXiv 1706.03762) pre-norm decoder blocks: ``x + SelfAttn(LN(x))`` ->
``+ SrcAttn(LN(x), memory)`` -> ``+ FFN(LN(x))`` (ReLU), then LayerNorm and the output projection.
U2++ (arXiv 2106.05642, Section 2.2) adds a right-to-left decoder fed ``<sos>`` and the reversed
hypothesis; attention rescoring mixes both directions. Mirrors wenet/transformer/{decoder,decoder_layer}.py.

Two ways to run a decoder:
* :meth:`TransformerDecoder.forward` -- teacher forcing on whole token sequences (attention rescoring);
* :meth:`TransformerDecoder.step` -- one token per hypothesis on a :class:`DecoderCache`, whose
  self-attention keys/values are preallocated once and written in place (attention beam search).

Shapes: N hypotheses (batch x beam), L tokens, S memory frames, D = d_model, V vocabulary, H heads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import MultiHeadedAttention
from .config import POSITIONAL_ROWS, DecoderConfig
from .encoder import FeedForward, lengths_to_mask, sinusoid_table


@dataclass
class DecoderCache:
    """Static per-layer key/value storage of one decoder for incremental decoding.

    ``self_k[i]``/``self_v[i]``: [N, H, max_len, d_k], position t written at step t (in place).
    ``src_k[i]``/``src_v[i]``: [N, H, S, d_k] projected encoder memory, computed once.
    ``memory_mask``: [N, 1, S] bool, True on valid memory frames.
    """

    self_k: list[torch.Tensor]
    self_v: list[torch.Tensor]
    src_k: list[torch.Tensor]
    src_v: list[torch.Tensor]
    memory_mask: torch.Tensor

    def reorder(self, index: torch.Tensor, length: int) -> None:
        """Keep hypothesis ``index[n]`` in row n (beam pruning): rows are gathered, positions < ``length``."""
        for buffers in (self.self_k, self.self_v):
            for buffer in buffers:
                buffer[:, :, :length] = buffer[:, :, :length].index_select(0, index)


class DecoderLayer(nn.Module):
    """Pre-norm decoder block: masked self-attention, source attention over the encoder, ReLU FFN."""

    def __init__(self, d_model: int, heads: int, hidden: int, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model, eps=eps)
        self.self_attn = MultiHeadedAttention(d_model, heads)
        self.norm2 = nn.LayerNorm(d_model, eps=eps)
        self.src_attn = MultiHeadedAttention(d_model, heads)
        self.norm3 = nn.LayerNorm(d_model, eps=eps)
        self.feed_forward = FeedForward(d_model, hidden, F.relu)

    def forward(
        self, x: torch.Tensor, self_mask: torch.Tensor, src_k: torch.Tensor, src_v: torch.Tensor, src_mask: torch.Tensor
    ) -> torch.Tensor:
        """x: [N, L, D]; self_mask: [N, L, L]; src_k/src_v: [N, H, S, d_k]; src_mask: [N, 1, S]."""
        h = self.norm1(x)
        k, v = self.self_attn.project_kv(h)
        x = x + self.self_attn(h, k, v, self_mask)
        x = x + self.src_attn(self.norm2(x), src_k, src_v, src_mask)
        return x + self.feed_forward(self.norm3(x))

    def step(self, x: torch.Tensor, position: int, cache: DecoderCache, layer: int) -> torch.Tensor:
        """One new token per row: x [N, 1, D] at ``position``; attends to cached positions <= position."""
        h = self.norm1(x)
        k, v = self.self_attn.project_kv(h)  # [N, H, 1, d_k]
        cache.self_k[layer][:, :, position : position + 1] = k
        cache.self_v[layer][:, :, position : position + 1] = v
        keys = cache.self_k[layer][:, :, : position + 1]  # [N, H, position + 1, d_k], all valid
        values = cache.self_v[layer][:, :, : position + 1]
        x = x + self.self_attn(h, keys, values, None)
        x = x + self.src_attn(self.norm2(x), cache.src_k[layer], cache.src_v[layer], cache.memory_mask)
        return x + self.feed_forward(self.norm3(x))


class TransformerDecoder(nn.Module):
    """A stack of :class:`DecoderLayer` with token embedding, sinusoidal positions and output projection."""

    def __init__(self, vocab_size: int, d_model: int, heads: int, hidden: int, num_blocks: int, eps: float):
        super().__init__()
        self.heads = heads
        self.xscale = math.sqrt(d_model)
        self.embed = nn.Embedding(vocab_size, d_model)
        self.register_buffer("pos_table", sinusoid_table(POSITIONAL_ROWS, d_model))  # [rows, D]
        self.layers = nn.ModuleList(DecoderLayer(d_model, heads, hidden, eps) for _ in range(num_blocks))
        self.after_norm = nn.LayerNorm(d_model, eps=eps)
        self.output_layer = nn.Linear(d_model, vocab_size)

    def forward(
        self, memory: torch.Tensor, memory_mask: torch.Tensor, tokens: torch.Tensor, token_lengths: torch.Tensor
    ) -> torch.Tensor:
        """Teacher-forced logits.

        Args:
            memory: [N, S, D] encoder output; memory_mask: [N, 1, S] bool (True = valid frame).
            tokens: [N, L] decoder inputs (``<sos>`` + hypothesis, padded with any valid id).
            token_lengths: [N] valid inputs per row.
        Returns:
            [N, L, V] logits (before softmax).
        """
        memory = memory.to(self.embed.weight.dtype)  # fp32 states of a half-precision encoder, or the reverse
        length = tokens.size(1)
        causal = torch.ones(length, length, dtype=torch.bool, device=tokens.device).tril()  # [L, L]
        self_mask = lengths_to_mask(token_lengths, length).unsqueeze(1) & causal  # [N, L, L]
        x = self.embed(tokens) * self.xscale + self.pos_table[:length]  # [N, L, D]
        for layer in self.layers:
            src_k, src_v = layer.src_attn.project_kv(memory)
            x = layer(x, self_mask, src_k, src_v, memory_mask)
        return self.output_layer(self.after_norm(x))

    def init_cache(self, memory: torch.Tensor, memory_mask: torch.Tensor, max_len: int) -> DecoderCache:
        """Allocate the static cache for up to ``max_len`` tokens per row and project ``memory`` [N, S, D]."""
        memory = memory.to(self.embed.weight.dtype)
        rows, d_k = memory.size(0), memory.size(2) // self.heads
        self_k, self_v, src_k, src_v = [], [], [], []
        for layer in self.layers:
            self_k.append(memory.new_zeros(rows, self.heads, max_len, d_k))
            self_v.append(memory.new_zeros(rows, self.heads, max_len, d_k))
            k, v = layer.src_attn.project_kv(memory)
            src_k.append(k)
            src_v.append(v)
        return DecoderCache(self_k, self_v, src_k, src_v, memory_mask)

    def step(self, tokens: torch.Tensor, position: int, cache: DecoderCache) -> torch.Tensor:
        """Log-probabilities [N, V] (float32) of the next token after ``tokens`` [N] at ``position``."""
        x = self.embed(tokens).unsqueeze(1) * self.xscale + self.pos_table[position : position + 1]  # [N, 1, D]
        for i, layer in enumerate(self.layers):
            x = layer.step(x, position, cache, i)
        return F.log_softmax(self.output_layer(self.after_norm(x[:, 0])).float(), dim=-1)


class BiTransformerDecoder(nn.Module):
    """U2++ decoder pair: ``left_decoder`` (left-to-right) and optional ``right_decoder`` (right-to-left).

    A plain WeNet ``transformer`` decoder is this class with ``right_decoder = None``.
    """

    def __init__(self, vocab_size: int, d_model: int, config: DecoderConfig):
        super().__init__()
        config.validate()
        self.config = config

        def build(blocks: int) -> TransformerDecoder:
            return TransformerDecoder(
                vocab_size, d_model, config.attention_heads, config.linear_units, blocks, config.norm_eps
            )

        self.left_decoder = build(config.num_blocks)
        self.right_decoder = build(config.r_num_blocks) if config.r_num_blocks > 0 else None
