"""GPU decode engine for Lite Transformer: fp16/bf16 (optional INT8 weight-only) decoder weights, static caches,
and one CUDA graph per shape bucket that holds a whole beam-search step.

Measured with the eager model, a decode step costs ~5 ms at any batch, beam or dtype: Python, ~400 kernel launches
and two host syncs of the beam search. A graph replay launches the same work with no Python and no sync, so the
step here is written for capture: every input lives in a static buffer, every position-dependent choice is a
device tensor, and the beam bookkeeping is :class:`.device_search.BeamSearchState`.

One replayed step (N = sentences x beam rows; shapes for the WMT En-De size: C = 496, two branches of 248)::

    x = sqrt(C) * embed[next_tokens] + positions[pad + 1 + step]    [N, C]  (kernels/embed_step.py, one launch)
    per layer (post-norm as in the paper, pre-norm also handled):
      u = x @ W_in^T + b_in      one GEMM: block-diagonal [q; k; v | linear1] over the branch channels
      attention branch: decode_attention(q, cache[:step + 1], new_kv=(k, v)): stores k, v at column step too
      convolution branch: GLU(u_conv); taps = weight_linear(.); the convolution over the last K inputs, in one
        launch (kernels/dynamic_conv_branch.py; INT8 weights: GLU, int8 GEMM, dynamic_conv_step_rows), which
        runs alongside the attention branch launched before it (``overlap``: the two share no buffer)
      both branches write their columns of one buffer m = [attn | conv]
      x = LayerNorm(x + m @ W_out^T + b_out)   one GEMM (block-diagonal [out_proj | linear2])
      x = LayerNorm(x + cross_out(attention(cross_q(x), encoder K/V)))   the add + LayerNorm, cross_q and the
        attention in one launch per (sentence, head) (kernels/norm_cross_attention.py; the beams share the K/V)
      x = LayerNorm(x + fc2(act(fc1(x))))
    each "x = LayerNorm(x + delta)" runs in the prologue of the next sublayer's first launch (in_proj, fc1 + ReLU:
    kernels/norm_linear.py; the cross-attention's), which also stores the new x; INT8 weights run it as
    add_layer_norm, and their cross sublayer as cross_q then decode_attention
    BeamSearchState.advance_logits(x @ E^T, fp32 from the GEMM's accumulator): log_softmax in fp32, masks,
    top 2k, finished hypotheses, and the row table reordered by the chosen beams (the caches stay: each key and
    convolution input stays in the row that computed it), in two kernels (kernels/beam_search_step.py)

Static decoding state (per graph key ``(beam, sentence bucket, source capacity, target capacity)``):

* self-attention K/V ``[n, 2, N, H, L, Dp]`` (one tensor per (H, Dp) shape; Dp: the head width padded to a
  multiple of ``HEAD_ALIGN``, zeros in the extra lanes, see :func:`_pad_heads`) and the row table ``kv_rows [N, L]``:
  step t writes row b's key into (row b, column t) and sets ``kv_rows[b, t] = b``; a beam reorder permutes the
  table's rows, and ``decode_attention(rows=kv_rows)`` reads key s of row b from cache row ``kv_rows[b, s]``.
  Each (row, column) is written once per search, so no key is overwritten while a later beam still reads it;
* convolution inputs ``[n_conv, N, L, C_max]`` (branch i uses ``[:, :, :C_i]``), kept like the keys: step t writes
  row b's input into (row b, column t) and the step kernel reads the K - 1 before it from rows ``kv_rows[b, s]``
  (``dynamic_conv_step_rows``; the step is a device tensor): nothing is copied when beams are reordered. Steps
  before the first read as zeros, as upstream's truncated first steps;
* encoder-decoder K/V ``[layers, 2, N, H, S, Dp]`` computed once per batch. Keys are *left-aligned*: a left-padded
  source row keeps its real keys in columns ``[0, len)``; attention is a sum over keys, so moving them changes
  nothing but lets ``decode_attention`` mask by length. Beam rows of one sentence share them: never reordered.

Sentence buckets: a batch of B sentences runs in the smallest bucket >= B; the extra sentences copy the last real
one and are ignored. Rows never interact, so padding cannot change results (tested on CPU).

Where CUDA is absent (CPU tests) or ``cuda_graphs=False``, the same step runs eagerly and the kernels dispatch to
their PyTorch references.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from turboformer.kernels import utils
from turboformer.kernels.decode_attention import decode_attention
from turboformer.kernels.dynamic_conv import dynamic_conv_step_rows
from turboformer.kernels.dynamic_conv_branch import dynamic_conv_branch_step
from turboformer.kernels.embed_step import embed_step
from turboformer.kernels.layer_norm import add_layer_norm, layer_norm
from turboformer.kernels.norm_cross_attention import norm_cross_attention
from turboformer.kernels.norm_linear import MAX_FEATURES, norm_linear
from turboformer.models.lite_transformer.device_search import BeamSearchState
from turboformer.models.lite_transformer.dynamic_conv import (
    DynamicConv,
    LightweightConv,
)
from turboformer.models.lite_transformer.generate import (
    BeamSearchOptions,
    GenerationError,
    Hypothesis,
    SpecialTokens,
)
from turboformer.models.lite_transformer.model import (
    ACTIVATIONS,
    DecoderLayer,
    LiteTransformer,
    MultiheadAttention,
    SinusoidalPositions,
)
from turboformer.nn.linear import PackedLinear
from turboformer.runtime.cuda_graphs import bucket_for, capture

QUANTIZE = (None, "int8")
MAX_SOURCE_GRAPHS = 64  # source lengths captured per slot (encoder graphs); further lengths encode eagerly
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Attention heads are stored padded to a multiple of 16 elements (62 -> 64 at the WMT size): a key or value row
# then starts on a 32-byte boundary and the kernels load it with 16-byte vectors, where a 62-wide row takes 62
# scalar loads and as many 64-bit addresses (on the H200 the engine's self-attention over 65 keys took 13.2 us
# unpadded, a scratch kernel of the same structure 5.8 us padded; 16 x 32 x beam 4 ~16.9 -> ~15.9 ms; see
# BENCHMARKS.md)
HEAD_ALIGN = 16


@dataclass(frozen=True)
class EngineOptions:
    dtype: torch.dtype = torch.float16  # or torch.bfloat16 (torch.float32 for CPU logic tests)
    quantize: str | None = None  # "int8": weight-only int8 decoder linears
    quantize_output: bool = False  # int8 for the vocabulary projection too (it decides the beams: fp16 by default)
    cuda_graphs: bool = True  # False: run the same step eagerly
    sentence_buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)  # sentences per batch captured as graphs
    length_multiple: int = 16  # source / target cache capacities are rounded up to a multiple of this
    check_every: int = 8  # steps between the host's "all sentences done?" checks (one sync each)
    int8_group: int | None = 16  # int8 scales per 16 input features (None: per output channel; see quantize_weight)

    def __post_init__(self) -> None:
        if self.quantize not in QUANTIZE:
            raise ValueError(f"quantize must be one of {QUANTIZE}, got {self.quantize!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be float16, bfloat16 or float32, got {self.dtype}")
        if not self.sentence_buckets or min(self.sentence_buckets) < 1:
            raise ValueError(f"sentence_buckets must be positive batch sizes, got {self.sentence_buckets}")
        if self.int8_group is not None and self.int8_group < 1:
            raise ValueError(f"int8_group must be >= 1 or None, got {self.int8_group}")
        if self.length_multiple < 1 or self.check_every < 1:
            raise ValueError("length_multiple and check_every must be >= 1")


def _ln(norm: torch.nn.LayerNorm, dtype: torch.dtype) -> tuple[Tensor, Tensor, float]:
    return norm.weight.detach().to(dtype).contiguous(), norm.bias.detach().to(dtype).contiguous(), norm.eps


def padded_head_dim(head_dim: int) -> int:
    """The head width the engine stores: ``head_dim`` rounded up to a multiple of ``HEAD_ALIGN``."""
    return -(-head_dim // HEAD_ALIGN) * HEAD_ALIGN


def _pad_heads(weight: Tensor, heads: int, head_dim: int) -> Tensor:
    """A projection's ``[heads * head_dim, ...]`` weight (or bias) with each head's rows padded to
    ``padded_head_dim(head_dim)``: zero rows (and zero bias) in the new lanes. A query, key or value projected by
    them carries exact zeros there, so every dot product, softmax and weighted sum is unchanged; the attention
    kernels store only the first head_dim lanes of their output (``out``/``out_dim``), so the out-projections
    keep the model's weights (and their INT8 groups)."""
    padded = padded_head_dim(head_dim)
    if padded == head_dim:
        return weight.detach()
    rest = weight.shape[1:]
    out = weight.detach().new_zeros(heads, padded, *rest)
    out[:, :head_dim] = weight.detach().reshape(heads, head_dim, *rest)
    return out.reshape(heads * padded, *rest)


def _qkv(module: MultiheadAttention) -> tuple[Tensor, Tensor]:
    """A self-attention module's q, k, v projections as one, heads padded (:func:`_pad_heads`): (W [3 H Dp, d],
    b [3 H Dp])."""
    qkv = [module.q_proj, module.k_proj, module.v_proj]
    H, D = module.heads, module.head_dim
    return (torch.cat([_pad_heads(p.weight, H, D) for p in qkv]), torch.cat([_pad_heads(p.bias, H, D) for p in qkv]))


def _block_diagonal(blocks: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """[(W_i [out_i, in_i], b_i [out_i])] -> W [sum out, sum in] with W_i on the diagonal, b [sum out] (fp32).
    Zero blocks add exact zeros to the fp32 accumulation: each output equals its own branch's projection."""
    rows, cols = sum(w.shape[0] for w, _ in blocks), sum(w.shape[1] for w, _ in blocks)
    weight = torch.zeros(rows, cols, dtype=torch.float32, device=blocks[0][0].device)
    bias = torch.zeros(rows, dtype=torch.float32, device=weight.device)
    r = c = 0
    for w, b in blocks:
        weight[r : r + w.shape[0], c : c + w.shape[1]] = w.float()
        bias[r : r + w.shape[0]] = b.float()
        r, c = r + w.shape[0], c + w.shape[1]
    return weight, bias


def _linear_or_identity(linear: torch.nn.Linear | None, dim: int, device) -> tuple[Tensor, Tensor]:
    if linear is None:  # a branch without projections: the identity, exact in any dtype
        return torch.eye(dim, device=device), torch.zeros(dim, device=device)
    bias = linear.bias if linear.bias is not None else torch.zeros(linear.out_features, device=device)
    return linear.weight.detach(), bias.detach()


@dataclass
class _AttentionBranch:
    in_offset: int  # columns [in_offset, in_offset + 3 H Dp) of the fused in-projection are q, k, v (heads padded)
    out_offset: int  # columns [out_offset, out_offset + d) of the out-projection's input are its output
    dim: int  # its channels: heads x head_dim (its columns of the out-projection's input)
    heads: int
    head_dim: int  # the model's (the softmax scale's); stored padded to group[1]
    group: tuple[int, int]  # (heads, padded head_dim): the self-attention cache tensor it lives in
    index: int  # its index in that tensor


@dataclass
class _ConvBranch:
    in_offset: int  # columns [in_offset, in_offset + (2 d if glu else d)) are linear1's output
    out_offset: int  # columns [out_offset, out_offset + d) of the out-projection's input are its output
    dim: int
    heads: int
    kernel_size: int
    glu: bool
    softmax: bool
    index: int  # its index in the convolution inputs tensor
    weight_linear: PackedLinear | None  # dynamic: taps predicted from the input; None: lightweight
    fixed_logits: Tensor | None  # lightweight: [1, H, K]


@dataclass
class _Layer:
    branches: list  # _AttentionBranch | _ConvBranch, in channel order
    in_proj: PackedLinear  # block-diagonal over the branches
    out_proj: PackedLinear  # block-diagonal over the branches
    lsra_norm: tuple
    cross_q: PackedLinear
    cross_out: PackedLinear
    cross_heads: int
    cross_norm: tuple
    fc1: PackedLinear
    fc2: PackedLinear
    ffn_norm: tuple


@dataclass
class _Slot:
    """Static buffers, search state and graph of one shape key."""

    sentences: int
    beam: int
    source_len: int  # encoder key capacity
    target_len: int  # decoder positions capacity (>= max_len + 1)
    state: BeamSearchState
    self_kv: dict  # (H, Dp) -> [n, 2, N, H, L, Dp]
    conv_history: Tensor | None  # [n_conv, N, L, C_max]
    cross_kv: Tensor  # [layers, 2, N, H, S, Dp]
    cross_lengths: Tensor  # [N] int64, real source tokens of each row
    self_lengths: Tensor  # [N] int64: step + 1
    beam_rows: Tensor  # [N] int64: the sentence of each row (arange(sentences) repeated beam times)
    kv_rows: Tensor  # [N, L] int64: the self-K/V cache row holding position s of row b's prefix (beam > 1)
    own_rows: Tensor  # [N] int64: arange(N)
    graph: object = None
    options: BeamSearchOptions | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class _Source:
    """Static source tokens [sentences, S] of one length and the graph that encodes them (None: eager)."""

    tokens: Tensor
    graph: object = None


class LiteTransformerEngine:
    """Beam search with the decoder step (and its bookkeeping) captured as CUDA graphs. ``generate`` returns the
    same :class:`.generate.Hypothesis` lists as the reference :class:`.generate.BeamSearch` path."""

    def __init__(
        self,
        model: LiteTransformer,
        special: SpecialTokens,
        options: EngineOptions = EngineOptions(),
        device: str | torch.device = "cuda",
    ) -> None:
        started = time.perf_counter()
        self.options, self.special, self.config = options, special, model.config
        self.device = torch.device(device)
        self.dtype = dtype = options.dtype
        self.model = model.to(device=self.device, dtype=dtype).eval()  # the encoder runs through the module
        decoder = self.model.decoder
        self.vocab_size = decoder.embed_tokens.num_embeddings
        self.padding_idx = decoder.padding_idx
        self.embed_scale = decoder.embed_scale
        self.embed = decoder.embed_tokens.weight.detach()  # [V, C]
        positions = decoder.embed_positions
        self.position_table = (
            None
            if positions is None
            else (positions.table if isinstance(positions, SinusoidalPositions) else positions.weight).detach()
        )
        int8 = options.quantize == "int8"
        out_weight = decoder.embed_tokens.weight if decoder.output_projection is None else decoder.output_projection.weight
        self.output = PackedLinear(out_weight.detach(), None, dtype, int8 and options.quantize_output, options.int8_group)
        self.final_norm = None if decoder.final_norm is None else _ln(decoder.final_norm, dtype)
        self.pre_norm = self.config.decoder.normalize_before
        self.activation = ACTIVATIONS[self.config.activation_fn]
        self.attn_groups: dict[tuple[int, int], int] = {}  # (H, D) -> attention branches in that cache tensor
        self.conv_dim_max = self.n_conv = 0
        self.layers = [self._convert(layer, dtype, int8) for layer in decoder.layers]
        self.cross_heads, self.cross_head_dim = self.layers[0].cross_heads, decoder.layers[0].cross_attn.head_dim
        self.cross_head_padded = padded_head_dim(self.cross_head_dim)  # stored width (HEAD_ALIGN)
        # every layer's encoder-decoder K and V projections as one GEMM over the encoder output: [L 2 H Dp, C_enc]
        projections = [p for layer in decoder.layers for p in (layer.cross_attn.k_proj, layer.cross_attn.v_proj)]
        H, D = self.cross_heads, self.cross_head_dim
        self.cross_kv_weight = torch.cat([_pad_heads(p.weight, H, D) for p in projections])
        self.cross_kv_bias = torch.cat([_pad_heads(p.bias, H, D) for p in projections])
        self.use_graphs = options.cuda_graphs and self.device.type == "cuda"
        self.slots: dict[tuple[int, int, int, int], _Slot] = {}
        self.graph_pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self.build_seconds = time.perf_counter() - started

    # ------------------------------------------------------------------ weights --------------------------------

    def _convert(self, layer: DecoderLayer, dtype: torch.dtype, int8: bool) -> _Layer:
        device, int8_group = self.device, self.options.int8_group
        in_blocks, out_blocks, branches, offset, out_offset = [], [], [], 0, 0
        for module, dim in zip(layer.lsra.branches, layer.lsra.dims):
            if isinstance(module, MultiheadAttention):
                H, D = module.heads, module.head_dim
                in_blocks.append(_qkv(module))
                out_blocks.append(_linear_or_identity(module.out_proj, dim, device))
                group = (H, padded_head_dim(D))
                index = self.attn_groups.get(group, 0)
                self.attn_groups[group] = index + 1
                branches.append(_AttentionBranch(offset, out_offset, dim, H, D, group, index))
                offset += 3 * H * group[1]
            else:
                assert isinstance(module, (DynamicConv, LightweightConv))
                in_blocks.append(_linear_or_identity(module.linear1, dim, device))
                out_blocks.append(_linear_or_identity(module.linear2, dim, device))
                glu = isinstance(module, DynamicConv) and module.glu
                weight_linear = fixed = None
                if isinstance(module, DynamicConv):
                    weight_linear = PackedLinear.of(module.weight_linear, dtype, int8, with_bias=False, group=int8_group)
                else:
                    fixed = module.weight.detach().to(dtype).view(1, module.heads, module.kernel_size).contiguous()
                branches.append(
                    _ConvBranch(
                        offset, out_offset, dim, module.heads, module.kernel_size, glu, module.weight_softmax,
                        self.n_conv, weight_linear, fixed,
                    )
                )  # fmt: skip
                self.n_conv += 1
                self.conv_dim_max = max(self.conv_dim_max, dim)
                offset += in_blocks[-1][0].shape[0]
            out_offset += dim
        in_w, in_b = _block_diagonal(in_blocks)
        out_w, out_b = _block_diagonal(out_blocks)
        cross = layer.cross_attn
        return _Layer(
            branches=branches,
            in_proj=PackedLinear(in_w, in_b, dtype, int8, int8_group),
            out_proj=PackedLinear(out_w, out_b, dtype, int8, int8_group),
            lsra_norm=_ln(layer.lsra_norm, dtype),
            cross_q=PackedLinear(_pad_heads(cross.q_proj.weight, cross.heads, cross.head_dim),
                                 _pad_heads(cross.q_proj.bias, cross.heads, cross.head_dim), dtype, int8, int8_group),
            cross_out=PackedLinear.of(cross.out_proj, dtype, int8, group=int8_group),
            cross_heads=cross.heads,
            cross_norm=_ln(layer.cross_attn_norm, dtype),
            fc1=PackedLinear.of(layer.ffn.fc1, dtype, int8, group=int8_group),
            fc2=PackedLinear.of(layer.ffn.fc2, dtype, int8, group=int8_group),
            ffn_norm=_ln(layer.ffn_norm, dtype),
        )

    # ------------------------------------------------------------------ the captured step ----------------------

    def _add_norm(self, x: Tensor, pending: tuple) -> tuple[Tensor, Tensor]:
        """The residual point left ``pending = (delta | None, norm | None)``: returns (the residual stream, the
        next sublayer's input). Post-norm: both are LN(x + delta). Pre-norm: x + delta, and its LN by ``norm``
        (the next sublayer's; None after the last layer without a final norm)."""
        delta, norm = pending
        if delta is not None and norm is not None:
            s, h = add_layer_norm(x, delta, norm[0], norm[1], norm[2])
        elif delta is not None:
            s = h = x + delta
        else:
            s, h = x, (x if norm is None else layer_norm(x, *norm))
        return (s if self.pre_norm else h), h

    def _first_linear(self, x: Tensor, pending: tuple, linear: PackedLinear, relu: bool = False):
        """A sublayer's first linear on its input: ``pending``'s add + LayerNorm (:meth:`_add_norm`) fused into
        the GEMM's prologue (``norm_linear``) for fp16/bf16 weights; INT8 weights run it unfused. Returns
        (the linear's output, after ReLU when ``relu``; the residual stream)."""
        delta, norm = pending
        if self._fused(linear) and (delta is None or norm is not None):
            ln, eps = (None, 1e-5) if norm is None else (norm[:2], norm[2])
            keep = "sum" if self.pre_norm else "norm"
            return norm_linear(x, linear.weight, linear.bias, delta=delta, ln=ln, eps=eps, keep=keep, relu=relu)
        x, h = self._add_norm(x, pending)
        y = linear(h)
        return (F.relu(y) if relu else y), x

    @staticmethod
    def _fused(linear: PackedLinear) -> bool:
        """Whether ``linear`` runs through norm_linear: fp16/bf16 weights of at most its ``MAX_FEATURES`` inputs."""
        return not linear.int8 and linear.in_features <= MAX_FEATURES

    def _one_wave(self, slot: _Slot) -> bool:
        """Whether the cross sublayer runs as one norm_cross_attention launch: when its programs (sentences x
        heads; one resident per SM: 8 warps of ~180 registers) fit in one wave. More waves lose to the two
        launches (H200, 64 one-beam rows: 512 programs take 18 us). Always on CPU, where both are references
        (or the interpreter in tests)."""
        if self.device.type != "cuda":
            return True
        return slot.sentences * self.cross_heads <= utils.multiprocessor_count(self.device)

    def _linear(self, linear: PackedLinear, x: Tensor) -> Tensor:
        """``x @ W^T + b``: the norm_linear kernel without its prologue for fp16/bf16 weights (at 64 rows of 496
        features on an H200 ~2.7 us against cuBLAS's ~4.2), the packed layer (cuBLAS, INT8) otherwise."""
        return norm_linear(x, linear.weight, linear.bias)[0] if self._fused(linear) else linear(x)

    def _pending(self, delta: Tensor, norm: tuple, next_norm: tuple | None) -> tuple:
        """What a sublayer with output ``delta`` leaves to the next: post-norm adds and normalises with the
        sublayer's own norm, pre-norm with the next sublayer's."""
        return delta, (next_norm if self.pre_norm else norm)

    def _lsra(self, slot: _Slot, i: int, layer: _Layer, x: Tensor, pending: tuple) -> tuple[Tensor, Tensor]:
        """The LSRA sublayer: (its output, the residual stream). Each branch writes its columns of one
        ``[N, sum of branch channels]`` buffer, the block-diagonal out-projection's input (no concatenation)."""
        N = x.shape[0]
        u, x = self._first_linear(x, pending, layer.in_proj)  # [N, sum of branch in-projections]
        rows = slot.kv_rows if slot.beam > 1 else None  # beams read their prefix's keys and inputs where they are
        mixed = torch.empty(N, layer.out_proj.in_features, dtype=u.dtype, device=u.device)
        for j, branch in enumerate(layer.branches):
            d = branch.dim
            out = mixed[:, branch.out_offset : branch.out_offset + d]
            if isinstance(branch, _AttentionBranch):
                H, Dp = branch.group
                qkv = u[:, branch.in_offset : branch.in_offset + 3 * H * Dp]
                q, k, v = (t.view(N, H, Dp) for t in qkv.split(H * Dp, dim=1))
                cache = slot.self_kv[branch.group][branch.index]  # [2, N, H, L, Dp]
                # this step's k, v go to (row b, column step) inside the attention launch; the output drops the
                # padded lanes (out is [N, H, head_dim])
                decode_attention(q, cache[0], cache[1], slot.self_lengths, branch.head_dim**-0.5, rows=rows,
                                 new_kv=(k, v), out=out.view(N, H, branch.head_dim))  # fmt: skip
                continue
            width = 2 * d if branch.glu else d
            c = u[:, branch.in_offset : branch.in_offset + width]
            history = slot.conv_history[branch.index, :, :, :d]  # [N, L, d]: column `step` written here
            step = slot.state.step
            if branch.weight_linear is not None and self._fused(branch.weight_linear):  # one launch on CUDA
                # the history and row table were written by earlier steps and the step's first kernel: they may
                # load while the kernel before it (the in-projection or the attention branch) still runs. After an
                # attention branch, which shares no buffer with it and starts its dependents only once the
                # in-projection is done, the whole branch runs alongside the attention (overlap)
                after_attention = j > 0 and isinstance(layer.branches[j - 1], _AttentionBranch)  # its last launch
                dynamic_conv_branch_step(c, branch.weight_linear.weight, history, step, rows, heads=branch.heads,
                                         glu=branch.glu, softmax=branch.softmax, out=out, prefetch=True,
                                         overlap=after_attention)  # fmt: skip
                continue
            if branch.glu:
                c = F.glu(c, dim=-1)
            c = c.contiguous()  # [N, d]
            if branch.weight_linear is not None:
                logits = self._linear(branch.weight_linear, c).view(N, branch.heads, branch.kernel_size)
            else:
                logits = branch.fixed_logits
            dynamic_conv_step_rows(c, history, logits, step, rows, branch.softmax, out=out)
        return self._linear(layer.out_proj, mixed), x

    def _cross(self, slot: _Slot, i: int, layer: _Layer, x: Tensor, pending: tuple) -> tuple[Tensor, Tensor]:
        """Encoder-decoder attention: (its output, the residual stream)."""
        N, H, D, Dp = x.shape[0], self.cross_heads, self.cross_head_dim, self.cross_head_padded
        kv = slot.cross_kv[i]  # [2, N, H, S, Dp]
        if self._fused(layer.cross_q) and self._one_wave(slot):
            delta, norm = pending  # after the LSRA sublayer: its output and the LayerNorm to apply, both set
            # one launch: the add + LayerNorm, each head's query projection and the attention over the encoder
            # K/V of the sentence (its beam rows share them: group = beam)
            a, x = norm_cross_attention(x, delta, layer.cross_q.weight, layer.cross_q.bias, norm[:2], kv[0], kv[1],
                                        slot.cross_lengths, D**-0.5, group=slot.beam, eps=norm[2],
                                        keep="sum" if self.pre_norm else "norm", out_dim=D)  # fmt: skip
        else:
            q, x = self._first_linear(x, pending, layer.cross_q)
            # the encoder K/V were written before the step: each split loads its first tile before it waits (PDL)
            a = torch.empty(N, H, D, dtype=q.dtype, device=q.device)  # the unpadded lanes
            decode_attention(q.view(N, H, Dp), kv[0], kv[1], slot.cross_lengths, D**-0.5, prefetch="all", out=a)
        return self._linear(layer.cross_out, a.view(N, H * D)), x

    def _step(self, slot: _Slot) -> None:
        """One beam-search step for all rows of ``slot``: device work only (captured as the slot's graph)."""
        state = slot.state
        # x [N, C]; the self-attention's lengths = step + 1; beams: this step's keys go to each row's own cache
        # row (kv_rows[b, step] = b). One launch on CUDA
        x = embed_step(state.next_tokens, self.embed, self.embed_scale, self.position_table, state.step,
                       self.padding_idx + 1, lengths=slot.self_lengths, rows=slot.kv_rows if state.k > 1 else None)
        # each sublayer leaves its residual add + LayerNorm pending: the next sublayer's first linear does it
        pending = (None, self.layers[0].lsra_norm if self.pre_norm else None)
        relu = self.activation is F.relu  # fused into fc1's epilogue
        for i, layer in enumerate(self.layers):
            delta, x = self._lsra(slot, i, layer, x, pending)
            pending = self._pending(delta, layer.lsra_norm, layer.cross_norm)
            delta, x = self._cross(slot, i, layer, x, pending)
            pending = self._pending(delta, layer.cross_norm, layer.ffn_norm)
            f, x = self._first_linear(x, pending, layer.fc1, relu=relu)
            delta = self._linear(layer.fc2, f if relu else self.activation(f))
            following = self.layers[i + 1].lsra_norm if i + 1 < len(self.layers) else self.final_norm
            pending = self._pending(delta, layer.ffn_norm, following)
        x, h = self._add_norm(x, pending)
        if self.final_norm is not None and not self.pre_norm:
            h = layer_norm(h, *self.final_norm)
        # the search step from the logits [N, V] (log-softmax, masks, top 2k, bookkeeping: two launches on CUDA).
        # Beam 1 keeps its rows; otherwise row i continues row reorder_rows[i] and takes that row's table of
        # where its prefix's keys and convolution inputs are (reordered with the histories) instead of a copy of
        # the caches. fp32 logits straight from the GEMM's accumulator: fp16 rounding would tie symbols that
        # fp32 orders
        state.advance_logits(self.output.fp32_out(h), tables=(slot.kv_rows,) if state.k > 1 else ())

    # ------------------------------------------------------------------ slots and graphs -----------------------

    def _round(self, n: int) -> int:
        m = self.options.length_multiple
        return -(-n // m) * m

    def _slot(self, sentences: int, options: BeamSearchOptions, source_len: int, target_len: int) -> _Slot:
        key = (options.beam_size, sentences, self._round(source_len), min(self._round(target_len), self.config.decoder.max_positions))
        slot = self.slots.get(key)
        if slot is None:
            beam, S, L = options.beam_size, key[2], key[3]
            N, dev, dtype = sentences * beam, self.device, self.dtype
            state = BeamSearchState(options, self.special, sentences, self.vocab_size, L - 1, dev)
            self_kv = {
                (H, D): torch.zeros(n, 2, N, H, L, D, dtype=dtype, device=dev) for (H, D), n in self.attn_groups.items()
            }
            history = None
            if self.n_conv:
                history = torch.zeros(self.n_conv, N, L, self.conv_dim_max, dtype=dtype, device=dev)
            H, Dp = self.cross_heads, self.cross_head_padded
            cross_kv = torch.zeros(len(self.layers), 2, N, H, S, Dp, dtype=dtype, device=dev)
            long = dict(dtype=torch.long, device=dev)
            beam_rows = torch.arange(sentences, device=dev).repeat_interleave(beam)
            slot = _Slot(sentences, beam, S, L, state, self_kv, history, cross_kv,
                         torch.ones(N, **long), torch.ones(N, **long), beam_rows,
                         torch.zeros(N, L, **long), torch.arange(N, device=dev))  # fmt: skip
            self.slots[key] = slot
        # the search options that are not shapes (lenpen, min_len, unk penalty, nbest) may change between calls
        slot.state.options = options
        slot.state.min_len.fill_(options.min_len)
        slot.state.unk_penalty.fill_(options.unk_penalty)
        return slot

    def _reset(self, slot: _Slot, max_len: int) -> None:
        slot.state.reset(max_len)
        slot.kv_rows.copy_(slot.own_rows[:, None].expand_as(slot.kv_rows))

    # ------------------------------------------------------------------ generation -----------------------------

    @torch.inference_mode()
    def encode(self, src_tokens: Tensor, slot: _Slot) -> None:
        """Encoder once, then the encoder-decoder K/V of every layer into the slot (left-aligned, per beam row).

        The sources are copied into a static ``[sentences, S]`` buffer (extra sentences repeat the last real one;
        rows never interact) and encoded by a CUDA graph per source length S, captured on first use (at most
        ``MAX_SOURCE_GRAPHS`` lengths per slot; others run eagerly). S is never padded: a padded source encodes
        differently (see :mod:`.model`), so each length has its own graph."""
        B, S = src_tokens.shape
        self.model.encoder.check(src_tokens)  # ids and shape, on the host, before anything is captured
        sources = slot.extra.setdefault("sources", {})
        source = sources.get(S)
        new = source is None
        if new:
            source = sources[S] = _Source(torch.empty(slot.sentences, S, dtype=torch.long, device=self.device))
        source.tokens[:B].copy_(src_tokens)
        source.tokens[B:].copy_(src_tokens[-1:].expand(slot.sentences - B, S))
        if new and self.use_graphs and len(sources) <= MAX_SOURCE_GRAPHS:  # warm-up runs on these very sources
            source.graph = capture(lambda: self._encode_step(slot, source.tokens), self.graph_pool)[0]
        if source.graph is not None:
            source.graph.replay()
        else:
            self._encode_step(slot, source.tokens)

    def _encode_step(self, slot: _Slot, tokens: Tensor) -> None:
        """Device work of :meth:`encode` for the static sources ``tokens`` [sentences, S]: no host sync."""
        S = tokens.size(1)
        pad = tokens.eq(self.padding_idx)  # [sentences, S]; all False without padding (the same as no mask)
        out = self.model.encoder.encode(tokens, pad).out  # [sentences, S, C]
        order = torch.sort(pad.to(torch.uint8), dim=1, stable=True).indices  # real tokens first, in order
        out = out.gather(1, order[..., None].expand_as(out))
        slot.cross_lengths.copy_((~pad).sum(dim=1).index_select(0, slot.beam_rows))
        # every layer's K and V in one GEMM ([sentences, S, L 2 H Dp]; heads padded), then one copy into the beam rows
        L, H, Dp = len(self.layers), self.cross_heads, self.cross_head_padded
        kv = F.linear(out, self.cross_kv_weight, self.cross_kv_bias).view(slot.sentences, S, L, 2, H, Dp)
        kv = kv.permute(2, 3, 0, 4, 1, 5)[:, :, :, None]  # [L, 2, sentences, 1, H, S, Dp]
        by_beam = slot.cross_kv.view(L, 2, slot.sentences, slot.beam, H, slot.cross_kv.shape[-2], Dp)
        by_beam[..., :S, :].copy_(kv.expand(-1, -1, -1, slot.beam, -1, -1, -1))

    @torch.inference_mode()
    def generate(self, src_tokens: Tensor, options: BeamSearchOptions, max_len: int) -> list[list[Hypothesis]]:
        """Beam search for one padded batch src_tokens [B, S] (rows end with </s>): ``nbest`` hypotheses per
        sentence, ``max_len`` tokens at most before the forced </s>."""
        src_tokens = src_tokens.to(self.device)
        B, S = src_tokens.shape
        if max_len < 0 or max_len + 1 > self.config.decoder.max_positions:
            raise GenerationError(f"max_len {max_len} must be in [0, {self.config.decoder.max_positions - 1}]")
        sentences = bucket_for(B, self.options.sentence_buckets)
        slot = self._slot(sentences, options, S, max_len + 1)
        self.encode(src_tokens, slot)
        if self.use_graphs and slot.graph is None:
            self._reset(slot, max_len)  # the warm-up steps run on this state; reset again below
            slot.graph = capture(lambda: self._step(slot), self.graph_pool)[0]
        self._reset(slot, max_len)
        state, check = slot.state, self.options.check_every
        for step in range(max_len + 1):
            if slot.graph is not None:
                slot.graph.replay()
            else:
                self._step(slot)
            if (step + 1) % check == 0 and step < max_len and bool((state.n_finished[:B] >= state.k).all()):
                break
        return state.hypotheses(B)
