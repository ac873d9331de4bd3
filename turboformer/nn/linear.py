"""A converted linear layer for the engines: fp16/bf16 through cuBLAS, or weight-only INT8 through Triton."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from turboformer.kernels.int8_linear import int8_linear, quantize_weight


def linear_fp32_out(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight^T + bias`` returned in fp32, straight from the GEMM's fp32 accumulator (not rounded to the
    compute dtype first): for the matmuls whose results join an fp32 residual stream. x [..., K] and weight [N, K]
    in the compute dtype, bias [N] fp32 or None. On CUDA one cuBLAS call (``addmm``/``mm`` with ``out_dtype``);
    elsewhere (CPU, fp32) the same arithmetic through F.linear."""
    if x.is_cuda and x.dtype != torch.float32:
        rows = x.reshape(-1, x.shape[-1])
        if bias is None:
            out = torch.mm(rows, weight.t(), out_dtype=torch.float32)
        else:
            out = torch.addmm(bias, rows, weight.t(), out_dtype=torch.float32)
        return out.view(*x.shape[:-1], weight.shape[0])
    return F.linear(x.float(), weight.float(), bias)


class PackedLinear:
    """``y = x @ W^T + b`` with W stored once at build: in the engine dtype, or as int8 + per-row fp32 scales.

    INT8 is weight-only (activations stay fp16/bf16, fp32 accumulation): a decode step at small batch is
    bound by reading the weights, and int8 halves those bytes.
    """

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, int8: bool = False,
        group: int | None = None,
    ):  # fmt: skip
        self.int8 = int8
        self.out_features, self.in_features = weight.shape
        if int8:  # per output channel, or per ``group`` inputs (see quantize_weight)
            self.weight, self.scale = quantize_weight(weight, group)
        else:
            self.weight, self.scale = weight.to(dtype).contiguous(), None
        self.bias = None if bias is None else bias.to(dtype).contiguous()
        self.bias32 = None if bias is None else bias.float().contiguous()  # for fp32_out

    @classmethod
    def of(
        cls, linear: nn.Linear, dtype: torch.dtype, int8: bool = False, with_bias: bool = True, group: int | None = None
    ) -> PackedLinear:
        return cls(linear.weight.detach(), linear.bias.detach() if with_bias else None, dtype, int8, group)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.int8:
            return int8_linear(x, self.weight, self.scale, self.bias)
        return F.linear(x, self.weight, self.bias)

    def fp32_out(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W^T + b`` in fp32 straight from cuBLAS's fp32 accumulator for fp16/bf16 weights
        (:func:`linear_fp32_out`, with the bias kept in fp32), e.g. logits that a search compares; the INT8
        kernel's output in x's dtype otherwise."""
        if self.int8:
            return int8_linear(x, self.weight, self.scale, self.bias)
        return linear_fp32_out(x, self.weight, self.bias32)

    @property
    def nbytes(self) -> int:
        """Bytes read per call for the weight (and its scales and bias)."""
        total = self.weight.numel() * self.weight.element_size()
        for t in (self.scale, self.bias):
            total += 0 if t is None else t.numel() * t.element_size()
        return total


class Int8Linear(nn.Module):
    """Drop-in ``nn.Linear`` with a weight-only INT8 weight (per-output-channel fp32 scales): the module form of
    :class:`PackedLinear` for engines that keep the model's own ``nn.Module`` tree (Conformer, Lite Transformer,
    SAM). Weight and scale are buffers, so ``.to(device)`` moves them and ``state_dict`` holds them; the bias
    follows the activations' dtype. Forward: the Triton kernel on CUDA, the dequantising reference elsewhere.
    """

    def __init__(self, linear: nn.Linear, group: int | None = None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight, scale = quantize_weight(linear.weight.detach(), group)
        self.register_buffer("weight", weight)  # [N, K] int8
        self.register_buffer("scale", scale)  # [N] fp32 per channel, or [N, K / group] group-wise
        bias = None if linear.bias is None else linear.bias.detach().clone()
        self.register_buffer("bias", bias)  # [N] or None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return int8_linear(x, self.weight, self.scale, bias)

    def _apply(self, fn, recurse=True):
        # .half()/.to(dtype) would cast the fp32 scales: keep their exact values, follow only the device.
        scale = self.scale
        super()._apply(fn, recurse)
        self.scale = scale.to(self.weight.device)
        return self

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


def quantize_linears(
    module: nn.Module, skip: Callable[[str], bool] = lambda name: False, group: int | None = None
) -> list[str]:
    """Replace every ``nn.Linear`` under ``module`` (in place) by an :class:`Int8Linear`, except those whose
    qualified name ``skip(name)`` accepts (e.g. an output projection kept in fp16). Returns the replaced names.
    ``group``: scales per ``group`` input features (``quantize_weight``); None: per output channel.

    Weight-only INT8 (Dettmers et al., "LLM.int8()", arXiv 2208.07339, per-channel absmax without outliers):
    activations stay in the engine dtype. Call it after moving the model to its dtype, before ``.to(device)``
    or after: the int8 buffers move with the module; the fp32 scales never change dtype (``.half()`` leaves
    integer buffers alone but would cast the scales, so this module's ``_apply`` keeps them fp32).
    """
    replaced = []
    for name, child in list(module.named_modules()):
        for attr, sub in list(child.named_children()):
            qualified = f"{name}.{attr}" if name else attr
            if isinstance(sub, nn.Linear) and not skip(qualified):
                setattr(child, attr, Int8Linear(sub, group))
                replaced.append(qualified)
    return replaced
