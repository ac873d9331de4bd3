"""Error rates: WER over words, CER over characters (Levenshtein distance / reference length, corpus level)."""

from __future__ import annotations

import re
from collections.abc import Sequence


def normalize_text(text: str) -> str:
    """Lower case, punctuation out: WER counts words, not their spelling on the page."""
    return " ".join(re.sub(r"[^\w\s']", " ", text.lower()).split())


def edit_distance(reference: Sequence, hypothesis: Sequence) -> int:
    """Substitutions + deletions + insertions turning ``reference`` into ``hypothesis`` (one row of the DP table)."""
    row = list(range(len(hypothesis) + 1))
    for i, r in enumerate(reference, 1):
        diagonal, row[0] = row[0], i
        for j, h in enumerate(hypothesis, 1):
            diagonal, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diagonal + (r != h))
    return row[-1]


def error_rate(references: Sequence[str], hypotheses: Sequence[str], unit: str = "word") -> float:
    """Corpus error rate: total edits / total reference units. unit: "word" (WER) or "char" (CER, spaces out)."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references for {len(hypotheses)} hypotheses")
    if unit not in ("word", "char"):
        raise ValueError(f"unit must be 'word' or 'char', got {unit!r}")
    split = str.split if unit == "word" else (lambda s: list(s.replace(" ", "")))
    edits = units = 0
    for ref, hyp in zip(references, hypotheses):
        r, h = split(ref), split(hyp)
        edits += edit_distance(r, h)
        units += len(r)
    return edits / max(units, 1)
