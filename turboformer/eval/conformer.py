"""Accuracy report of a WeNet Conformer on a device/dtype against the fp32 CPU path: hypotheses and CER.

    turboformer eval conformer a.wav b.wav --model DIR [--mode attention_rescoring] [--device cuda --dtype float16]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from turboformer.eval.metrics import error_rate
from turboformer.models.conformer import ConformerRecognizer, RecognizeOptions
from turboformer.models.conformer.engine import convert_model


@dataclass(frozen=True)
class RecognitionEvalReport:
    engine: str
    inputs: int
    hypotheses_equal: float  # share of inputs whose best hypothesis (tokens) equals the fp32 one
    cer_vs_fp32: float  # character error rate of the candidate's texts against the fp32 texts
    max_score_diff: float  # |score - fp32 score| where the hypotheses are equal (nan if none)
    cer_vs_truth: tuple[float, float] | None  # (fp32, candidate) against ground truth, when given

    def text(self) -> str:
        lines = [
            f"engine: {self.engine}",
            f"{self.inputs} inputs; best hypotheses equal to fp32 CPU: {self.hypotheses_equal:.0%}; "
            f"CER against the fp32 texts: {self.cer_vs_fp32:.2%}; max score difference where equal: "
            f"{self.max_score_diff:.3g}",
        ]
        if self.cer_vs_truth is not None:
            lines.append(f"CER against the references: fp32 {self.cer_vs_truth[0]:.2%}, candidate {self.cer_vs_truth[1]:.2%}")
        return "\n".join(lines)


def evaluate_recognition(
    model_dir: str,
    inputs: list,
    device: str,
    dtype: torch.dtype,
    options: RecognizeOptions = RecognizeOptions(),
    truths: list[str] | None = None,
    quantize: str | None = None,
) -> RecognitionEvalReport:
    reference = ConformerRecognizer.from_dir(model_dir, "cpu")
    if torch.device(device).type == "cuda":
        candidate = ConformerRecognizer.from_dir(model_dir, device, dtype=dtype, quantize=quantize)  # GPU engine
    else:  # the reference path with the model in ``dtype`` (CMVN and BatchNorm statistics stay fp32)
        candidate = ConformerRecognizer.from_dir(model_dir, device)
        convert_model(candidate.model, dtype, quantize)
    ref_out, cand_out = reference.recognize(inputs, options), candidate.recognize(inputs, options)
    equal = [a.tokens == b.tokens for a, b in zip(ref_out, cand_out)]
    diffs = [abs(a.score - b.score) for a, b, same in zip(ref_out, cand_out, equal) if same]
    ref_texts, cand_texts = [r.text for r in ref_out], [r.text for r in cand_out]
    return RecognitionEvalReport(
        engine=f"{model_dir} on {device}, {str(dtype).removeprefix('torch.')}" + (f", {quantize}" if quantize else "")
        + f", {options.mode}",
        inputs=len(inputs),
        hypotheses_equal=sum(equal) / max(len(inputs), 1),
        cer_vs_fp32=error_rate(ref_texts, cand_texts, "char"),
        max_score_diff=max(diffs) if diffs else float("nan"),
        cer_vs_truth=None if truths is None else (
            error_rate(truths, ref_texts, "char"), error_rate(truths, cand_texts, "char")
        ),
    )
