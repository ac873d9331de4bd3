"""The Segment Anything model: image encoder, prompt encoder and mask decoder, passed in ready-built.

Kirillov et al., "Segment Anything" (arXiv 2304.02643), Fig. 4. The image is encoded once
(:meth:`Sam.encode_image`, the expensive part); each batch of prompts then costs one light decoder pass
(:meth:`Sam.forward`), the step a later engine captures in a CUDA graph. Image pre- and
post-processing lives in :mod:`.transforms`, the stateful API in :mod:`.predictor`.
"""

import torch
from torch import nn

from .config import SamConfig
from .image_encoder import ImageEncoder
from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder


class Sam(nn.Module):
    """SAM: ``encode_image`` once per image, then ``forward`` per batch of prompts."""

    mask_threshold: float = 0.0  # logits above this are "in the mask"

    def __init__(
        self,
        config: SamConfig,
        image_encoder: ImageEncoder,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoder,
    ) -> None:
        super().__init__()
        self.config = config
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder

    @property
    def device(self) -> torch.device:
        return self.prompt_encoder.label_embed.device

    @property
    def dtype(self) -> torch.dtype:
        """The prompt encoder's and mask decoder's dtype (that of prompt tensors and image embeddings)."""
        return self.prompt_encoder.label_embed.dtype

    @property
    def encoder_dtype(self) -> torch.dtype:
        """The image encoder's activation dtype (may differ from :attr:`dtype`, see ``engine.prepare_sam``)."""
        return self.image_encoder.pos_embed.dtype

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """``images``: ``[B, 3, 1024, 1024]`` normalised and padded -> embeddings ``[B, 256, 64, 64]``
        in the decoder's dtype."""
        return self.image_encoder(images.to(self.encoder_dtype)).to(self.dtype)

    @torch.no_grad()
    def forward(
        self,
        image_embedding: torch.Tensor,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None,
        mask_input: torch.Tensor | None,
        multimask_output: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode a batch of prompts against one image embedding.

        Args:
            image_embedding: ``[1, 256, 64, 64]``.
            point_coords: ``[B, N, 2]`` pixel (x, y) in the resized, padded 1024 frame, or None.
            point_labels: ``[B, N]`` (1 foreground, 0 background, -1 padding), or None.
            boxes: ``[B, 4]`` pixel (x0, y0, x1, y1) in that frame, or None.
            mask_input: ``[B, 1, 256, 256]`` logits from an earlier prediction, or None.
            multimask_output: three masks per prompt instead of one.

        Returns:
            low-resolution logits ``[B, M, 256, 256]`` and IoU predictions ``[B, M]`` (M = 3 or 1).
        """
        sparse, dense = self.prompt_encoder(point_coords, point_labels, boxes, mask_input)
        return self.mask_decoder(
            image_embedding, self.prompt_encoder.dense_pe(), sparse, dense, multimask_output
        )


def build_sam(config: SamConfig) -> Sam:
    """A randomly initialised SAM of the given size (load weights with :mod:`.load`)."""
    return Sam(config, ImageEncoder(config), PromptEncoder(config), MaskDecoder(config)).eval()
