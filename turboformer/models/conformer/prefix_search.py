"""Batched CTC prefix beam search in tensors: every utterance of a batch at once, one loop over frames.

The same search as :func:`ctc.ctc_prefix_beam_search` (Hannun et al., arXiv 1408.2873, Algorithm 1, with
WeNet's pruning; that pure-Python version is the reference = upstream semantics) giving the same n-best in
the same order with float64 scores, but with no host round trip per frame, so it runs on the GPU (and can be
captured in a CUDA graph: every shape is fixed by (B, T', beam), nothing reads a tensor on the host).

Per frame, the ``N = beam`` surviving prefixes and the ``K = beam`` most likely units make candidates
``[B, K, N, 2]``, flattened in the reference's creation order (unit j, then prefix i, then slot):

* slot 0 -- the same prefix: unit = blank (``s += score + lp``) or unit = last unit (``ns += ns + lp``);
* slot 1 -- prefix + unit: ``ns += score + lp`` (or ``s + lp`` when unit = last unit: ``*a blank a``).

A prefix is identified by two polynomial hashes (mod two primes below 2^31, so products fit in int64) and its
length. Candidates that are the same prefix merge (a [B, C, C] equality matrix, masked log-sum-exp of their
``s`` and ``ns`` contributions) into the first one created (the reference's dict insertion order); a stable
descending sort keeps the best ``N``. Candidates that the reference creates with score -inf stay candidates
(ranked after every finite one, in creation order); candidates it never creates (the other slot, prefixes
that do not exist yet) rank after those. Frames past an utterance's length leave its state unchanged.

Shapes: B utterances, T' frames, V units, N = K = beam, C = 2 K N candidates, L = T' + 1 token columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from turboformer.kernels import utils
from turboformer.kernels.ctc_prefix_search import HASH_BASES, HASH_PRIMES, ctc_prefix_search_triton, top_units

NEG_INF = -float("inf")
SORT_FLOOR = -1e300  # sort key of a created candidate scored -inf: below every finite score, above "absent"


@dataclass
class PrefixBeams:
    """The n-best of a batch as tensors (best first along N).

    tokens: [B, N, L] int64 units (entries past ``lengths`` are 0); lengths: [B, N] int64;
    scores: [B, N] float64 log p(prefix | x); alive: [B, N] bool (an utterance may have fewer than N).
    """

    tokens: torch.Tensor
    lengths: torch.Tensor
    scores: torch.Tensor
    alive: torch.Tensor

    def to_lists(self) -> list[list[tuple[tuple[int, ...], float]]]:
        """Per utterance [(units, score), ...] best first, as :func:`ctc.ctc_prefix_beam_search` returns."""
        tokens, lengths = self.tokens.tolist(), self.lengths.tolist()
        scores, alive = self.scores.tolist(), self.alive.tolist()
        return [
            [(tuple(tokens[b][n][: lengths[b][n]]), scores[b][n]) for n in range(len(alive[b])) if alive[b][n]]
            for b in range(len(alive))
        ]


def _extend_hash(h: torch.Tensor, unit: torch.Tensor, which: int) -> torch.Tensor:
    return (h * HASH_BASES[which] + unit + 1) % HASH_PRIMES[which]


def ctc_prefix_beam_search_batched(
    log_probs: torch.Tensor, lengths: torch.Tensor, beam_size: int, blank_id: int = 0
) -> PrefixBeams:
    """CTC prefix beam search of a batch on ``log_probs``' device: the Triton kernel on CUDA
    (``kernels/ctc_prefix_search.py``), these tensor ops otherwise.

    Args:
        log_probs: [B, T', V] CTC log-probabilities (float32 as the reference reads them; any float dtype).
        lengths: [B] valid frames (on the same device).
        beam_size: prefixes kept per frame and units tried per frame (<= V).
    Returns:
        :class:`PrefixBeams`, equal to the reference's n-best (order; scores within float64 rounding).
    """
    if utils.use_triton(log_probs):  # one program per utterance over all frames (kernels/ctc_prefix_search.py)
        return PrefixBeams(*ctc_prefix_search_triton(log_probs, lengths, beam_size, blank_id))
    return ctc_prefix_beam_search_torch(log_probs, lengths, beam_size, blank_id)


def ctc_prefix_beam_search_torch(
    log_probs: torch.Tensor, lengths: torch.Tensor, beam_size: int, blank_id: int = 0
) -> PrefixBeams:
    """:func:`ctc_prefix_beam_search_batched` in tensor ops, on any device."""
    batch, frames, _ = log_probs.shape
    device = log_probs.device
    n = k = beam_size
    top_logp, top_unit = top_units(log_probs, k)  # [B, T', K], as the reference (which then reads float64)
    top_logp = top_logp.double()
    width = frames + 1  # a prefix has at most one unit per frame (+1 spare column for the scatter below)

    # State of the N prefixes per utterance. Only prefix 0 (the empty one, s = 0) exists at the start.
    alive = torch.zeros(batch, n, dtype=torch.bool, device=device)
    alive[:, 0] = True
    s = torch.full((batch, n), NEG_INF, dtype=torch.float64, device=device)  # log p(prefix, ends in blank)
    s[:, 0] = 0.0
    ns = torch.full_like(s, NEG_INF)  # log p(prefix, ends in its last unit)
    h0 = torch.zeros(batch, n, dtype=torch.long, device=device)  # the two hashes of the prefix
    h1 = torch.zeros_like(h0)
    length = torch.zeros_like(h0)
    last = torch.full_like(h0, -1)  # last unit, -1 for the empty prefix
    tokens = torch.zeros(batch, n, width, dtype=torch.long, device=device)

    columns = torch.arange(width, device=device)  # [L]
    slot = torch.arange(2, device=device).view(1, 1, 1, 2)  # [1, 1, 1, 2]
    parent_of = torch.arange(n, device=device).view(1, 1, n, 1).expand(batch, k, n, 2).reshape(batch, -1)  # [B, C]
    order_of = torch.arange(2 * k * n, device=device)  # [C] creation order
    for t in range(frames):
        lp = top_logp[:, t].view(batch, k, 1, 1)  # [B, K, 1, 1]
        unit = top_unit[:, t].view(batch, k, 1, 1)
        score = torch.logaddexp(s, ns).view(batch, 1, n, 1)  # [B, 1, N, 1]
        p_s, p_ns = s.view(batch, 1, n, 1), ns.view(batch, 1, n, 1)
        p_alive = alive.view(batch, 1, n, 1)
        is_blank = unit == blank_id  # [B, K, 1, 1]
        is_repeat = ~is_blank & (unit == last.view(batch, 1, n, 1))  # [B, K, N, 1]
        same = slot == 0  # [1, 1, 1, 2]
        created = p_alive & torch.where(same, is_blank | is_repeat, ~is_blank)  # [B, K, N, 2]
        add_s = torch.where(same & is_blank, score + lp, NEG_INF)
        add_ns = torch.where(same, torch.where(is_repeat, p_ns + lp, NEG_INF), torch.where(is_repeat, p_s, score) + lp)
        add_s = add_s.masked_fill(~created, NEG_INF).reshape(batch, -1)  # [B, C]
        add_ns = add_ns.masked_fill(~created, NEG_INF).reshape(batch, -1)
        created = created.reshape(batch, -1)
        c_h0 = torch.where(same, h0.view(batch, 1, n, 1), _extend_hash(h0.view(batch, 1, n, 1), unit, 0))
        c_h1 = torch.where(same, h1.view(batch, 1, n, 1), _extend_hash(h1.view(batch, 1, n, 1), unit, 1))
        c_len = length.view(batch, 1, n, 1) + (~same).long()
        c_h0, c_h1, c_len = (x.expand(batch, k, n, 2).reshape(batch, -1) for x in (c_h0, c_h1, c_len))
        c_last = torch.where(same, last.view(batch, 1, n, 1), unit).expand(batch, k, n, 2).reshape(batch, -1)
        c_unit = torch.where(same, -1, unit).expand(batch, k, n, 2).reshape(batch, -1)  # appended unit or -1

        # Merge candidates that are the same prefix into the first one created.
        equal = (
            (c_h0.unsqueeze(2) == c_h0.unsqueeze(1))
            & (c_h1.unsqueeze(2) == c_h1.unsqueeze(1))
            & (c_len.unsqueeze(2) == c_len.unsqueeze(1))
            & created.unsqueeze(1)
            & created.unsqueeze(2)
        )  # [B, C, C]
        first = equal.to(torch.uint8).argmax(dim=-1)  # [B, C] first equal candidate (argmax: first maximum)
        representative = created & (first == order_of)
        m_s = torch.logsumexp(add_s.unsqueeze(1).masked_fill(~equal, NEG_INF), dim=-1)  # [B, C]
        m_ns = torch.logsumexp(add_ns.unsqueeze(1).masked_fill(~equal, NEG_INF), dim=-1)
        m_score = torch.logaddexp(m_s, m_ns)
        key = torch.where(representative, m_score.clamp(min=SORT_FLOOR), NEG_INF)
        keep = key.sort(dim=-1, descending=True, stable=True).indices[:, :n]  # [B, N]

        parent, appended = parent_of.gather(1, keep), c_unit.gather(1, keep)
        new_len = c_len.gather(1, keep)
        gathered = tokens.gather(1, parent.unsqueeze(-1).expand(batch, n, width))  # [B, N, L]
        write = (columns == (new_len - 1).unsqueeze(-1)) & (appended >= 0).unsqueeze(-1)
        new_tokens = torch.where(write, appended.unsqueeze(-1), gathered)

        active = (t < lengths).view(batch, 1)  # [B, 1] frames past an utterance's length change nothing
        alive = torch.where(active, representative.gather(1, keep), alive)
        s = torch.where(active, m_s.gather(1, keep), s)
        ns = torch.where(active, m_ns.gather(1, keep), ns)
        h0 = torch.where(active, c_h0.gather(1, keep), h0)
        h1 = torch.where(active, c_h1.gather(1, keep), h1)
        length = torch.where(active, new_len, length)
        last = torch.where(active, c_last.gather(1, keep), last)
        tokens = torch.where(active.unsqueeze(-1), new_tokens, tokens)
    scores = torch.logaddexp(s, ns)
    tokens = tokens.masked_fill(columns >= length.unsqueeze(-1), 0)
    return PrefixBeams(tokens=tokens, lengths=length, scores=scores, alive=alive)
