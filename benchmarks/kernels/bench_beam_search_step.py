"""Benchmark the beam-search step kernels (``beam_search_step``: candidates per row chunk + selection and
bookkeeping per sentence) against the PyTorch step they replace (``beam_search_step_ref``: fp32 log_softmax,
fairseq's masks, ``topk`` over k x V per sentence, ~45 small ops) at the Lite Transformer WMT shapes: V = 32,768
symbols, sentences x beams = 16 x 4, 1 x 4, 16 x 1 and 64 x 4, fp32 logits (as the engine passes them).

Both are timed as the engine runs them, captured in a CUDA graph (``bench_common.time_us``); the step counter is
reset inside the graph (one tiny fill in both variants). Before timing, the kernels' state is checked against
the reference's. Bytes model: the logits read once.

``--sweep`` times the candidates kernel over chunk sizes x warps and prints the best.

Run on a CUDA machine: ``python benchmarks/kernels/bench_beam_search_step.py [--sweep]``.
"""

import argparse
import itertools
import sys

import torch

from bench_common import require_cuda, row, time_us, write_results

V = 32768
CASES = [(16, 4), (1, 4), (16, 1), (64, 4)]  # (sentences, beam)


def make_state(B, k, seed=0):
    from turboformer.models.lite_transformer.device_search import BeamSearchState
    from turboformer.models.lite_transformer.generate import BeamSearchOptions, SpecialTokens

    state = BeamSearchState(BeamSearchOptions(k, 0.6), SpecialTokens(eos=2, pad=1, unk=3, start=2), B, V, 64, "cuda")
    state.reset(64)
    g = torch.Generator(device="cuda").manual_seed(seed)
    state.step.fill_(5)
    state.tokens[:, 1:6] = torch.randint(4, V, (state.N, 5), device="cuda", generator=g)
    state.scores[:, :5] = -torch.rand(state.N, 5, device="cuda", generator=g).cumsum(1)
    state.prev_scores.copy_(state.scores[:, 4])
    return state


def stepper(state, table, triton_kernels, tile=None):
    from turboformer.kernels.beam_search_step import beam_search_step_ref, beam_search_step_triton

    def run(logits):
        state.step.fill_(5)
        if triton_kernels:
            kwargs = {} if tile is None else dict(block_v=tile[0], num_warps=tile[1])
            beam_search_step_triton(logits, state, 1, 3, 2, tables=(table,), **kwargs)
        else:
            beam_search_step_ref(logits.clone(), state, 1, 3, 2, tables=(table,))
        return state.next_tokens

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sweep", action="store_true", help="time the candidates kernel over chunks x warps")
    args = parser.parse_args()
    require_cuda("bench_beam_search_step.py")
    rows = []
    for B, k in CASES[: 1 if args.sweep else None]:  # the sweep: 16 x 4 only
        N = B * k
        logits = torch.randn(N, V, device="cuda")
        want, got = make_state(B, k), make_state(B, k)
        want_table = torch.arange(N, device="cuda")[:, None].repeat(1, 65)
        got_table = want_table.clone()
        stepper(want, want_table, False)(logits)
        stepper(got, got_table, True)(logits)
        for name in ("tokens", "next_tokens", "reorder_rows", "n_finished"):
            if not torch.equal(getattr(got, name), getattr(want, name)):
                sys.exit(f"{name} differs from the reference at {B} x {k}; not timing it")
        if not torch.allclose(got.scores, want.scores, atol=1e-5) or not torch.equal(got_table, want_table):
            sys.exit(f"scores or the reordered table differ from the reference at {B} x {k}; not timing it")
        nbytes = N * V * 4
        inputs = lambda: (torch.randn(N, V, device="cuda"),)  # noqa: E731
        times = {
            "triton": time_us(stepper(got, got_table, True), inputs, nbytes),
            "torch": time_us(stepper(want, want_table, False), inputs, nbytes),
        }
        rows.append(row(dict(sentences=B, beam=k, V=V), nbytes, times))
        if args.sweep:
            tiles = list(itertools.product([1024, 2048, 4096], [1, 2, 4, 8]))
            timed = sorted((time_us(stepper(got, got_table, True, t), inputs, nbytes), t) for t in tiles)
            print(f"{B} x {k}: best (block_v, warps) " + ", ".join(f"{t} {us:.2f} us" for us, t in timed[:5]))
    write_results("beam_search_step", rows, "fp32 logits; torch = log_softmax + the PyTorch step (topk)")


if __name__ == "__main__":
    main()
