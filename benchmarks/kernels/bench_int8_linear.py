"""Benchmark the weight-only INT8 linear layer at Whisper large-v3 shapes.

Layers: attention projections [1280, 1280], FFN up [5120, 1280] and down [1280, 5120], vocabulary
projection [51866, 1280]; M = 1/16/64 decode tokens and 1500 (one encoder window). Variants: ``triton``
(ours), ``ref`` (the PyTorch reference: dequantise then fp32 matmul) and ``cublas`` (the obvious
alternative: ``F.linear`` with the fp16/bf16 weight, which reads twice the weight bytes). Bytes model for
ours: int8 weight + fp32 scales + bias + x read once + y written once; cuBLAS's GB/s counts the fp16 weight.

Run on a CUDA machine: ``python benchmarks/kernels/bench_int8_linear.py``.
"""

import torch
import torch.nn.functional as F

from bench_common import check, require_cuda, row, time_us, write_results

LAYERS = {"attn": (1280, 1280), "fc1": (5120, 1280), "fc2": (1280, 5120), "vocab": (51866, 1280)}


def main() -> None:
    require_cuda("bench_int8_linear.py")
    from turboformer.kernels.int8_linear import int8_linear_ref, int8_linear_triton, quantize_weight

    rows = []
    for dtype in (torch.float16, torch.bfloat16):
        for layer, (n, k) in LAYERS.items():
            for m in (1, 16, 64, 1500):

                def make_inputs():
                    """(x, w_int8, scale, bias, w_lowp): the quantised layer and the same weight in fp16/bf16."""
                    w_int8, scale = quantize_weight(torch.randn(n, k, device="cuda") * 0.02)
                    w_lowp = (w_int8.float() * scale[:, None]).to(dtype)
                    x = torch.randn(m, k, device="cuda", dtype=dtype)
                    return x, w_int8, scale, torch.randn(n, device="cuda", dtype=dtype), w_lowp

                x, w_int8, scale, bias, _ = make_inputs()
                ref = int8_linear_ref(x, w_int8, scale, bias)
                check(f"int8_linear {layer} M={m}", int8_linear_triton(x, w_int8, scale, bias), ref, 2e-2, 2e-2)
                nbytes = w_int8.numel() + 4 * n + 2 * n + x.numel() * 2 + m * n * 2
                cublas_bytes = nbytes + w_int8.numel() - 4 * n  # fp16 weight, no scales
                variants = {
                    "triton": lambda x, w8, s, b, w: int8_linear_triton(x, w8, s, b),
                    "ref": lambda x, w8, s, b, w: int8_linear_ref(x, w8, s, b),
                    "cublas": lambda x, w8, s, b, w: F.linear(x, w, b),
                }
                times = {name: time_us(fn, make_inputs, nbytes) for name, fn in variants.items()}
                case = {"layer": layer, "dtype": str(dtype).removeprefix("torch."), "M": m, "N": n, "K": k}
                rows.append(row(case, nbytes, times, {"cublas": cublas_bytes}))
    notes = "cublas = F.linear with the dequantised fp16/bf16 weight; its GB/s counts those 2-byte weights."
    write_results("int8_linear", rows, notes)


if __name__ == "__main__":
    main()
