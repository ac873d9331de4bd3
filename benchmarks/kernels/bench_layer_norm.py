"""Benchmark LayerNorm and fused add + LayerNorm at Whisper large-v3 shapes (d_model 1280).

Variants: ``triton`` (ours), ``ref`` (the PyTorch reference, fp32 math) and ``torch`` (the obvious
alternative: ``F.layer_norm`` in the model dtype; for add + LayerNorm, ``h = x + delta`` then
``F.layer_norm(h)``). Bytes model: LayerNorm reads x and writes y; add + LayerNorm reads x and delta and
writes h and y (weights of 2 * 1280 floats are noise).

Run on a CUDA machine: ``python benchmarks/kernels/bench_layer_norm.py``.
"""

import torch
import torch.nn.functional as F

from bench_common import check, require_cuda, row, time_us, write_results

D_MODEL = 1280
ROWS = [1, 16, 64, 1500, 24000]  # decode batches 1/16/64; one encoder window; 16 windows
EPS = 1e-5


def main() -> None:
    require_cuda("bench_layer_norm.py")
    from turboformer.kernels.layer_norm import (
        add_layer_norm_ref,
        add_layer_norm_triton,
        layer_norm_ref,
        layer_norm_triton,
    )

    rows = []
    for dtype in (torch.float16, torch.bfloat16):
        weight, bias = torch.randn(D_MODEL, device="cuda"), torch.randn(D_MODEL, device="cuda")
        w_lowp, b_lowp = weight.to(dtype), bias.to(dtype)
        for m in ROWS:

            def make_inputs():
                return tuple(torch.randn(m, D_MODEL, device="cuda", dtype=dtype) for _ in range(2))  # x, delta

            x, delta = make_inputs()
            size = x.numel() * x.element_size()
            case = {"dtype": str(dtype).removeprefix("torch."), "rows": m, "N": D_MODEL}

            y, y_ref = layer_norm_triton(x, weight, bias, EPS), layer_norm_ref(x, weight, bias, EPS)
            check("layer_norm", y, y_ref, 2e-2, 1e-2)
            variants = {
                "triton": lambda x, _: layer_norm_triton(x, weight, bias, EPS),
                "ref": lambda x, _: layer_norm_ref(x, weight, bias, EPS),
                "torch": lambda x, _: F.layer_norm(x, (D_MODEL,), w_lowp, b_lowp, EPS),
            }
            times = {name: time_us(fn, make_inputs, 2 * size) for name, fn in variants.items()}
            rows.append(row({"op": "layer_norm", **case}, 2 * size, times))

            h, y = add_layer_norm_triton(x, delta, weight, bias, EPS)
            h_ref, y_ref = add_layer_norm_ref(x, delta, weight, bias, EPS)
            check("add_layer_norm h", h, h_ref, 0, 0)
            check("add_layer_norm y", y, y_ref, 2e-2, 1e-2)
            variants = {
                "triton": lambda x, d: add_layer_norm_triton(x, d, weight, bias, EPS),
                "ref": lambda x, d: add_layer_norm_ref(x, d, weight, bias, EPS),
                "torch": lambda x, d: F.layer_norm(x + d, (D_MODEL,), w_lowp, b_lowp, EPS),
            }
            times = {name: time_us(fn, make_inputs, 4 * size) for name, fn in variants.items()}
            rows.append(row({"op": "add_layer_norm", **case}, 4 * size, times))
    write_results("layer_norm", rows, "torch = F.layer_norm in the model dtype (after x + delta for the fused op).")


if __name__ == "__main__":
    main()
