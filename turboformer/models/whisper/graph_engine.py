"""The GPU engine: converted weights, static caches for declared batch buckets, the decode step as a CUDA graph.

Built once from a ``Whisper`` module (``build`` below): weights move to the device in fp16/bf16 (or weight-only
INT8 for the decoder's linear layers), caches are allocated for the largest bucket and every bucket's decode
step is captured as a CUDA graph that reads and writes static buffers. A decode step of large-v3 at batch 1 is
~1,100 kernel launches' worth of work for ~1.85 GB of bytes; replaying it as one graph removes the launch
gaps, so the step runs at the speed of its memory traffic.

The step (per layer, one token per row, all rows at their own positions), for a bucket of one row (batch 1):
    q = LN(x) @ Wqkv                    k, v -> self cache column pos[b]      (one decode_linear launch)
    a = decode_attention(q, K[:, :, :pos+1], V[...])             (Triton, split over keys)
    x += a @ Wo                                                   (residual add in the GEMV's epilogue)
    a = decode_attention(LN(x) @ Wq, K_cross, V_cross)           (1500 frames; int8 optional)
    x += a @ Wo'
    x += GELU(LN(x) @ W1 + b1) @ W2                               (two launches)
    logits = LN(x) @ E^T                (fp32 out)
Each ``decode_linear`` streams one weight with the LayerNorm in its prologue and the bias, GELU, residual add or
cache write in its epilogue. Larger buckets run the same arithmetic through batched GEMMs (cuBLAS, or the INT8
tile kernel) with the residual add + next LayerNorm fused into one Triton kernel (``_decode_batched``).
Unlike the eager engine, rows are not left-padded here: row b's token goes to cache column ``pos[b]`` and
attends to columns ``< pos[b] + 1``, so the prefill right-aligns the padded prompts it receives.

Where CUDA is absent (or ``cuda_graphs=False``) the same step runs eagerly and the kernels dispatch to their
PyTorch references: that is how CPU tests check this engine's logic against the eager engine.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from turboformer.kernels.bias_gelu import bias_gelu
from turboformer.kernels.decode_attention import decode_attention, quantize_kv, split_counters
from turboformer.kernels.decode_linear import MAX_ROWS as DECODE_LINEAR_MAX_ROWS
from turboformer.kernels.decode_linear import KVCache, decode_linear
from turboformer.kernels.kv_cache_write import kv_cache_write
from turboformer.kernels.layer_norm import add_layer_norm, layer_norm
from turboformer.models.whisper.encoder_engine import EncoderEngine, weight_and_bias
from turboformer.models.whisper.model import Whisper, merge_heads, split_heads
from turboformer.nn.linear import PackedLinear
from turboformer.runtime.cuda_graphs import DEFAULT_BUCKETS, GraphedStep, PaddedGraphs, bucket_for

QUANTIZE = (None, "int8")
# prompt widths a graphed prefill is captured for (a prompt runs padded to the next one; 448 = n_text_ctx)
PREFILL_WIDTHS = (8, 16, 32, 64, 128, 256, 448)


@dataclass(frozen=True)
class EngineOptions:
    dtype: torch.dtype = torch.float16  # or torch.bfloat16 (torch.float32 for CPU logic tests)
    quantize: str | None = None  # "int8": weight-only int8 decoder linears + int8 cross-attention K/V
    buckets: tuple[int, ...] = DEFAULT_BUCKETS  # batch sizes (rows = files x beams) captured as graphs
    cuda_graphs: bool = True  # False: run the same step eagerly
    # int8 weight scales per 64 input features (None: one per output channel). Measured on the real tiny.en, 10
    # clips, CPU: per-channel scales and groups of 128 change 2 transcripts, groups of 32 or 64 one.
    int8_group: int | None = 64
    # buckets of at most this many rows decode through the fused GEMV kernels (``decode_linear``: LayerNorm,
    # bias, GELU, residual add and the KV-cache write fused into each weight stream); larger buckets through
    # batched tensor-core GEMMs. 0: always batched. Measured on an H200 (benchmarks/ab_decode_step.py, fp16):
    # large-v3 1.26 vs 2.04 ms/token at 1 row, but 3.03 vs 2.32 at 4 rows and 5.23 vs 2.59 at 8 (each row is
    # a serial pass over the register-held weight tile); tiny 0.158 vs 0.251 at 1 row, even at 4.
    fused_rows: int = 1

    def validate(self) -> None:
        if self.quantize not in QUANTIZE:
            raise ValueError(f"quantize must be one of {QUANTIZE}, got {self.quantize!r}")
        if self.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"dtype must be float16, bfloat16 or float32, got {self.dtype}")
        if self.int8_group is not None and self.int8_group < 1:
            raise ValueError(f"int8_group must be >= 1 or None, got {self.int8_group}")
        if not 0 <= self.fused_rows <= DECODE_LINEAR_MAX_ROWS:
            raise ValueError(f"fused_rows must be in 0..{DECODE_LINEAR_MAX_ROWS}, got {self.fused_rows}")
        if not self.buckets or min(self.buckets) < 1:
            raise ValueError(f"buckets must be positive batch sizes, got {self.buckets}")


@dataclass
class _Layer:
    """One decoder layer's converted weights."""

    attn_ln: tuple[torch.Tensor, torch.Tensor]
    qkv: PackedLinear
    out: PackedLinear
    cross_ln: tuple[torch.Tensor, torch.Tensor]
    cross_q: PackedLinear
    cross_kv: PackedLinear
    cross_out: PackedLinear
    mlp_ln: tuple[torch.Tensor, torch.Tensor]
    fc1: PackedLinear  # without bias: the bias is added by the fused bias + GELU kernel
    fc1_bias: torch.Tensor
    fc2: PackedLinear


class GraphEngine:
    """Implements the engine protocol of ``engine.py`` with static buffers and graphed decode steps."""

    def __init__(self, model: Whisper, options: EngineOptions = EngineOptions(), device: str | torch.device = "cuda"):
        options.validate()
        started = time.perf_counter()
        self.options, self.config = options, model.config
        self.device = torch.device(device)
        self.dtype = options.dtype
        dtype, int8 = options.dtype, options.quantize == "int8"

        def pack(linear, quantized=int8, with_bias=True):
            return PackedLinear.of(linear, dtype, quantized, with_bias, options.int8_group)

        self.model = model.to(self.device, dtype).eval()  # the encoder and the prefill run through the module
        decoder = self.model.decoder
        self.layers = [
            _Layer(
                attn_ln=weight_and_bias(b.attn_ln, dtype),
                qkv=pack(b.attn.qkv),
                out=pack(b.attn.out),
                cross_ln=weight_and_bias(b.cross_attn_ln, dtype),
                cross_q=pack(b.cross_attn.q),
                cross_kv=pack(b.cross_attn.kv, quantized=False),  # once per window: keep it exact
                cross_out=pack(b.cross_attn.out),
                mlp_ln=weight_and_bias(b.mlp_ln, dtype),
                fc1=pack(b.mlp[0], with_bias=False),
                fc1_bias=b.mlp[0].bias.detach().to(dtype).contiguous(),
                fc2=pack(b.mlp[2]),
            )
            for b in decoder.blocks
        ]
        self.final_ln = weight_and_bias(decoder.ln, dtype)
        self.embedding = decoder.token_embedding.weight.detach()  # [V, C], also the output projection
        self.positions = decoder.positional_embedding.detach()  # [n_text_ctx, C]

        # static caches for the largest bucket; bucket b uses rows [:b]
        cfg = self.config
        self.heads, self.head_dim = cfg.n_text_head, cfg.n_text_state // cfg.n_text_head
        rows = self.max_rows = max(options.buckets)
        self_shape = (cfg.n_text_layer, rows, self.heads, cfg.n_text_ctx, self.head_dim)
        cross_shape = (cfg.n_text_layer, rows, self.heads, cfg.n_audio_ctx, self.head_dim)
        self.self_k = torch.zeros(self_shape, dtype=dtype, device=self.device)
        self.self_v = torch.zeros(self_shape, dtype=dtype, device=self.device)
        cross_dtype = torch.int8 if int8 else dtype
        self.cross_k = torch.zeros(cross_shape, dtype=cross_dtype, device=self.device)
        self.cross_v = torch.zeros(cross_shape, dtype=cross_dtype, device=self.device)
        scale_shape = (cfg.n_text_layer, rows, self.heads, 1, self.head_dim)
        self.cross_k_scale = torch.ones(scale_shape, device=self.device) if int8 else None
        self.cross_v_scale = torch.ones(scale_shape, device=self.device) if int8 else None
        # the decode step's attentions merge their key splits in their last program (no merge launch); the
        # step's launches run one after another on one stream, so they share one set of counters
        self.attention_counters = split_counters(rows * self.heads, self.device)

        # static step inputs and outputs
        self.tokens = torch.zeros(rows, dtype=torch.long, device=self.device)
        self.pos = torch.zeros(rows, dtype=torch.long, device=self.device)
        self.logits = torch.zeros(rows, cfg.n_vocab, dtype=torch.float32, device=self.device)
        # greedy feedback (benchmarks, text-only decoding): suppression added to the logits, history of tokens
        self.suppress = torch.zeros(cfg.n_vocab, dtype=torch.float32, device=self.device)
        self.history = torch.zeros(rows, cfg.n_text_ctx + 1, dtype=torch.long, device=self.device)
        self.rows, self.bucket, self.pads = 0, min(options.buckets), None
        # graphs that callers capture over these static buffers (continuous batching's token pick), by their key
        self.graph_cache: dict = {}

        graphs = options.cuda_graphs and self.device.type == "cuda"
        # the encoder: fused passes, a graph per bucket captured on first use (the build stays fast)
        self.encoder = EncoderEngine(self.model.encoder, dtype, options.buckets, self.device, graphs)
        # a window entering a slot (cross-K/V fill, prompt prefill): graphs per row / prompt-width bucket
        self.entry_graphs = PaddedGraphs() if graphs else None
        self.step_graph = GraphedStep(self._step, options.buckets, graphs)
        self.greedy_graph = GraphedStep(self._greedy_step, options.buckets, graphs)
        self.build_seconds = time.perf_counter() - started

    # ------------------------------------------------------------------ the captured step --------------

    def _decode(self, b: int) -> None:
        """One token for rows [:b] from self.tokens/self.pos into self.logits (all static buffers).

        The residual stream x stays fp32: every sublayer adds its fp32 result into it, and the LayerNorms read
        it (bf16's 8-bit mantissa would otherwise round it at every layer).
        """
        if b <= self.options.fused_rows:
            self._decode_fused(b)
        else:
            self._decode_batched(b)

    def _decode_fused(self, b: int) -> None:
        """One row (or up to ``fused_rows``): each weight is streamed once by ``decode_linear`` with its neighbours
        fused (8 launches per layer: 6 weight streams, 2 attentions that merge their key splits themselves).
        Under PDL each attention loads keys before the previous kernel ends: the cross K/V, and every self key
        but the one the qkv projection has just written."""
        tokens, pos, dtype = self.tokens[:b], self.pos[:b], self.dtype
        lengths = (pos + 1).to(torch.int32)  # keys attended: columns 0..pos

        def linear(x, packed: PackedLinear, bias=None, **fused):
            bias = packed.bias if bias is None else bias
            return decode_linear(x, packed.weight, bias, scale=packed.scale, act_dtype=dtype, **fused)

        x = self.embedding[tokens].float() + self.positions[pos].float()  # [b, C] fp32
        for i, layer in enumerate(self.layers):
            cache = KVCache(self.self_k[i, :b], self.self_v[i, :b], pos)  # this token's k, v -> column pos[b]
            q = linear(x, layer.qkv, ln=layer.attn_ln, kv_cache=cache).view(b, self.heads, self.head_dim)
            a = self._self_attention(q, i, lengths, chained=True)
            linear(a.reshape(b, -1), layer.out, residual=x)
            q = linear(x, layer.cross_q, ln=layer.cross_ln).view(b, self.heads, self.head_dim)
            linear(self._cross_attention(q, i, chained=True).reshape(b, -1), layer.cross_out, residual=x)
            g = linear(x, layer.fc1, layer.fc1_bias, ln=layer.mlp_ln, gelu=True)  # [b, 4C]
            linear(g, layer.fc2, residual=x)
        self.logits[:b] = decode_linear(x, self.embedding, ln=self.final_ln, out_dtype=torch.float32)

    def _decode_batched(self, b: int) -> None:
        """Many rows: tensor-core GEMMs (cuBLAS, or the INT8 kernel) with the fused residual add + LayerNorm."""
        tokens, pos, dtype = self.tokens[:b], self.pos[:b], self.dtype
        lengths = (pos + 1).to(torch.int32)  # keys attended: columns 0..pos
        x = self.embedding[tokens].float() + self.positions[pos].float()  # [b, C] fp32
        h = layer_norm(x, *self.layers[0].attn_ln, out_dtype=dtype)
        for i, layer in enumerate(self.layers):
            q, k, v = layer.qkv(h).view(b, 3, self.heads, self.head_dim).unbind(1)  # each [b, H, D]
            kv_cache_write(k, v, self.self_k[i, :b], self.self_v[i, :b], pos)
            a = self._self_attention(q, i, lengths, chained=False)
            x, h = add_layer_norm(x, layer.out(a.reshape(b, -1)), *layer.cross_ln, out_dtype=dtype)
            q = layer.cross_q(h).view(b, self.heads, self.head_dim)
            a = self._cross_attention(q, i, chained=False)
            x, h = add_layer_norm(x, layer.cross_out(a.reshape(b, -1)), *layer.mlp_ln, out_dtype=dtype)
            delta = layer.fc2(bias_gelu(layer.fc1(h), layer.fc1_bias))
            next_ln = self.layers[i + 1].attn_ln if i + 1 < len(self.layers) else self.final_ln
            x, h = add_layer_norm(x, delta, *next_ln, out_dtype=dtype)
        self.logits[:b] = F.linear(h, self.embedding).float()

    def _chained(self, chained: bool, prefetch: str) -> dict:
        """decode_attention's options inside the fused step's PDL chain: load the keys that the previous kernel
        did not write before waiting for it, and merge the key splits in the last split program. Measured on the
        H200 (ab_decode_step.py): large-v3 batch 1 1.175 -> 1.147 ms/token with both, no gain from either alone;
        the batched step's attentions follow cuBLAS GEMMs (no early start) and were slower with them (4.49 ->
        4.73 ms at batch 16), so they keep the merge kernel."""
        return {"prefetch": prefetch, "counters": self.attention_counters} if chained else {}

    def _self_attention(self, q: torch.Tensor, layer: int, lengths: torch.Tensor, chained: bool) -> torch.Tensor:
        """q [b, H, D] over columns [0, pos] of layer's self K/V; the previous kernel wrote column pos."""
        b = q.shape[0]
        k, v = self.self_k[layer, :b], self.self_v[layer, :b]
        return decode_attention(q, k, v, lengths, **self._chained(chained, "all_but_last"))

    def _cross_attention(self, q: torch.Tensor, layer: int, chained: bool) -> torch.Tensor:
        """q [b, H, D] over layer's 1500-frame cross K/V of rows [:b] (int8 with their scales when quantized),
        written when the window entered its row."""
        b, scales = q.shape[0], {}
        if self.cross_k_scale is not None:
            scales = dict(k_scale=self.cross_k_scale[layer, :b], v_scale=self.cross_v_scale[layer, :b])
        k, v = self.cross_k[layer, :b], self.cross_v[layer, :b]
        return decode_attention(q, k, v, None, **scales, **self._chained(chained, "all"))

    def _step(self, b: int) -> None:
        self._decode(b)

    def _greedy_step(self, b: int) -> None:
        """Decode, pick argmax(logits + suppress), feed it back: N replays decode N tokens with no host sync."""
        self._decode(b)
        next_tokens = (self.logits[:b] + self.suppress).argmax(dim=-1)
        self.pos[:b] += 1
        self.history[torch.arange(b, device=self.device), self.pos[:b]] = next_tokens
        self.tokens[:b] = next_tokens

    # ------------------------------------------------------------------ the engine protocol ------------

    @torch.inference_mode()
    def encode(self, mel: torch.Tensor) -> torch.Tensor:
        return self.encoder(mel)

    @torch.inference_mode()
    def start(self, audio_features: torch.Tensor, n_group: int, pads: torch.Tensor) -> None:
        rows = audio_features.shape[0] * n_group
        self.bucket = bucket_for(rows, self.options.buckets)
        self.rows, self.pads = rows, pads.to(torch.long)
        self._fill_cross(audio_features, torch.arange(rows, device=self.device), n_group)
        self.tokens.zero_()  # rows past `rows` in the bucket decode harmless garbage at position 0
        self.pos.zero_()

    def _fill_cross(self, audio_features: torch.Tensor, rows: torch.Tensor, n_group: int = 1) -> None:
        """Cross-attention K/V of each window [n, T, C] into cache rows ``rows`` (n * n_group of them). With CUDA
        graphs and one row per window, through one graph per row bucket (``PaddedGraphs``: padded rows repeat
        row 0)."""
        features, rows = audio_features.to(self.device, self.dtype), rows.to(self.device)
        n = features.shape[0]
        if self.entry_graphs is None or n_group != 1 or n > self.max_rows:
            return self._fill_cross_device(features, rows, n_group)
        bucket = bucket_for(n, self.options.buckets)
        shapes = ((bucket, *features.shape[1:]), (bucket,))
        self.entry_graphs.run(("cross", bucket), self._fill_cross_device, (features, rows), shapes)

    def _fill_cross_device(self, features: torch.Tensor, rows: torch.Tensor, n_group: int = 1) -> None:
        for i, layer in enumerate(self.layers):
            k, v = (split_heads(t, self.heads) for t in layer.cross_kv(features).chunk(2, dim=-1))  # [n, H, T, D]
            k, v = k.repeat_interleave(n_group, dim=0), v.repeat_interleave(n_group, dim=0)
            if self.cross_k_scale is not None:
                (k, self.cross_k_scale[i, rows]), (v, self.cross_v_scale[i, rows]) = quantize_kv(k), quantize_kv(v)
            self.cross_k[i, rows], self.cross_v[i, rows] = k, v

    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor, sot_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the left-padded prompts [rows, L] eagerly, right-aligned: row b's prompt at columns 0..len_b-1."""
        rows, width = tokens.shape
        lengths = width - self.pads  # [rows]
        columns = torch.arange(width)
        aligned = tokens.gather(1, (columns[None, :] + self.pads[:, None]).clamp(max=width - 1))
        return self._prefill_rows(aligned, lengths, sot_index - self.pads, torch.arange(rows, device=self.device))

    def _prefill_rows(self, aligned, lengths, sot_index, rows) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts aligned [n, L] (row r's at columns 0..lengths[r]-1) into cache rows ``rows``; logits at each
        prompt's last token and at its <|startoftranscript|> (sot_index [n]); pos[rows] = the last column.

        With CUDA graphs, through one graph per (row bucket, width bucket), captured on first use: the prompts
        are padded to the width bucket (padding columns are masked keys, their K/V land past each prompt's
        last column, where decoding overwrites them before reading) and the rows to the row bucket by repeating
        the first row (identical values written twice to the same cache row). Lockstep and slot prefills both
        come here, so their arithmetic is the same."""
        n, width = aligned.shape
        lengths, sot_index = lengths.to(self.device), sot_index.to(self.device)
        if self.entry_graphs is None or n > self.max_rows or width > PREFILL_WIDTHS[-1]:
            return self._prefill_device(aligned.to(self.device), lengths, sot_index, rows)
        n_bucket = bucket_for(n, self.options.buckets)
        width_bucket = next(w for w in PREFILL_WIDTHS if w >= width)
        shapes = ((n_bucket, width_bucket), (n_bucket,), (n_bucket,), (n_bucket,))
        values = (aligned.to(self.device), lengths, sot_index, rows.to(self.device))
        last, sot = self.entry_graphs.run(("prefill", n_bucket, width_bucket), self._prefill_device, values, shapes)
        return last[:n].clone(), sot[:n].clone()  # copies: the next replay of any entry graph may reuse them

    def _prefill_device(self, tokens, lengths, sot_index, rows) -> tuple[torch.Tensor, torch.Tensor]:
        """The prefill on device tensors only (tokens [n, L], lengths, sot_index, rows [n]): capturable."""
        width = tokens.shape[1]
        valid = torch.arange(width, device=self.device)[None, :] < lengths[:, None]  # [n, L]
        h = self._prefill_hidden(tokens, valid, rows)  # [n, L, C] final-LN'd
        at = torch.arange(tokens.shape[0], device=self.device)
        last, sot = h[at, lengths - 1], h[at, sot_index]
        logits = F.linear(torch.stack([last, sot]), self.embedding).float()
        self.pos[rows] = lengths - 1  # the last prompt token's column
        return logits[0], logits[1]

    def _prefill_hidden(self, tokens: torch.Tensor, valid: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        width = tokens.shape[1]
        columns = torch.arange(width, device=self.device)
        causal = columns[None, :] <= columns[:, None]  # [L, L]
        mask = (causal[None] & valid[:, None, :])[:, None]  # [n, 1, L, L]; column 0 is always valid
        dtype = self.dtype
        x = self.embedding[tokens].float() + self.positions[:width][None].float()  # fp32 residual stream
        for i, layer in enumerate(self.layers):
            h = layer_norm(x, *layer.attn_ln, out_dtype=dtype)
            q, k, v = (split_heads(t, self.heads) for t in layer.qkv(h).chunk(3, dim=-1))
            self.self_k[i, rows, :, :width], self.self_v[i, rows, :, :width] = k, v
            x = x + layer.out(merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=mask)))
            h = layer_norm(x, *layer.cross_ln, out_dtype=dtype)
            q = split_heads(layer.cross_q(h), self.heads)
            kc, vc = self.cross_k[i, rows], self.cross_v[i, rows]
            if self.cross_k_scale is not None:
                kc = kc.to(self.dtype) * self.cross_k_scale[i, rows].to(self.dtype)
                vc = vc.to(self.dtype) * self.cross_v_scale[i, rows].to(self.dtype)
            x = x + layer.cross_out(merge_heads(F.scaled_dot_product_attention(q, kc, vc)))
            h = layer_norm(x, *layer.mlp_ln, out_dtype=dtype)
            x = x + layer.fc2(bias_gelu(layer.fc1(h), layer.fc1_bias))
        return layer_norm(x, *self.final_ln, out_dtype=dtype)

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self.tokens[: self.rows] = tokens.to(self.device)
        self.pos[: self.rows] = positions.to(self.device)
        self.step_graph.run(self.bucket)
        return self.logits[: self.rows].clone()  # a copy: the static buffer is rewritten next step

    # ------------------------------------------------------------------ continuous batching (slots) ----
    # Each cache row is a slot holding one window; a slot is refilled (``start_slots`` + ``prefill_slots``) the
    # step its sequence ends, while the other slots go on decoding at their own positions (``step_slots``).

    @torch.inference_mode()
    def start_slots(self, audio_features: torch.Tensor, slots: list[int]) -> None:
        """The cross-attention K/V of windows [n, T, C] into slots (cache rows) ``slots``."""
        if len(slots) != audio_features.shape[0] or max(slots) >= self.max_rows or min(slots) < 0:
            raise ValueError(f"{audio_features.shape[0]} windows for slots {slots} of {self.max_rows}")
        self._fill_cross(audio_features, torch.tensor(slots, device=self.device))

    @torch.inference_mode()
    def prefill_slots(self, prompts: list[list[int]], slots: list[int], sot_index: list[int]):
        """Each slot's prompt (token ids, <|startoftranscript|> at sot_index) at its columns 0..len-1; returns
        the logits [n, V] at each prompt's last token and at its <|startoftranscript|>."""
        lengths = torch.tensor([len(p) for p in prompts])
        if int(lengths.max()) >= self.config.n_text_ctx:
            raise ValueError(f"a prompt of {int(lengths.max())} tokens leaves no room in {self.config.n_text_ctx}")
        aligned = torch.zeros(len(prompts), int(lengths.max()), dtype=torch.long)
        for r, prompt in enumerate(prompts):
            aligned[r, : len(prompt)] = torch.tensor(prompt)
        rows = torch.tensor(slots, device=self.device)
        return self._prefill_rows(aligned, lengths, torch.tensor(sot_index), rows)

    @torch.inference_mode()
    def feed_slots(self, rows, tokens: torch.Tensor) -> None:
        """The next input of each row (a slice or an index tensor; tokens [n] on the device): its token, at the
        column after its last one. Device-side only, so it runs inside a caller's CUDA graph."""
        self.tokens[rows] = tokens
        # a row that ended at the last column stays idle there: its slot must not step past the context
        self.pos[rows] = (self.pos[rows] + 1).clamp(max=self.config.n_text_ctx - 1)

    @torch.inference_mode()
    def step_slots(self, top: int) -> int:
        """One token for every row of the smallest bucket holding rows [:top], each at its position, from what
        ``prefill_slots`` and ``feed_slots`` left in the static buffers (no host-to-device copy, which would
        wait for the GPU); the logits stay in ``self.logits[:bucket]``. Returns the bucket. Idle slots inside it
        decode garbage into their own rows, which the next prefill of that slot overwrites before anything
        reads it."""
        bucket = bucket_for(top, self.options.buckets)
        self.step_graph.run(bucket)
        return bucket

    @torch.inference_mode()
    def reorder(self, rows: torch.Tensor) -> None:
        index, r = rows.to(self.device), self.rows
        self.self_k[:, :r] = self.self_k[:, :r].index_select(1, index)
        self.self_v[:, :r] = self.self_v[:, :r].index_select(1, index)

    # ------------------------------------------------------------------ fast greedy ---------------------

    @torch.inference_mode()
    def greedy(self, first_tokens: torch.Tensor, n_tokens: int, suppress: torch.Tensor | None = None) -> torch.Tensor:
        """After ``prefill``, decode ``n_tokens`` greedily on the GPU with no host round trip per token.

        first_tokens [rows]: the tokens chosen from the prefill logits; suppress [V] float added to every
        step's logits (-inf bans a token). Returns the rows' tokens [rows, n_tokens] (first_tokens included).
        """
        rows = self.rows
        if int(self.pos[:rows].max()) + n_tokens >= self.config.n_text_ctx:
            raise ValueError(f"{n_tokens} more tokens would pass the decoder's {self.config.n_text_ctx} positions")
        self.suppress.copy_(suppress.to(self.device) if suppress is not None else torch.zeros_like(self.suppress))
        self.tokens[:rows] = first_tokens.to(self.device)
        self.pos[:rows] += 1  # the first sampled token's column
        start = self.pos[:rows].clone()
        self.history[torch.arange(rows, device=self.device), start] = self.tokens[:rows]
        for _ in range(n_tokens - 1):
            self.greedy_graph.run(self.bucket)
        offsets = start[:, None] + torch.arange(n_tokens, device=self.device)[None, :]
        return self.history[:rows].gather(1, offsets).cpu()

    def weight_bytes(self) -> int:
        """Bytes of decoder weights read by one decode step (the output projection included)."""
        total = self.embedding.numel() * self.embedding.element_size()
        for layer in self.layers:
            total += sum(p.nbytes for p in (layer.qkv, layer.out, layer.cross_q, layer.cross_out, layer.fc1, layer.fc2))
        return total
