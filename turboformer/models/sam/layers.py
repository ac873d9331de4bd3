"""Small layers shared by the SAM encoder, prompt encoder and mask decoder."""

import torch
import torch.nn.functional as F
from torch import nn

from turboformer.kernels import utils
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
    """Two linear layers with an activation between them (the transformer MLP block).

    On CUDA in fp16/bf16, an exact GELU after an ``nn.Linear`` runs in cuBLASLt's GELU epilogue of the first
    product (``torch._addmm_activation``): one pass instead of a matmul plus an elementwise pass over the
    ``[tokens, 4C]`` activations (ViT-H at batch 8: 0.65 vs 0.82 ms per block on an H200,
    ``benchmarks/ab_gelu_epilogue.py``). cuBLASLt's GELU is the tanh form, which differs from the exact erf
    form by at most ~3e-4 (less than half a bf16 ulp at |x| > 0.25); it takes the fp32 product before its
    rounding, where the two-pass path rounds the product to bf16 first. The kernels-off switch
    (``use_reference``) and every other case run the two passes.
    """

    def __init__(self, dim: int, hidden_dim: int, activation: type[nn.Module]) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = activation()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[..., dim]`` -> ``[..., dim]``."""
        if self.gelu_epilogue(x):
            rows = x.reshape(-1, x.shape[-1])
            h = torch._addmm_activation(self.fc1.bias, rows, self.fc1.weight.t(), use_gelu=True)
            return self.fc2(h.view(*x.shape[:-1], -1))
        return self.fc2(self.act(self.fc1(x)))

    def gelu_epilogue(self, x: torch.Tensor) -> bool:
        """True where the first product and its exact GELU run as one cuBLASLt call (see the class)."""
        return (
            utils.use_triton(x)  # CUDA with the kernels on
            and x.dtype in (torch.float16, torch.bfloat16)
            and type(self.fc1) is nn.Linear
            and self.fc1.bias is not None
            and isinstance(self.act, nn.GELU)
            and self.act.approximate == "none"
        )


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
