"""One step of fairseq's beam search (``SequenceGenerator``, fairseq 0.8) from the decoder's logits, in two launches.

The step (``B`` sentences x ``k`` beams = ``N`` rows, ``V`` symbols; the state's tensors are listed in
:class:`BeamTensors`) is the reference's, with every decision on the device:

    lprobs = log_softmax(logits) in fp32                                          [N, V]
    lprobs[:, pad] = -inf; lprobs[:, unk] -= unk_penalty
    </s> banned before min_len; at step == max_len only </s> is allowed
    candidates: the 2k best of lprobs + prev_scores over each sentence's k x V     [B, 2k]
    finish the </s> candidates among the first k while the sentence has < k finished hypotheses
    continue with the first k candidates that are not </s>: tokens, scores, next token, parent row

:func:`beam_search_step_ref` is that in PyTorch ops (~45 launches, including a ``topk`` over ``k x V`` per
sentence: ~75 us at 16 x 4 x 32,768 on an H200). The Triton version:

1. ``_row_candidates_kernel``, one program per (row, chunk of ``BLOCK_V`` symbols): the chunk's max and sum of
   ``exp(logit - max)`` (the log-softmax's statistics) and its 2k best symbols by the masked logit. Inside one row
   the masked logit orders symbols as the log-probability does (the same constant is subtracted), so a row's 2k
   best are among its chunks' 2k best.
2. ``_beam_select_kernel``, one program per sentence: the row's log-sum-exp from the chunks, the reference's
   log-probability ``(logit - max) - log(sum)`` (then the masks, then ``+ prev_scores``) of every chunk
   candidate, the 2k best of the sentence, and all the bookkeeping: finished hypotheses, the surviving beams'
   token and score histories reordered in place (loads, a CTA barrier, stores), and optional ``[N, L]`` tables
   reordered the same way (the Lite engine's self-attention row table).

The last selection program to finish increments the step counter (an acquire-release ticket: every program has
read the step by then), so the step needs no third launch.

Both kernels pick their best candidates in rounds of one max reduction each: every candidate gets a distinct int64
key (``_order_key``: the fp32 value's bits made monotone, then the index) whose maximum is the best value with the
lowest index among equals; the round removes it. (Two reductions per round, the value's max and the index's min,
plus one to read the pick's logit, cost the candidates kernel ~6 us more at 16 x 4 x 32,768 on an H200.) Candidates
of equal score are so ordered by their flat index ``beam * V + symbol`` (lowest first); ``torch.topk`` leaves that
order to the device. The log-sum-exp is summed in another order than PyTorch's, so log-probabilities
may differ from ``F.log_softmax``'s in the last bits (tests compare scores at 1e-5).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
import torch.nn.functional as F

from turboformer.kernels import utils
from turboformer.kernels.utils import KernelInputError, tl, triton

NEG_INF = float("-inf")
MAX_CHUNKS = 32  # symbols per row are split into at most this many chunks of BLOCK_V (>= 1,024)
MIN_CHUNKS = 8  # ... and into at least this many (when BLOCK_V >= 1,024 allows)
TARGET_PROGRAMS = 256  # rows x chunks the candidates kernel aims at
CANDIDATE_WARPS = 4  # warps of a candidates program
GROUP = 32  # symbols per group in the candidates kernel's two-level selection


class BeamTensors(Protocol):
    """The device state of one search (``.device_search.BeamSearchState``): ``B`` sentences x ``k`` beams, row
    ``b k + j`` is beam j of sentence b; ``T`` = the largest max_len."""

    B: int
    k: int
    N: int
    V: int
    step: torch.Tensor  # [] int64: tokens decoded so far
    max_len: torch.Tensor  # [] int64
    min_len: torch.Tensor  # [] int64
    unk_penalty: torch.Tensor  # [] float32
    offsets: torch.Tensor  # [B, 1] int64: b k
    candidate_order: torch.Tensor  # [2k] int64: arange
    tokens: torch.Tensor  # [N, T + 2] int64: start token + generated ids
    scores: torch.Tensor  # [N, T + 1] float32: cumulative scores per step
    prev_scores: torch.Tensor  # [N] float32
    next_tokens: torch.Tensor  # [N] int64 out: the decoder's next input
    reorder_rows: torch.Tensor  # [N] int64 out: row i continues row reorder_rows[i]
    n_finished: torch.Tensor  # [B] int64
    fin_tokens: torch.Tensor  # [B (k + 1), T + 1] int64: slot k of a sentence is a spare for rejected ones
    fin_cumulative: torch.Tensor  # [B (k + 1), T + 1] float32
    fin_step: torch.Tensor  # [B (k + 1)] int64
    fin_order: torch.Tensor  # [B, k + 1] int64: flat slot of (sentence, slot)
    ticket: torch.Tensor  # [1] int32: the selection kernel's programs done (zero between launches)


# ----------------------------------------------------------------------------------------------------------
# Reference.


def beam_advance_ref(
    lprobs: torch.Tensor, s: BeamTensors, pad: int, unk: int, eos: int, tables: Sequence[torch.Tensor] = ()
) -> None:
    """The step from log-probabilities ``lprobs [N, V]`` (float32, modified in place): PyTorch ops, no host sync
    and no data-dependent shapes (CUDA-graph safe). ``tables``: ``[N, L]`` tensors whose rows follow the beams."""
    k, B, V = s.k, s.B, s.V
    step = s.step
    last = step >= s.max_len  # 0-d bool: only </s> may follow
    lprobs[:, pad] = NEG_INF
    lprobs[:, unk] -= s.unk_penalty
    eos_lprobs = lprobs[:, eos].clone()
    eos_lprobs = torch.where(~last & (step < s.min_len), NEG_INF, eos_lprobs)
    lprobs.masked_fill_(last, NEG_INF)
    lprobs[:, eos] = eos_lprobs

    flat = (lprobs.view(B, k, V) + s.prev_scores.view(B, k, 1)).view(B, k * V)
    cand_scores, cand_flat = flat.topk(2 * k)  # [B, 2k]
    cand_tokens = cand_flat % V
    cand_rows = cand_flat // V + s.offsets
    cand_eos = cand_tokens.eq(eos)

    # finish </s> candidates among the top k, in candidate order, while the sentence has < k finished
    done = s.n_finished >= k  # [B]
    finishing = cand_eos[:, :k] & ~done[:, None] & (cand_scores[:, :k] > NEG_INF) & (step <= s.max_len)
    rank = finishing.long().cumsum(dim=1)  # 1, 2, ... along the finishing candidates
    accept = finishing & (s.n_finished[:, None] + rank <= k)
    slot = torch.where(accept, s.n_finished[:, None] + rank - 1, k)  # [B, k]; k = the spare slot
    where = s.fin_order.gather(1, slot).view(-1)  # [B k] flat slots
    rows = cand_rows[:, :k].reshape(-1)
    step1 = step.view(1)
    hyp_tokens = s.tokens.index_select(0, rows)[:, 1:]  # [B k, T + 1]
    hyp_tokens.index_fill_(1, step1, eos)
    hyp_cumulative = s.scores.index_select(0, rows)
    hyp_cumulative.index_copy_(1, step1, cand_scores[:, :k].reshape(-1, 1))
    s.fin_tokens.index_copy_(0, where, hyp_tokens)
    s.fin_cumulative.index_copy_(0, where, hyp_cumulative)
    s.fin_step.index_copy_(0, where, step.expand(B * k))
    s.n_finished += accept.sum(dim=1)

    # continue with the k best candidates that do not end: </s> ones sort after all others
    order = cand_eos.long() * (2 * k) + s.candidate_order
    active = order.topk(k, dim=1, largest=False).indices  # [B, k]
    rows = cand_rows.gather(1, active).view(-1)  # [N]
    chosen_tokens = cand_tokens.gather(1, active).view(-1)
    chosen_scores = cand_scores.gather(1, active).view(-1)
    s.tokens.copy_(s.tokens.index_select(0, rows))
    s.tokens.index_copy_(1, step1 + 1, chosen_tokens[:, None])
    s.scores.copy_(s.scores.index_select(0, rows))
    s.scores.index_copy_(1, step1, chosen_scores[:, None])
    s.prev_scores.copy_(chosen_scores)
    s.next_tokens.copy_(chosen_tokens)
    s.reorder_rows.copy_(rows)
    for table in tables:
        table.copy_(table.index_select(0, rows))
    s.step += 1


def beam_search_step_ref(
    logits: torch.Tensor, s: BeamTensors, pad: int, unk: int, eos: int, tables: Sequence[torch.Tensor] = ()
) -> None:
    """The step from the decoder's logits ``[N, V]`` (any float dtype): fp32 log-softmax, then
    :func:`beam_advance_ref`."""
    beam_advance_ref(F.log_softmax(logits, dim=-1, dtype=torch.float32), s, pad, unk, eos, tables)


# ----------------------------------------------------------------------------------------------------------
# Kernels.


@triton.jit
def _masked(value, symbol, step, max_len, min_len, penalty, PAD, UNK, EOS):
    """The reference's masks on a log-probability (or on a logit: the same order within a row): pad -inf, unk
    minus the penalty, </s> -inf before min_len, everything but </s> -inf at the last step."""
    NEG = -float("inf")
    last = step >= max_len
    banned_eos = (step < min_len) & (step < max_len)
    value = tl.where(symbol == PAD, NEG, value)
    value = tl.where(symbol == UNK, value - penalty, value)
    return tl.where(symbol == EOS, tl.where(banned_eos, NEG, value), tl.where(last, NEG, value))


@triton.jit
def _order_key(value, index, LIMIT):
    """An int64 per element that orders as (value, then the lower index first): the fp32 value's bits made
    monotone (IEEE order; -0.0 counts as +0.0) above ``LIMIT - index`` (0 <= index < LIMIT < 2^31). The best
    candidate is then one max reduction of the keys instead of a max of the values and a min of the indices.
    Removed elements get _no_key(), below the key of any value (-inf included)."""
    bits = (value + 0.0).to(tl.int32, bitcast=True)
    bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: larger magnitude -> smaller int
    return (bits.to(tl.int64) << 32) | (LIMIT - index).to(tl.int64)


@triton.jit
def _no_key():
    """(-2^31 + 1) * 2^32: below the key of -inf (high word -2,139,095,041), index LIMIT, value -inf."""
    return tl.full([], -9223372032559808512, tl.int64)


@triton.jit
def _key_value(key):
    """The value of an _order_key (-inf for _no_key())."""
    bits = (key >> 32).to(tl.int32)
    value = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
    return tl.where(key == _no_key(), -float("inf"), value)


@triton.jit
def _key_index(key, LIMIT):
    """The index of an _order_key (LIMIT for _no_key())."""
    return (LIMIT - (key - ((key >> 32) << 32))).to(tl.int32)


@triton.jit
def _row_candidates_kernel(
    logits_ptr, stride_logits,  # [N, V], symbols at unit stride
    step_ptr, max_len_ptr, min_len_ptr, penalty_ptr,  # [] search scalars
    cand_logit_ptr,  # [N, C, TOPK] float32 out: the raw logits of the chunk's TOPK best
    cand_symbol_ptr,  # [N, C, TOPK] int32 out: their symbols (V where the chunk has fewer than TOPK)
    chunk_max_ptr,  # [N, C] float32 out
    chunk_sum_ptr,  # [N, C] float32 out: sum of exp(logit - chunk max)
    V, C, PAD, UNK, EOS,
    TOPK: tl.constexpr,  # 2k
    BLOCK_TOPK: tl.constexpr,  # TOPK rounded up to a power of two
    GROUP: tl.constexpr,  # symbols per group of the two-level selection
    BLOCK_V: tl.constexpr,
):  # fmt: skip
    NEG = -float("inf")
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    base = logits_ptr + row.to(tl.int64) * stride_logits
    start = chunk * BLOCK_V
    # the chunk as [groups, GROUP] symbols: the log-softmax statistics, and each group's best key
    symbol = start + tl.arange(0, BLOCK_V // GROUP)[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    valid = symbol < V
    x = tl.load(base + symbol, mask=valid, other=NEG).to(tl.float32)  # [BLOCK_V / GROUP, GROUP]
    m = tl.max(tl.max(x, axis=1), axis=0)
    total = tl.sum(tl.sum(tl.exp(x - m), axis=1), axis=0)  # masked symbols: exp(-inf) = 0
    step, max_len = tl.load(step_ptr), tl.load(max_len_ptr)
    min_len, penalty = tl.load(min_len_ptr), tl.load(penalty_ptr)
    key = tl.where(valid, _order_key(_masked(x, symbol, step, max_len, min_len, penalty, PAD, UNK, EOS), symbol, V),
                   _no_key())  # distinct keys  # fmt: skip
    if TOPK * GROUP < BLOCK_V:
        # Two levels: the chunk's TOPK best keys lie in the TOPK groups with the best group maxima (a group ranked
        # below them has TOPK better keys above its best), so pick those groups first (TOPK rounds over the
        # BLOCK_V / GROUP group maxima), then reload their symbols (L1/L2) for TOPK rounds over TOPK x GROUP keys:
        # ~3,000 keys touched per 4,096-symbol chunk at k = 4 instead of TOPK x BLOCK_V (~3x less work)
        group_key = tl.max(key, axis=1)  # [BLOCK_V / GROUP]
        slot = tl.arange(0, BLOCK_TOPK)
        picked = tl.full([BLOCK_TOPK], -1, tl.int32)  # group of each slot; -1: none (the chunk has fewer groups)
        for i in tl.static_range(TOPK):
            best = tl.max(group_key, axis=0)
            group_key = tl.where(group_key == best, _no_key(), group_key)
            group = tl.where(best == _no_key(), -1, (_key_index(best, V) - start) // GROUP)
            picked = tl.where(slot == i, group, picked)
        symbol = start + picked[:, None] * GROUP + tl.arange(0, GROUP)[None, :]  # [BLOCK_TOPK, GROUP]
        valid = (picked >= 0)[:, None] & (symbol < V)
        x = tl.load(base + symbol, mask=valid, other=NEG).to(tl.float32)
        key = tl.where(valid, _order_key(_masked(x, symbol, step, max_len, min_len, penalty, PAD, UNK, EOS), symbol,
                                         V), _no_key())  # fmt: skip
    unk_logit = tl.load(base + UNK).to(tl.float32)
    out = (row * C + chunk) * TOPK
    for i in tl.static_range(TOPK):  # the best key left (best value, lowest symbol among equals), then remove it
        best = tl.max(tl.max(key, axis=1), axis=0)
        key = tl.where(key == best, _no_key(), key)
        pick = _key_index(best, V)  # V when the chunk has no symbol left
        # the raw logit: the masked value, except for unk (the penalty subtracted; masked to -inf values are masked
        # again by the selection, whatever their logit)
        tl.store(cand_logit_ptr + out + i, tl.where(pick == UNK, unk_logit, _key_value(best)))
        tl.store(cand_symbol_ptr + out + i, pick)
    tl.store(chunk_max_ptr + row * C + chunk, m)
    tl.store(chunk_sum_ptr + row * C + chunk, total)


@triton.jit
def _copy_rows(src_ptr, src_stride, src_row, dst_ptr, dst_stride, dst_row, row_ok, cols, patch_col, patch_value,
               BLOCK_T: tl.constexpr):  # fmt: skip
    """Row ``dst_row[j]`` of ``dst_ptr`` becomes row ``src_row[j]`` of ``src_ptr`` (columns ``[0, cols)``, rows
    where ``row_ok``), with column ``patch_col`` set to ``patch_value[j]`` (no column when patch_col < 0). In place
    when both are one tensor and the rows are the same sentence's: each column block is loaded whole, then a CTA
    barrier, then stored."""
    for start in range(0, cols, BLOCK_T):
        t = start + tl.arange(0, BLOCK_T)
        mask = row_ok[:, None] & (t < cols)[None, :]
        old = tl.load(src_ptr + src_row[:, None] * src_stride + t[None, :], mask=mask)
        tl.debug_barrier()
        new = tl.where(t[None, :] == patch_col, patch_value[:, None].to(old.dtype), old)
        tl.store(dst_ptr + dst_row[:, None] * dst_stride + t[None, :], new, mask=mask)
        tl.debug_barrier()


@triton.jit
def _beam_select_kernel(
    cand_logit_ptr, cand_symbol_ptr, chunk_max_ptr, chunk_sum_ptr,  # from _row_candidates_kernel
    step_ptr, max_len_ptr, min_len_ptr, penalty_ptr,
    prev_ptr,  # [N] float32 in/out: each row's score
    tokens_ptr, stride_tokens,  # [N, T + 2] int64 in/out
    scores_ptr, stride_scores,  # [N, T + 1] float32 in/out
    next_ptr, reorder_ptr,  # [N] int64 out
    n_fin_ptr,  # [B] int64 in/out
    fin_tokens_ptr, stride_fin_tokens,  # [B (k + 1), T + 1] int64 out
    fin_scores_ptr, stride_fin_scores,  # [B (k + 1), T + 1] float32 out
    fin_step_ptr,  # [B (k + 1)] int64 out
    table_ptr, stride_table, table_cols,  # [N, L] int64 in/out (HAS_TABLE)
    ticket_ptr,  # [1] int32: programs done; the last one increments the step
    V, C, T1, PAD, UNK, EOS,  # T1 = T + 1
    K: tl.constexpr,
    BLOCK_K: tl.constexpr,  # >= K
    BLOCK_C: tl.constexpr,  # >= C
    TOPK: tl.constexpr,  # 2 K
    BLOCK_TOPK: tl.constexpr,  # >= TOPK
    BLOCK_T: tl.constexpr,  # history columns per block
    HAS_TABLE: tl.constexpr,
):  # fmt: skip
    NEG = -float("inf")
    b = tl.program_id(0)
    step = tl.load(step_ptr)
    max_len = tl.load(max_len_ptr)
    min_len = tl.load(min_len_ptr)
    penalty = tl.load(penalty_ptr)
    n_fin = tl.load(n_fin_ptr + b)
    j = tl.arange(0, BLOCK_K)  # beam within the sentence
    j_ok = j < K
    rows = b * K + j

    # each row's log-sum-exp from its chunks
    c = tl.arange(0, BLOCK_C)
    stat = rows[:, None] * C + c[None, :]
    stat_ok = j_ok[:, None] & (c < C)[None, :]
    chunk_max = tl.load(chunk_max_ptr + stat, mask=stat_ok, other=NEG)
    row_max = tl.max(chunk_max, axis=1)  # [BLOCK_K]
    chunk_sum = tl.load(chunk_sum_ptr + stat, mask=stat_ok, other=0.0)
    row_max_ok = tl.where(j_ok, row_max, 0.0)
    log_sum = tl.log(tl.where(j_ok, tl.sum(chunk_sum * tl.exp(chunk_max - row_max_ok[:, None]), axis=1), 1.0))
    prev = tl.load(prev_ptr + rows, mask=j_ok, other=NEG)

    # every chunk candidate: the reference's score, and its flat index beam * V + symbol
    q = tl.arange(0, BLOCK_C * BLOCK_TOPK)  # (chunk, rank in chunk)
    q_chunk = q // BLOCK_TOPK
    q_rank = q % BLOCK_TOPK
    q_ok = (q_chunk < C) & (q_rank < TOPK)
    at = (rows[:, None] * C + q_chunk[None, :]) * TOPK + q_rank[None, :]
    ok = j_ok[:, None] & q_ok[None, :]
    symbol = tl.load(cand_symbol_ptr + at, mask=ok, other=V)
    ok = ok & (symbol < V)
    x = tl.load(cand_logit_ptr + at, mask=ok, other=0.0)
    lprob = (x - row_max_ok[:, None]) - log_sum[:, None]
    lprob = _masked(lprob, symbol, step, max_len, min_len, penalty, PAD, UNK, EOS)
    score = tl.where(ok, lprob + prev[:, None], NEG)
    NONE = K * V  # flat index past every candidate
    flat = tl.where(ok, j[:, None] * V + symbol, NONE)

    # the sentence's TOPK best, best first (equal scores: lowest flat index)
    i = tl.arange(0, BLOCK_TOPK)
    cand_score = tl.full([BLOCK_TOPK], NEG, tl.float32)
    cand_flat = tl.full([BLOCK_TOPK], NONE, tl.int32)
    key = tl.where(ok, _order_key(score, flat, NONE), _no_key())  # [BLOCK_K, BLOCK_C * BLOCK_TOPK] distinct keys
    for r in tl.static_range(TOPK):
        best = tl.max(tl.max(key, axis=1), axis=0)
        key = tl.where(key == best, _no_key(), key)
        cand_score = tl.where(i == r, _key_value(best), cand_score)
        cand_flat = tl.where(i == r, _key_index(best, NONE), cand_flat)
    i_ok = i < TOPK
    cand_symbol = cand_flat % V
    cand_row = b * K + cand_flat // V  # [BLOCK_TOPK] global rows
    cand_eos = i_ok & (cand_symbol == EOS)

    # finish </s> candidates among the first K, in order, while the sentence has < K finished
    open_ = tl.where((n_fin < K) & (step <= max_len), 1, 0)  # a vector below (the interpreter's bool & scalar)
    finishing = (i < K) & cand_eos & (cand_score > NEG) & (i * 0 + open_ > 0)
    rank = tl.cumsum(finishing.to(tl.int32), axis=0)  # 1, 2, ... along the finishing candidates
    accept = finishing & (n_fin + rank <= K)
    fin_row = b * (K + 1) + n_fin + rank - 1
    # the finished hypotheses' histories (generated ids: tokens from column 1), read before the reorder below
    eos_ids = tl.full([BLOCK_TOPK], EOS, tl.int64)
    _copy_rows(tokens_ptr + 1, stride_tokens, cand_row, fin_tokens_ptr, stride_fin_tokens, fin_row, accept, T1,
               step, eos_ids, BLOCK_T)  # fmt: skip
    _copy_rows(scores_ptr, stride_scores, cand_row, fin_scores_ptr, stride_fin_scores, fin_row, accept, T1,
               step, cand_score, BLOCK_T)  # fmt: skip
    tl.store(fin_step_ptr + fin_row, step + tl.zeros_like(fin_row).to(tl.int64), mask=accept)

    # continue with the first K candidates that do not end (</s> ones rank after all others)
    not_eos = i_ok & ~cand_eos
    place = tl.where(cand_eos, tl.sum(not_eos.to(tl.int32), axis=0) + tl.cumsum(cand_eos.to(tl.int32), axis=0),
                     tl.cumsum(not_eos.to(tl.int32), axis=0)) - 1  # fmt: skip
    chosen = (place[None, :] == j[:, None]) & i_ok[None, :] & j_ok[:, None]  # [BLOCK_K, BLOCK_TOPK]
    src_row = tl.sum(tl.where(chosen, cand_row[None, :], 0), axis=1)  # [BLOCK_K]
    new_symbol = tl.sum(tl.where(chosen, cand_symbol[None, :], 0), axis=1).to(tl.int64)
    new_score = tl.sum(tl.where(chosen, cand_score[None, :], 0.0), axis=1)
    tl.debug_barrier()
    _copy_rows(tokens_ptr, stride_tokens, src_row, tokens_ptr, stride_tokens, rows, j_ok, T1 + 1, step + 1,
               new_symbol, BLOCK_T)  # fmt: skip
    _copy_rows(scores_ptr, stride_scores, src_row, scores_ptr, stride_scores, rows, j_ok, T1, step, new_score,
               BLOCK_T)  # fmt: skip
    if HAS_TABLE:
        _copy_rows(table_ptr, stride_table, src_row, table_ptr, stride_table, rows, j_ok, table_cols, -1, src_row,
                   BLOCK_T)  # fmt: skip
    # the step counter: every program read it above, before its ticket; the last one increments it (and rezeroes
    # the ticket for the next launch)
    ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel", scope="gpu")
    if ticket == tl.num_programs(0) - 1:
        tl.store(step_ptr, step + 1)
        tl.store(ticket_ptr, 0)
    tl.store(prev_ptr + rows, new_score, mask=j_ok)
    tl.store(next_ptr + rows, new_symbol, mask=j_ok)
    tl.store(reorder_ptr + rows, src_row.to(tl.int64), mask=j_ok)
    tl.store(n_fin_ptr + b, n_fin + tl.sum(accept.to(tl.int64), axis=0))


# ----------------------------------------------------------------------------------------------------------
# Launcher and dispatcher.


def _check(logits: torch.Tensor, s: BeamTensors, tables: Sequence[torch.Tensor]) -> None:
    if logits.dim() != 2 or tuple(logits.shape) != (s.N, s.V):
        raise KernelInputError(f"logits must be [{s.N}, {s.V}] (rows, symbols), got {list(logits.shape)}")
    utils.check_float("logits", logits)
    for table in tables:
        if table.dim() != 2 or table.shape[0] != s.N or table.dtype != torch.long:
            raise KernelInputError(f"a reordered table must be int64 [{s.N}, L], got {table.dtype} {list(table.shape)}")


def _block_v(rows: int, symbols: int) -> int:
    """The candidates kernel's chunk: about TARGET_PROGRAMS programs (MIN_CHUNKS to MAX_CHUNKS per row). Fewer,
    longer chunks also leave the selection fewer candidates to merge. H200, 64 rows x 32,768 symbols
    (``bench_beam_search_step.py --sweep``): 4,096-symbol chunks x 4 warps 24.5 us, 1,024 28.1 us."""
    chunks = min(MAX_CHUNKS, max(MIN_CHUNKS, utils.next_power_of_2(utils.cdiv(TARGET_PROGRAMS, max(rows, 1)))))
    return max(1024, utils.next_power_of_2(utils.cdiv(symbols, chunks)))


def beam_search_step_triton(
    logits: torch.Tensor, s: BeamTensors, pad: int, unk: int, eos: int, tables: Sequence[torch.Tensor] = (),
    *, block_v: int | None = None, num_warps: int | None = None,
) -> None:
    """The two kernels (module docstring; the second increments the step); ``tables``: at most one ``[N, L]`` int64.
    ``block_v``, ``num_warps``: the candidates kernel's chunk and warps (tuning sweeps)."""
    _check(logits, s, tables)
    if len(tables) > 1:
        raise KernelInputError(f"the kernel reorders at most one table, got {len(tables)}")
    utils.check_launchable(logits, s.tokens, s.scores, *tables)
    for name in ("tokens", "scores", "fin_tokens", "fin_cumulative"):
        if getattr(s, name).stride(1) != 1:
            raise KernelInputError(f"the state's {name} must have unit column stride")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    N, V, k = s.N, s.V, s.k
    block_v = block_v or _block_v(N, V)
    if block_v < GROUP or block_v & (block_v - 1):
        raise KernelInputError(f"block_v must be a power of two >= {GROUP}, got {block_v}")
    chunks = utils.cdiv(V, block_v)
    topk = 2 * k
    device = logits.device
    cand_logit = utils.empty((N, chunks, topk), torch.float32, device)
    cand_symbol = utils.empty((N, chunks, topk), torch.int32, device)
    chunk_max = utils.empty((N, chunks), torch.float32, device)
    chunk_sum = utils.empty((N, chunks), torch.float32, device)
    scalars = (s.step, s.max_len, s.min_len, s.unk_penalty)
    _row_candidates_kernel[(N, chunks)](
        logits, logits.stride(0), *scalars, cand_logit, cand_symbol, chunk_max, chunk_sum,
        V, chunks, pad, unk, eos, TOPK=topk, BLOCK_TOPK=utils.next_power_of_2(topk), GROUP=GROUP,
        BLOCK_V=block_v, num_warps=num_warps or CANDIDATE_WARPS,
    )  # fmt: skip
    table = tables[0] if tables else s.tokens
    _beam_select_kernel[(s.B,)](
        cand_logit, cand_symbol, chunk_max, chunk_sum, *scalars,
        s.prev_scores, s.tokens, s.tokens.stride(0), s.scores, s.scores.stride(0), s.next_tokens, s.reorder_rows,
        s.n_finished, s.fin_tokens, s.fin_tokens.stride(0), s.fin_cumulative, s.fin_cumulative.stride(0), s.fin_step,
        table, table.stride(0), table.shape[1], s.ticket, V, chunks, s.scores.shape[1], pad, unk, eos,
        K=k, BLOCK_K=max(2, utils.next_power_of_2(k)), BLOCK_C=max(2, utils.next_power_of_2(chunks)),
        TOPK=topk, BLOCK_TOPK=utils.next_power_of_2(topk), BLOCK_T=128, HAS_TABLE=bool(tables), num_warps=4,
    )  # fmt: skip


def beam_search_step(
    logits: torch.Tensor, s: BeamTensors, pad: int, unk: int, eos: int, tables: Sequence[torch.Tensor] = ()
) -> None:
    """One beam-search step of the state ``s`` (:class:`BeamTensors`, updated in place) from ``logits [N, V]``;
    ``tables``: ``[N, L]`` int64 tensors whose rows follow the surviving beams (at most one on the kernel path).
    Triton on CUDA (and on CPU inside :func:`.utils.launch_on_cpu` with the interpreter), the reference
    otherwise."""
    if utils.use_triton_or_interpreter(logits) and len(tables) <= 1:
        beam_search_step_triton(logits, s, pad, unk, eos, tables)
    else:
        _check(logits, s, tables)
        beam_search_step_ref(logits, s, pad, unk, eos, tables)
