"""CTC prefix beam search alone: the Triton kernel (``turboformer/kernels/ctc_prefix_search.py``, one program
per utterance over all its frames) against the tensor-op version it replaces in the Conformer engine
(``prefix_search.ctc_prefix_beam_search_torch``), eager and as a CUDA graph, on the same log-probabilities.

Inputs: log-softmax of Gaussian logits over the AISHELL vocabulary (4,233 units) with the blank raised so
~80% of frames are blank (as a trained model's); 40 ms frames: 5 s = 125 frames, 15 s = 375. Beam 10. Every
configuration's n-best is checked equal to the tensor-op version's (units; scores within 1e-9).

    python benchmarks/bench_ctc_prefix_search.py [--out benchmarks/results]

Writes ``<out>/<gpu>/ctc_prefix_search.{json,md}``.
"""

import argparse
import sys

import torch

from turboformer.benchmark.common import median_ms, write_results
from turboformer.kernels.ctc_prefix_search import ctc_prefix_search_triton
from turboformer.models.conformer.prefix_search import PrefixBeams, ctc_prefix_beam_search_torch
from turboformer.runtime.cuda_graphs import capture

VOCAB, BEAM = 4233, 10


def same_nbest(a: PrefixBeams, b: PrefixBeams) -> bool:
    for got, want in zip(a.to_lists(), b.to_lists()):
        if [t for t, _ in got] != [t for t, _ in want]:
            return False
        if any(abs(x - y) > 1e-9 for (_, x), (_, y) in zip(got, want) if x != y):
            return False
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    rows = []
    for batch in (1, 16):
        for frames in (125, 375):
            g = torch.Generator(device="cuda").manual_seed(batch * 1000 + frames)
            logits = torch.randn(batch, frames, VOCAB, device="cuda", generator=g) * 2
            logits[..., 0] += 6  # mostly blank
            log_probs = torch.log_softmax(logits, -1)
            lengths = torch.full((batch,), frames, device="cuda")
            lengths[1::2] = frames * 2 // 3  # unequal lengths in a batch
            reference = ctc_prefix_beam_search_torch(log_probs, lengths, BEAM)
            row = {"batch": batch, "frames": frames}
            row["tensor_ops_eager_ms"] = median_ms(lambda: ctc_prefix_beam_search_torch(log_probs, lengths, BEAM),
                                                   max(2, args.repeat // 3), "cuda", 1)
            graph, _ = capture(lambda: ctc_prefix_beam_search_torch(log_probs, lengths, BEAM))
            row["tensor_ops_graphed_ms"] = median_ms(graph.replay, args.repeat, "cuda", 1)
            for warps in (1, 2, 4, 8, 16):
                out = PrefixBeams(*ctc_prefix_search_triton(log_probs, lengths, BEAM, num_warps=warps))
                row[f"triton_w{warps}_same"] = same_nbest(out, reference)
                row[f"triton_w{warps}_ms"] = median_ms(
                    lambda: ctc_prefix_search_triton(log_probs, lengths, BEAM, num_warps=warps), args.repeat, "cuda", 1)
            best = min((1, 2, 4, 8, 16), key=lambda w: row[f"triton_w{w}_ms"])
            row["triton_best_warps"] = best
            row["speedup_vs_graphed"] = row["tensor_ops_graphed_ms"] / row[f"triton_w{best}_ms"]
            rows.append(row)
            print(row, flush=True)
    lines = ["# CTC prefix beam search alone: Triton kernel vs tensor ops", "",
             f"{torch.cuda.get_device_name()}, torch {torch.__version__}; vocabulary {VOCAB}, beam {BEAM}, "
             "odd utterances 2/3 as long; ms (median).", "",
             "| batch | frames | tensor ops eager | tensor ops graphed | Triton, 1 / 2 / 4 / 8 / 16 warps "
             "| speedup vs graphed | n-best equal |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        triton = " / ".join(f"{r[f'triton_w{w}_ms']:.3f}" for w in (1, 2, 4, 8, 16))
        same = all(r[f"triton_w{w}_same"] for w in (1, 2, 4, 8, 16))
        lines.append(f"| {r['batch']} | {r['frames']} | {r['tensor_ops_eager_ms']:.2f} | "
                     f"{r['tensor_ops_graphed_ms']:.2f} | {triton} | {r['speedup_vs_graphed']:.1f}x | {same} |")
    print("\n".join(lines))
    write_results({"rows": rows}, args.out, "ctc_prefix_search", torch.cuda.get_device_name(), "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
