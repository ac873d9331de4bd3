"""Speech recognition with a WeNet U2/U2++ model: audio -> fbank -> encoder -> CTC / attention decoding.

The four WeNet decoding modes (``ASRModel.decode``):

* ``ctc_greedy``: best CTC path, collapsed;
* ``ctc_prefix_beam``: CTC prefix beam search;
* ``attention``: autoregressive beam search with the left-to-right decoder;
* ``attention_rescoring``: CTC prefix beam n-best rescored by the decoder(s) (U2++ two-pass).

Streaming: ``chunk_size > 0`` restricts attention to chunks (``left_chunks`` of history); with
``simulate_streaming`` each utterance goes through the cached ``forward_chunk`` path instead.

On CUDA, :class:`~.engine.ConformerEngine` runs ``ctc_greedy``, ``ctc_prefix_beam`` and ``attention_rescoring``
(fp16/bf16/INT8, CUDA graphs, batched search and rescoring); ``attention`` and simulated streaming run the
converted model eagerly.

Batches are padded; every result equals the one-utterance result (the front-end, masks and the causal
or masked convolution keep padding out of valid frames, and attention search stops each utterance at its
own length).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch

from turboformer.audio import kaldi_fbank, load_audio

from .ctc import ctc_greedy_search, ctc_prefix_beam_search
from .encoder import ConformerInputError
from .engine import ConformerEngine, EngineOptions, EngineOptionsError
from .load import SymbolTable, load_conformer
from .model import ConformerASR
from .search import attention_beam_search, attention_rescoring

MODES = ("ctc_greedy", "ctc_prefix_beam", "attention", "attention_rescoring")
INT16_SCALE = 32768.0  # WeNet feeds Kaldi fbank int16-valued samples: float audio * 2^15

AudioInput = Union[str, os.PathLike, np.ndarray, torch.Tensor]


class RecognizeOptionsError(ValueError):
    """Decoding options that are invalid on their own or for the loaded model."""


@dataclass(frozen=True)
class RecognizeOptions:
    """How to decode.

    ``ctc_weight`` and ``reverse_weight`` only affect ``attention_rescoring``; the defaults are the AISHELL
    U2++ recipe's decoding values (ctc 0.3, reverse 0.5). ``reverse_weight=None`` means 0.5 for a model with
    a right-to-left decoder and 0.0 otherwise.
    """

    mode: str = "attention_rescoring"
    beam_size: int = 10
    ctc_weight: float = 0.3
    reverse_weight: float | None = None
    chunk_size: int = -1  # encoder frames per chunk; < 0: full context
    left_chunks: int = -1  # chunks of history; < 0: all
    simulate_streaming: bool = False  # chunk-by-chunk with caches (needs chunk_size > 0)
    batch: int = 8  # utterances encoded together

    def __post_init__(self):
        if self.mode not in MODES:
            raise RecognizeOptionsError(f"mode={self.mode!r}: choose one of {', '.join(MODES)}")
        if self.beam_size < 1:
            raise RecognizeOptionsError(f"beam_size must be >= 1, got {self.beam_size}")
        if self.batch < 1:
            raise RecognizeOptionsError(f"batch must be >= 1, got {self.batch}")
        if self.chunk_size == 0:
            raise RecognizeOptionsError("chunk_size must be > 0 (streaming chunks) or < 0 (full context), not 0")
        if self.simulate_streaming and self.chunk_size < 0:
            raise RecognizeOptionsError("simulate_streaming needs chunk_size > 0")
        if self.ctc_weight < 0:
            raise RecognizeOptionsError(f"ctc_weight must be >= 0, got {self.ctc_weight}")
        if self.reverse_weight is not None and not 0.0 <= self.reverse_weight <= 1.0:
            raise RecognizeOptionsError(f"reverse_weight must be in [0, 1], got {self.reverse_weight}")


@dataclass(frozen=True)
class Hypothesis:
    """One candidate: text, unit ids and its score (log-probability or rescoring score)."""

    text: str
    tokens: tuple[int, ...]
    score: float


@dataclass(frozen=True)
class Recognition:
    """The best hypothesis of one input and the n-best list it was chosen from (best first).

    ``score`` per mode: ``ctc_greedy`` log-probability of the best path; ``ctc_prefix_beam`` log p(y | x)
    summed over alignments; ``attention`` summed decoder log-probabilities (incl. ``<eos>`` when reached);
    ``attention_rescoring`` the rescoring score. (Upstream WeNet reports no score for the first and third.)
    """

    text: str
    tokens: tuple[int, ...]
    score: float
    nbest: tuple[Hypothesis, ...]


class ConformerRecognizer:
    """A loaded U2/U2++ model with its unit dictionary; stateless across calls."""

    def __init__(self, model: ConformerASR, symbols: SymbolTable, engine: ConformerEngine | None = None):
        self.engine = engine
        self.model = (engine.model if engine is not None else model).eval()
        self.symbols = symbols
        self.config = model.config

    @classmethod
    def from_dir(
        cls,
        model_dir: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        quantize: str | None = None,
        cuda_graphs: bool = True,
    ) -> ConformerRecognizer:
        """Load a WeNet model directory (train.yaml, final.pt, units.txt, global_cmvn).

        On CPU: the fp32 reference path (``dtype`` None or float32, no ``quantize``). On CUDA: the
        :class:`ConformerEngine` in ``dtype`` (default float16; float32 and bfloat16 too), ``quantize="int8"``
        for weight-only INT8 linears, encoder + CTC + prefix beam search as CUDA graphs (``cuda_graphs``).
        """
        device = torch.device(device)
        if device.type != "cuda":
            if dtype not in (None, torch.float32) or quantize is not None:
                raise EngineOptionsError(
                    f"dtype={dtype} / quantize={quantize!r} need a CUDA device: the CPU path is the fp32 reference"
                )
            return cls(*load_conformer(model_dir, device=device))
        options = EngineOptions(dtype=dtype or torch.float16, quantize=quantize, cuda_graphs=cuda_graphs)
        options.validate()
        model, symbols = load_conformer(model_dir, device=device)
        return cls(model, symbols, ConformerEngine(model, options))

    @property
    def device(self) -> torch.device:
        return self.model.ctc.ctc_lo.weight.device

    # -- front-end --------------------------------------------------------------------------------------------

    def features(self, audio: AudioInput, sample_rate: int | None = None) -> torch.Tensor:
        """Kaldi fbank [T, F] of one input, as WeNet computes it at decode time (dither 0).

        ``audio`` is a file path (decoded and resampled by :func:`turboformer.audio.load_audio`) or a mono
        waveform at ``sample_rate`` Hz (default: the model's rate): float in [-1, 1], or int16 PCM values.
        """
        fb = self.config.fbank
        if isinstance(audio, (str, os.PathLike)):
            if sample_rate is not None:
                raise ConformerInputError("sample_rate applies to arrays only: files are resampled on load")
            name, samples = os.fspath(audio), load_audio(audio, sample_rate=fb.sample_rate)
            wave = torch.from_numpy(samples) * INT16_SCALE
        else:
            name = "audio array"
            wave = torch.from_numpy(np.array(audio)) if isinstance(audio, np.ndarray) else torch.as_tensor(audio)
            rate = fb.sample_rate if sample_rate is None else sample_rate
            if rate != fb.sample_rate:
                raise ConformerInputError(
                    f"{name} is {rate} Hz but this model expects {fb.sample_rate} Hz audio; resample it first "
                    "(turboformer.audio.load_audio resamples files)"
                )
            if wave.dim() != 1:
                raise ConformerInputError(f"{name} must be mono [samples], got shape {tuple(wave.shape)}")
            if wave.is_floating_point():
                wave = wave.float() * INT16_SCALE
            elif wave.dtype == torch.int16:
                wave = wave.float()
            else:
                raise ConformerInputError(f"{name} must be float in [-1, 1] or int16 PCM, got {wave.dtype}")
            if not bool(torch.isfinite(wave).all()):
                raise ConformerInputError(f"{name} contains NaN or infinite samples")
        if wave.numel() == 0:
            raise ConformerInputError(f"{name} is empty (0 samples)")
        feats = kaldi_fbank(
            wave,
            sample_rate=fb.sample_rate,
            num_mel_bins=fb.num_mel_bins,
            frame_length_ms=fb.frame_length_ms,
            frame_shift_ms=fb.frame_shift_ms,
        )
        need = self.config.encoder.right_context + 1
        if feats.size(0) < need:
            min_ms = fb.frame_length_ms + (need - 1) * fb.frame_shift_ms
            raise ConformerInputError(
                f"{name} is too short: {wave.numel() / fb.sample_rate * 1000:.0f} ms gives {feats.size(0)} fbank "
                f"frames, the model needs at least {need} (>= {min_ms:.0f} ms)"
            )
        return feats

    # -- decoding ---------------------------------------------------------------------------------------------

    def recognize(
        self,
        inputs: Sequence[AudioInput],
        options: RecognizeOptions = RecognizeOptions(),
        sample_rate: int | None = None,
    ) -> list[Recognition]:
        """Recognize files or waveforms (see :meth:`features`); one :class:`Recognition` per input, in order."""
        if isinstance(inputs, (str, os.PathLike, np.ndarray, torch.Tensor)):
            inputs = [inputs]
        features = []
        for i, audio in enumerate(inputs):
            try:
                features.append(self.features(audio, sample_rate))
            except ConformerInputError as e:
                raise ConformerInputError(f"input {i}: {e}") from None
        return self.recognize_features(features, options)

    @torch.inference_mode()
    def recognize_features(self, features: Sequence[torch.Tensor], options: RecognizeOptions) -> list[Recognition]:
        """Recognize raw (un-normalised) fbank matrices [T_i, F]; batches of similar length are padded."""
        self._check_options(options)
        dim = self.config.encoder.input_dim
        for i, feats in enumerate(features):
            if feats.dim() != 2 or feats.size(1) != dim:
                raise ConformerInputError(f"features {i} must be [frames, {dim}], got {tuple(feats.shape)}")
        order = sorted(range(len(features)), key=lambda i: -features[i].size(0))  # less padding per batch
        results: list[Recognition | None] = [None] * len(features)
        for start in range(0, len(order), options.batch):
            group = order[start : start + options.batch]
            lengths = torch.tensor([features[i].size(0) for i in group], device=self.device)
            padded = [features[i].to(self.device, torch.float32) for i in group]
            feats = torch.nn.utils.rnn.pad_sequence(padded, batch_first=True)  # [B, T_max, F] zero-padded
            for i, result in zip(group, self._decode(feats, lengths, options)):
                results[i] = result
        return results

    def _check_options(self, options: RecognizeOptions) -> None:
        enc = self.config.encoder
        if options.beam_size > self.config.vocab_size:
            raise RecognizeOptionsError(
                f"beam_size={options.beam_size} exceeds the {self.config.vocab_size}-unit vocabulary"
            )
        if options.chunk_size > 0 and not (enc.use_dynamic_chunk or enc.static_chunk_size > 0):
            raise RecognizeOptionsError("this model was trained without chunk masks: use chunk_size -1")
        if (options.reverse_weight or 0.0) > 0 and self.model.decoder.right_decoder is None:
            raise RecognizeOptionsError("reverse_weight > 0 needs a bitransformer decoder with r_num_blocks > 0")

    def _reverse_weight(self, options: RecognizeOptions) -> float:
        if options.reverse_weight is not None:
            return options.reverse_weight
        return 0.5 if self.model.decoder.right_decoder is not None else 0.0

    def _decode(self, feats: torch.Tensor, lengths: torch.Tensor, options: RecognizeOptions) -> list[Recognition]:
        """Decode one padded batch: feats [B, T, F], lengths [B]."""
        model, cfg = self.model, self.config
        if self.engine is not None and options.mode != "attention" and not options.simulate_streaming:
            nbests = self.engine.decode(
                feats, lengths, options.mode, options.beam_size, options.ctc_weight, self._reverse_weight(options),
                options.chunk_size, options.left_chunks,
            )  # fmt: skip
            return [self._result(nbest) for nbest in nbests]
        encoder_out, encoder_lengths = model.encode(
            feats, lengths, options.chunk_size, options.left_chunks, options.simulate_streaming
        )
        if options.mode == "attention":
            nbests = attention_beam_search(
                model.decoder.left_decoder, encoder_out, encoder_lengths, options.beam_size, cfg.sos_id, cfg.eos_id
            )
        else:
            log_probs = model.ctc(encoder_out)  # [B, T', V] float32
            if options.mode == "ctc_greedy":
                nbests = [[best] for best in ctc_greedy_search(log_probs, encoder_lengths, cfg.blank_id)]
            else:
                nbests = ctc_prefix_beam_search(log_probs, encoder_lengths, options.beam_size, cfg.blank_id)
                if options.mode == "attention_rescoring":
                    nbests = [
                        attention_rescoring(
                            model.decoder,
                            encoder_out[b : b + 1, : int(encoder_lengths[b])],
                            nbest,
                            options.ctc_weight,
                            self._reverse_weight(options),
                            cfg.sos_id,
                            cfg.eos_id,
                        )
                        for b, nbest in enumerate(nbests)
                    ]
        return [self._result(nbest) for nbest in nbests]

    def _result(self, nbest: list[tuple[tuple[int, ...], float]]) -> Recognition:
        hyps = tuple(Hypothesis(self.symbols.detokenize(tokens), tuple(tokens), score) for tokens, score in nbest)
        return Recognition(hyps[0].text, hyps[0].tokens, hyps[0].score, hyps)
