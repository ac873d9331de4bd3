"""The Conformer GPU engine: the model in fp16/bf16 (optionally weight-only INT8), encoder + CTC + prefix beam
search captured as one CUDA graph per shape bucket, and batched attention rescoring.

Built once from a verified fp32 :class:`ConformerASR` (``ConformerEngine(model, EngineOptions(...))``):

* weights: every parameter in ``dtype``; CMVN statistics, BatchNorm statistics (folded into the depthwise conv
  in float32) stay fp32; softmax, log-softmax and LayerNorm statistics run in fp32 (the model's own code and
  PyTorch's LayerNorm kernels); ``quantize="int8"``: every ``nn.Linear`` becomes a weight-only per-channel
  INT8 :class:`~turboformer.nn.linear.Int8Linear` except the CTC projection and the decoders' output
  projections, which pick the tokens and stay in ``dtype``;
* the hot step, captured per (batch bucket, feature-frame bucket, beam, chunk) on first use: encoder on a
  zero-padded batch (the padding masks make the padded frames and rows invisible to valid frames) ->
  CTC log-softmax -> :func:`prefix_search.ctc_prefix_beam_search_batched` (on CUDA one Triton program per
  utterance over all its frames, ``kernels/ctc_prefix_search.py``; eager elsewhere, its tensor-op version:
  ~60 small ops per frame). Static input buffers are copied into before
  each replay; the graphs share one memory pool and are replayed one at a time;
* rescoring: :func:`search.rescoring_scores` on all B x N hypotheses (one left and one right decoder
  forward, eager; the hypothesis width is read once on the host and rounded up to ``WIDTH_STEP``).

Where CUDA is absent or ``cuda_graphs=False`` the same step runs eagerly (CPU tests check the logic: padded
buckets, batched search and rescoring against the reference path).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from turboformer.nn.linear import quantize_linears
from turboformer.runtime.cuda_graphs import bucket_for, capture

from .ctc import ctc_greedy_search
from .encoder import ConformerBlock, ConformerEncoder
from .model import ConformerASR
from .prefix_search import PrefixBeams, ctc_prefix_beam_search_batched
from .search import rescored_nbest, rescoring_scores

QUANTIZE = (None, "int8")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
WIDTH_STEP = 16  # rescoring decodes hypotheses padded to a multiple of this many tokens
# Linears kept in the engine dtype under INT8: they choose the tokens (CTC posteriors, decoder scores).
KEEP_PRECISE = ("ctc.ctc_lo", "decoder.left_decoder.output_layer", "decoder.right_decoder.output_layer")
PRECISE_MODULES = ("ctc.", "decoder.")  # fp32 and never quantized in a ``precise`` engine


class EngineOptionsError(ValueError):
    """Engine options that are invalid on their own or for the device."""


@dataclass(frozen=True)
class EngineOptions:
    dtype: torch.dtype = torch.float16  # or torch.bfloat16; torch.float32 (CPU logic tests, fp32 on GPU)
    quantize: str | None = None  # "int8": weight-only INT8 linears (see KEEP_PRECISE)
    batch_buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32)  # utterances per graph
    frame_step: int = 128  # feature frames (10 ms) are padded up to a multiple of this (1.28 s buckets)
    cuda_graphs: bool = True  # False: run the same step eagerly
    int8_group: int | None = 32  # int8 scales per 32 input features (None: per output channel)
    # fp16/bf16 engines: fp32 residual stream in the encoder, CTC projection and both decoders in fp32 (they
    # score the n-best, whose members can be a few hundredths of a nat apart). False: plain half precision.
    precise: bool = True

    def validate(self) -> None:
        if self.dtype not in DTYPES:
            raise EngineOptionsError(f"dtype must be float16, bfloat16 or float32, got {self.dtype}")
        if self.quantize not in QUANTIZE:
            raise EngineOptionsError(f"quantize must be one of {QUANTIZE}, got {self.quantize!r}")
        if not self.batch_buckets or min(self.batch_buckets) < 1:
            raise EngineOptionsError(f"batch_buckets must be positive batch sizes, got {self.batch_buckets}")
        if self.int8_group is not None and self.int8_group < 1:
            raise EngineOptionsError(f"int8_group must be >= 1 or None, got {self.int8_group}")
        if self.frame_step < 1:
            raise EngineOptionsError(f"frame_step must be >= 1, got {self.frame_step}")


def fp32_convolutions():
    """A context in which cuDNN runs convolutions in fp32: PyTorch's default lets it use TF32 (10-bit mantissa;
    measured on the H200: fixture scores 1e-2 off and one n-best order flipped). Other cuDNN flags unchanged."""
    cudnn = torch.backends.cudnn
    return cudnn.flags(
        enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic, allow_tf32=False
    )


def convert_model(
    model: ConformerASR,
    dtype: torch.dtype,
    quantize: str | None,
    int8_group: int | None = EngineOptions.int8_group,
    precise: bool = EngineOptions.precise,
) -> ConformerASR:
    """The model in ``dtype`` with fp32 CMVN and BatchNorm statistics, optionally INT8 linears (in place).

    ``precise`` (half-precision dtypes): the encoder keeps an fp32 residual stream and fp32 output states, the
    CTC projection and the decoders stay fp32 (and are not quantized). ``precise=False`` is plain PyTorch
    half precision (every module in ``dtype``), the benchmark's ``torch fp16`` baseline.
    """
    model.to(dtype)
    model.encoder.global_cmvn.float()  # (x - mean) * istd on log-fbank ~10: fp16 would keep ~3 digits
    for module in model.modules():
        if isinstance(module, nn.BatchNorm1d):
            module.float()  # only folded into the depthwise conv (in float32), never run itself
    precise = precise and dtype != torch.float32
    for module in model.encoder.modules():
        if isinstance(module, (ConformerEncoder, ConformerBlock)):
            module.fp32_residual = precise
    if precise:
        model.ctc.float()
        model.decoder.float()
    if quantize == "int8":
        skip = PRECISE_MODULES if precise else KEEP_PRECISE
        quantize_linears(model, skip=lambda name: name.startswith(skip), group=int8_group)
    return model


@dataclass
class _Graph:
    """Static buffers of one bucket: inputs copied in, outputs read after ``run``."""

    feats: torch.Tensor  # [Bb, Tb, F] float32
    lengths: torch.Tensor  # [Bb] int64
    outputs: tuple  # (encoder_out [Bb, T'b, D], encoder_lengths [Bb], log_probs [Bb, T'b, V], PrefixBeams | None)
    graph: torch.cuda.CUDAGraph | None


class ConformerEngine:
    """A converted model on its device with per-bucket graphs of encoder + CTC + prefix beam search."""

    def __init__(self, model: ConformerASR, options: EngineOptions = EngineOptions(), copy_model: bool = False):
        options.validate()
        self.options = options
        self.device = next(model.parameters()).device
        if self.device.type != "cuda" and (options.dtype != torch.float32 or options.quantize):
            raise EngineOptionsError("float16/bfloat16 and int8 engines need a CUDA device (CPU runs fp32)")
        model = copy.deepcopy(model) if copy_model else model
        self.model = convert_model(model.eval(), options.dtype, options.quantize, options.int8_group, options.precise)
        self.config = model.config
        self.graphed = options.cuda_graphs and self.device.type == "cuda"
        self._graphs: dict[tuple, _Graph] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.graphed else None

    # -- the captured step --------------------------------------------------------------------------------------

    def _step(self, feats, lengths, beam: int, chunk_size: int, left_chunks: int):
        if self.options.dtype == torch.float32 and self.device.type == "cuda":  # an fp32 engine computes in fp32
            with fp32_convolutions():
                return self._compute(feats, lengths, beam, chunk_size, left_chunks)
        return self._compute(feats, lengths, beam, chunk_size, left_chunks)

    def _compute(self, feats, lengths, beam: int, chunk_size: int, left_chunks: int):
        encoder_out, encoder_lengths = self.model.encoder(feats, lengths, chunk_size, left_chunks)
        log_probs = self.model.ctc(encoder_out)  # [Bb, T'b, V] float32
        beams = None
        if beam > 0:
            beams = ctc_prefix_beam_search_batched(log_probs, encoder_lengths, beam, self.config.blank_id)
        return encoder_out, encoder_lengths, log_probs, beams

    def _bucket(self, batch: int, frames: int, beam: int, chunk_size: int, left_chunks: int) -> _Graph:
        rows = bucket_for(batch, self.options.batch_buckets)
        step = self.options.frame_step
        padded = -(-frames // step) * step
        key = (rows, padded, beam, chunk_size, left_chunks)
        if key in self._graphs:
            return self._graphs[key]
        feats = torch.zeros(rows, padded, self.config.encoder.input_dim, device=self.device)
        lengths = torch.full((rows,), padded, dtype=torch.long, device=self.device)

        def run():
            return self._step(feats, lengths, beam, chunk_size, left_chunks)

        graph = outputs = None  # eager: computed at every call
        if self.graphed:
            graph, outputs = capture(run, self._pool)
        self._graphs[key] = _Graph(feats, lengths, outputs, graph)
        return self._graphs[key]

    @torch.inference_mode()
    def encode_and_search(
        self, feats: torch.Tensor, lengths: torch.Tensor, beam: int, chunk_size: int = -1, left_chunks: int = -1
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, PrefixBeams | None]:
        """Encoder, CTC and (beam > 0) prefix beam search of one padded batch, through its bucket.

        Args:
            feats: [B, T, F] raw fbank, zero-padded; lengths: [B] valid frames; B <= the largest bucket.
        Returns:
            (encoder_out [B, T'b, D], encoder_lengths [B], log_probs [B, T'b, V], n-best of the B utterances).
            T'b is the bucket's padded length: frames past ``encoder_lengths`` mean nothing. The tensors are the
            graph's static outputs: valid until the next call.
        """
        self.model.check_features(feats, lengths)
        batch, frames, _ = feats.shape
        bucket = self._bucket(batch, frames, beam, chunk_size, left_chunks)
        bucket.feats.zero_()
        bucket.feats[:batch, :frames].copy_(feats)
        bucket.lengths.fill_(bucket.feats.size(1))  # spare rows: full-length zeros, never read
        bucket.lengths[:batch].copy_(lengths)
        if bucket.graph is not None:
            bucket.graph.replay()
            outputs = bucket.outputs
        else:
            outputs = self._step(bucket.feats, bucket.lengths, beam, chunk_size, left_chunks)
        encoder_out, encoder_lengths, log_probs, beams = outputs
        if beams is not None:
            beams = PrefixBeams(*(x[:batch] for x in (beams.tokens, beams.lengths, beams.scores, beams.alive)))
        return encoder_out[:batch], encoder_lengths[:batch], log_probs[:batch], beams

    # -- decoding -----------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def decode(
        self,
        feats: torch.Tensor,
        lengths: torch.Tensor,
        mode: str,
        beam: int,
        ctc_weight: float = 0.3,
        reverse_weight: float = 0.0,
        chunk_size: int = -1,
        left_chunks: int = -1,
    ) -> list[list[tuple[tuple[int, ...], float]]]:
        """n-best lists (tokens, score), best first, per utterance for ``ctc_greedy``, ``ctc_prefix_beam`` or
        ``attention_rescoring``, as the recognizer's reference path computes them."""
        largest = max(self.options.batch_buckets)
        if feats.size(0) > largest:
            return [
                nbest
                for start in range(0, feats.size(0), largest)
                for nbest in self.decode(
                    feats[start : start + largest], lengths[start : start + largest], mode, beam, ctc_weight,
                    reverse_weight, chunk_size, left_chunks,
                )
            ]
        cfg = self.config
        search_beam = 0 if mode == "ctc_greedy" else beam
        encoder_out, encoder_lengths, log_probs, beams = self.encode_and_search(
            feats, lengths, search_beam, chunk_size, left_chunks
        )
        if mode == "ctc_greedy":
            return [[best] for best in ctc_greedy_search(log_probs, encoder_lengths, cfg.blank_id)]
        if mode == "ctc_prefix_beam":
            return beams.to_lists()
        if mode != "attention_rescoring":
            raise ValueError(f"the engine decodes ctc_greedy, ctc_prefix_beam and attention_rescoring, not {mode!r}")
        longest = int(beams.lengths.masked_fill(~beams.alive, 0).max())  # the one host read of the batch
        width = max(-(-longest // WIDTH_STEP) * WIDTH_STEP, WIDTH_STEP)
        frames = int(encoder_lengths.max())  # memory frames the decoders attend to (the rest is padding)
        scores = rescoring_scores(
            self.model.decoder, encoder_out[:, :frames], encoder_lengths, beams, ctc_weight, reverse_weight,
            cfg.sos_id, cfg.eos_id, width,
        )  # fmt: skip
        return rescored_nbest(beams, scores)
