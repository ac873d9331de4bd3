"""CTC head and CTC decoding: greedy search and prefix beam search (WeNet wenet/transformer/{ctc,search}.py).

Graves et al., "Connectionist Temporal Classification" (ICML 2006); prefix beam search as in
Hannun et al. (arXiv 1408.2873, Algorithm 1) in log space, with WeNet's pruning: at every frame only the
``beam`` most likely units extend the ``beam`` surviving prefixes.

Prefix search runs on the host in float64 over the float32 log-probabilities, one utterance at a time,
exactly as upstream (including its tie-breaking: candidates are created in the order
top-k unit x surviving prefix, and the stable sort keeps that order on equal scores).
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import nn

from turboformer.kernels.ctc_prefix_search import top_units

NEG_INF = -float("inf")


class CTC(nn.Module):
    """The CTC projection ``ctc_lo``: encoder states [B, T', D] -> log-probabilities [B, T', V] (float32)."""

    def __init__(self, vocab_size: int, d_model: int):
        super().__init__()
        self.ctc_lo = nn.Linear(d_model, vocab_size)

    def forward(self, encoder_out: torch.Tensor) -> torch.Tensor:
        # the encoder's states may be fp32 (the residual stream of a half-precision encoder): use the projection's dtype
        return F.log_softmax(self.ctc_lo(encoder_out.to(self.ctc_lo.bias.dtype)).float(), dim=-1)


def collapse(path: list[int], blank_id: int) -> tuple[int, ...]:
    """CTC's many-to-one map: merge repeated units, then drop blanks."""
    out, previous = [], None
    for unit in path:
        if unit != previous and unit != blank_id:
            out.append(unit)
        previous = unit
    return tuple(out)


def ctc_greedy_search(
    log_probs: torch.Tensor, lengths: torch.Tensor, blank_id: int = 0
) -> list[tuple[tuple[int, ...], float]]:
    """Best path per utterance: argmax at every valid frame, collapsed.

    Args:
        log_probs: [B, T', V] CTC log-probabilities; lengths: [B] valid frames.
    Returns:
        per utterance (units, log-probability of the best *path*, i.e. the sum of the frame maxima).
    """
    best_logp, best_unit = log_probs.max(dim=-1)  # [B, T']
    results = []
    for b, length in enumerate(lengths.tolist()):
        path = best_unit[b, :length].tolist()
        results.append((collapse(path, blank_id), float(best_logp[b, :length].double().sum())))
    return results


def log_add(*values: float) -> float:
    """log(sum(exp(values))) for Python floats, -inf safe."""
    top = max(values)
    if top == NEG_INF:
        return NEG_INF
    return top + math.log(sum(math.exp(v - top) for v in values))


class _Prefix:
    """Log-probabilities of a prefix ending in blank (``s``) and in its last unit (``ns``)."""

    __slots__ = ("ns", "s")

    def __init__(self, s: float = NEG_INF, ns: float = NEG_INF):
        self.s, self.ns = s, ns

    def score(self) -> float:
        return log_add(self.s, self.ns)


def ctc_prefix_beam_search(
    log_probs: torch.Tensor, lengths: torch.Tensor, beam_size: int, blank_id: int = 0
) -> list[list[tuple[tuple[int, ...], float]]]:
    """CTC prefix beam search.

    Args:
        log_probs: [B, T', V] CTC log-probabilities; lengths: [B] valid frames.
        beam_size: prefixes kept per frame and units tried per frame.
    Returns:
        per utterance the n-best list of (units, log p(units | x)), best first (at most ``beam_size``).
    """
    top_logp, top_unit = top_units(log_probs, beam_size)  # [B, T', beam]; ties in unit order
    results = []
    for b, length in enumerate(lengths.tolist()):
        frames_logp, frames_unit = top_logp[b, :length].tolist(), top_unit[b, :length].tolist()
        hyps: list[tuple[tuple[int, ...], _Prefix]] = [((), _Prefix(s=0.0))]
        for logps, units in zip(frames_logp, frames_unit):
            next_hyps: dict[tuple[int, ...], _Prefix] = defaultdict(_Prefix)
            for unit, logp in zip(units, logps):
                for prefix, old in hyps:
                    if unit == blank_id:  # *a + blank -> *a (ends in blank)
                        new = next_hyps[prefix]
                        new.s = log_add(new.s, old.score() + logp)
                    elif prefix and unit == prefix[-1]:
                        new = next_hyps[prefix]  # *aa -> *a (repeat merged)
                        new.ns = log_add(new.ns, old.ns + logp)
                        new = next_hyps[prefix + (unit,)]  # *a blank a -> *aa
                        new.ns = log_add(new.ns, old.s + logp)
                    else:
                        new = next_hyps[prefix + (unit,)]
                        new.ns = log_add(new.ns, old.score() + logp)
            ranked = sorted(next_hyps.items(), key=lambda item: item[1].score(), reverse=True)
            hyps = ranked[:beam_size]
        results.append([(prefix, state.score()) for prefix, state in hyps])
    return results
