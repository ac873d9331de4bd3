"""A/B: the SAM encoder MLP's first layer + GELU as two passes (``F.linear`` then ``F.gelu``, exact erf) against
cuBLASLt's GELU epilogue (``torch._addmm_activation(..., use_gelu=True)``, one pass), bf16, at the ViT-B/H
fc1 shapes of a batch of 8 (32,768 tokens). Reports ms of each and the epilogue's max error against the exact
(erf) and the tanh GELU of the exact (fp64) product, beside the bf16 rounding of the exact result.

    python benchmarks/ab_gelu_epilogue.py
"""

import sys

import torch
import torch.nn.functional as F

from turboformer.benchmark.common import median_ms

SHAPES = {"vit_b": (768, 3072), "vit_h": (1280, 5120)}


def main() -> int:
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    for name, (dim, hidden) in SHAPES.items():
        x = torch.randn(32768, dim, device="cuda", dtype=torch.bfloat16)
        w = (torch.randn(hidden, dim, device="cuda") * dim**-0.5).to(torch.bfloat16)
        b = (0.1 * torch.randn(hidden, device="cuda")).to(torch.bfloat16)
        two = median_ms(lambda: F.gelu(F.linear(x, w, b)), 20, "cuda", 3)
        one = median_ms(lambda: torch._addmm_activation(b, x, w.t(), use_gelu=True), 20, "cuda", 3)
        pre = F.linear(x.double(), w.double(), b.double())  # the exact product (the epilogue takes fp32, unrounded)
        fused = torch._addmm_activation(b, x, w.t(), use_gelu=True).double()
        err_erf = (fused - F.gelu(pre)).abs().max().item()
        err_tanh = (fused - F.gelu(pre, approximate="tanh")).abs().max().item()
        rounding = (F.gelu(pre).to(torch.bfloat16).double() - F.gelu(pre)).abs().max().item()
        print(f"{name}: linear+gelu {two:.3f} ms, epilogue {one:.3f} ms ({two / one:.2f}x); epilogue max err vs "
              f"erf {err_erf:.3g}, vs tanh {err_tanh:.3g}; bf16 rounding of the exact result {rounding:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
