"""A/B of two source trees of turboformer on the Whisper decode step (CUDA): ms per token and the tokens, same
random weights, features and prompt, each tree in its own process, run alternately.

    mkdir /tmp/old && git archive <revision> turboformer | tar -x -C /tmp/old
    python benchmarks/ab_trees.py --old /tmp/old [--new .] [--models tiny large-v3] [--batches 1 16] [--rounds 2]

Per (model, batch, fp16 / INT8 weights): the best of ``--rounds`` per tree (each is
``ab_decode_step.per_token_ms``: a median of 5 graphed greedy runs of 100 tokens after the prompt, prefill
subtracted), the ratio new / old, and the share of greedy tokens that are equal. Used for the decode-attention
change of the tenth session (results/NVIDIA-H200/ab_attention_prefetch.md).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import gc, json, math, os, sys
root, out, models, batches = sys.argv[1], sys.argv[2], sys.argv[3].split(","), [int(b) for b in sys.argv[4].split(",")]
sys.path.insert(0, root)
import torch
import turboformer
assert os.path.abspath(turboformer.__file__).startswith(os.path.abspath(root)), turboformer.__file__
sys.path.append(sys.argv[5])  # this script's folder: ab_decode_step's timing, on the tree imported above
from ab_decode_step import GraphEngine, EngineOptions, WHISPER_CONFIGS, per_token_ms, random_model
results = {}
for name in models:
    config = WHISPER_CONFIGS[name]
    model = random_model(config, device="cuda", dtype=torch.float16)
    for batch in batches:
        for quantize in (None, "int8"):
            engine = GraphEngine(model, EngineOptions(buckets=(batch,), quantize=quantize), "cuda")
            torch.manual_seed(1)  # the same encoder input in both trees
            ms, tokens = per_token_ms(engine, config, batch)
            results[f"{name} | {batch} | {quantize or 'fp16'}"] = {"ms": ms, "tokens": tokens.tolist()}
            del engine
            gc.collect()
            torch.cuda.empty_cache()
json.dump(results, open(out, "w"))
"""


def run_tree(root: str, models: list[str], batches: list[int]) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        here = str(Path(__file__).resolve().parent)
        cmd = [sys.executable, "-c", CHILD, root, out.name, ",".join(models), ",".join(map(str, batches)), here]
        subprocess.run(cmd, check=True)
        return json.loads(Path(out.name).read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--old", required=True, help="root of the old tree (holds turboformer/)")
    parser.add_argument("--new", default=".", help="root of the new tree (default: this checkout)")
    parser.add_argument("--models", nargs="+", default=["tiny", "large-v3"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs per tree (best is kept)")
    args = parser.parse_args()
    runs = {"old": [], "new": []}
    for _ in range(args.rounds):
        for tag in ("old", "new"):
            runs[tag].append(run_tree(getattr(args, tag), args.models, args.batches))
    print("| model | batch | weights | old ms/token | new ms/token | new / old | tokens equal |")
    print("|---|---|---|---|---|---|---|")
    for key in runs["new"][0]:
        old = min(r[key]["ms"] for r in runs["old"])
        new = min(r[key]["ms"] for r in runs["new"])
        a = [t for row in runs["old"][0][key]["tokens"] for t in row]
        b = [t for row in runs["new"][0][key]["tokens"] for t in row]
        same = sum(x == y for x, y in zip(a, b)) / len(a)
        print(f"| {key} | {old:.4f} | {new:.4f} | {new / old:.3f} | {same:.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
