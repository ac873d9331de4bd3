"""Small layers shared by the SAM encoder, prompt encoder and mask decoder."""

import torch
import torch.nn.functional as F
from torch import nn

from turboformer.kernels.channel_layer_norm import channel_layer_norm, channel_layer_norm_ref


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a ``[B, C, H, W]`` map (ConvNeXt, arXiv 2201.03545).

    fp32 runs upstream SAM's ops (mean, variance, sqrt, affine) in its order, bit-exact with it
    (:func:`~turboformer.kernels.channel_layer_norm.channel_layer_norm_ref`); ``F.layer_norm`` on a permuted
    view computes the same maths in another order. fp16/bf16 inputs are normalised in fp32 (statistics over up
    to 256 channels lose digits in 8 mantissa bits) and the result cast back, in one Triton pass on CUDA
    (:func:`~turboformer.kernels.channel_layer_norm.channel_layer_norm`).
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, C, H, W]`` -> ``[B, C, H, W]``."""
        if x.dtype != torch.float32:
            return channel_layer_norm(x, self.weight, self.bias, self.eps)
        return channel_layer_norm_ref(x, self.weight, self.bias, self.eps)  # upstream's ops, in its order


class FeedForward(nn.Module):
    """Two linear layers with an activation between them (the transformer MLP block)."""

    def __init__(self, dim: int, hidden_dim: int, activation: type[nn.Module]) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = activation()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[..., dim]`` -> ``[..., dim]``."""
        return self.fc2(self.act(self.fc1(x)))


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (MaskFormer's prediction heads)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip(dims_in, dims_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[..., input_dim]`` -> ``[..., output_dim]``."""
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return self.layers[-1](x)
