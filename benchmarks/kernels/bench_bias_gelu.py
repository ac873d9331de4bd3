"""Benchmark bias + exact GELU at Whisper large-v3 FFN shapes ([tokens, 5120]).

Variants: ``triton`` (ours), ``ref`` (the PyTorch reference, fp32 math) and ``torch`` (the obvious
alternative: ``F.gelu(x + bias)`` in the model dtype, two kernels). Bytes model: read x, write y.

Run on a CUDA machine: ``python benchmarks/kernels/bench_bias_gelu.py``.
"""

import torch
import torch.nn.functional as F

from bench_common import check, require_cuda, row, time_us, write_results

D_FFN = 5120
ROWS = [1, 16, 64, 1500, 24000]  # decode batches 1/16/64; one encoder window; 16 windows


def main() -> None:
    require_cuda("bench_bias_gelu.py")
    from turboformer.kernels.bias_gelu import bias_gelu_ref, bias_gelu_triton

    rows = []
    for dtype in (torch.float16, torch.bfloat16):
        bias = torch.randn(D_FFN, device="cuda", dtype=dtype)
        for m in ROWS:

            def make_inputs():
                return (torch.randn(m, D_FFN, device="cuda", dtype=dtype) * 3,)

            (x,) = make_inputs()
            check("bias_gelu", bias_gelu_triton(x, bias), bias_gelu_ref(x, bias), 2e-2, 1e-2)
            nbytes = 2 * x.numel() * x.element_size()
            variants = {
                "triton": lambda x: bias_gelu_triton(x, bias),
                "ref": lambda x: bias_gelu_ref(x, bias),
                "torch": lambda x: F.gelu(x + bias),
            }
            times = {name: time_us(fn, make_inputs, nbytes) for name, fn in variants.items()}
            rows.append(row({"dtype": str(dtype).removeprefix("torch."), "rows": m, "N": D_FFN}, nbytes, times))
    write_results("bias_gelu", rows, "torch = F.gelu(x + bias) in the model dtype.")


if __name__ == "__main__":
    main()
