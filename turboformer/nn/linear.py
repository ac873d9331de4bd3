"""A converted linear layer for the engines: fp16/bf16 through cuBLAS, or weight-only INT8 through Triton."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from turboformer.kernels.int8_linear import int8_linear, quantize_weight


class PackedLinear:
    """``y = x @ W^T + b`` with W stored once at build: in the engine dtype, or as int8 + per-row fp32 scales.

    INT8 is weight-only (activations stay fp16/bf16, fp32 accumulation): a decode step at small batch is
    bound by reading the weights, and int8 halves those bytes.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, int8: bool = False):
        self.int8 = int8
        self.out_features, self.in_features = weight.shape
        if int8:
            self.weight, self.scale = quantize_weight(weight)
        else:
            self.weight, self.scale = weight.to(dtype).contiguous(), None
        self.bias = None if bias is None else bias.to(dtype).contiguous()

    @classmethod
    def of(cls, linear: nn.Linear, dtype: torch.dtype, int8: bool = False, with_bias: bool = True) -> "PackedLinear":
        return cls(linear.weight.detach(), linear.bias.detach() if with_bias else None, dtype, int8)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.int8:
            return int8_linear(x, self.weight, self.scale, self.bias)
        return F.linear(x, self.weight, self.bias)

    @property
    def nbytes(self) -> int:
        """Bytes read per call for the weight (and its scales and bias)."""
        total = self.weight.numel() * self.weight.element_size()
        for t in (self.scale, self.bias):
            total += 0 if t is None else t.numel() * t.element_size()
        return total
