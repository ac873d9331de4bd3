"""fairseq's beam search (:class:`.generate.BeamSearch`) with all of its per-step bookkeeping on the device.

:class:`.generate.BeamSearch` stays the reference: it finalises hypotheses in Python lists and asks the host
"is every sentence done?" after every step, two host syncs per token. :class:`BeamSearchState` keeps the same
decisions in static tensors so that ``advance`` (one step) launches only device work, never syncs, and can be
captured in a CUDA graph together with the decoder step; the host reads the results once, at the end.

The step is the reference's, written with static shapes (``B`` sentences x ``k`` beams = ``N`` rows, ``V``
symbols, ``T`` = the largest max_len):

* the step counter, ``max_len`` and ``min_len`` are device scalars, so the ``step == 0`` / ``min_len`` /
  ``max_len`` cases are ``torch.where`` masks, not Python branches;
* step 0 ("only the first beam counts") is a previous score of 0 for beam 0 and -inf for the others: the same
  top-``2k`` candidates as the reference's slice, as long as beam 0 has ``2k`` finite candidates (``V - 2 >= 2k``;
  :class:`BeamSearchState` checks ``V - 1 >= 2k``, so the candidate count is the reference's ``2k`` at every step);
* finishing ("a </s> candidate among the top k ends a hypothesis, in candidate order, while the sentence has
  fewer than k finished ones") is a cumulative count along the candidates; accepted hypotheses are scattered
  into slot ``n_finished + rank`` of static per-sentence buffers (rejected ones into a spare slot ``k``);
* a done sentence keeps decoding (its rows are ignored), as in the reference, which only stops early when all
  are done: ``finished_all`` is the one host sync, for the caller to poll every few steps;
* the normalisation ``score / len ** lenpen`` and the positional scores are computed at the end, with the
  reference's float32 arithmetic, from the stored cumulative scores.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from turboformer.kernels.beam_search_step import beam_advance_ref, beam_search_step
from turboformer.models.lite_transformer.generate import (
    BeamSearchOptions,
    GenerationError,
    Hypothesis,
    IncrementalDecoder,
    SpecialTokens,
)

NEG_INF = float("-inf")


class BeamSearchState:
    """Static device buffers and the graph-safe step of one beam search over ``batch_size`` sentences.

    Row ``b * k + j`` is beam j of sentence b. ``reset(max_len)`` (eager) starts a search of at most
    ``max_len <= max_len_capacity`` tokens before the forced </s>; each ``advance(lprobs)`` is one step and leaves
    the decoder's next input in ``next_tokens`` [N] and the rows to continue in ``reorder_rows`` [N].
    """

    def __init__(
        self,
        options: BeamSearchOptions,
        special: SpecialTokens,
        batch_size: int,
        vocab_size: int,
        max_len_capacity: int,
        device: torch.device | str = "cpu",
    ) -> None:
        k = options.beam_size
        if 2 * k > vocab_size - 1:
            raise GenerationError(
                f"the device beam search needs 2 x beam_size ({2 * k}) < vocabulary size ({vocab_size})"
            )
        self.options, self.special = options, special
        self.B, self.k, self.N, self.V, self.T = batch_size, k, batch_size * k, vocab_size, max_len_capacity
        self.device = torch.device(device)
        B, N, T, dev = self.B, self.N, self.T, self.device
        long = dict(dtype=torch.long, device=dev)
        f32 = dict(dtype=torch.float32, device=dev)
        self.step = torch.zeros((), **long)  # tokens decoded so far (the reference's loop variable)
        self.max_len = torch.zeros((), **long)
        self.min_len = torch.full((), options.min_len, **long)
        self.unk_penalty = torch.full((), options.unk_penalty, **f32)
        self.offsets = torch.arange(B, device=dev)[:, None] * k  # [B, 1] first row of each sentence
        self.candidate_order = torch.arange(2 * k, device=dev)  # [2k]
        self.tokens = torch.zeros(N, T + 2, **long)  # start token + generated ids
        self.scores = torch.zeros(N, T + 1, **f32)  # cumulative log-probabilities per step
        self.prev_scores = torch.zeros(N, **f32)  # score of each row after the previous step
        self.next_tokens = torch.zeros(N, **long)  # the decoder's next input
        self.reorder_rows = torch.arange(N, device=dev)  # row i continues row reorder_rows[i]
        # finished hypotheses: slot k of each sentence is a spare that receives the rejected candidates
        self.n_finished = torch.zeros(B, **long)
        self.fin_tokens = torch.zeros(B * (k + 1), T + 1, **long)  # generated ids, </s> at column fin_step
        self.fin_cumulative = torch.zeros(B * (k + 1), T + 1, **f32)  # cumulative scores up to fin_step
        self.fin_step = torch.zeros(B * (k + 1), **long)
        self.fin_order = torch.arange(B * (k + 1), device=dev).view(B, k + 1)  # flat slot of (sentence, slot)
        self.ticket = torch.zeros(1, dtype=torch.int32, device=dev)  # the selection kernel's programs done (0 between)
        self._host: tuple[Tensor, ...] | None = None  # pinned copies of the finished hypotheses (CUDA)

    def reset(self, max_len: int) -> None:
        """Start a new search (eager, before the first ``advance``)."""
        if not 0 <= max_len <= self.T:
            raise GenerationError(f"max_len {max_len} must be in [0, {self.T}] (this search's capacity)")
        self.step.zero_()
        self.max_len.fill_(max_len)
        self.tokens.fill_(self.special.pad)
        self.tokens[:, 0] = self.special.start
        self.scores.zero_()
        first_beam = torch.zeros(self.k, device=self.device)
        first_beam[1:] = NEG_INF  # step 0: all beams are the same hypothesis, only beam 0's candidates count
        self.prev_scores.copy_(first_beam.repeat(self.B))
        self.next_tokens.fill_(self.special.start)
        self.reorder_rows.copy_(torch.arange(self.N, device=self.device))
        self.n_finished.zero_()
        self.fin_step.zero_()
        self.ticket.zero_()

    def advance(self, lprobs: Tensor) -> None:
        """One step from the next-token log-probabilities ``lprobs`` [N, V] (float32, modified in place):
        :func:`.beam_search_step.beam_advance_ref`. Device work only: no host sync, no data-dependent shapes
        (CUDA-graph safe)."""
        sp = self.special
        beam_advance_ref(lprobs, self, sp.pad, sp.unk, sp.eos)

    def advance_logits(self, logits: Tensor, tables: Sequence[Tensor] = ()) -> None:
        """One step from the decoder's logits [N, V] (fp16/bf16/fp32): :func:`.beam_search_step.beam_search_step`
        (two Triton launches on CUDA; log_softmax + :meth:`advance` elsewhere). ``tables``: [N, L] int64 tensors
        whose rows follow the surviving beams."""
        sp = self.special
        beam_search_step(logits, self, sp.pad, sp.unk, sp.eos, tables)

    def finished_all(self) -> bool:
        """Whether every sentence has k finished hypotheses (a host sync)."""
        return bool((self.n_finished >= self.k).all())

    def _to_host(self, B: int, slots: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(n_finished, fin_step, fin_tokens, fin_cumulative) of the first B sentences on the host. From a GPU: four
        asynchronous copies into pinned buffers (kept for the next call) and one sync, not a sync per tensor."""
        sources = (self.n_finished[:B], self.fin_step[:slots], self.fin_tokens[:slots], self.fin_cumulative[:slots])
        if self.device.type != "cuda":
            return sources
        if self._host is None:
            full = (self.n_finished, self.fin_step, self.fin_tokens, self.fin_cumulative)
            self._host = tuple(torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in full)
        out = tuple(host[: t.shape[0]].copy_(t, non_blocking=True) for host, t in zip(self._host, sources))
        torch.cuda.current_stream(self.device).synchronize()
        return out

    def hypotheses(self, batch_size: int | None = None) -> list[list[Hypothesis]]:
        """The ``nbest`` finished hypotheses of the first ``batch_size`` sentences, best first (one host sync).

        Scores with the reference's float32 arithmetic, for all slots at once (a per-hypothesis loop of small
        tensor ops cost ~1.6 ms of host time at 16 sentences x beam 4): per-token scores are differences of
        the cumulative ones, the score is the cumulative one at </s> divided by ``len ** lenpen``."""
        B, k = self.B if batch_size is None else batch_size, self.k
        slots = B * (k + 1)
        counts, steps, tokens, cumulative = self._to_host(B, slots)
        counts = counts.tolist()
        positional = cumulative.clone()
        positional[:, 1:] = cumulative[:, 1:] - cumulative[:, :-1]  # cumulative -> per token, float32
        scores = cumulative.gather(1, steps[:, None])[:, 0]  # the cumulative score at </s>
        steps = steps.tolist()
        if self.options.normalize_scores:
            lengths = torch.tensor([(s + 1) ** self.options.lenpen for s in steps], dtype=torch.float64)
            scores = scores / lengths.to(torch.float32)
        tokens, positional, scores = tokens.tolist(), positional.tolist(), scores.tolist()
        out = []
        for b in range(B):
            sentence = []
            for i in range(b * (k + 1), b * (k + 1) + counts[b]):
                end = steps[i] + 1
                sentence.append(Hypothesis(tuple(tokens[i][:end]), scores[i], tuple(positional[i][:end])))
            out.append(sorted(sentence, key=lambda h: h.score, reverse=True)[: self.options.nbest])
        return out


def device_beam_search(
    decoder: IncrementalDecoder,
    options: BeamSearchOptions,
    special: SpecialTokens,
    batch_size: int,
    max_len: int,
    vocab_size: int,
    device: torch.device | str = "cpu",
    check_every: int = 8,
) -> list[list[Hypothesis]]:
    """:class:`.generate.BeamSearch` through :class:`BeamSearchState`, eagerly over any incremental decoder (the
    engine runs the same ``advance`` inside its CUDA graph). Checks "all done" every ``check_every`` steps."""
    if max_len < 0:
        raise GenerationError(f"max_len must be >= 0, got {max_len}")
    state = BeamSearchState(options, special, batch_size, vocab_size, max_len, device)
    state.reset(max_len)
    history = state.tokens  # the decoder may read the last column only
    for step in range(max_len + 1):
        lprobs = decoder.log_probs(history[:, : step + 1]).to(torch.float32, copy=True)
        state.advance(lprobs)
        decoder.reorder(state.reorder_rows)
        if (step + 1) % check_every == 0 and state.finished_all():
            break
    return state.hypotheses()
