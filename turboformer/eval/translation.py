"""Accuracy report of a Lite Transformer on a device/dtype against the fp32 CPU path: BLEU and fidelity.

    turboformer eval lite-transformer --model DIR --input src.txt [--references ref.txt] [--device cuda --dtype float16]

Translates the input with the fp32 CPU reference and with the engine under test (same weights), then reports
the share of identical best hypotheses, the score differences, and corpus BLEU of both against the references
(sacrebleu, when installed and references are given).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from turboformer.models.lite_transformer.translate import (
    LiteTransformerTranslator,
    TranslateOptions,
)


@dataclass(frozen=True)
class TranslationEvalReport:
    engine: str
    sentences: int
    hypotheses_equal: float  # share of inputs whose best hypothesis (tokens) equals the fp32 one
    max_score_diff: float  # |score - fp32 score| over inputs with equal hypotheses (nan if none)
    bleu: tuple[float, float] | None  # (fp32, candidate) corpus BLEU against the references

    def text(self) -> str:
        lines = [
            f"engine: {self.engine}",
            f"{self.sentences} sentences; best hypotheses equal to fp32 CPU: {self.hypotheses_equal:.0%}; "
            f"max score difference where equal: {self.max_score_diff:.3g}",
        ]
        if self.bleu is not None:
            lines.append(f"BLEU against the references: fp32 {self.bleu[0]:.2f}, candidate {self.bleu[1]:.2f}")
        return "\n".join(lines)


def corpus_bleu(hypotheses: list[str], references: list[str]) -> float:
    """sacrebleu's corpus BLEU (13a tokenisation, as reported in papers); ImportError names the package."""
    try:
        import sacrebleu
    except ImportError:
        raise ImportError("BLEU needs sacrebleu: pip install sacrebleu") from None
    return sacrebleu.corpus_bleu(hypotheses, [references]).score


def evaluate_translation(
    model_dir: str,
    sentences: list[str],
    references: list[str] | None,
    device: str,
    dtype: torch.dtype,
    options: TranslateOptions = TranslateOptions(),
    quantize: str | None = None,
) -> TranslationEvalReport:
    reference = LiteTransformerTranslator.from_dir(model_dir, "cpu", torch.float32)
    candidate = LiteTransformerTranslator.from_dir(model_dir, device, dtype, quantize=quantize)
    ref_out = reference.translate(sentences, options)
    cand_out = candidate.translate(sentences, options)
    equal = [a.tokens == b.tokens for a, b in zip(ref_out, cand_out)]
    diffs = [abs(a.score - b.score) for a, b, same in zip(ref_out, cand_out, equal) if same]
    bleu = None
    if references is not None:
        bleu = (corpus_bleu([t.text for t in ref_out], references), corpus_bleu([t.text for t in cand_out], references))
    return TranslationEvalReport(
        engine=f"{model_dir} on {device}, {str(dtype).removeprefix('torch.')}" + (f", {quantize}" if quantize else ""),
        sentences=len(sentences),
        hypotheses_equal=sum(equal) / max(len(sentences), 1),
        max_score_diff=max(diffs) if diffs else float("nan"),
        bleu=bleu,
    )
