"""beam_search_step: the two Triton kernels (the interpreter on CPU, the GPU where there is one) against the PyTorch
reference step (log_softmax + fairseq's masks + topk + bookkeeping) on the same random state.

Logits are distinct within a row (a permutation), so the candidates' order has no ties and both orders agree;
scores are compared at 1e-5 (the kernel's log-sum-exp adds its chunks in another order)."""

from __future__ import annotations

import pytest
import torch

from turboformer.kernels import KernelInputError, poison_buffers
from turboformer.kernels.beam_search_step import (
    beam_search_step,
    beam_search_step_ref,
    beam_search_step_triton,
)
from turboformer.kernels.utils import launch_on_cpu
from turboformer.models.lite_transformer.device_search import BeamSearchState
from turboformer.models.lite_transformer.generate import BeamSearchOptions, SpecialTokens

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SPECIAL = SpecialTokens(eos=2, pad=1, unk=3, start=2)
B, T = 3, 12  # sentences, max_len capacity
CASES = ("first", "middle", "eos", "min_len", "last", "done")


def _state(case: str, k: int, V: int, seed: int) -> tuple[BeamSearchState, torch.Tensor, torch.Tensor]:
    """A state in the middle of a search (random histories, some finished hypotheses), its logits [N, V] and an
    [N, L] table; ``case`` picks the step's situation."""
    g = torch.Generator().manual_seed(seed)
    min_len = 9 if case == "min_len" else 0
    options = BeamSearchOptions(k, 0.6, min_len=min_len, unk_penalty=0.7, nbest=k)
    state = BeamSearchState(options, SPECIAL, B, V, T, DEVICE)
    state.reset(T if case != "last" else 6)
    N = state.N
    step = {"first": 0, "last": 6}.get(case, 5)
    state.step.fill_(step)
    if case != "first":
        state.tokens[:, 1 : step + 1] = torch.randint(4, V, (N, step), generator=g).to(DEVICE)
        state.scores[:, :step] = (-torch.rand(N, step, generator=g)).cumsum(1).to(DEVICE)
        state.prev_scores.copy_(state.scores[:, step - 1] if step else 0)
        finished = torch.randint(0, k, (B,), generator=g)
        if case == "done":
            finished[1] = k
        state.n_finished.copy_(finished)
        state.fin_tokens.copy_(torch.randint(4, V, state.fin_tokens.shape, generator=g))
        state.fin_cumulative.copy_(-torch.rand(state.fin_cumulative.shape, generator=g))
        state.fin_step.copy_(torch.randint(0, step, state.fin_step.shape, generator=g))
    # distinct logits per row: a permutation of -V/2..V/2 times 2^-7 (exact in fp16 for V < 4096)
    logits = (torch.stack([torch.randperm(V, generator=g) for _ in range(N)]) - V // 2).float() * 2.0**-7
    if case in ("eos", "min_len", "done", "last"):
        logits[::2, SPECIAL.eos] = logits.max() + 0.25  # </s> is the best symbol of every other row
    logits[1::3, SPECIAL.unk] = logits.max() + 0.5  # unk first before its penalty
    table = torch.randint(0, 100, (N, T + 1), generator=g)
    return state, logits.to(DEVICE), table.to(DEVICE)


def _fields(state: BeamSearchState, case: str) -> dict[str, torch.Tensor]:
    k = state.k
    fields = {
        "step": state.step,
        "n_finished": state.n_finished,
        "prev_scores": state.prev_scores,
        # the spare slot k receives the reference's rejected hypotheses; nothing reads it
        "fin_tokens": state.fin_tokens.view(B, k + 1, -1)[:, :k],
        "fin_cumulative": state.fin_cumulative.view(B, k + 1, -1)[:, :k],
        "fin_step": state.fin_step.view(B, k + 1)[:, :k],
    }
    if case != "last":  # at the last step the continuing beams are -inf candidates in a device-chosen order
        fields |= {"tokens": state.tokens, "scores": state.scores, "next_tokens": state.next_tokens,
                   "reorder_rows": state.reorder_rows}  # fmt: skip
    return fields


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("k", [1, 2, 4, 5])
@pytest.mark.parametrize("V", [37, 2500])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_step_matches_reference(case, k, V, dtype):
    want, logits, want_table = _state(case, k, V, seed=k * 100 + V)
    got, _, got_table = _state(case, k, V, seed=k * 100 + V)
    logits = logits.to(dtype)
    beam_search_step_ref(logits.clone(), want, SPECIAL.pad, SPECIAL.unk, SPECIAL.eos, tables=(want_table,))
    with poison_buffers():
        beam_search_step_triton(logits, got, SPECIAL.pad, SPECIAL.unk, SPECIAL.eos, tables=(got_table,))
    for name, expected in _fields(want, case).items():
        torch.testing.assert_close(_fields(got, case)[name], expected, rtol=1e-5, atol=1e-5, msg=name)
    if case != "last":
        torch.testing.assert_close(got_table, want_table)
    if case in ("eos", "done"):  # the case finishes hypotheses (and leaves a done sentence alone)
        assert int(want.n_finished.sum()) > int(_state(case, k, V, seed=k * 100 + V)[0].n_finished.sum())


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("layout", ["one group", "one per group", "one level"])
def test_candidates_wherever_they_lie_in_a_chunk(layout, k):
    """The candidates kernel's two-level selection (the 2k groups of 32 symbols with the best maxima, then the 2k best
    of their symbols) against the reference when a row's 2k best symbols fill one group, or lie one per group (all
    2k groups needed), and the one-level selection of short chunks (2k x 32 >= BLOCK_V). </s> is the best of them,
    so the continuing beams come from further down the list (at k = 1 the row's second candidate decides)."""
    V = 2500
    want, logits, want_table = _state("middle", k, V, seed=11)
    got, _, got_table = _state("middle", k, V, seed=11)
    rank = torch.arange(1, 2 * k, device=DEVICE)
    others = 4 + rank if layout == "one group" else 32 + 32 * rank  # one group: </s>'s own, symbols 0..31
    symbols = torch.cat([torch.tensor([SPECIAL.eos], device=DEVICE), others])
    logits[:, symbols] = logits.max() + 20.0 - torch.arange(2 * k, device=DEVICE).float() * 0.125
    beam_search_step_ref(logits.clone(), want, SPECIAL.pad, SPECIAL.unk, SPECIAL.eos, tables=(want_table,))
    block_v = 64 if layout == "one level" else None
    beam_search_step_triton(logits, got, SPECIAL.pad, SPECIAL.unk, SPECIAL.eos, tables=(got_table,), block_v=block_v)
    for name, expected in _fields(want, "middle").items():
        torch.testing.assert_close(_fields(got, "middle")[name], expected, rtol=1e-5, atol=1e-5, msg=name)
    torch.testing.assert_close(got_table, want_table)
    assert set(got.next_tokens.tolist()) <= set(others.tolist())  # the planted symbols won


def test_step_without_table_and_through_the_dispatcher():
    want, logits, _ = _state("eos", 4, 300, seed=3)
    got, _, _ = _state("eos", 4, 300, seed=3)
    beam_search_step_ref(logits.clone(), want, SPECIAL.pad, SPECIAL.unk, SPECIAL.eos)
    with launch_on_cpu():
        beam_search_step(logits, got, SPECIAL.pad, SPECIAL.unk, SPECIAL.eos)
    for name, expected in _fields(want, "eos").items():
        torch.testing.assert_close(_fields(got, "eos")[name], expected, rtol=1e-5, atol=1e-5, msg=name)


def test_bad_input():
    state, logits, table = _state("middle", 2, 40, seed=0)
    with pytest.raises(KernelInputError, match="logits must be"):
        beam_search_step_triton(logits[:, :-1], state, SPECIAL.pad, SPECIAL.unk, SPECIAL.eos)
    with pytest.raises(KernelInputError, match="table"):
        beam_search_step_triton(logits, state, SPECIAL.pad, SPECIAL.unk, SPECIAL.eos, tables=(table.int(),))
    with pytest.raises(KernelInputError, match="block_v"):
        beam_search_step_triton(logits, state, SPECIAL.pad, SPECIAL.unk, SPECIAL.eos, block_v=48)
    with pytest.raises(KernelInputError, match="float32, float16 or bfloat16"):
        beam_search_step(logits.long(), state, SPECIAL.pad, SPECIAL.unk, SPECIAL.eos)


@pytest.mark.parametrize("V", [37, 2500])
def test_ties_go_to_the_lowest_flat_index(V):
    """Equal scores rank by flat index ``beam * V + symbol`` (lowest first): every beam of a sentence has the same
    score and the same logits, drawn from four values, so most candidates tie exactly; the expected order is a
    stable sort of the exact scores (the values are far apart: no rounding reorders them)."""
    k = 4
    state, _, _ = _state("middle", k, V, seed=7)
    state.prev_scores.zero_()
    g = torch.Generator().manual_seed(V)
    row = torch.randint(0, 4, (B, 1, V), generator=g).float() * 0.5
    row[..., SPECIAL.eos] = -8.0  # no </s> candidate: the continuing beams are the first k candidates
    logits = row.expand(B, k, V).reshape(B * k, V).to(DEVICE)
    beam_search_step_triton(logits, state, SPECIAL.pad, SPECIAL.unk, SPECIAL.eos)
    scores = torch.log_softmax(logits.double().cpu(), dim=-1)
    scores[:, SPECIAL.pad] = float("-inf")
    scores[:, SPECIAL.unk] -= 0.7  # the state's unk penalty
    flat = scores.view(B, k * V)
    order = torch.sort(flat, dim=1, descending=True, stable=True).indices[:, :k]  # [B, k] flat indices
    assert torch.equal(state.next_tokens.cpu(), (order % V).view(-1))
    assert torch.equal(state.reorder_rows.cpu(), (order // V + torch.arange(B)[:, None] * k).view(-1))
