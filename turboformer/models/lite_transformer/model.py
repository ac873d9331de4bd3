"""Lite Transformer encoder-decoder (Wu et al., ICLR 2020, "Lite Transformer with Long-Short Range Attention",
arXiv 2004.11886), numerically equal to mit-han-lab/lite-transformer's ``transformer_multibranch_v2`` (fairseq 0.8).

Each layer replaces self-attention by Long-Short Range Attention (LSRA, Sec. 3.2 and Fig. 3): the channels of
its input are split between branches, an attention branch (global context) and a convolution branch (local
context, :mod:`.dynamic_conv`), whose outputs are concatenated again. The rest is the Transformer of Vaswani et al.
(2017): residual + LayerNorm around LSRA, encoder-decoder attention and a feed-forward network, post-norm
(the paper) or pre-norm (tensor2tensor), selected once per layer by a residual strategy function.

Layout: activations are batch-major ``[B, T, C]`` (upstream is time-major). Attention and kernel softmaxes and the
output log-softmax run in float32, so ``model.to(torch.float16 / torch.bfloat16)`` keeps them exact.

Padding, exactly as upstream:
* sources are padded with ``<pad>`` (left by default); attention ignores padded keys;
* the convolution branch of an encoder layer sees zeros at padded positions, but ``linear1`` has a bias, so after
  the GLU those positions hold ``GLU(linear1.bias)`` and the centred convolution mixes them into neighbouring real
  positions: a padded row's result differs slightly from the same sentence encoded alone;
* positions count non-pad tokens from ``pad + 1``, so the first real token has position 2 whatever the padding.

Incremental decoding uses a :class:`DecoderCache` allocated once per batch: self-attention keys/values
preallocated to the maximum length, one ring buffer per decoder convolution, and encoder-decoder keys/values
computed once from the encoder output.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from turboformer.models.lite_transformer.config import BranchSpec, LiteTransformerConfig, StackConfig
from turboformer.models.lite_transformer.dynamic_conv import DynamicConv, LightweightConv

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_accurate": partial(F.gelu, approximate="tanh"),  # fairseq's tanh approximation
    "gelu_fast": partial(F.gelu, approximate="tanh"),  # fairseq's deprecated name for gelu_accurate
    "tanh": torch.tanh,
    "linear": lambda x: x,
}


# ---------------------------------------------------------------------------------------------- positions


def make_positions(tokens: Tensor, padding_idx: int) -> Tensor:
    """[B, T] ids -> [B, T] positions: non-pad tokens count from padding_idx + 1, pads get padding_idx."""
    mask = tokens.ne(padding_idx).long()
    return torch.cumsum(mask, dim=1) * mask + padding_idx


def sinusoidal_table(num_positions: int, dim: int, padding_idx: int) -> Tensor:
    """fairseq's SinusoidalPositionalEmbedding table [num_positions, dim] in float32: row p =
    [sin(p f_0) .. sin(p f_{h-1}), cos(p f_0) .. cos(p f_{h-1})], f_i = 10000^(-i / (h - 1)), h = dim // 2
    (halves concatenated, not interleaved; a zero column for odd dims); the padding row is zero."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000) / (half - 1)))
    angles = torch.arange(num_positions, dtype=torch.float32)[:, None] * freqs[None, :]  # [P, h]
    table = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if dim % 2:
        table = torch.cat([table, torch.zeros(num_positions, 1)], dim=1)
    table[padding_idx] = 0
    return table


class SinusoidalPositions(nn.Module):
    """Fixed positions (not in the state dict): positions [B, T] -> [B, T, C]."""

    def __init__(self, dim: int, max_positions: int, padding_idx: int) -> None:
        super().__init__()
        self.register_buffer(
            "table", sinusoidal_table(max_positions + padding_idx + 1, dim, padding_idx), persistent=False
        )

    def forward(self, positions: Tensor) -> Tensor:
        return F.embedding(positions, self.table)


class LearnedPositions(nn.Embedding):
    """Learned positions, ``max_positions + padding_idx + 1`` rows as fairseq allocates them."""

    def __init__(self, dim: int, max_positions: int, padding_idx: int) -> None:
        super().__init__(max_positions + padding_idx + 1, dim, padding_idx=padding_idx)


def build_positions(stack: StackConfig, config: LiteTransformerConfig) -> nn.Module | None:
    if not config.positional_embeddings:
        return None
    kind = LearnedPositions if stack.learned_pos else SinusoidalPositions
    return kind(stack.embed_dim, stack.max_positions, config.padding_idx)


# ---------------------------------------------------------------------------------------------- attention


@dataclass
class KVCache:
    """Keys and values [B, H, L, D] of one attention module."""

    k: Tensor
    v: Tensor


class MultiheadAttention(nn.Module):
    """Multi-head attention with fairseq's parameters (q/k/v/out projections with biases); the query is scaled
    by head_dim**-0.5 after its projection. Masks are boolean, True where attention is not allowed."""

    def __init__(self, dim: int, heads: int, kv_dim: int | None = None) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention dim {dim} is not divisible by {heads} heads")
        self.heads, self.head_dim = heads, dim // heads
        self.scaling = self.head_dim**-0.5
        kv_dim = dim if kv_dim is None else kv_dim
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(kv_dim, dim)
        self.v_proj = nn.Linear(kv_dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def _split_heads(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.heads, self.head_dim).transpose(1, 2)  # [B, H, T, D]

    def project_kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """[B, S, C_kv] -> keys, values [B, H, S, D]."""
        return self._split_heads(self.k_proj(x)), self._split_heads(self.v_proj(x))

    def attend(self, query: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
        """query [B, T, C], k/v [B, H, S, D], mask broadcastable to [B, H, T, S] -> [B, T, C]."""
        B, T, C = query.shape
        q = self._split_heads(self.q_proj(query) * self.scaling)
        scores = q @ k.transpose(-1, -2)  # [B, H, T, S]
        if mask is not None:
            scores = scores.masked_fill(mask, float("-inf"))
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
        return self.out_proj((probs @ v).transpose(1, 2).reshape(B, T, C))

    def forward(self, query: Tensor, key_value: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """Self-attention (key_value None) or attention over key_value [B, S, C_kv]."""
        k, v = self.project_kv(query if key_value is None else key_value)
        return self.attend(query, k, v, mask)

    def new_cache(self, batch_size: int, max_len: int, dtype: torch.dtype, device: torch.device) -> KVCache:
        shape = (batch_size, self.heads, max_len, self.head_dim)
        return KVCache(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    def step(self, x: Tensor, cache: KVCache, position: int) -> Tensor:
        """Causal self-attention for one step: x [B, 1, C]; writes column ``position`` of the cache in place."""
        k, v = self.project_kv(x)  # [B, H, 1, D]
        cache.k[:, :, position] = k[:, :, 0]
        cache.v[:, :, position] = v[:, :, 0]
        return self.attend(x, cache.k[:, :, : position + 1], cache.v[:, :, : position + 1])


# ---------------------------------------------------------------------------------------------- layers


def build_branch(
    spec: BranchSpec, kernel_size: int, causal: bool, glu: bool, config: LiteTransformerConfig
) -> nn.Module:
    """One LSRA branch; convolutions are centred (padding K // 2) in the encoder, causal (K - 1) in the decoder."""
    if spec.kind == "attn":
        return MultiheadAttention(spec.dim, spec.heads)
    padding_l = kernel_size - 1 if causal else kernel_size // 2
    if spec.kind == "dynamic":
        return DynamicConv(spec.dim, kernel_size, spec.heads, padding_l, config.weight_softmax, glu, config.conv_linear)
    return LightweightConv(spec.dim, kernel_size, spec.heads, padding_l, config.weight_softmax, config.conv_linear)


class MultiBranch(nn.Module):
    """Long-Short Range Attention: channels [C_0 | C_1 | ...] of the input go to branch 0, 1, ...; the branch
    outputs are concatenated back to [B, T, C]."""

    def __init__(self, branches: Sequence[nn.Module], dims: Sequence[int]) -> None:
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.dims = tuple(dims)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, padding_mask: Tensor | None = None) -> Tensor:
        """x [B, T, C]; attn_mask: boolean, broadcastable to [B, H, T, T]; padding_mask [B, T]: True at padding,
        where the convolutions' input is zeroed (before their input projection, as upstream)."""
        outs = []
        for branch, part in zip(self.branches, x.split(self.dims, dim=-1)):
            if isinstance(branch, MultiheadAttention):
                outs.append(branch(part, mask=attn_mask))
            else:
                if padding_mask is not None:
                    part = part.masked_fill(padding_mask[..., None], 0.0)
                outs.append(branch(part))
        return torch.cat(outs, dim=-1)

    def new_states(self, batch_size: int, max_len: int, dtype: torch.dtype, device: torch.device) -> list:
        """Per-branch decoding state: a KVCache (attention) or a ring buffer [B, K, C_i] (convolution)."""
        return [
            b.new_cache(batch_size, max_len, dtype, device)
            if isinstance(b, MultiheadAttention)
            else b.new_buffer(batch_size, dtype, device)
            for b in self.branches
        ]

    def step(self, x: Tensor, states: list, position: int) -> Tensor:
        """One causal step: x [B, 1, C] -> [B, 1, C]."""
        return torch.cat(
            [
                branch.step(part, state, position)
                for branch, part, state in zip(self.branches, x.split(self.dims, -1), states)
            ],
            dim=-1,
        )


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, activation: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.activation = ACTIVATIONS[activation]

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.activation(self.fc1(x)))


Sublayer = Callable[[Tensor], Tensor]


def post_norm(x: Tensor, norm: nn.LayerNorm, sublayer: Sublayer) -> Tensor:
    """The paper's order (Vaswani et al. 2017): LayerNorm(x + f(x))."""
    return norm(x + sublayer(x))


def pre_norm(x: Tensor, norm: nn.LayerNorm, sublayer: Sublayer) -> Tensor:
    """tensor2tensor's order: x + f(LayerNorm(x))."""
    return x + sublayer(norm(x))


def _lsra(stack: StackConfig, layer: int, causal: bool, config: LiteTransformerConfig) -> MultiBranch:
    kernels = stack.layer_kernels(layer)
    branches = [build_branch(b, k, causal, stack.glu, config) for b, k in zip(stack.branches, kernels)]
    return MultiBranch(branches, [b.dim for b in stack.branches])


class EncoderLayer(nn.Module):
    def __init__(self, stack: StackConfig, layer: int, config: LiteTransformerConfig) -> None:
        super().__init__()
        self.lsra = _lsra(stack, layer, causal=False, config=config)
        self.lsra_norm = nn.LayerNorm(stack.embed_dim)
        self.ffn = FeedForward(stack.embed_dim, stack.ffn_dim, config.activation_fn)
        self.ffn_norm = nn.LayerNorm(stack.embed_dim)
        self.residual = pre_norm if stack.normalize_before else post_norm

    def forward(self, x: Tensor, padding_mask: Tensor | None) -> Tensor:
        """x [B, S, C]; padding_mask [B, S] (True at padding) or None."""
        attn_mask = None if padding_mask is None else padding_mask[:, None, None, :]  # [B, 1, 1, S]
        x = self.residual(x, self.lsra_norm, lambda h: self.lsra(h, attn_mask, padding_mask))
        return self.residual(x, self.ffn_norm, self.ffn)


class DecoderLayer(nn.Module):
    def __init__(self, stack: StackConfig, layer: int, config: LiteTransformerConfig) -> None:
        super().__init__()
        self.lsra = _lsra(stack, layer, causal=True, config=config)
        self.lsra_norm = nn.LayerNorm(stack.embed_dim)
        self.cross_attn = MultiheadAttention(stack.embed_dim, stack.attention_heads, kv_dim=config.encoder.embed_dim)
        self.cross_attn_norm = nn.LayerNorm(stack.embed_dim)
        self.ffn = FeedForward(stack.embed_dim, stack.ffn_dim, config.activation_fn)
        self.ffn_norm = nn.LayerNorm(stack.embed_dim)
        self.residual = pre_norm if stack.normalize_before else post_norm

    def forward(self, x: Tensor, encoder_out: EncoderOutput, causal_mask: Tensor) -> Tensor:
        """Teacher forcing: x [B, T, C]; causal_mask [T, T] (True above the diagonal)."""
        cross_mask = encoder_out.attention_mask()
        x = self.residual(x, self.lsra_norm, lambda h: self.lsra(h, causal_mask))
        x = self.residual(x, self.cross_attn_norm, lambda h: self.cross_attn(h, encoder_out.out, cross_mask))
        return self.residual(x, self.ffn_norm, self.ffn)

    def step(self, x: Tensor, states: list, cross: KVCache, cross_mask: Tensor | None, position: int) -> Tensor:
        """One step: x [B, 1, C]; states from MultiBranch.new_states; cross: encoder keys/values."""
        x = self.residual(x, self.lsra_norm, lambda h: self.lsra.step(h, states, position))
        x = self.residual(x, self.cross_attn_norm, lambda h: self.cross_attn.attend(h, cross.k, cross.v, cross_mask))
        return self.residual(x, self.ffn_norm, self.ffn)


# ---------------------------------------------------------------------------------------------- encoder, decoder


@dataclass(frozen=True)
class EncoderOutput:
    out: Tensor  # [B, S, C]
    padding_mask: Tensor | None  # [B, S], True at padding; None when no row is padded

    def attention_mask(self) -> Tensor | None:
        return None if self.padding_mask is None else self.padding_mask[:, None, None, :]  # [B, 1, 1, S]

    def index_select(self, order: Tensor) -> EncoderOutput:
        """Rows ``order`` (e.g. each sentence repeated once per beam)."""
        mask = None if self.padding_mask is None else self.padding_mask.index_select(0, order)
        return EncoderOutput(self.out.index_select(0, order), mask)


def _check_tokens(tokens: Tensor, vocab_size: int, max_positions: int, what: str) -> None:
    if tokens.dim() != 2 or tokens.dtype != torch.long:
        raise ValueError(f"{what} must be a [batch, length] int64 tensor, got {tuple(tokens.shape)} {tokens.dtype}")
    if tokens.size(1) > max_positions:
        raise ValueError(f"{what} has {tokens.size(1)} positions, more than the model's maximum of {max_positions}")
    if tokens.numel() and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ValueError(f"{what} holds ids outside the dictionary [0, {vocab_size})")


class Encoder(nn.Module):
    def __init__(self, config: LiteTransformerConfig, embed_tokens: nn.Embedding) -> None:
        super().__init__()
        stack = config.encoder
        self.padding_idx, self.max_positions = config.padding_idx, stack.max_positions
        self.embed_tokens = embed_tokens
        self.embed_scale = math.sqrt(stack.embed_dim)
        self.embed_positions = build_positions(stack, config)
        self.layers = nn.ModuleList(EncoderLayer(stack, i, config) for i in range(stack.layers))
        self.final_norm = nn.LayerNorm(stack.embed_dim) if stack.final_norm else None

    def embed(self, src_tokens: Tensor) -> Tensor:
        """[B, S] ids -> sqrt(C) * embedding + positions [B, S, C] (the input of layer 0)."""
        x = self.embed_scale * self.embed_tokens(src_tokens)
        if self.embed_positions is not None:
            x = x + self.embed_positions(make_positions(src_tokens, self.padding_idx))
        return x

    def forward(self, src_tokens: Tensor) -> EncoderOutput:
        """src_tokens [B, S] (each row ends with </s>, padded with <pad>) -> EncoderOutput."""
        self.check(src_tokens)
        padding_mask = src_tokens.eq(self.padding_idx)
        if not padding_mask.any():
            padding_mask = None
        return self.encode(src_tokens, padding_mask)

    def check(self, src_tokens: Tensor) -> None:
        """Raise ValueError for a source batch the encoder cannot take (shape, dtype, ids; one host sync)."""
        _check_tokens(src_tokens, self.embed_tokens.num_embeddings, self.max_positions, "src_tokens")

    def encode(self, src_tokens: Tensor, padding_mask: Tensor | None) -> EncoderOutput:
        """The encoder without checks or host syncs (CUDA-graph safe): src_tokens [B, S], padding_mask [B, S]
        (True at padding) or None. An all-False mask gives the same result as None (every masked_fill is a no-op)."""
        x = self.embed(src_tokens)
        for layer in self.layers:
            x = layer(x, padding_mask)
        if self.final_norm is not None:
            x = self.final_norm(x)
        return EncoderOutput(x, padding_mask)


@dataclass
class DecoderCache:
    """Static incremental-decoding state of one batch (allocated by ``Decoder.new_cache``)."""

    self_attn: list[list]  # [layer][branch]: KVCache [B, H, L, D] or convolution ring buffer [B, K, C_i]
    cross_attn: list[KVCache]  # [layer]: encoder keys/values [B, H, S, D], computed once
    cross_mask: Tensor | None  # [B, 1, 1, S], True at source padding
    max_len: int  # decoder positions available (L)
    position: int = 0  # positions decoded so far

    def tensors(self) -> list[Tensor]:
        out = []
        for state in [s for layer in self.self_attn for s in layer] + self.cross_attn:
            out += [state.k, state.v] if isinstance(state, KVCache) else [state]
        return out + ([] if self.cross_mask is None else [self.cross_mask])

    def reorder(self, order: Tensor) -> None:
        """Row i takes the state of row order[i] (beam search), in place."""
        for t in self.tensors():
            t.copy_(t.index_select(0, order))


class Decoder(nn.Module):
    def __init__(self, config: LiteTransformerConfig, embed_tokens: nn.Embedding) -> None:
        super().__init__()
        stack = config.decoder
        self.padding_idx, self.max_positions = config.padding_idx, stack.max_positions
        self.embed_tokens = embed_tokens
        self.embed_scale = math.sqrt(stack.embed_dim)
        self.embed_positions = build_positions(stack, config)
        self.layers = nn.ModuleList(DecoderLayer(stack, i, config) for i in range(stack.layers))
        self.final_norm = nn.LayerNorm(stack.embed_dim) if stack.final_norm else None
        self.output_projection = (
            None
            if config.share_decoder_input_output_embed
            else nn.Linear(stack.embed_dim, config.tgt_vocab_size, bias=False)
        )

    def embed(self, tokens: Tensor, positions: Tensor) -> Tensor:
        """ids [B, T], positions [B, T] -> sqrt(C) * embedding + positions [B, T, C]."""
        x = self.embed_scale * self.embed_tokens(tokens)
        if self.embed_positions is not None:
            x = x + self.embed_positions(positions)
        return x

    def output_layer(self, x: Tensor) -> Tensor:
        """[..., C] -> logits [..., V] (the input embedding table when shared)."""
        weight = self.embed_tokens.weight if self.output_projection is None else self.output_projection.weight
        return F.linear(x, weight)

    def forward(self, prev_output_tokens: Tensor, encoder_out: EncoderOutput) -> Tensor:
        """Teacher forcing: prev_output_tokens [B, T] (</s> + target[:-1], right-padded) -> logits [B, T, V]."""
        _check_tokens(prev_output_tokens, self.embed_tokens.num_embeddings, self.max_positions, "prev_output_tokens")
        x = self.embed(prev_output_tokens, make_positions(prev_output_tokens, self.padding_idx))
        T = x.size(1)
        causal_mask = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        for layer in self.layers:
            x = layer(x, encoder_out, causal_mask)
        if self.final_norm is not None:
            x = self.final_norm(x)
        return self.output_layer(x)

    def new_cache(self, encoder_out: EncoderOutput, max_len: int) -> DecoderCache:
        """Allocate the decoding state for ``max_len`` steps of ``encoder_out``'s rows."""
        if not 1 <= max_len <= self.max_positions:
            raise ValueError(f"max_len {max_len} must be in [1, {self.max_positions}] (the decoder's positions)")
        B = encoder_out.out.size(0)
        dtype, device = encoder_out.out.dtype, encoder_out.out.device
        cross = [KVCache(*layer.cross_attn.project_kv(encoder_out.out)) for layer in self.layers]
        states = [layer.lsra.new_states(B, max_len, dtype, device) for layer in self.layers]
        mask = encoder_out.attention_mask()
        return DecoderCache(
            states, cross, None if mask is None else mask.clone(), max_len
        )  # own copy: reordered in place

    def step(self, tokens: Tensor, cache: DecoderCache) -> Tensor:
        """Next-token logits [B, V] after the previous tokens [B] (the first call feeds </s>)."""
        position = cache.position
        if position >= cache.max_len:
            raise ValueError(f"the decoder cache holds {cache.max_len} positions, all used")
        positions = torch.full_like(tokens[:, None], self.padding_idx + 1 + position)
        x = self.embed(tokens[:, None], positions)  # [B, 1, C]
        for layer, states, cross in zip(self.layers, cache.self_attn, cache.cross_attn):
            x = layer.step(x, states, cross, cache.cross_mask, position)
        if self.final_norm is not None:
            x = self.final_norm(x)
        cache.position += 1
        return self.output_layer(x[:, 0])


class LiteTransformer(nn.Module):
    """Encoder-decoder translation model; build it with :func:`build_model`."""

    def __init__(self, config: LiteTransformerConfig, encoder: Encoder, decoder: Decoder) -> None:
        super().__init__()
        self.config = config
        self.encoder = encoder
        self.decoder = decoder

    def forward(self, src_tokens: Tensor, prev_output_tokens: Tensor) -> Tensor:
        """Teacher-forced logits [B, T, V]."""
        return self.decoder(prev_output_tokens, self.encoder(src_tokens))

    @staticmethod
    def log_probs(logits: Tensor) -> Tensor:
        """log_softmax over the vocabulary, in float32 whatever the model's dtype."""
        return F.log_softmax(logits, dim=-1, dtype=torch.float32)


def build_model(config: LiteTransformerConfig) -> LiteTransformer:
    """A randomly initialised model (load weights with :func:`.load.load_model`)."""
    src_embed = nn.Embedding(config.src_vocab_size, config.encoder.embed_dim, padding_idx=config.padding_idx)
    tgt_embed = (
        src_embed
        if config.share_all_embeddings
        else nn.Embedding(config.tgt_vocab_size, config.decoder.embed_dim, padding_idx=config.padding_idx)
    )
    return LiteTransformer(config, Encoder(config, src_embed), Decoder(config, tgt_embed))
