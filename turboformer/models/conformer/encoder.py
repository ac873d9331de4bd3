"""WeNet Conformer encoder: CMVN, conv2d subsampling, rel-pos Conformer blocks, chunk masks, streaming.

Gulati et al., "Conformer" (arXiv 2005.08100), Section 2 and Fig. 1: each block is
``x + 1/2 FFN(x)`` -> ``+ MHSA`` -> ``+ Conv`` -> ``+ 1/2 FFN`` -> LayerNorm, all sub-modules pre-norm.
U2 (arXiv 2012.05481, Section 2.3): dynamic chunk training lets one model decode with full context or
with chunk-restricted attention (``chunk_size`` frames, ``left_chunks`` chunks of history); a causal
depthwise convolution keeps the conv module streamable. Mirrors wenet/transformer/{encoder,encoder_layer,
convolution,subsampling,embedding,cmvn}.py at commit 0154699 (2025-12).

Shapes: B batch, T input frames, T' = subsampled frames, D = d_model, H heads, d_k = D / H,
K = conv kernel. Feature frames are 10 ms; encoder frames are ``subsampling_rate`` x 10 ms.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

# Called as dwconv.depthwise_conv1d (module attribute), so a test can route it to the Triton launcher on CPU.
from turboformer.kernels import depthwise_conv as dwconv
from turboformer.kernels.depthwise_conv import fold_batch_norm
from turboformer.kernels.layer_norm import add_layer_norm, layer_norm

from .attention import RelPositionAttention
from .config import POSITIONAL_ROWS, EncoderConfig


class ConformerInputError(ValueError):
    """The input cannot be encoded (too short, too long, wrong shape, bad streaming arguments)."""


def sinusoid_table(rows: int, dim: int) -> torch.Tensor:
    """WeNet's sinusoidal table [rows, dim]: pe[p, 2i] = sin(p / 10000^(2i/dim)), pe[p, 2i+1] = cos(...).

    Computed in float32 as wenet/transformer/embedding.py does, so it matches the ``pe`` buffers stored in
    WeNet checkpoints to float32 libm rounding (~2e-6 at p ~ 5000, CPU-dependent; a float64 computation
    differs by up to 3e-4). The loader prefers a checkpoint's stored table.
    """
    position = torch.arange(0, rows, dtype=torch.float32).unsqueeze(1)  # [rows, 1]
    div_term = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * -(math.log(10000.0) / dim))
    table = torch.zeros(rows, dim)
    table[:, 0::2] = torch.sin(position * div_term)
    table[:, 1::2] = torch.cos(position * div_term)
    return table


def lengths_to_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """[B] lengths -> [B, max_len] bool, True on valid frames."""
    return torch.arange(max_len, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)


def chunk_attention_mask(size: int, chunk_size: int, left_chunks: int, device=None) -> torch.Tensor:
    """[size, size] bool: frame i attends to its own chunk and ``left_chunks`` chunks before it (all if < 0).

    U2 (arXiv 2012.05481) Fig. 2; WeNet ``subsequent_chunk_mask``, vectorised.
    """
    index = torch.arange(size, device=device)
    chunk = index // chunk_size  # [size] chunk of each query frame
    end = (chunk + 1) * chunk_size  # exclusive
    start = torch.zeros_like(chunk) if left_chunks < 0 else ((chunk - left_chunks) * chunk_size).clamp(min=0)
    return (index.unsqueeze(0) >= start.unsqueeze(1)) & (index.unsqueeze(0) < end.unsqueeze(1))


class GlobalCMVN(nn.Module):
    """Global cepstral mean and variance normalisation: ``(x - mean) * istd`` per feature bin.

    Computed in float32 whatever the model dtype: log-fbank values ~10 minus means ~10 would lose most of
    their bits in fp16/bf16. (A GPU engine can fold this affine map into the first subsampling conv.)
    """

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))  # [F]
        self.register_buffer("istd", torch.ones(dim))  # [F] 1 / standard deviation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean.float()) * self.istd.float()


class Conv2dSubsampling(nn.Module):
    """2-D convolution front-end: [B, T, F] fbank -> [B, T', D], T' ~ T / rate (ReLU after each conv).

    ``conv2d``: two 3x3 stride-2 convs (4x); ``conv2d6``: 3x3/2 then 5x5/3 (6x); ``conv2d8``: three 3x3/2
    (8x). No padding, so output frame j only sees input frames it would see in an unpadded utterance.
    """

    KERNELS = {"conv2d": ((3, 2), (3, 2)), "conv2d6": ((3, 2), (5, 3)), "conv2d8": ((3, 2), (3, 2), (3, 2))}

    def __init__(self, input_dim: int, d_model: int, kind: str):
        super().__init__()
        self.kernels = self.KERNELS[kind]
        self.convs = nn.ModuleList(
            nn.Conv2d(1 if i == 0 else d_model, d_model, kernel, stride)
            for i, (kernel, stride) in enumerate(self.kernels)
        )
        freq = input_dim
        for kernel, stride in self.kernels:
            freq = (freq - kernel) // stride + 1
        self.out = nn.Linear(d_model * freq, d_model)

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """Valid output frames for ``lengths`` valid input frames (e.g. conv2d: ((L - 1) // 2 - 1) // 2)."""
        for kernel, stride in self.kernels:
            lengths = torch.div(lengths - kernel, stride, rounding_mode="floor") + 1
        return lengths.clamp(min=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.unsqueeze(1)  # [B, 1, T, F]
        for conv in self.convs:
            x = F.relu(conv(x))  # [B, D, T_i, F_i]
        batch, channels, time, freq = x.shape
        return self.out(x.transpose(1, 2).reshape(batch, time, channels * freq))  # [B, T', D]


class FeedForward(nn.Module):
    """Position-wise FFN: ``w_2(act(w_1(x)))``."""

    def __init__(self, d_model: int, hidden: int, activation: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.w_1 = nn.Linear(d_model, hidden)
        self.w_2 = nn.Linear(hidden, d_model)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(self.activation(self.w_1(x)))


class ConvolutionModule(nn.Module):
    """Conformer convolution module (arXiv 2005.08100 Fig. 2): pointwise -> GLU -> depthwise -> norm -> swish
    -> pointwise, operating on [B, T, D]. The two pointwise convs are plain ``nn.Linear`` (the loader
    squeezes WeNet's [out, in, 1] Conv1d kernels).

    Causal: the depthwise conv sees only the past; its left context is ``K - 1`` raw module inputs
    (zeros at utterance start, or the streaming cache), taken *before* the first pointwise conv, as WeNet.
    Non-causal: symmetric zero padding ``(K - 1) / 2`` after the GLU. Padded frames of a batch are zeroed
    after the GLU as well: WeNet zeroes them only before ``pointwise_conv1``, so their ``glu(bias)`` leaks
    into the last (K - 1) / 2 valid frames of shorter utterances; here every utterance of a padded batch
    gets its unpadded result (WeNet's result for a batch of one; identical to WeNet for causal models).
    """

    def __init__(self, channels: int, kernel_size: int, causal: bool, norm: str, norm_eps: float):
        super().__init__()
        self.lorder = kernel_size - 1 if causal else 0
        self.pointwise_conv1 = nn.Linear(channels, 2 * channels)
        self.depthwise_conv = nn.Conv1d(
            channels, channels, kernel_size, padding=0 if causal else (kernel_size - 1) // 2, groups=channels
        )
        if norm == "layer_norm":
            self.norm = nn.LayerNorm(channels, eps=norm_eps)
        else:
            self.norm = nn.BatchNorm1d(channels, eps=norm_eps)
        self.pointwise_conv2 = nn.Linear(channels, channels)
        self._folded: tuple | None = None  # (key, weight [D, K], bias [D]) of the BatchNorm-folded conv

    def _apply(self, fn, recurse=True):
        self._folded = None  # .to(dtype/device) replaces the tensors the folded copy came from
        return super()._apply(fn, recurse)

    def conv_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Depthwise conv weight [D, K] and bias [D] as the kernel takes them: with an (eval) BatchNorm folded
        in (:func:`fold_batch_norm`), else the conv's own (views, no copy).

        The fold is computed on first use after loading and cached; in-place updates of the conv or BatchNorm
        tensors (``load_state_dict``, ``copy_``) bump their version counters and refresh it.
        """
        conv = self.depthwise_conv
        if not isinstance(self.norm, nn.BatchNorm1d):
            return conv.weight.squeeze(1), conv.bias
        bn = self.norm
        sources = (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
        try:
            key = tuple((id(t), t._version) for t in sources)
        except RuntimeError:  # tensors created under inference_mode have no version counter: fold every call
            key = None
        if key is None or self._folded is None or self._folded[0] != key:
            with torch.no_grad():
                self._folded = (key, *fold_batch_norm(conv.weight, conv.bias, self.norm))
        return self._folded[1], self._folded[2]

    def forward(
        self, x: torch.Tensor, pad_mask: torch.Tensor | None, cache: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """
        Args:
            x: [B, T, D].
            pad_mask: [B, T] bool (True = valid) or None; padded frames are zeroed before and after.
            cache: [B, D, K - 1] previous raw inputs (WeNet's channel-first layout) or None. Only used
                (and only returned) by a causal module.
        Returns:
            ([B, T, D], new cache [B, D, K - 1] for a causal module, else None).
        """
        if pad_mask is not None:
            x = x.masked_fill(~pad_mask.unsqueeze(-1), 0.0)
        new_cache = None
        if self.lorder > 0:
            if cache is None or cache.size(-1) == 0:
                x = F.pad(x, (0, 0, self.lorder, 0))  # [B, K - 1 + T, D] zero history
            else:
                x = torch.cat([cache.transpose(1, 2), x], dim=1)
            new_cache = x[:, -self.lorder :].transpose(1, 2)  # [B, D, K - 1]
        x = F.glu(self.pointwise_conv1(x), dim=-1)  # [B, T (+K-1), D]
        # Depthwise conv on the channel-last GLU output. Non-causal: padded frames read as zeros (the `valid`
        # mask), i.e. the zeros of an unpadded utterance; causal: the K - 1 history frames are already in x.
        weight, bias = self.conv_weights()
        batch_norm = isinstance(self.norm, nn.BatchNorm1d)
        x = dwconv.depthwise_conv1d(
            x,
            weight,
            bias,
            (0, 0) if self.lorder > 0 else self.depthwise_conv.padding * 2,
            pad_mask if self.lorder == 0 else None,
            "silu" if batch_norm else None,  # BatchNorm folded into the conv, Swish in its epilogue
        )  # [B, T, D]
        if not batch_norm:
            x = F.silu(self.norm(x))
        x = self.pointwise_conv2(x)
        if pad_mask is not None:
            x = x.masked_fill(~pad_mask.unsqueeze(-1), 0.0)
        return x, new_cache


class ConformerBlock(nn.Module):
    """One pre-norm Conformer block (macaron FFN halves, rel-pos MHSA, optional conv module)."""

    fp32_residual = False  # fp16/bf16 weights: keep the residual stream in fp32 (set by the GPU engine)

    def __init__(self, config: EncoderConfig):
        super().__init__()
        d, eps = config.output_size, config.norm_eps
        self.ff_scale = 0.5 if config.macaron_style else 1.0
        self.norm_ff_macaron = nn.LayerNorm(d, eps=eps) if config.macaron_style else None
        self.feed_forward_macaron = FeedForward(d, config.linear_units, F.silu) if config.macaron_style else None
        self.norm_mha = nn.LayerNorm(d, eps=eps)
        self.self_attn = RelPositionAttention(d, config.attention_heads)
        if config.use_cnn_module:
            self.norm_conv = nn.LayerNorm(d, eps=eps)
            self.conv_module = ConvolutionModule(
                d, config.cnn_module_kernel, config.causal, config.cnn_module_norm, config.conv_norm_eps
            )
            self.norm_final = nn.LayerNorm(d, eps=eps)
        else:
            self.norm_conv = self.conv_module = self.norm_final = None
        self.norm_ff = nn.LayerNorm(d, eps=eps)
        self.feed_forward = FeedForward(d, config.linear_units, F.silu)

    def forward(
        self,
        x: torch.Tensor,
        pos_emb: torch.Tensor,
        attn_mask: torch.Tensor | None,
        pad_mask: torch.Tensor | None,
        att_cache: torch.Tensor | None = None,
        cnn_cache: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """
        Args:
            x: [B, T, D]; pos_emb: [1, S, D] rows of the S attended keys (S = cached + T).
            attn_mask: [B, 1 | T, S] bool or None; pad_mask: [B, T] bool or None (conv module).
            att_cache: [B, H, S - T, 2 d_k] or None; cnn_cache: [B, D, K - 1] or None (streaming only).
        Returns:
            (x [B, T, D], new attention cache or None, new conv cache or None).
        """
        if self.fp32_residual and self.norm_mha.weight.dtype != torch.float32:
            return self._forward_low_precision(x, pos_emb, attn_mask, pad_mask, att_cache, cnn_cache)
        if self.feed_forward_macaron is not None:
            x = x + self.ff_scale * self.feed_forward_macaron(self.norm_ff_macaron(x))
        attn, new_att_cache = self.self_attn(self.norm_mha(x), pos_emb, attn_mask, att_cache)
        x = x + attn
        new_cnn_cache = None
        if self.conv_module is not None:
            conv, new_cnn_cache = self.conv_module(self.norm_conv(x), pad_mask, cnn_cache)
            x = x + conv
        x = x + self.ff_scale * self.feed_forward(self.norm_ff(x))
        if self.norm_final is not None:
            x = self.norm_final(x)
        return x, new_att_cache, new_cnn_cache

    def _forward_low_precision(self, x, pos_emb, attn_mask, pad_mask, att_cache, cnn_cache):
        """The same block for fp16/bf16 weights with an fp32 residual stream: each LayerNorm reads the fp32
        stream and writes its output in the weights' dtype; the sub-modules run in that dtype and their outputs
        are added to the stream in fp32 (a rounded stream accumulates 2 x 12 half-precision roundings of every
        frame over the AISHELL encoder). Each residual add is fused with the next LayerNorm
        (:func:`~turboformer.kernels.layer_norm.add_layer_norm`, Triton on CUDA). Returns x in fp32."""
        dtype = self.norm_mha.weight.dtype
        x = x.float()

        def norm(module: nn.LayerNorm, out_dtype=dtype) -> torch.Tensor:
            return layer_norm(x, module.weight, module.bias, module.eps, out_dtype=out_dtype)

        def add_norm(delta: torch.Tensor, module: nn.LayerNorm) -> tuple[torch.Tensor, torch.Tensor]:
            return add_layer_norm(x, delta, module.weight, module.bias, module.eps, out_dtype=dtype)

        if self.feed_forward_macaron is not None:
            # ff_scale is 0.5 or 1: scaling the half-precision output is exact
            delta = self.ff_scale * self.feed_forward_macaron(norm(self.norm_ff_macaron))
            x, h = add_norm(delta, self.norm_mha)
        else:
            h = norm(self.norm_mha)
        attn, new_att_cache = self.self_attn(h, pos_emb, attn_mask, att_cache)
        new_cnn_cache = None
        if self.conv_module is not None:
            x, h = add_norm(attn, self.norm_conv)
            conv, new_cnn_cache = self.conv_module(h, pad_mask, cnn_cache)
            x, h = add_norm(conv, self.norm_ff)
        else:
            x, h = add_norm(attn, self.norm_ff)
        x = x + self.ff_scale * self.feed_forward(h)  # fp32 + half -> fp32
        if self.norm_final is not None:
            x = norm(self.norm_final, torch.float32)
        return x, new_att_cache, new_cnn_cache


class ConformerEncoder(nn.Module):
    """WeNet ``ConformerEncoder`` (pre-norm): fbank [B, T, F] -> encoder states [B, T', D]."""

    fp32_residual = False  # see ConformerBlock; the engine sets both

    def __init__(self, config: EncoderConfig):
        super().__init__()
        config.validate()
        self.config = config
        d = config.output_size
        self.xscale = math.sqrt(d)  # RelPositionalEncoding scales the subsampled features by sqrt(D)
        self.global_cmvn = GlobalCMVN(config.input_dim)
        self.subsampling = Conv2dSubsampling(config.input_dim, d, config.input_layer)
        self.register_buffer("pos_table", sinusoid_table(POSITIONAL_ROWS, d))  # [rows, D]
        self.layers = nn.ModuleList(ConformerBlock(config) for _ in range(config.num_blocks))
        self.after_norm = nn.LayerNorm(d, eps=config.norm_eps) if config.final_norm else nn.Identity()

    def output_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The final LayerNorm (if any). A half-precision encoder's fp32 residual stream is normalised in fp32 and
        its states stay fp32: the CTC projection and the decoders cast them to their own weights' dtype."""
        norm = self.after_norm
        if self.fp32_residual and isinstance(norm, nn.LayerNorm) and norm.weight.dtype != torch.float32:
            return layer_norm(x, norm.weight, norm.bias, norm.eps, out_dtype=torch.float32)
        return norm(x)

    def positions(self, offset: int, size: int) -> torch.Tensor:
        """Positional rows [1, size, D] for encoder frames offset .. offset + size - 1."""
        if offset < 0 or offset + size > self.pos_table.size(0):
            raise ConformerInputError(
                f"encoder positions {offset}..{offset + size - 1} exceed the {self.pos_table.size(0)}-row "
                f"positional table (~{self.pos_table.size(0) * self.config.subsampling_rate / 100:.0f} s of audio); "
                "split the audio into shorter pieces"
            )
        return self.pos_table[offset : offset + size].unsqueeze(0)

    def embed(self, feats: torch.Tensor) -> torch.Tensor:
        """CMVN and subsampling of raw fbank [B, T, F] -> [B, T', D], already scaled by sqrt(D)."""
        # float32 -> the model dtype (read from a conv: the linear ``out`` may hold int8 weights)
        normalised = self.global_cmvn(feats).to(self.subsampling.convs[0].weight.dtype)
        return self.subsampling(normalised) * self.xscale

    def attention_mask(self, valid: torch.Tensor, chunk_size: int, left_chunks: int) -> torch.Tensor:
        """Self-attention mask [B, 1 | T', T'] (True = attend), as WeNet ``add_optional_chunk_mask``.

        Full context when ``chunk_size < 0`` on a dynamic-chunk model (or a model trained without chunks);
        a static-chunk model always uses its training chunk size.
        """
        if self.config.use_dynamic_chunk:
            if chunk_size == 0:
                raise ConformerInputError("chunk_size must be > 0 (chunked) or < 0 (full context), not 0")
            size = chunk_size if chunk_size > 0 else -1
        elif self.config.static_chunk_size > 0:
            size = self.config.static_chunk_size
        else:
            size = -1
        if size < 0:
            return valid.unsqueeze(1)  # [B, 1, T']
        mask = valid.unsqueeze(1) & chunk_attention_mask(valid.size(1), size, left_chunks, valid.device)
        # Rows with no valid key (padded query frames past the left-chunk window) attend everywhere, as
        # upstream; they never reach valid frames.
        return mask | ~mask.any(dim=-1, keepdim=True)

    def forward(
        self, feats: torch.Tensor, lengths: torch.Tensor, chunk_size: int = -1, left_chunks: int = -1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode a padded batch.

        Args:
            feats: [B, T, F] raw fbank (CMVN is applied here), zero-padded after each length.
            lengths: [B] valid input frames.
            chunk_size: encoder frames per attention chunk (< 0: full context).
            left_chunks: chunks of history each chunk may see (< 0: all).
        Returns:
            (encoder states [B, T', D], valid encoder frames [B]).
        """
        x = self.embed(feats)  # [B, T', D]
        out_lengths = self.subsampling.output_lengths(lengths)
        valid = lengths_to_mask(out_lengths, x.size(1))  # [B, T']
        attn_mask = self.attention_mask(valid, chunk_size, left_chunks)
        pos_emb = self.positions(0, x.size(1))  # [1, T', D]
        for layer in self.layers:
            x, _, _ = layer(x, pos_emb, attn_mask, valid)
        return self.output_norm(x), out_lengths

    def forward_chunk(
        self,
        feats: torch.Tensor,
        offset: int,
        required_cache_size: int,
        att_cache: torch.Tensor | None = None,
        cnn_cache: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode one streaming chunk with caches (WeNet ``BaseEncoder.forward_chunk``; caches in its layout).

        Args:
            feats: [1, T, F] raw fbank of the chunk window, T = (chunk - 1) * rate + right_context + 1.
            offset: encoder frames already emitted before this chunk.
            required_cache_size: encoder frames of attention history the returned cache keeps: < 0 all,
                0 none, n > 0 the last n (WeNet passes ``chunk_size * left_chunks``).
            att_cache: [L, H, Tc, 2 d_k] (keys ‖ values per layer) or None/empty for the first chunk.
            cnn_cache: [L, 1, D, K - 1] or None/empty.
        Returns:
            (chunk output [1, T'_chunk, D], new att_cache [L, H, Tc', 2 d_k], new cnn_cache [L, 1, D, K - 1]).
        """
        if feats.dim() != 3 or feats.size(0) != 1:
            raise ConformerInputError(f"forward_chunk takes one utterance [1, T, F], got {tuple(feats.shape)}")
        if att_cache is not None and att_cache.size(0) == 0:
            att_cache = None
        if cnn_cache is not None and cnn_cache.size(0) == 0:
            cnn_cache = None
        x = self.embed(feats)  # [1, T', D]
        cached = att_cache.size(2) if att_cache is not None else 0
        keys = cached + x.size(1)
        pos_emb = self.positions(offset - cached, keys)  # keys sit at absolute positions offset - cached ..
        if required_cache_size < 0:
            keep_from = 0
        elif required_cache_size == 0:
            keep_from = keys
        else:
            keep_from = max(keys - required_cache_size, 0)
        empty = x.new_zeros(1, self.config.attention_heads, 0, 2 * self.config.head_dim)
        new_att, new_cnn = [], []
        for i, layer in enumerate(self.layers):
            x, kv, conv = layer(
                x,
                pos_emb,
                None,
                None,
                att_cache=att_cache[i : i + 1] if att_cache is not None else empty,
                cnn_cache=cnn_cache[i] if cnn_cache is not None else None,
            )
            new_att.append(kv[:, :, keep_from:])
            if conv is not None:
                new_cnn.append(conv)
        x = self.output_norm(x)
        new_cnn_cache = torch.stack(new_cnn) if new_cnn else x.new_zeros(0, 0, 0, 0)
        return x, torch.cat(new_att, dim=0), new_cnn_cache

    def forward_chunk_by_chunk(self, feats: torch.Tensor, chunk_size: int, left_chunks: int = -1) -> torch.Tensor:
        """Simulated streaming: feed ``feats`` [1, T, F] through :meth:`forward_chunk` window by window.

        Each call sees ``(chunk_size - 1) * rate + right_context + 1`` input frames; windows advance by
        ``chunk_size * rate`` (WeNet ``forward_chunk_by_chunk``). Returns [1, T', D].
        """
        if chunk_size <= 0:
            raise ConformerInputError(f"simulated streaming needs chunk_size > 0, got {chunk_size}")
        if not (self.config.use_dynamic_chunk or self.config.static_chunk_size > 0):
            raise ConformerInputError("this model was trained without chunk masks: it cannot stream")
        rate, context = self.config.subsampling_rate, self.config.right_context + 1
        stride, window = rate * chunk_size, (chunk_size - 1) * rate + context
        frames = feats.size(1)
        if frames < context:
            raise ConformerInputError(f"{frames} feature frames are fewer than the {context} one encoder frame needs")
        att_cache = cnn_cache = None
        outputs, offset = [], 0
        for start in range(0, frames - context + 1, stride):
            y, att_cache, cnn_cache = self.forward_chunk(
                feats[:, start : start + window], offset, chunk_size * left_chunks, att_cache, cnn_cache
            )
            outputs.append(y)
            offset += y.size(1)
        return torch.cat(outputs, dim=1)
