"""Dynamic and lightweight convolution (Wu et al., ICLR 2019, "Pay Less Attention with Lightweight and Dynamic
Convolutions", arXiv 1901.10430, Sec. 3), the short-range branch of Lite Transformer.

Both are depth-wise 1-D convolutions whose channels are split into ``H`` heads; all ``R = C / H`` channels of a
head share one kernel of ``K`` taps, normalised by a softmax over the taps (``weight_softmax``, Sec. 3.1):

    out[b, t, h*R + r] = sum_k w[b, t, h, k] * x[b, t - P + k, h*R + r]      (x = 0 outside [0, T))

* lightweight convolution: ``w[h, k]`` is a parameter, the same at every time step (Eq. 1-2);
* dynamic convolution: ``w[b, t, h, :] = W_lin x[b, t]``, a kernel predicted from the current time step (Eq. 3).

``P`` is the left padding: ``K // 2`` (centred, encoder) or ``K - 1`` (causal, decoder). As in fairseq's
``DynamicConv1dTBC`` / ``LightweightConv1dTBC`` with ``with_linear``, the convolution sits between an input
projection ``linear1`` (C -> 2C followed by a GLU for dynamic convolutions with ``glu``, else C -> C) and an output
projection ``linear2`` (C -> C); the dynamic kernels are predicted from the *projected* input.

Each module has a full-sequence ``forward`` and a one-step ``step`` for incremental (causal) decoding that keeps the
last ``K`` projected inputs in a static ring buffer, written in place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from turboformer.kernels.dynamic_conv import dynamic_conv, dynamic_conv_step


def dynamic_conv1d(x: Tensor, weight: Tensor, padding_l: int) -> Tensor:
    """Depth-wise convolution with one (already normalised) kernel per batch row, time step and head.

    x: [B, T, C]; weight: [B, T, H, K] (or broadcastable to it, e.g. [1, 1, H, K] for lightweight kernels);
    padding_l: zeros in front of the sequence (K - 1 - padding_l zeros follow it). Returns [B, T, C].
    Runs :func:`turboformer.kernels.dynamic_conv.dynamic_conv` (Triton on CUDA, the unfold reference otherwise).
    """
    C = x.shape[-1]
    H, K = weight.shape[-2:]
    if C % H:
        raise ValueError(f"{C} channels cannot be split into {H} heads")
    if not 0 <= padding_l < K:
        raise ValueError(f"padding_l {padding_l} must be in [0, {K})")
    return dynamic_conv(x, weight, padding_l)


class _ConvBranch(nn.Module):
    """Shared projections and decoding state of the two convolution kinds; subclasses define ``logits``."""

    def __init__(self, dim: int, kernel_size: int, heads: int, padding_l: int, weight_softmax: bool) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"{dim} channels cannot be split into {heads} heads")
        self.dim, self.kernel_size, self.heads = dim, kernel_size, heads
        self.padding_l = padding_l
        self.weight_softmax = weight_softmax
        self.linear1: nn.Linear | None = None
        self.linear2: nn.Linear | None = None

    def project_in(self, x: Tensor) -> Tensor:
        """[..., C] -> [..., C]: linear1 (+ GLU)."""
        return x if self.linear1 is None else self.linear1(x)

    def logits(self, x: Tensor) -> Tensor:
        """Projected input [B, T, C] -> kernels before the softmax [B or 1, T or 1, H, K] (normalised by
        ``normalise``, or by the convolution op itself, which fuses the softmax)."""
        raise NotImplementedError

    def kernels(self, x: Tensor) -> Tensor:
        """Projected input [B, T, C] -> normalised kernels [B or 1, T or 1, H, K]."""
        return self.normalise(self.logits(x), x)

    def normalise(self, weight: Tensor, like: Tensor) -> Tensor:
        """Softmax over the K taps, computed in float32 (Sec. 3.1), returned in the activations' dtype."""
        return F.softmax(weight, dim=-1, dtype=torch.float32).to(like.dtype) if self.weight_softmax else weight

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, T, C] -> [B, T, C] over the whole sequence."""
        x = self.project_in(x)
        out = dynamic_conv(x, self.logits(x), self.padding_l, self.weight_softmax)  # softmax fused (fp32)
        return out if self.linear2 is None else self.linear2(out)

    def new_buffer(self, batch_size: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """Zeroed ring buffer [B, K, C] of projected inputs for ``step`` (causal convolutions only)."""
        if self.padding_l != self.kernel_size - 1:
            raise ValueError("incremental decoding needs a causal convolution (padding_l = kernel_size - 1)")
        return torch.zeros(batch_size, self.kernel_size, self.dim, dtype=dtype, device=device)

    def step(self, x: Tensor, buffer: Tensor, position: int) -> Tensor:
        """One causal time step. x: [B, 1, C]; buffer: [B, K, C] from ``new_buffer``, updated in place;
        position: index of this step in the sequence (0, 1, ...). Returns [B, 1, C].

        Slot ``position % K`` receives the projected input, so slot s holds time step t' with t' = s (mod K) and
        tap k (which reads x[t - K + 1 + k]) sits in slot (t + 1 + k) mod K: rolling the kernel by (t + 1) mod K
        lines it up with the slots. Slots not yet written are zero, like upstream's truncated first steps.
        """
        x = self.project_in(x)  # [B, 1, C]
        out = dynamic_conv_step(x[:, 0], buffer, self.logits(x)[:, 0], position, self.weight_softmax)  # [B, C]
        out = out[:, None]
        return out if self.linear2 is None else self.linear2(out)


class DynamicConv(_ConvBranch):
    """Dynamic convolution: kernels predicted per time step by ``weight_linear`` (no bias), optional GLU input
    projection. Parameter names follow fairseq (``linear1``, ``weight_linear``, ``linear2``)."""

    def __init__(
        self,
        dim: int,
        kernel_size: int,
        heads: int,
        padding_l: int,
        weight_softmax: bool = True,
        glu: bool = True,
        with_linear: bool = True,
    ) -> None:
        super().__init__(dim, kernel_size, heads, padding_l, weight_softmax)
        self.glu = glu and with_linear  # the GLU belongs to the input projection
        self.weight_linear = nn.Linear(dim, heads * kernel_size, bias=False)
        if with_linear:
            self.linear1 = nn.Linear(dim, 2 * dim if self.glu else dim)
            self.linear2 = nn.Linear(dim, dim)

    def project_in(self, x: Tensor) -> Tensor:
        x = super().project_in(x)
        return F.glu(x, dim=-1) if self.glu else x

    def logits(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        return self.weight_linear(x).view(B, T, self.heads, self.kernel_size)


class LightweightConv(_ConvBranch):
    """Lightweight convolution: one learned kernel per head, ``weight`` [H, K], shared by all time steps."""

    def __init__(
        self,
        dim: int,
        kernel_size: int,
        heads: int,
        padding_l: int,
        weight_softmax: bool = True,
        with_linear: bool = True,
    ) -> None:
        super().__init__(dim, kernel_size, heads, padding_l, weight_softmax)
        self.weight = nn.Parameter(torch.empty(heads, kernel_size))
        nn.init.xavier_uniform_(self.weight)
        if with_linear:
            self.linear1 = nn.Linear(dim, dim)
            self.linear2 = nn.Linear(dim, dim)

    def logits(self, x: Tensor) -> Tensor:
        return self.weight.view(1, 1, self.heads, self.kernel_size)
