"""Tile sweep of the SAM encoder's fused attention (``turboformer/kernels/window_attention.py``) at the real
shapes: ViT-B/H (heads 12/16, head dim 64/80) on the 64 x 64 grid, 14 x 14 windows and global, batch 8, bf16.

Every configuration is checked against the launcher's default (max abs difference, printed) and timed with CUDA
events (median of 20); TFLOP/s of ``4 T n D`` per (image, head) for T = 4096 real queries over n keys. Also
times upstream's layout with torch SDPA (window partition, einsums, SDPA with an additive mask, unpartition).

    python benchmarks/tune_window_attention.py [--batch 8] [--models vit_b vit_h] [--split both|on|off]
        [--out benchmarks/results] [--name tune_window_attention]

``--split``: ViT-H's head dim 80 as two parts (64 + 16) or padded to 128, or both (each its own rows of the table).
Writes ``<out>/<gpu>/<name>.{json,md}``.
"""

import argparse
import itertools
import sys

import torch

from turboformer.benchmark.common import median_ms, write_results
from turboformer.kernels.window_attention import window_attention_triton
from turboformer.models.sam.image_encoder import sdpa_attention

SHAPES = {"vit_b": (12, 64), "vit_h": (16, 80)}  # heads, head dim


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--models", nargs="+", choices=sorted(SHAPES), default=sorted(SHAPES))
    parser.add_argument("--split", choices=("both", "on", "off"), default="both")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--name", default="tune_window_attention")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    rows, grid = [], 64
    splits = {"both": (True, False), "on": (True,), "off": (False,)}[args.split]
    for model, window in itertools.product(args.models, (14, 0)):
        heads, d = SHAPES[model]
        side = window or grid
        qkv = torch.randn(args.batch, grid, grid, 3 * heads * d, device="cuda", dtype=torch.bfloat16)
        bias = torch.randn(3 * heads * d, device="cuda", dtype=torch.bfloat16)
        tables = [0.5 * torch.randn(2 * side - 1, d, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
        inputs = (qkv, bias, *tables, heads, window)
        flops = 4 * args.batch * heads * grid * grid * side * side * d
        default = window_attention_triton(*inputs)
        sdpa_ms = median_ms(lambda: sdpa_attention(*inputs), 20, "cuda", 2)
        tiles = [(64, 64), (128, 32), (128, 64)] if window else [(64, 64), (128, 64)]
        for (block_m, block_n), warps, stages, split in itertools.product(tiles, (4, 8), (2, 3), splits):
            if split and d & (d - 1) == 0:
                continue  # a power-of-two head dim runs whole
            kwargs = dict(block_m=block_m, block_n=block_n, num_warps=warps, num_stages=stages,
                          split_head_dim=split)
            try:
                out = window_attention_triton(*inputs, **kwargs)
                ms = median_ms(lambda: window_attention_triton(*inputs, **kwargs), 20, "cuda", 2)
            except Exception as error:  # out of shared memory / registers: record and go on
                print(f"{model} window={window} {kwargs}: {type(error).__name__}: {str(error)[:120]}")
                continue
            diff = (out.float() - default.float()).abs().max().item()
            rows.append({"model": model, "window": window, **kwargs, "ms": ms, "TFLOPs": flops / ms / 1e9,
                         "sdpa_ms": sdpa_ms, "max_diff_vs_default": diff})
            print(f"{model:6} window={window:2} m={block_m:3} n={block_n:3} warps={warps} stages={stages} "
                  f"split={split:d}: "
                  f"{ms:7.3f} ms {flops / ms / 1e9:6.1f} TFLOP/s (SDPA layout {sdpa_ms:.3f} ms) diff {diff:.3g}",
                  flush=True)
    lines = ["# Fused SAM encoder attention: tile sweep", "",
             f"{torch.cuda.get_device_name()}, torch {torch.__version__}, batch {args.batch}, bf16. Best per shape:",
             "",
             "| model | block | head dim | block_m | block_n | warps | stages | ms | TFLOP/s "
             "| upstream layout + SDPA ms |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    key = lambda r: (r["model"], r["window"], r["split_head_dim"])  # noqa: E731
    for (model, window, split), group in itertools.groupby(sorted(rows, key=key), key=key):
        best = min(group, key=lambda r: r["ms"])
        head_dim = SHAPES[model][1]
        parts = (f"{head_dim} as 64 + 16" if head_dim == 80 else f"{head_dim} in two parts") if split else (
            f"{head_dim} padded to 128" if head_dim == 80 else str(head_dim))
        lines.append(f"| {model} | {'window' if window else 'global'} | {parts} | {best['block_m']} "
                     f"| {best['block_n']} | {best['num_warps']} | {best['num_stages']} | {best['ms']:.3f} "
                     f"| {best['TFLOPs']:.1f} | {best['sdpa_ms']:.3f} |")
    print("\n".join(lines))
    gpu = torch.cuda.get_device_name()
    write_results({"rows": rows}, args.out, args.name, gpu, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
