"""Benchmark norm_linear (residual add + LayerNorm fused into the next GEMM's prologue) at the Lite Transformer
WMT En-De decode shapes: 496 features, M = 4 (batch 1 x beam 4), 64 (16 x 4) and 256 (64 x 4) rows.

Each layer is timed as the decode step runs it (``bench_common.time_us``: a CUDA graph over enough input sets
to overflow L2), fused (``triton``: one ``norm_linear`` launch) and unfused (``unfused``: the Triton
``add_layer_norm`` + cuBLAS ``F.linear`` (+ ReLU), what the step launched before). Layers: out_proj [496, 496]
(no prologue), cross_q [496, 496] and in_proj [1240, 496] with the add + LayerNorm prologue, fc1 [496, 496]
with the prologue and ReLU. Bytes model: weight + bias + LayerNorm vectors + x and delta read once, y and the
residual written once.

``--sweep`` times the kernel over tiles (BLOCK_M x BLOCK_N x warps) per layer and prints the best.

Run on a CUDA machine: ``python benchmarks/kernels/bench_norm_linear.py [--sweep]``.
"""

import argparse
import itertools

import torch
import torch.nn.functional as F

from bench_common import check, require_cuda, row, time_us, write_results

# name: (N, K, prologue add + LN, ReLU)
LAYERS = {
    "out_proj": (496, 496, False, False),
    "cross_q": (496, 496, True, False),
    "fc1": (496, 496, True, True),
    "in_proj": (1240, 496, True, False),
}


def make_case(m, n, k, dtype):
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    delta = torch.randn(m, k, device="cuda", dtype=dtype)
    weight = (torch.randn(n, k, device="cuda") / k**0.5).to(dtype)
    bias = (torch.randn(n, device="cuda") * 0.1).to(dtype)
    ln_w = (torch.randn(k, device="cuda") * 0.1 + 1).to(dtype)
    ln_b = (torch.randn(k, device="cuda") * 0.1).to(dtype)
    return x, delta, weight, bias, ln_w, ln_b


def fused(prologue, relu, tile=None):
    from turboformer.kernels.norm_linear import norm_linear_triton

    def run(x, delta, weight, bias, ln_w, ln_b):
        kwargs = dict(delta=delta, ln=(ln_w, ln_b)) if prologue else {}
        if tile is not None:
            kwargs.update(block_m=tile[0], block_n=tile[1], num_warps=tile[2])
        return norm_linear_triton(x, weight, bias, relu=relu, **kwargs)[0]

    return run


def unfused(prologue, relu):
    from turboformer.kernels.layer_norm import add_layer_norm

    def run(x, delta, weight, bias, ln_w, ln_b):
        h = add_layer_norm(x, delta, ln_w, ln_b, 1e-5)[1] if prologue else x
        y = F.linear(h, weight, bias)
        return torch.relu(y) if relu else y

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[4, 64, 256])
    parser.add_argument("--sweep", action="store_true", help="time a grid of tiles and print the best per layer")
    args = parser.parse_args()
    require_cuda("bench_norm_linear.py")
    from turboformer.kernels.norm_linear import norm_linear_ref

    dtype = torch.float16
    rows = []
    for name, (n, k, prologue, relu) in LAYERS.items():
        for m in args.rows:
            case = make_case(m, n, k, dtype)
            x, delta, weight, bias, ln_w, ln_b = case
            kwargs = dict(delta=delta, ln=(ln_w, ln_b)) if prologue else {}
            want = norm_linear_ref(x, weight, bias, relu=relu, **kwargs)[0]
            got = fused(prologue, relu)(*case)
            check(f"{name} M={m}", got, want, atol=2e-2, rtol=2e-2)
            nbytes = 2 * (n * k + n + 2 * k + (2 if prologue else 1) * m * k + m * n + (m * k if prologue else 0))
            times = {
                "triton": time_us(fused(prologue, relu), lambda: make_case(m, n, k, dtype), nbytes),
                "unfused": time_us(unfused(prologue, relu), lambda: make_case(m, n, k, dtype), nbytes),
            }
            rows.append(row(dict(layer=name, M=m, N=n, K=k), nbytes, times))
            if args.sweep:
                tiles = [t for t in itertools.product([16, 32, 64], [16, 32, 64], [4, 8]) if t[0] * t[1] >= 512]
                timed = sorted((time_us(fused(prologue, relu, t), lambda: make_case(m, n, k, dtype), nbytes), t)
                               for t in tiles)  # fmt: skip
                print(f"{name} M={m}: best tiles (BLOCK_M, BLOCK_N, warps) " +
                      ", ".join(f"{t} {us:.2f} us" for us, t in timed[:4]))  # fmt: skip
    write_results("norm_linear", rows, "fp16; unfused = Triton add_layer_norm + cuBLAS F.linear (+ ReLU)")


if __name__ == "__main__":
    main()
