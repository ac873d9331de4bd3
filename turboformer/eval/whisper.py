"""Accuracy report of a Whisper engine against the fp32 CPU reference on the same weights and audio.

For each input: the fp32 CPU path transcribes it (greedy, text only); the candidate engine (GPU fp16/bf16,
INT8, or the CPU graph engine) is teacher-forced through the same tokens step by step, so its decoder logits
are compared position by position with the reference's; its own greedy transcript is compared too. The report
gives logits and encoder-output error statistics, argmax agreement, transcripts equal, and WER against the
reference transcripts (and against ground truth when given).

    turboformer eval whisper a.wav b.wav --model tiny.en --device cuda --dtype bfloat16 [--quantize int8]
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch

from turboformer.audio import N_FRAMES, log_mel_spectrogram, pad_or_trim
from turboformer.eval.metrics import error_rate, normalize_text
from turboformer.eval.tensor_stats import TensorStats, tensor_stats
from turboformer.models.whisper.graph_engine import EngineOptions, GraphEngine
from turboformer.models.whisper.pipeline import WhisperModel
from turboformer.models.whisper.transcribe import TranscribeOptions, transcribe_batch

TEXT_ONLY = TranscribeOptions(temperature=(0.0,), without_timestamps=True, condition_on_previous_text=False)


@dataclass(frozen=True)
class WhisperEvalReport:
    engine: str
    logits: TensorStats  # teacher-forced decoder logits, all positions of all inputs
    encoder: TensorStats
    argmax_agreement: float  # share of positions where the candidate's top token equals the reference's
    transcripts_equal: float  # share of inputs whose greedy transcript equals the fp32 one
    wer_vs_fp32: float  # candidate transcripts scored against the fp32 ones
    wer_vs_truth: tuple[float, float] | None  # (fp32, candidate) against ground truth, when given

    def text(self) -> str:
        lines = [
            f"engine: {self.engine}",
            f"decoder logits vs fp32 CPU: {self.logits.row()}  ({self.logits.count} values, finite: {self.logits.finite})",
            f"encoder output vs fp32 CPU: {self.encoder.row()}",
            f"argmax agreement {self.argmax_agreement:.2%}; transcripts equal {self.transcripts_equal:.0%}",
        ]
        lines.append(f"WER of the candidate against the fp32 transcripts: {self.wer_vs_fp32:.2%}")
        if self.wer_vs_truth is not None:
            lines.append(f"WER against the references: fp32 {self.wer_vs_truth[0]:.2%}, candidate {self.wer_vs_truth[1]:.2%}")
        return "\n".join(lines)


def _wer(references: list[str], hypotheses: list[str]) -> float:
    return error_rate([normalize_text(r) for r in references], [normalize_text(h) for h in hypotheses], "word")


@torch.inference_mode()
def _teacher_forced_logits(engine, tokenizer, features, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """Logits [len(tokens) + 1, V] of the engine fed prompt + tokens one step at a time (the decode path)."""
    engine.start(features, 1, torch.zeros(1, dtype=torch.long))
    logits, _ = engine.prefill(torch.tensor([prompt]), torch.tensor([prompt.index(tokenizer.special.sot)]))
    rows = [logits[0].float()]
    for i, token in enumerate(tokens):
        rows.append(engine.step(torch.tensor([token]), torch.tensor([len(prompt) + i]))[0].float())
    return torch.stack(rows)


def evaluate(
    reference: WhisperModel,
    candidate,
    audios: list[np.ndarray],
    truths: list[str] | None = None,
    label: str = "",
) -> WhisperEvalReport:
    """reference: the fp32 CPU model; candidate: an engine (``WhisperModel.engine``) on the same weights."""
    tok = reference.tokenizer
    ref_results = transcribe_batch(reference.engine, tok, audios, TEXT_ONLY)
    cand_results = transcribe_batch(candidate, tok, audios, TEXT_ONLY)
    logits_ref, logits_cand, enc_ref, enc_cand = [], [], [], []
    for audio, result in zip(audios, ref_results):
        mel = pad_or_trim(log_mel_spectrogram(audio, reference.config.n_mels), N_FRAMES)[None]
        f_ref, f_cand = reference.engine.encode(mel), candidate.encode(mel)
        enc_ref.append(f_ref.float().cpu())
        enc_cand.append(f_cand.float().cpu())
        language = result.language if tok.multilingual else None
        prompt = list(tok.sot_sequence(language, "transcribe")) + [tok.special.no_timestamps]
        tokens = [t for s in result.segments for t in s.tokens][:200]
        logits_ref.append(_teacher_forced_logits(reference.engine, tok, f_ref, prompt, tokens))
        logits_cand.append(_teacher_forced_logits(candidate, tok, f_cand, prompt, tokens))
    lr, lc = torch.cat(logits_ref), torch.cat(logits_cand)
    fp32_texts = [r.text.strip() for r in ref_results]
    cand_texts = [r.text.strip() for r in cand_results]
    return WhisperEvalReport(
        engine=label,
        logits=tensor_stats(lc, lr),
        encoder=tensor_stats(torch.cat(enc_cand), torch.cat(enc_ref)),
        argmax_agreement=(lc.argmax(-1) == lr.argmax(-1)).double().mean().item(),
        transcripts_equal=sum(a == b for a, b in zip(fp32_texts, cand_texts)) / len(audios),
        wer_vs_fp32=_wer(fp32_texts, cand_texts),
        wer_vs_truth=(
            None if truths is None else (_wer(truths, fp32_texts), _wer(truths, cand_texts))
        ),
    )


def candidate_engine(reference: WhisperModel, device: str, dtype: torch.dtype, quantize: str | None):
    """The engine under test, built from a copy of the reference's fp32 weights."""
    model = copy.deepcopy(reference.model)
    options = EngineOptions(dtype=dtype, quantize=quantize, buckets=(1, 2, 4, 8))
    return GraphEngine(model, options, device)
