"""Beam search equal to fairseq 0.8's ``SequenceGenerator`` (plain ``BeamSearch``), independent of the model.

The model is reached through an :class:`IncrementalDecoder`: ``log_probs(tokens)`` returns the next-token
log-probabilities of every hypothesis given its tokens so far, and ``reorder(order)`` makes row i continue the
state of row ``order[i]``. Any encoder-decoder with a static cache can provide it (Lite Transformer here; the same
strategy suits Whisper's decoder).

The fairseq semantics reproduced (the reference fixtures check them token for token):

* hypotheses start with one token (fairseq: ``</s>``); every sentence keeps ``beam`` live hypotheses;
* at step 0 only the first beam's candidates count (all beams are equal); later, candidate scores are the
  cumulative float32 sums ``score[t-1] + log p``; each step takes the top ``2 * beam`` candidates over
  ``beam x V``;
* ``<pad>`` is never produced, ``unk_penalty`` is subtracted from ``<unk>``; ``</s>`` is forbidden before
  ``min_len`` steps and is the only choice at step ``max_len`` (a hypothesis has at most max_len + 1 tokens);
* a ``</s>`` candidate among the top ``beam`` ones finishes a hypothesis (in candidate order, while the sentence
  has fewer than ``beam`` finished ones); its score is ``sum(log p) / len ** lenpen`` (len includes ``</s>``)
  when ``normalize_scores``; a sentence is done once it has ``beam`` finished hypotheses;
* the ``beam`` best non-``</s>`` candidates continue;
* finished hypotheses are sorted by score, best first (stable), and the first ``nbest`` are returned.

Unlike fairseq, done sentences stay in the batch (their rows are computed and ignored): shapes stay static, which
is what a CUDA-graphed decoder wants, and rows do not interact, so results are the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor


class GenerationError(ValueError):
    """Invalid beam search options or inputs."""


@dataclass(frozen=True)
class BeamSearchOptions:
    beam_size: int = 4
    lenpen: float = 1.0  # score / len ** lenpen: < 1 favours shorter, > 1 longer hypotheses
    min_len: int = 1  # tokens before </s> may end a hypothesis
    nbest: int = 1  # hypotheses returned per sentence (<= beam_size)
    normalize_scores: bool = True
    unk_penalty: float = 0.0  # > 0: fewer <unk>

    def __post_init__(self) -> None:
        if self.beam_size < 1:
            raise GenerationError(f"beam_size must be >= 1, got {self.beam_size}")
        if not 1 <= self.nbest <= self.beam_size:
            raise GenerationError(f"nbest must be in [1, beam_size={self.beam_size}], got {self.nbest}")
        if self.min_len < 0:
            raise GenerationError(f"min_len must be >= 0, got {self.min_len}")


@dataclass(frozen=True)
class SpecialTokens:
    eos: int  # ends a hypothesis
    pad: int  # never produced
    unk: int  # receives unk_penalty
    start: int  # first decoder input (fairseq: eos)


@dataclass(frozen=True)
class Hypothesis:
    tokens: tuple[int, ...]  # generated ids, the last one is eos
    score: float  # normalised sum of log-probabilities
    positional_scores: tuple[float, ...]  # log-probability of each token, eos included


class IncrementalDecoder(Protocol):
    def log_probs(self, tokens: Tensor) -> Tensor:
        """tokens [N, t + 1] (start token + t generated ones) -> next-token log-probabilities [N, V] (float32).
        Called once per step with t = 0, 1, ...; an implementation may read only ``tokens[:, -1]``."""
        ...

    def reorder(self, order: Tensor) -> None:
        """Row i continues the state of row ``order[i]`` ([N] int64)."""
        ...


class BeamSearch:
    """fairseq's beam search over an :class:`IncrementalDecoder` for ``batch_size`` sentences (rows
    ``b * beam_size .. (b + 1) * beam_size - 1`` of the decoder belong to sentence b)."""

    def __init__(self, options: BeamSearchOptions, special: SpecialTokens) -> None:
        self.options = options
        self.special = special

    def __call__(
        self, decoder: IncrementalDecoder, batch_size: int, max_len: int, device: torch.device | str = "cpu"
    ) -> list[list[Hypothesis]]:
        """Decode up to ``max_len`` tokens before the forced </s>; returns ``nbest`` hypotheses per sentence."""
        if max_len < 0:
            raise GenerationError(f"max_len must be >= 0, got {max_len}")
        beam, sp = self.options.beam_size, self.special
        N = batch_size * beam
        tokens = torch.full((N, max_len + 2), sp.pad, dtype=torch.long, device=device)
        tokens[:, 0] = sp.start
        scores = torch.zeros(N, max_len + 1, dtype=torch.float32, device=device)  # cumulative log-probs
        offsets = torch.arange(batch_size, device=device)[:, None] * beam  # [B, 1] first row of each sentence
        finalized: list[list[Hypothesis]] = [[] for _ in range(batch_size)]
        done = torch.zeros(batch_size, dtype=torch.bool, device=device)

        for step in range(max_len + 1):
            lprobs = decoder.log_probs(tokens[:, : step + 1]).to(torch.float32, copy=True)  # [N, V], ours to edit
            V = lprobs.size(1)
            if beam > V - 1:
                raise GenerationError(f"beam_size {beam} must be smaller than the vocabulary ({V} symbols)")
            lprobs[:, sp.pad] = float("-inf")
            lprobs[:, sp.unk] -= self.options.unk_penalty
            if step >= max_len:
                eos_lprobs = lprobs[:, sp.eos].clone()
                lprobs.fill_(float("-inf"))
                lprobs[:, sp.eos] = eos_lprobs
            elif step < self.options.min_len:
                lprobs[:, sp.eos] = float("-inf")

            lprobs = lprobs.view(batch_size, beam, V)
            if step == 0:
                lprobs = lprobs[:, :1]  # all beams are identical at the start
            else:
                lprobs = lprobs + scores.view(batch_size, beam, -1)[:, :, step - 1 : step]
            flat = lprobs.reshape(batch_size, -1)
            cand_size = min(2 * beam, flat.size(1) - 1)  # -1: pad is never selected
            cand_scores, cand_flat = flat.topk(cand_size)  # [B, 2 * beam]
            cand_tokens = cand_flat % V
            cand_rows = cand_flat // V + offsets  # row of the hypothesis each candidate extends
            cand_eos = cand_tokens.eq(sp.eos)

            finishing = cand_eos[:, :beam] & ~done[:, None]
            if finishing.any():
                self._finalize(
                    step, cand_rows[:, :beam][finishing], cand_scores[:, :beam][finishing], tokens, scores, finalized
                )
                done = torch.tensor([len(f) >= beam for f in finalized], device=device)
            if bool(done.all()):
                break

            # continue with the `beam` best candidates that do not end: eos ones sort after all others
            rank = cand_eos.long() * cand_size + torch.arange(cand_size, device=device)
            active = rank.topk(beam, dim=1, largest=False).indices  # [B, beam]
            rows = cand_rows.gather(1, active).view(-1)  # [N]
            tokens = tokens.index_select(0, rows)
            tokens[:, step + 1] = cand_tokens.gather(1, active).view(-1)
            scores = scores.index_select(0, rows)
            scores[:, step] = cand_scores.gather(1, active).view(-1)
            decoder.reorder(rows)

        nbest = self.options.nbest
        return [sorted(f, key=lambda h: h.score, reverse=True)[:nbest] for f in finalized]

    def _finalize(
        self,
        step: int,
        rows: Tensor,
        eos_scores: Tensor,
        tokens: Tensor,
        scores: Tensor,
        finalized: list[list[Hypothesis]],
    ) -> None:
        """Finish the hypotheses of ``rows`` (in candidate order) with </s> at ``step``; float32 arithmetic as
        fairseq's ``finalize_hypos``."""
        hyp_tokens = tokens.index_select(0, rows)[:, 1 : step + 2]
        hyp_tokens[:, step] = self.special.eos
        positional = scores.index_select(0, rows)[:, : step + 1]
        positional[:, step] = eos_scores
        positional[:, 1:] = positional[:, 1:] - positional[:, :-1]  # cumulative -> per token
        if self.options.normalize_scores:
            eos_scores = eos_scores / (step + 1) ** self.options.lenpen
        beam = self.options.beam_size
        for row, score, toks, pos in zip(rows.tolist(), eos_scores.tolist(), hyp_tokens.tolist(), positional.tolist()):
            sentence = finalized[row // beam]
            if len(sentence) < beam:
                sentence.append(Hypothesis(tuple(toks), score, tuple(pos)))
