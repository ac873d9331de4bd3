"""Whisper as one readable file: audio encoder, text decoder with static caches.

Radford et al., "Robust Speech Recognition via Large-Scale Weak Supervision" (arXiv 2212.04356), Section 2.2
and Figure 1. The arithmetic follows openai-whisper's ``model.py``; the layout of the weights follows the
converted engine: the self-attention projections are fused into one ``qkv`` matrix ([q; k; v] rows, the key
bias stored as zeros because Whisper's key projection has none) and the cross-attention key/value projections
into one ``kv`` matrix, as CTranslate2 stores them.

The decoder never grows a tensor while decoding: ``DecoderCache`` preallocates the self-attention keys and
values for ``n_text_ctx`` positions and the cross-attention keys and values for one 30 s window, and every
step writes its new keys in place. Rows of a batch may hold prompts of different lengths: they are
left-padded so that all rows write the same cache columns, and ``DecoderCache.key_valid`` masks the padding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from turboformer.models.whisper.config import WhisperConfig


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """The encoder's fixed positional table [length, channels]: sin in the first half, cos in the second."""
    assert channels % 2 == 0
    log_timescale_increment = math.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = torch.exp(-log_timescale_increment * torch.arange(channels // 2))
    scaled_time = torch.arange(length)[:, None] * inv_timescales[None, :]
    return torch.cat([torch.sin(scaled_time), torch.cos(scaled_time)], dim=1)


class LayerNorm(nn.LayerNorm):
    """LayerNorm whose statistics are always computed in fp32, whatever the activations' dtype; the output is in
    the layer's own (compute) dtype, so an fp32 residual stream feeds fp16/bf16 sub-layers."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps).to(
            self.weight.dtype
        )


def split_heads(x: torch.Tensor, n_head: int) -> torch.Tensor:
    """[B, L, H * D] -> [B, H, L, D]."""
    batch, length, width = x.shape
    return x.view(batch, length, n_head, width // n_head).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, L, D] -> [B, L, H * D]."""
    batch, heads, length, dim = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * dim)


class SelfAttention(nn.Module):
    """Bidirectional self-attention of the encoder; q, k, v in one fused projection."""

    def __init__(self, n_state: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(n_state, 3 * n_state)
        self.out = nn.Linear(n_state, n_state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, T, C]
        q, k, v = (split_heads(t, self.n_head) for t in self.qkv(x).chunk(3, dim=-1))
        return self.out(merge_heads(F.scaled_dot_product_attention(q, k, v)))


class DecoderCache:
    """Static key/value storage of the decoder for ``batch`` rows.

    self_k, self_v:   [n_layer, B, H, n_text_ctx, D]  written in place at ``offset`` each step
    cross_k, cross_v: [n_layer, B, H, n_audio_ctx, D] computed once per window from the encoder output
    key_valid:        [B, n_text_ctx] bool, False at the left padding of shorter prompts
    """

    def __init__(self, config: WhisperConfig, batch: int, device=None, dtype=torch.float32):
        heads, dim = config.n_text_head, config.n_text_state // config.n_text_head
        self_shape = (config.n_text_layer, batch, heads, config.n_text_ctx, dim)
        cross_shape = (config.n_text_layer, batch, heads, config.n_audio_ctx, dim)
        self.self_k = torch.zeros(self_shape, device=device, dtype=dtype)
        self.self_v = torch.zeros(self_shape, device=device, dtype=dtype)
        self.cross_k = torch.zeros(cross_shape, device=device, dtype=dtype)
        self.cross_v = torch.zeros(cross_shape, device=device, dtype=dtype)
        self.key_valid = torch.ones(batch, config.n_text_ctx, dtype=torch.bool, device=device)
        self.batch = batch

    def reorder(self, rows: torch.Tensor) -> None:
        """Make row i hold what row ``rows[i]`` held (beam search); in place, the buffers stay put."""
        for buffer in (self.self_k, self.self_v):
            buffer.copy_(buffer.index_select(1, rows))
        self.key_valid.copy_(self.key_valid.index_select(0, rows))


class CachedSelfAttention(nn.Module):
    """Causal self-attention of the decoder over the static cache."""

    def __init__(self, n_state: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(n_state, 3 * n_state)
        self.out = nn.Linear(n_state, n_state)

    def forward(self, x, k_cache, v_cache, offset: int, mask) -> torch.Tensor:
        # x: [B, L, C]; k_cache, v_cache: [B, H, n_text_ctx, D]; mask: [B, 1, L, offset + L] bool (True = attend)
        q, k, v = (split_heads(t, self.n_head) for t in self.qkv(x).chunk(3, dim=-1))
        length = x.shape[1]
        k_cache[:, :, offset : offset + length] = k
        v_cache[:, :, offset : offset + length] = v
        keys, values = k_cache[:, :, : offset + length], v_cache[:, :, : offset + length]
        return self.out(merge_heads(F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)))


class CrossAttention(nn.Module):
    """Decoder-to-encoder attention; keys and values come from the cache filled once per window."""

    def __init__(self, n_state: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.q = nn.Linear(n_state, n_state)
        self.kv = nn.Linear(n_state, 2 * n_state)  # [k; v] rows, the k bias zero
        self.out = nn.Linear(n_state, n_state)

    def keys_values(self, audio_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, T, C] -> two [B, H, T, D]."""
        k, v = self.kv(audio_features).chunk(2, dim=-1)
        return split_heads(k, self.n_head), split_heads(v, self.n_head)

    def forward(self, x, keys, values) -> torch.Tensor:  # x: [B, L, C]; keys, values: [B, H, T, D]
        q = split_heads(self.q(x), self.n_head)
        return self.out(merge_heads(F.scaled_dot_product_attention(q, keys, values)))


def mlp(n_state: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_state, 4 * n_state), nn.GELU(), nn.Linear(4 * n_state, n_state))


class EncoderBlock(nn.Module):
    def __init__(self, n_state: int, n_head: int):
        super().__init__()
        self.attn_ln = LayerNorm(n_state)
        self.attn = SelfAttention(n_state, n_head)
        self.mlp_ln = LayerNorm(n_state)
        self.mlp = mlp(n_state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_ln(x))
        return x + self.mlp(self.mlp_ln(x))


class DecoderBlock(nn.Module):
    def __init__(self, n_state: int, n_head: int):
        super().__init__()
        self.attn_ln = LayerNorm(n_state)
        self.attn = CachedSelfAttention(n_state, n_head)
        self.cross_attn_ln = LayerNorm(n_state)
        self.cross_attn = CrossAttention(n_state, n_head)
        self.mlp_ln = LayerNorm(n_state)
        self.mlp = mlp(n_state)


class AudioEncoder(nn.Module):
    """log-mel [B, n_mels, 3000] -> audio features [B, 1500, C]."""

    def __init__(self, config: WhisperConfig):
        super().__init__()
        state = config.n_audio_state
        self.conv1 = nn.Conv1d(config.n_mels, state, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(state, state, kernel_size=3, stride=2, padding=1)
        self.register_buffer("positional_embedding", sinusoids(config.n_audio_ctx, state))
        self.blocks = nn.ModuleList(EncoderBlock(state, config.n_audio_head) for _ in range(config.n_audio_layer))
        self.ln_post = LayerNorm(state)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.conv1(mel))
        x = F.gelu(self.conv2(x)).transpose(1, 2)  # [B, 1500, C]
        if x.shape[1] != self.positional_embedding.shape[0]:
            raise ValueError(f"the encoder takes 3000 mel frames (30 s); got {mel.shape[-1]}")
        # The residual stream stays fp32 whatever the weights' dtype (each block adds its fp16/bf16 output to it):
        # in bf16 (8-bit mantissa) a rounded stream changed a word of a real tiny.en transcript.
        x = x.float() + self.positional_embedding.float()
        for block in self.blocks:
            x = block(x)
        return self.ln_post(x)  # [B, 1500, C] in the weights' dtype


class TextDecoder(nn.Module):
    """tokens [B, L] at cache columns offset..offset+L-1 -> logits [B, L, n_vocab] (fp32)."""

    def __init__(self, config: WhisperConfig):
        super().__init__()
        state = config.n_text_state
        self.token_embedding = nn.Embedding(config.n_vocab, state)
        self.positional_embedding = nn.Parameter(torch.empty(config.n_text_ctx, state))
        self.blocks = nn.ModuleList(DecoderBlock(state, config.n_text_head) for _ in range(config.n_text_layer))
        self.ln = LayerNorm(state)

    def fill_cross_cache(self, audio_features: torch.Tensor, cache: DecoderCache, rows=slice(None)) -> None:
        """Compute every layer's cross-attention keys/values once per window: [B, T, C] -> cache rows."""
        for layer, block in enumerate(self.blocks):
            keys, values = block.cross_attn.keys_values(audio_features)
            cache.cross_k[layer, rows] = keys
            cache.cross_v[layer, rows] = values

    def forward(self, tokens, positions, cache: DecoderCache, offset: int) -> torch.Tensor:
        # tokens, positions: [B, L]; the new keys go to cache columns [offset, offset + L)
        length = tokens.shape[1]
        columns = torch.arange(offset + length, device=tokens.device)
        query_columns = columns[offset:, None]
        # mask [B, 1, L, offset+L]: causal, valid keys only; a padding query sees itself so no row is empty
        mask = (columns[None, :] <= query_columns) & cache.key_valid[:, None, None, : offset + length]
        mask = mask | (columns[None, :] == query_columns)
        x = self.token_embedding(tokens) + self.positional_embedding[positions]
        x = x.to(cache.self_k.dtype)
        for layer, block in enumerate(self.blocks):
            x = x + block.attn(block.attn_ln(x), cache.self_k[layer], cache.self_v[layer], offset, mask)
            x = x + block.cross_attn(block.cross_attn_ln(x), cache.cross_k[layer], cache.cross_v[layer])
            x = x + block.mlp(block.mlp_ln(x))
        x = self.ln(x)
        return (x @ self.token_embedding.weight.to(x.dtype).T).float()


class Whisper(nn.Module):
    def __init__(self, config: WhisperConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.encoder = AudioEncoder(config)
        self.decoder = TextDecoder(config)

    @property
    def device(self) -> torch.device:
        return self.decoder.token_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.token_embedding.weight.dtype

    def new_cache(self, batch: int) -> DecoderCache:
        return DecoderCache(self.config, batch, device=self.device, dtype=self.dtype)
