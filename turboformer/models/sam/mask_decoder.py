"""SAM mask decoder: a two-way transformer, a 4x upscaler and per-token hypernetwork heads.

Kirillov et al., "Segment Anything" (arXiv 2304.02643), Sec. 3 and Appendix A. Learned output tokens
(one IoU token, ``1 + num_multimask_outputs`` mask tokens) are prepended to the sparse prompt tokens.
After the transformer, the image tokens are upscaled 4x (64 -> 256) to 32 channels; each mask token
goes through its own 3-layer MLP to 32 weights, and a mask is the dot product of those weights with
every upscaled pixel. The IoU token predicts each mask's quality.

Mask 0 is the single-mask output; masks 1..3 are the three "multimask" outputs for ambiguous prompts.
"""

import torch
import torch.nn.functional as F
from torch import nn

from turboformer.kernels.channel_layer_norm import channel_layer_norm
from turboformer.kernels.mask_head import mask_head

from .config import SamConfig
from .layers import MLP, LayerNorm2d
from .transformer import TwoWayTransformer


class Upscaler(nn.Module):
    """``[B, C, h, w]`` -> ``[B, C / 8, 4h, 4w]``: two stride-2 transposed convolutions.

    In fp32 it runs upstream's exact ops (the parity path). In fp16/bf16 the first stage's LayerNorm2d +
    GELU is one Triton pass (:func:`~turboformer.kernels.channel_layer_norm.channel_layer_norm`), and the
    decoder skips :meth:`forward` for :meth:`masks`, which fuses the second stage into the mask product.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv1 = nn.ConvTranspose2d(dim, dim // 4, kernel_size=2, stride=2)
        self.norm = LayerNorm2d(dim // 4)
        self.conv2 = nn.ConvTranspose2d(dim // 4, dim // 8, kernel_size=2, stride=2)
        self.act = nn.GELU()

    def stage1(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, C, h, w]`` -> ``gelu(norm(conv1(x)))`` ``[B, C / 4, 2h, 2w]``. In fp16/bf16 the
        convolution's bias is added inside the LayerNorm pass (cuDNN's transposed convolution adds it in a pass
        of its own: 0.19 ms at 64 prompts on the H200)."""
        if x.dtype == torch.float32:
            return self.act(self.norm(self.conv1(x)))
        x = F.conv_transpose2d(x, self.conv1.weight, None, stride=2)
        return channel_layer_norm(x, self.norm.weight, self.norm.bias, self.norm.eps, gelu=True, shift=self.conv1.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, C, h, w]`` -> ``[B, C / 8, 4h, 4w]``."""
        return self.act(self.conv2(self.stage1(x)))

    def masks(self, x: torch.Tensor, hyper_in: torch.Tensor) -> torch.Tensor:
        """Mask logits ``hyper_in @ forward(x)`` over the channels: ``x [B, C, h, w]``, ``hyper_in
        [B, M, C / 8]`` -> ``[B, M, 4h, 4w]`` float32.

        The logits are thresholded at 0: in fp16/bf16 the 32-term product runs in fp32 and returns fp32
        logits, so no output rounding (2^-9 relative in bf16) moves pixels across the threshold. There the
        second stage and the product are one Triton kernel
        (:func:`~turboformer.kernels.mask_head.mask_head`) that never stores the ``[B, C / 8, 4h, 4w]`` map.
        """
        if x.dtype == torch.float32:  # upstream's ops
            upscaled = self.forward(x)
            b, c, h, w = upscaled.shape
            return (hyper_in @ upscaled.view(b, c, h * w)).view(b, -1, h, w)
        return mask_head(self.stage1(x), self.conv2.weight, self.conv2.bias, hyper_in)


class MaskDecoder(nn.Module):
    """Image embedding + prompt embeddings -> low-resolution mask logits and IoU predictions."""

    def __init__(self, config: SamConfig) -> None:
        super().__init__()
        dim = config.prompt_embed_dim
        self.num_mask_tokens = config.num_multimask_outputs + 1
        self.output_tokens = nn.Parameter(torch.randn(1 + self.num_mask_tokens, dim))  # IoU, then masks
        self.transformer = TwoWayTransformer(config)
        self.upscale = Upscaler(dim)
        self.hypernet_mlps = nn.ModuleList(MLP(dim, dim, dim // 8, 3) for _ in range(self.num_mask_tokens))
        self.iou_head = MLP(dim, config.iou_head_hidden_dim, self.num_mask_tokens, config.iou_head_depth)

    def forward(
        self,
        image_embedding: torch.Tensor,
        image_pe: torch.Tensor,
        sparse: torch.Tensor,
        dense: torch.Tensor,
        multimask_output: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Predict masks for a batch of prompts on one image.

        Args:
            image_embedding: ``[1, C, 64, 64]`` from the image encoder.
            image_pe: ``[1, C, 64, 64]`` position encoding of that grid.
            sparse: ``[B, N, C]`` point/box tokens.
            dense: ``[B, C, 64, 64]`` mask-prompt (or no-mask) embedding.
            multimask_output: return the three multimask outputs instead of the single mask.

        Returns:
            low-resolution mask logits ``[B, M, 256, 256]`` and IoU predictions ``[B, M]``, with
            ``M`` = 3 if ``multimask_output`` else 1.
        """
        masks, iou_pred = self.predict_all(image_embedding, image_pe, sparse, dense)
        return select_outputs(masks, iou_pred, multimask_output)

    def predict_all(
        self, image_embedding: torch.Tensor, image_pe: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All ``1 + num_multimask_outputs`` masks ``[B, 4, 256, 256]`` and IoU predictions ``[B, 4]``
        (arguments as :meth:`forward`); the graphed engine captures this and selects afterwards."""
        batch = sparse.shape[0]
        tokens = torch.cat([self.output_tokens.unsqueeze(0).expand(batch, -1, -1), sparse], dim=1)
        if dense.stride(0) == 0:
            # One dense map for every prompt (no mask input: the learned no-mask embedding, expanded). Upstream
            # repeats the image embedding per prompt; here its sum with the dense map stays one [1, C, 64, 64]
            # map, and the transformer's image side is shared by the prompts until the image tokens first
            # attend to them (the same values, computed once instead of B times).
            dense = dense[:1]
        src = image_embedding + dense  # [B or 1, C, 64, 64]
        c, h, w = src.shape[1:]

        hs, src = self.transformer(src, image_pe, tokens)  # [B, Nt, C], [B, hw, C]
        iou_token = hs[:, 0, :]
        mask_tokens = hs[:, 1 : 1 + self.num_mask_tokens, :]  # [B, 4, C]

        hyper_in = torch.stack([mlp(mask_tokens[:, i, :]) for i, mlp in enumerate(self.hypernet_mlps)], dim=1)
        # [B, hw, C] token-major features as a [B, C, h, w] map: channels-last, which the kernels read in place
        masks = self.upscale.masks(src.transpose(1, 2).view(batch, c, h, w), hyper_in)  # [B, 4, 256, 256] fp32
        return masks, self.iou_head(iou_token).float()  # [B, 4, 256, 256], [B, 4]


def select_outputs(
    masks: torch.Tensor, iou_pred: torch.Tensor, multimask_output: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask 0 (single-mask output) or masks 1..3 (multimask) of ``[B, 4, ...]`` logits and ``[B, 4]`` IoUs."""
    selected = slice(1, None) if multimask_output else slice(0, 1)
    return masks[:, selected], iou_pred[:, selected]
