"""Benchmark the fused decode-step linear layer at Whisper large-v3 and tiny shapes, M = 1..8 rows.

Each layer is timed as the decode step runs it, fused (``triton``: one ``decode_linear`` launch) and unfused
(``unfused``: what the batched step launches for the same work: the Triton LayerNorm, cuBLAS ``F.linear``, the
Triton bias + GELU, or a residual ``add_``). Layers: qkv [3840, 1280] with the LayerNorm prologue, attention
output [1280, 1280] and fc2 [1280, 5120] with the residual epilogue, fc1 [5120, 1280] with LayerNorm + bias +
GELU, the vocabulary projection [51866, 1280] with the final LayerNorm and fp32 logits; tiny.en's qkv [1152, 384]
and fc2 [384, 1536]. Bytes model: weight + bias + LayerNorm vectors + x read once, y written once (the residual
read and written).

``--sweep`` times the kernel over a grid of tiles (BLOCK_N x warps) per layer at M = 1 and 4 and prints the best,
for tuning ``decode_linear._plan``.

Run on a CUDA machine: ``python benchmarks/kernels/bench_decode_linear.py [--sweep]``.
"""

import argparse
import itertools

import torch
import torch.nn.functional as F

from bench_common import check, require_cuda, row, time_us, write_results

# name: (N, K, fused epilogue/prologue)
LAYERS = {
    "large-v3 qkv": (3840, 1280, "ln"),
    "large-v3 out": (1280, 1280, "residual"),
    "large-v3 fc1": (5120, 1280, "ln_gelu"),
    "large-v3 fc2": (1280, 5120, "residual"),
    "large-v3 vocab": (51866, 1280, "ln_logits"),
    "tiny qkv": (1152, 384, "ln"),
    "tiny fc2": (384, 1536, "residual"),
}


def make_case(m, n, k, kind, dtype):
    """(x, weight, bias, ln_w, ln_b, residual) as the step holds them: fp32 stream x, activations in dtype."""
    stream = kind.startswith("ln")
    x = torch.randn(m, k, device="cuda") if stream else torch.randn(m, k, device="cuda", dtype=dtype)
    weight = (torch.randn(n, k, device="cuda") / k**0.5).to(dtype)
    bias = (torch.randn(n, device="cuda") * 0.1).to(dtype)
    ln_w = (torch.randn(k, device="cuda") * 0.1 + 1).to(dtype)
    ln_b = (torch.randn(k, device="cuda") * 0.1).to(dtype)
    residual = torch.randn(m, n, device="cuda")
    return x, weight, bias, ln_w, ln_b, residual


def fused(kind, tile=None):
    from turboformer.kernels.decode_linear import decode_linear_triton

    def run(x, weight, bias, ln_w, ln_b, residual):
        ln = (ln_w, ln_b) if kind.startswith("ln") else None
        out_dtype = torch.float32 if kind == "ln_logits" else None
        return decode_linear_triton(
            x, weight, None if kind == "ln_logits" else bias, ln=ln, gelu=kind == "ln_gelu",
            residual=residual if kind == "residual" else None, out_dtype=out_dtype, tile=tile,
        )  # fmt: skip

    return run


def unfused(kind):
    from turboformer.kernels.bias_gelu import bias_gelu
    from turboformer.kernels.layer_norm import layer_norm

    def run(x, weight, bias, ln_w, ln_b, residual):
        if kind == "residual":
            return residual.add_(F.linear(x, weight, bias))
        h = layer_norm(x, ln_w, ln_b, out_dtype=weight.dtype)
        if kind == "ln_gelu":
            return bias_gelu(F.linear(h, weight), bias)
        if kind == "ln_logits":
            return F.linear(h, weight).float()
        return F.linear(h, weight, bias)

    return run


def nbytes_of(m, n, k, kind, dtype):
    size = torch.finfo(dtype).bits // 8
    total = n * k * size + n * size + m * k * (4 if kind.startswith("ln") else size)
    total += 2 * k * size if kind.startswith("ln") else 0
    total += 2 * m * n * 4 if kind == "residual" else m * n * (4 if kind == "ln_logits" else size)
    return total


def verify(name, kind, args):
    from turboformer.kernels.decode_linear import decode_linear_ref

    x, weight, bias, ln_w, ln_b, residual = args
    ln = (ln_w, ln_b) if kind.startswith("ln") else None
    ref_residual, our_residual = residual.clone(), residual.clone()
    kw = dict(ln=ln, gelu=kind == "ln_gelu", out_dtype=torch.float32 if kind == "ln_logits" else None)
    b = None if kind == "ln_logits" else bias
    ref = decode_linear_ref(x, weight, b, residual=ref_residual if kind == "residual" else None, **kw)
    out = fused(kind)(x, weight, bias, ln_w, ln_b, our_residual)
    check(name, out, ref, 2e-2, 2e-2)


def main() -> None:
    require_cuda("bench_decode_linear.py")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", action="store_true", help="time a grid of tiles per layer (M = 1, 4); no table")
    args = parser.parse_args()
    from turboformer.kernels.decode_linear import Tile, _plan

    dtype = torch.float16
    if args.sweep:
        for (name, (n, k, kind)), m in itertools.product(LAYERS.items(), (1, 4)):
            nbytes = nbytes_of(m, n, k, kind, dtype)
            width = 1 << (k - 1).bit_length()  # the weight rows a program holds, padded to a power of two
            grid = [Tile(bn, w) for bn, w in itertools.product((1, 2, 4, 8, 16), (2, 4, 8)) if bn * width <= 128 * 32 * w]
            results = []
            for tile in grid:
                t = time_us(fused(kind, tile), lambda: make_case(m, n, k, kind, dtype), nbytes, rep_ms=60)
                results.append((t, tile))
            results.sort(key=lambda r: r[0])
            best = ", ".join(f"{t:.2f} us {tuple(tile)}" for t, tile in results[:3])
            t_plan = time_us(fused(kind), lambda: make_case(m, n, k, kind, dtype), nbytes, rep_ms=60)
            print(f"{name:16s} M={m}: best {best}; plan {tuple(_plan(n, k))} {t_plan:.2f} us", flush=True)
        return

    rows = []
    for name, (n, k, kind) in LAYERS.items():
        for m in (1, 4, 8):
            verify(f"decode_linear {name} M={m}", kind, make_case(m, n, k, kind, dtype))
            nbytes = nbytes_of(m, n, k, kind, dtype)
            make = lambda: make_case(m, n, k, kind, dtype)  # noqa: E731
            times = {"triton": time_us(fused(kind), make, nbytes), "unfused": time_us(unfused(kind), make, nbytes)}
            rows.append(row({"layer": name, "fused": kind, "M": m, "N": n, "K": k}, nbytes, times))
    notes = (
        "fp16; triton = one decode_linear launch; unfused = the batched step's launches for the same work "
        "(Triton LayerNorm, cuBLAS F.linear, Triton bias+GELU or a residual add_)."
    )
    write_results("decode_linear", rows, notes)


if __name__ == "__main__":
    main()
