"""CTC prefix beam search as one Triton program per utterance: every frame of the search in one launch.

The search is Hannun et al.'s (arXiv 1408.2873, Algorithm 1) with WeNet's pruning (the K = beam most likely
units per frame extend the N = beam surviving prefixes), as :func:`turboformer.models.conformer.ctc.
ctc_prefix_beam_search` (pure Python, upstream's semantics: the reference) and the batched tensor version
:func:`turboformer.models.conformer.prefix_search.ctc_prefix_beam_search_batched` (one loop over frames of ~70
small tensor ops each, ~4 us of GPU launch per op inside a CUDA graph). Here a program keeps its utterance's
beams in registers and loops over the frames itself.

Per frame and prefix i (a unit j of the top K):

* slot 0, the same prefix: j is blank (``s += score_i + lp_j``) or repeats the prefix's last unit
  (``ns += ns_i + lp_j``); top-K units are distinct, so a prefix has at most one of each. These merge into one
  *group* per prefix: ``[N]`` vectors.
* slot 1, the extension ``prefix_i + j`` (j not blank): ``ns += score_i + lp_j``, or ``s_i + lp_j`` when j
  repeats the last unit (``a blank a``). A ``[K, N]`` tile.

An extension can equal an existing prefix i' (the same units: two polynomial hashes and the length agree, a
``[K, N, N']`` comparison); the pair is one prefix, whose ``ns`` is the log-sum-exp of both. Candidates are
ranked by ``log(exp(s) + exp(ns))`` descending, ties by creation order (the reference's dict insertion order:
unit j, then prefix i, then slot), which is the order the representative of a merged pair takes; a candidate
the reference creates with score -inf ranks after every finite one, and the ones it never creates after those
(they fill the beam, dead, when fewer than N exist). The N best are picked one at a time (two reductions each);
each new beam records its parent beam and appended unit, and after the last frame every surviving beam walks
these back pointers to write its units.

All scores are float64 as in the reference; the log-probabilities arrive as the K best per frame (``topk`` of
the float32 CTC output, then float64, as the reference reads them).
"""

from __future__ import annotations

import torch

from turboformer.kernels import utils
from turboformer.kernels.utils import KernelInputError, tl, triton

HASH_PRIMES = (2147483629, 2147483587)  # two primes < 2^31: hash * base + unit < 2^62 fits in int64
HASH_BASES = (1000003, 999983)


@triton.jit
def _logaddexp(a, b):
    """log(exp(a) + exp(b)) in the inputs' dtype; -inf where both are."""
    hi = tl.maximum(a, b)
    lo = tl.minimum(a, b)
    none = lo == -float("inf")
    return tl.where(none, hi, hi + tl.log(1.0 + tl.exp(tl.where(none, 0.0, lo) - tl.where(none, 0.0, hi))))


@triton.jit
def _by_rank(sel_g, group_value, sel_1, extension_value):
    """``[R]``: for each new beam r, the value of the candidate ranked r, a group (``sel_g [N', R]``, values
    ``[N']``) or an extension (``sel_1 [K, N, R]``, values ``[K, N]``); exactly one is selected per beam."""
    from_groups = tl.sum(tl.where(sel_g, group_value[:, None], 0), axis=0)
    return from_groups + tl.sum(tl.sum(tl.where(sel_1, extension_value[:, :, None], 0), axis=0), axis=0)


@triton.jit
def _ctc_prefix_search_kernel(
    logp_ptr,  # [B, T, K] float64: each frame's K best log-probabilities, descending
    unit_ptr,  # [B, T, K] int64: their units
    frames_ptr,  # [B] valid frames per utterance
    parent_ptr,  # [B, T, N] int32 scratch: each frame's new beams' parent beam
    appended_ptr,  # [B, T, N] int32 scratch: ... and the unit appended to it (-1: none)
    tokens_ptr,  # [B, N, L] int64 out, zero-filled by the launcher
    length_ptr,  # [B, N] int64 out: units per beam
    s_ptr,  # [B, N] float64 out: log p(prefix, ends in blank)
    ns_ptr,  # [B, N] float64 out: log p(prefix, ends in its last unit)
    alive_ptr,  # [B, N] int8 out: the beam is a prefix the reference holds
    T, L, N, K, BLANK,
    BLOCK_N: tl.constexpr,  # >= N
    BLOCK_K: tl.constexpr,  # >= K
):  # fmt: skip
    b = tl.program_id(0)
    frames = tl.load(frames_ptr + b)
    r = tl.arange(0, BLOCK_N)  # beam (prefix) index i, or i' for the prefix an extension may equal
    jj = tl.arange(0, BLOCK_K)  # rank j of a unit among the frame's K best
    beam_ok = r < N
    NEG = -float("inf")
    FLOOR = -1e300  # rank key of a created candidate scored -inf: below every finite score
    DEAD = -1e308  # rank key of a candidate the reference never creates: below FLOOR, above "picked" (-inf)
    BIG = 1 << 29  # creation orders are < 2 K N; dead candidates get BIG + a unique index

    # Only prefix 0, the empty one (s = 0), exists at the start.
    alive = r == 0
    s = tl.where(r == 0, 0.0, NEG).to(tl.float64)  # [BLOCK_N]
    ns = tl.full([BLOCK_N], NEG, tl.float64)
    h0 = tl.zeros([BLOCK_N], tl.int64)  # the prefix's two hashes
    h1 = tl.zeros([BLOCK_N], tl.int64)
    length = tl.zeros([BLOCK_N], tl.int64)
    last = tl.full([BLOCK_N], -1, tl.int64)  # last unit, -1 for the empty prefix
    order0 = (jj[:, None] * N + r[None, :]) * 2  # [K, N] creation order of slot 0; slot 1 is +1
    flat = jj[:, None] * BLOCK_N + r[None, :]  # [K, N] a unique index per tile entry
    for t in range(0, frames):
        frame = (b.to(tl.int64) * T + t) * K
        lp = tl.load(logp_ptr + frame + jj, mask=jj < K, other=NEG)[:, None]  # [K, 1]
        unit = tl.load(unit_ptr + frame + jj, mask=jj < K, other=-2)[:, None]  # -2: no unit
        score = _logaddexp(s, ns)[None, :]  # [1, N]
        valid = (jj < K)[:, None] & alive[None, :]  # [K, N]
        is_blank = unit == BLANK  # [K, 1]
        is_repeat = (unit != BLANK) & (unit == last[None, :])  # [K, N]

        # slot 0 -> one group per prefix i: its s and ns contributions (at most one each), first creation order
        created0 = valid & (is_blank | is_repeat)
        g_s = tl.max(tl.where(created0 & is_blank, score + lp, NEG), axis=0)  # [N]
        g_ns = tl.max(tl.where(created0 & is_repeat, ns[None, :] + lp, NEG), axis=0)
        g_order = tl.min(tl.where(created0, order0, BIG), axis=0)
        g_created = g_order < BIG

        # slot 1 -> the extensions prefix_i + unit_j, [K, N]
        created1 = valid & (unit != BLANK)
        e_ns = tl.where(created1, tl.where(is_repeat, s[None, :], score) + lp, NEG)
        e_h0 = (h0[None, :] * 1000003 + unit + 1) % 2147483629  # (HASH_BASES, HASH_PRIMES, written out)
        e_h1 = (h1[None, :] * 999983 + unit + 1) % 2147483587
        e_len = length[None, :] + 1
        order1 = order0 + 1

        # An extension that equals an existing prefix i' merges with i''s group: match [K, N, N'] (one i' at most
        # per extension, one extension at most per i').
        match = (created1[:, :, None] & g_created[None, None, :] & (e_h0[:, :, None] == h0[None, None, :])
                 & (e_h1[:, :, None] == h1[None, None, :]) & (e_len[:, :, None] == length[None, None, :]))
        into_ns = tl.max(tl.max(tl.where(match, e_ns[:, :, None], NEG), axis=0), axis=0)  # [N'] the extension's ns
        into_order = tl.min(tl.min(tl.where(match, order1[:, :, None], BIG), axis=0), axis=0)
        its_s = tl.max(tl.where(match, g_s[None, None, :], NEG), axis=2)  # [K, N] the group's s, ns, order
        its_ns = tl.max(tl.where(match, g_ns[None, None, :], NEG), axis=2)
        its_order = tl.min(tl.where(match, g_order[None, None, :], BIG), axis=2)

        # Merged candidates; the representative of a merged pair is the one created first.
        cg_s = g_s
        cg_ns = _logaddexp(g_ns, into_ns)
        rep_g = g_created & (g_order < into_order)
        c1_s = its_s  # -inf where unmatched
        c1_ns = _logaddexp(its_ns, e_ns)
        rep_1 = created1 & (order1 < its_order)
        key_g = tl.where(rep_g, tl.maximum(_logaddexp(cg_s, cg_ns), FLOOR), DEAD)
        key_1 = tl.where(rep_1, tl.maximum(_logaddexp(c1_s, c1_ns), FLOOR), DEAD)
        ord_g = tl.where(rep_g, g_order, BIG + r)
        ord_1 = tl.where(rep_1, order1, BIG + BLOCK_N + flat)

        # Pick the N best (key descending, then creation order) one at a time: rank_* = the new beam index.
        rank_g = tl.full([BLOCK_N], -1, tl.int32)
        rank_1 = tl.full([BLOCK_K, BLOCK_N], -1, tl.int32)
        for pick in range(0, N):
            best = tl.maximum(tl.max(key_g, axis=0), tl.max(tl.max(key_1, axis=1), axis=0))
            first = tl.minimum(tl.min(tl.where(key_g == best, ord_g, 2 * BIG), axis=0),
                               tl.min(tl.min(tl.where(key_1 == best, ord_1, 2 * BIG), axis=1), axis=0))
            rank_g = tl.where(ord_g == first, pick, rank_g)
            rank_1 = tl.where(ord_1 == first, pick, rank_1)
            key_g = tl.where(ord_g == first, NEG, key_g)
            key_1 = tl.where(ord_1 == first, NEG, key_1)

        # The new beams' state, gathered by rank: sel_g [N', R], sel_1 [K, N, R].
        sel_g = rank_g[:, None] == r[None, :]
        sel_1 = rank_1[:, :, None] == r[None, None, :]
        unit_1 = unit + tl.zeros([BLOCK_K, BLOCK_N], tl.int64)
        s = _by_rank(sel_g, cg_s, sel_1, c1_s)
        ns = _by_rank(sel_g, cg_ns, sel_1, c1_ns)
        alive = _by_rank(sel_g, rep_g.to(tl.int32), sel_1, rep_1.to(tl.int32)) > 0
        h0 = _by_rank(sel_g, h0, sel_1, e_h0)
        h1 = _by_rank(sel_g, h1, sel_1, e_h1)
        length = _by_rank(sel_g, length, sel_1, e_len)
        last = _by_rank(sel_g, last, sel_1, unit_1)
        parent = _by_rank(sel_g, r, sel_1, flat % BLOCK_N)  # a group's parent is its own prefix
        appended = _by_rank(sel_g, tl.full([BLOCK_N], -1, tl.int64), sel_1, unit_1)  # a group appends nothing
        alive = alive & beam_ok
        step = (b.to(tl.int64) * T + t) * N + r
        tl.store(parent_ptr + step, tl.minimum(parent, N - 1).to(tl.int32), mask=beam_ok)
        tl.store(appended_ptr + step, appended.to(tl.int32), mask=beam_ok)

    out = b.to(tl.int64) * N + r
    tl.store(s_ptr + out, s, mask=beam_ok)
    tl.store(ns_ptr + out, ns, mask=beam_ok)
    tl.store(length_ptr + out, length, mask=beam_ok)
    tl.store(alive_ptr + out, alive.to(tl.int8), mask=beam_ok)
    # Units by back pointers, last frame first: each beam's units fill its row from the end.
    tl.debug_barrier()  # the pointers were stored by other threads of this program
    cur = r
    pos = length - 1
    for back in range(0, frames):
        step = (b.to(tl.int64) * T + frames - 1 - back) * N + cur
        parent = tl.load(parent_ptr + step, mask=beam_ok, other=0)
        appended = tl.load(appended_ptr + step, mask=beam_ok, other=-1)
        write = beam_ok & (appended >= 0) & (pos >= 0)
        tl.store(tokens_ptr + out * L + pos, appended.to(tl.int64), mask=write)
        pos = tl.where(appended >= 0, pos - 1, pos)
        cur = parent


def top_units(log_probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most likely units per frame, ``(log-probs [B, T, k], units [B, T, k])``, descending, units of
    equal log-probability in unit order. ``torch.topk`` leaves the order of equal values to the device (the -inf
    of impossible units come out in different orders on CPU and CUDA), and the search's creation order follows
    it; which of several units tied at the k-th value are taken stays ``topk``'s choice."""
    values, units = log_probs.topk(k, dim=-1)
    units, order = units.sort(dim=-1)
    values, order = values.gather(-1, order).sort(dim=-1, descending=True, stable=True)
    return values, units.gather(-1, order)


def ctc_prefix_search_triton(
    log_probs: torch.Tensor, lengths: torch.Tensor, beam_size: int, blank_id: int = 0, *, num_warps: int = 8
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The search on ``log_probs [B, T', V]`` (any float dtype) with ``lengths [B]`` valid frames; ``beam_size``
    prefixes kept and units tried per frame (<= V). Returns ``(tokens [B, N, T' + 1] int64, lengths [B, N]
    int64, scores [B, N] float64, alive [B, N] bool)``, best first, units past a beam's length 0: the fields of
    ``prefix_search.PrefixBeams``."""
    if log_probs.dim() != 3 or not log_probs.is_floating_point():
        raise KernelInputError(f"log_probs must be a float [B, T, V] tensor, got {log_probs.dtype} "
                               f"{list(log_probs.shape)}")
    batch, frames, vocab = log_probs.shape
    if not 1 <= beam_size <= vocab:
        raise KernelInputError(f"beam_size must be in 1..{vocab} (the vocabulary), got {beam_size}")
    if lengths.shape != (batch,):
        raise KernelInputError(f"lengths must be [{batch}], got {list(lengths.shape)}")
    utils.check_launchable(log_probs, lengths)
    n = k = beam_size
    top_logp, top_unit = top_units(log_probs, k)  # [B, T', K], as the reference (which then reads float64)
    top_logp, top_unit = top_logp.double().contiguous(), top_unit.contiguous()
    device = log_probs.device
    width = frames + 1
    tokens = torch.zeros(batch, n, width, dtype=torch.long, device=device)
    length = torch.empty(batch, n, dtype=torch.long, device=device)
    s = torch.empty(batch, n, dtype=torch.float64, device=device)
    ns = torch.empty_like(s)
    alive = torch.empty(batch, n, dtype=torch.int8, device=device)
    parent = torch.empty(batch, max(frames, 1), n, dtype=torch.int32, device=device)
    appended = torch.empty_like(parent)
    frames_valid = lengths.to(device=device, dtype=torch.int32).clamp(0, frames).contiguous()
    block_n = max(2, utils.next_power_of_2(n))
    _ctc_prefix_search_kernel[(batch,)](
        top_logp, top_unit, frames_valid, parent, appended, tokens, length, s, ns, alive,
        frames, width, n, k, blank_id, BLOCK_N=block_n, BLOCK_K=block_n, num_warps=num_warps,
    )  # fmt: skip
    return tokens, length, torch.logaddexp(s, ns), alive.bool()
