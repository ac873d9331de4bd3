"""Sweep decode_attention's launch parameters (keys per tile, key splits, warps) at one shape, against the
shape-based plan: which setting a new model's decode shapes want.

    python benchmarks/kernels/sweep_decode_attention.py --rows 64 --heads 8 --keys 32 --dim 62 [--dtype float16]

Prints the planned launch's time and every setting's, fastest first (CUDA graphs of 20 calls, median of 5).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys

import torch

from turboformer.kernels.decode_attention import (
    _plan,
    decode_attention_ref,
    decode_attention_triton,
)


def graph_us(fn, calls: int = 20, repeat: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=64, help="batch rows (sentences x beam)")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--keys", type=int, default=32, help="cache length S")
    parser.add_argument("--dim", type=int, default=62)
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("sweep_decode_attention: needs a CUDA GPU", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(args.rows, args.heads, args.dim, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(args.rows, args.heads, args.keys, args.dim, device="cuda", dtype=dtype, generator=g)
    v = torch.randn_like(k)
    lengths = torch.full((args.rows,), args.keys, device="cuda", dtype=torch.long)
    gold = decode_attention_ref(q, k, v, lengths)
    plan = _plan(args.rows * args.heads, args.keys, args.dim, False, q.device, None, None)
    print(f"shape rows {args.rows} heads {args.heads} keys {args.keys} dim {args.dim} {args.dtype}; plan "
          f"(block_s, block_d, splits, split_size, warps) = {plan}")
    results = [("plan", graph_us(lambda: decode_attention_triton(q, k, v, lengths)))]
    for block_s, splits, warps in itertools.product((16, 32, 64, 128), (1, 2, 4), (1, 2, 4, 8)):
        if (splits - 1) * block_s >= args.keys:
            continue

        def call(b=block_s, n=splits, w=warps):
            return decode_attention_triton(q, k, v, lengths, block_s=b, num_splits=n, num_warps=w)

        torch.testing.assert_close(call().float(), gold.float(), atol=2e-2, rtol=0)
        results.append((f"block_s {block_s} splits {splits} warps {warps}", graph_us(call)))
    for name, us in sorted(results, key=lambda r: r[1])[:12]:
        print(f"{name:<36} {us:7.2f} us")
    print(f"{'plan':<36} {results[0][1]:7.2f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
