"""Sweep bias_gelu's tile (rows x features per program) and warps at Whisper/SAM FFN shapes, against the
launcher's plan: which setting streams closest to the copy bandwidth.

    python benchmarks/kernels/sweep_bias_gelu.py [--shapes 24000x5120 1500x5120] [--dtype float16]

Prints the planned launch's GB/s and every setting's, fastest first (CUDA graphs of 20 calls, median of 5).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sweep_decode_attention import graph_us  # noqa: E402

from turboformer.kernels import bias_gelu as op  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", nargs="+", default=["24000x5120", "96000x5120", "1500x5120", "64x5120"])
    parser.add_argument("--dtype", default="float16")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    for shape in args.shapes:
        m, n = (int(v) for v in shape.split("x"))
        x = torch.randn(m, n, device="cuda", dtype=dtype)
        bias = torch.randn(n, device="cuda", dtype=dtype)
        y = torch.empty_like(x)
        gbytes = 2 * x.numel() * x.element_size() / 1e9
        planned = graph_us(lambda: op.bias_gelu_triton(x, bias))
        rows = []
        for block_n, tile, warps in itertools.product((256, 512, 1024, 2048), (2048, 4096, 8192, 16384), (4, 8, 16)):
            block_m = tile // block_n
            if block_m < 1 or block_n > triton_next(n) * 2:
                continue
            grid = (op.utils.cdiv(m, block_m), op.utils.cdiv(n, block_n))

            def launch(block_m=block_m, block_n=block_n, warps=warps, grid=grid):
                op._bias_gelu_kernel[grid](x, bias, y, m, n, x.stride(0), BLOCK_M=block_m, BLOCK_N=block_n,
                                           num_warps=warps)  # fmt: skip

            rows.append((graph_us(launch), block_m, block_n, warps))
        rows.sort()
        print(f"\n{shape} {args.dtype}: planned {planned:.1f} us = {gbytes / planned * 1e6:.0f} GB/s")
        for us, block_m, block_n, warps in rows[:8]:
            print(f"  BLOCK_M {block_m:>3} BLOCK_N {block_n:>5} warps {warps:>2}: {us:8.1f} us {gbytes / us * 1e6:6.0f} GB/s")
    return 0


def triton_next(n: int) -> int:
    return op.utils.next_power_of_2(n)


if __name__ == "__main__":
    sys.exit(main())
