"""Decoder-side searches of U2/U2++: attention beam search and attention rescoring (wenet/transformer/search.py).

* :func:`attention_beam_search` -- autoregressive beam search with the left-to-right decoder on a static
  key/value cache. By default an utterance of S valid encoder frames emits at most S tokens: WeNet's
  result for that utterance decoded alone, whatever the batch. (WeNet's batched decode runs every
  utterance for the batch's *padded* length, so an utterance that has not emitted ``<eos>`` after S
  tokens continues depending on its batch neighbours; ``max_steps`` reproduces that.)
* :func:`attention_rescoring` -- U2++ second pass (arXiv 2106.05642, Section 2.3): each CTC n-best
  hypothesis y (length n) scores ``(1 - rw) * L + rw * R + cw * ctc(y)`` with
  L = sum_j log p_l2r(y_j | sos, y_<j) + log p_l2r(eos | sos, y) and R the same for the right-to-left
  decoder fed ``sos, y_n .. y_1``. Sums run in float32 like upstream.
* :func:`attention_rescoring_batched` -- the same scores for a whole batch's n-best in one left and one right
  decoder forward (the GPU engine's path; :func:`attention_rescoring` is its per-utterance reference).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .decoder import BiTransformerDecoder, TransformerDecoder
from .encoder import lengths_to_mask
from .prefix_search import PrefixBeams


def attention_beam_search(
    decoder: TransformerDecoder,
    encoder_out: torch.Tensor,
    encoder_lengths: torch.Tensor,
    beam_size: int,
    sos: int,
    eos: int,
    max_steps: int | None = None,
) -> list[list[tuple[tuple[int, ...], float]]]:
    """Beam search on the attention decoder for a batch.

    Args:
        decoder: the left-to-right decoder.
        encoder_out: [B, S, D]; encoder_lengths: [B] valid frames.
        beam_size: hypotheses per utterance (N).
        sos, eos: start and end token ids (may be equal).
        max_steps: tokens per utterance at most; None: each utterance's own ``encoder_lengths[b]``
            (batch-invariant). WeNet's batched ``decode`` corresponds to ``max_steps = S``.
    Returns:
        per utterance the N final hypotheses, best first: (tokens without sos/eos, summed log-probability).
    """
    batch, frames, _ = encoder_out.shape
    if max_steps is None:
        step_limit = encoder_lengths
    else:
        step_limit = torch.full_like(encoder_lengths, max_steps)
    steps = int(step_limit.max())
    rows = batch * beam_size
    device = encoder_out.device
    memory = encoder_out.repeat_interleave(beam_size, dim=0)  # [B*N, S, D], beams of one utterance adjacent
    memory_mask = lengths_to_mask(encoder_lengths, frames).repeat_interleave(beam_size, dim=0).unsqueeze(1)
    cache = decoder.init_cache(memory, memory_mask, steps + 1)
    hyps = torch.full((rows, steps + 1), sos, dtype=torch.long, device=device)  # [B*N, 1 + steps] in place
    # Only beam 0 is live at the start, so the first expansion does not pick N copies of one token.
    scores = torch.tensor([0.0] + [-float("inf")] * (beam_size - 1), device=device).repeat(batch).unsqueeze(1)
    ended = torch.zeros(rows, 1, dtype=torch.bool, device=device)  # [B*N, 1]
    beam_base = torch.arange(batch, device=device).repeat_interleave(beam_size) * beam_size  # [B*N]
    step_limit = step_limit.repeat_interleave(beam_size).unsqueeze(1)  # [B*N, 1]
    first = torch.arange(beam_size, device=device).unsqueeze(0) == 0  # [1, N] a beam's own best candidate
    length = 1
    for step in range(1, steps + 1):
        ended = ended | (step > step_limit)  # past its own length a beam only repeats itself (score + 0)
        if bool(ended.all()):
            break
        logp = decoder.step(hyps[:, step - 1], step - 1, cache)  # [B*N, V]
        top_logp, top_token = logp.topk(beam_size, dim=-1)  # [B*N, N]
        # A finished beam proposes only itself again (log-prob 0, token eos) and nothing else.
        top_logp = top_logp.masked_fill(ended & ~first, -float("inf")).masked_fill(ended & first, 0.0)
        top_token = top_token.masked_fill(ended, eos)
        candidates = (scores + top_logp).view(batch, beam_size * beam_size)  # [B, N*N]
        best, best_offset = candidates.topk(beam_size, dim=-1)  # [B, N]
        scores = best.view(-1, 1)
        source = beam_base + torch.div(best_offset.view(-1), beam_size, rounding_mode="floor")  # [B*N] parent rows
        new_token = top_token.view(-1).index_select(0, beam_base * beam_size + best_offset.view(-1))
        cache.reorder(source, step)
        hyps[:, :step] = hyps[:, :step].index_select(0, source)
        hyps[:, step] = new_token
        ended = new_token.eq(eos).view(-1, 1)
        length = step + 1
    scores = scores.view(batch, beam_size)
    tokens = hyps[:, 1:length].view(batch, beam_size, -1).tolist()
    order = scores.argsort(dim=-1, descending=True, stable=True).tolist()
    return [[(tuple(t for t in tokens[b][n] if t != eos), float(scores[b, n])) for n in order[b]] for b in range(batch)]


def _pad(sequences: list[list[int]], value: int, device) -> torch.Tensor:
    """Right-pad token lists into [N, max_len] long."""
    width = max(len(seq) for seq in sequences)
    return torch.tensor([seq + [value] * (width - len(seq)) for seq in sequences], dtype=torch.long, device=device)


def decoder_log_probs(
    decoder: BiTransformerDecoder,
    encoder_out: torch.Tensor,
    hyps: list[tuple[int, ...]],
    sos: int,
    eos: int,
    right_to_left: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Teacher-forced decoder log-probabilities of n-best hypotheses of one utterance.

    Args:
        encoder_out: [1, S, D] one utterance, unpadded.
        hyps: N hypotheses (token tuples without sos/eos).
        right_to_left: also run the right-to-left decoder.
    Returns:
        (l2r log-probs [N, 1 + n_max, V] for inputs ``sos + y`` padded with eos; row i is valid for
         positions <= n_i, position j predicting y_{j+1} (and eos at j = n_i),
         r2l log-probs for ``sos + reversed(y)`` the same way, or None).
    """
    device = encoder_out.device
    lengths = torch.tensor([len(h) + 1 for h in hyps], dtype=torch.long, device=device)
    memory = encoder_out.expand(len(hyps), -1, -1)  # [N, S, D]
    memory_mask = torch.ones(len(hyps), 1, memory.size(1), dtype=torch.bool, device=device)
    l2r_in = _pad([[sos, *h] for h in hyps], eos, device)
    l2r = F.log_softmax(decoder.left_decoder(memory, memory_mask, l2r_in, lengths).float(), dim=-1)
    r2l = None
    if right_to_left:
        r2l_in = _pad([[sos, *reversed(h)] for h in hyps], eos, device)
        r2l = F.log_softmax(decoder.right_decoder(memory, memory_mask, r2l_in, lengths).float(), dim=-1)
    return l2r, r2l


def attention_rescoring(
    decoder: BiTransformerDecoder,
    encoder_out: torch.Tensor,
    nbest: list[tuple[tuple[int, ...], float]],
    ctc_weight: float,
    reverse_weight: float,
    sos: int,
    eos: int,
) -> list[tuple[tuple[int, ...], float]]:
    """Rescore the CTC n-best of one utterance with the attention decoder(s).

    Args:
        encoder_out: [1, S, D] one utterance, unpadded.
        nbest: CTC prefix beam search output, (tokens, ctc log-prob), best first.
        ctc_weight: weight of the CTC score; reverse_weight: weight of the right-to-left decoder.
    Returns:
        the hypotheses with their rescoring scores, best first (stable: ties keep n-best order).
    """
    hyps = [tokens for tokens, _ in nbest]
    use_r2l = reverse_weight > 0.0
    l2r, r2l = decoder_log_probs(decoder, encoder_out, hyps, sos, eos, use_r2l)
    rescored = []
    for i, hyp in enumerate(hyps):
        n = len(hyp)
        targets = torch.tensor([*hyp, eos], dtype=torch.long, device=l2r.device)  # y_1 .. y_n, eos
        score = l2r[i, torch.arange(n + 1, device=l2r.device), targets].sum()  # float32
        if use_r2l:
            # r2l input position j predicts y_{n-j}; the reversed targets read back the same tokens.
            r_targets = torch.tensor([*reversed(hyp), eos], dtype=torch.long, device=l2r.device)
            r_score = r2l[i, torch.arange(n + 1, device=l2r.device), r_targets].sum()
            score = score * (1 - reverse_weight) + r_score * reverse_weight
        score = score + nbest[i][1] * ctc_weight
        rescored.append((hyp, float(score)))
    order = sorted(range(len(rescored)), key=lambda i: -rescored[i][1])
    return [rescored[i] for i in order]


def rescoring_scores(
    decoder: BiTransformerDecoder,
    encoder_out: torch.Tensor,
    encoder_lengths: torch.Tensor,
    beams: PrefixBeams,
    ctc_weight: float,
    reverse_weight: float,
    sos: int,
    eos: int,
    width: int | None = None,
) -> torch.Tensor:
    """Attention-rescoring scores of a whole batch's CTC n-best in one left and one right decoder forward.

    The scores of :func:`attention_rescoring` for every utterance at once: the B x N hypotheses are padded to
    ``width`` tokens (with eos) and decoded against their utterance's encoder output (repeated per hypothesis,
    padded frames masked), teacher-forced, in float32 log-softmax as there.

    Args:
        encoder_out: [B, S, D] padded; encoder_lengths: [B] valid frames.
        beams: the CTC n-best as tensors (:func:`prefix_search.ctc_prefix_beam_search_batched`).
        width: token columns to decode (>= the longest hypothesis; None: the longest, read on the host).
    Returns:
        [B, N] float32 scores; -inf where ``beams.alive`` is False.
    """
    batch, n = beams.alive.shape
    rows, device = batch * n, encoder_out.device
    lengths = beams.lengths.masked_fill(~beams.alive, 0).reshape(rows)  # [R] hypothesis lengths n_i
    if width is None:
        width = int(lengths.max())
    tokens = beams.tokens.reshape(rows, -1)[:, :width]
    if tokens.size(1) < width:
        tokens = F.pad(tokens, (0, width - tokens.size(1)))
    columns = torch.arange(width + 1, device=device)  # decoder positions 0 .. width
    inside = columns[:width] < lengths.unsqueeze(1)  # [R, width] valid hypothesis tokens
    forward_tokens = tokens.masked_fill(~inside, eos)  # y_1 .. y_n, eos ...
    reverse_index = (lengths.unsqueeze(1) - 1 - columns[:width]).clamp(min=0)
    reverse_tokens = tokens.gather(1, reverse_index).masked_fill(~inside, eos)  # y_n .. y_1, eos ...
    sos_column = torch.full((rows, 1), sos, dtype=torch.long, device=device)
    memory = encoder_out.repeat_interleave(n, dim=0)  # [R, S, D] hypotheses of one utterance adjacent
    memory_mask = lengths_to_mask(encoder_lengths, encoder_out.size(1)).repeat_interleave(n, dim=0).unsqueeze(1)
    valid = columns.unsqueeze(0) <= lengths.unsqueeze(1)  # [R, width + 1] positions 0 .. n_i predict y / eos

    def direction_score(decoder_part, inputs: torch.Tensor) -> torch.Tensor:
        decoder_in = torch.cat([sos_column, inputs], dim=1)  # [R, 1 + width]
        targets = torch.cat([inputs, torch.full_like(sos_column, eos)], dim=1)  # position j predicts targets[j]
        targets = torch.where(columns < lengths.unsqueeze(1), targets, eos)  # eos at position n_i
        logp = F.log_softmax(decoder_part(memory, memory_mask, decoder_in, lengths + 1).float(), dim=-1)
        picked = logp.gather(2, targets.unsqueeze(-1)).squeeze(-1)  # [R, 1 + width]
        return picked.masked_fill(~valid, 0.0).sum(dim=1)  # [R] float32

    score = direction_score(decoder.left_decoder, forward_tokens)
    if reverse_weight > 0.0:
        r_score = direction_score(decoder.right_decoder, reverse_tokens)
        score = score * (1 - reverse_weight) + r_score * reverse_weight
    score = score + (beams.scores.reshape(rows) * ctc_weight).float()
    return score.view(batch, n).masked_fill(~beams.alive, -float("inf"))


def attention_rescoring_batched(
    decoder: BiTransformerDecoder,
    encoder_out: torch.Tensor,
    encoder_lengths: torch.Tensor,
    beams: PrefixBeams,
    ctc_weight: float,
    reverse_weight: float,
    sos: int,
    eos: int,
    width: int | None = None,
) -> list[list[tuple[tuple[int, ...], float]]]:
    """:func:`attention_rescoring` of every utterance of a batch (see :func:`rescoring_scores`): per utterance
    the hypotheses with their rescoring scores, best first (stable: ties keep n-best order)."""
    scores = rescoring_scores(
        decoder, encoder_out, encoder_lengths, beams, ctc_weight, reverse_weight, sos, eos, width
    )
    return rescored_nbest(beams, scores)


def rescored_nbest(beams: PrefixBeams, scores: torch.Tensor) -> list[list[tuple[tuple[int, ...], float]]]:
    """Per utterance the live hypotheses of ``beams`` with their ``scores`` [B, N], best first (stable)."""
    order = scores.sort(dim=-1, descending=True, stable=True).indices  # [B, N]
    order = order.gather(1, (~beams.alive).gather(1, order).long().sort(dim=-1, stable=True).indices)  # live first
    tokens, lengths, alive = beams.tokens.tolist(), beams.lengths.tolist(), beams.alive.tolist()
    scores_list, order_list = scores.tolist(), order.tolist()
    return [
        [(tuple(tokens[b][i][: lengths[b][i]]), scores_list[b][i]) for i in order_list[b] if alive[b][i]]
        for b in range(len(alive))
    ]
