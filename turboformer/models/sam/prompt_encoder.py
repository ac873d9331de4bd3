"""SAM prompt encoder: points and boxes to sparse tokens, a mask prompt to a dense map.

Kirillov et al., "Segment Anything" (arXiv 2304.02643), Sec. 3 and Appendix A. A point or box corner
is its random-Fourier-feature position encoding (Tancik et al., arXiv 2006.10739) plus a learned
embedding of its kind. A low-resolution mask prompt is downscaled 4x by convolutions to the image
embedding grid; without one, a learned "no mask" vector fills that grid.

Point labels follow upstream: 1 foreground, 0 background, -1 padding ("not a point"). Internally a
box is two more points with the kinds 2 (top-left) and 3 (bottom-right), so all five kinds live in one
``[5, C]`` table indexed by ``label + 1``.
"""

import math

import torch
from torch import nn

from .config import SamConfig
from .layers import LayerNorm2d

NOT_A_POINT = -1  # label of padding points: their position encoding is zeroed
BOX_TOP_LEFT, BOX_BOTTOM_RIGHT = 2, 3  # internal labels of a box's two corners


class RandomFourierPositions(nn.Module):
    """Position encoding ``[sin(2 pi (2p - 1) G), cos(2 pi (2p - 1) G)]`` for p in ``[0, 1]^2``.

    ``G`` is a fixed ``[2, C / 2]`` Gaussian matrix stored in the checkpoint. The encoding is computed
    in float32 whatever the model's dtype: the sin/cos arguments reach tens of radians, whose phase a
    bfloat16 argument would lose; ``load_sam`` keeps ``G`` itself in float32 for the same reason.
    """

    def __init__(self, num_pos_feats: int) -> None:
        super().__init__()
        self.register_buffer("gaussian", torch.randn(2, num_pos_feats))

    def encode(self, coords: torch.Tensor) -> torch.Tensor:
        """``coords``: ``[..., 2]`` (x, y) in ``[0, 1]``, float32 -> ``[..., C]`` float32."""
        coords = 2 * coords - 1
        coords = 2 * math.pi * (coords @ self.gaussian.to(coords.dtype))
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def encode_pixels(self, coords: torch.Tensor, image_size: int) -> torch.Tensor:
        """``coords``: ``[B, N, 2]`` pixel (x, y) in the padded ``image_size`` square -> ``[B, N, C]``.

        Normalised in the input's own precision (float64 from the automatic generator, as upstream)
        and only then cast to float32.
        """
        return self.encode((coords / image_size).to(torch.float32))

    def grid(self, size: int) -> torch.Tensor:
        """Encoding of the centres of a ``size x size`` grid over ``[0, 1]^2``: ``[C, size, size]``."""
        centers = (torch.arange(size, device=self.gaussian.device, dtype=torch.float32) + 0.5) / size
        y, x = torch.meshgrid(centers, centers, indexing="ij")  # [size, size] each
        return self.encode(torch.stack([x, y], dim=-1)).permute(2, 0, 1)


class PromptEncoder(nn.Module):
    """Points, boxes and masks -> sparse ``[B, N, C]`` and dense ``[B, C, 64, 64]`` prompt embeddings."""

    def __init__(self, config: SamConfig) -> None:
        super().__init__()
        dim, hidden = config.prompt_embed_dim, config.mask_in_chans
        self.image_size = config.image_size
        self.embedding_size = config.image_embedding_size
        self.pe = RandomFourierPositions(dim // 2)
        # Rows: not-a-point (-1), background (0), foreground (1), box top-left (2), box bottom-right (3)
        self.label_embed = nn.Parameter(torch.randn(5, dim))
        self.no_mask_embed = nn.Parameter(torch.randn(1, dim))
        self.mask_downscale = MaskDownscaler(hidden, dim)

    def dense_pe(self) -> torch.Tensor:
        """Position encoding of the image-embedding grid: ``[1, C, 64, 64]``."""
        return self.pe.grid(self.embedding_size).unsqueeze(0).to(self.label_embed.dtype)

    def embed_points(self, points: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        """``points`` ``[B, N, 2]`` pixels, ``labels`` ``[B, N]`` -> ``[B, N (+1 if pad), C]``.

        Without a box, upstream appends one padding point (label -1) to every prompt.
        """
        points = points + 0.5  # pixel centre
        if pad:
            points = torch.cat([points, points.new_zeros(points.shape[0], 1, 2)], dim=1)
            labels = torch.cat([labels, labels.new_full((labels.shape[0], 1), NOT_A_POINT)], dim=1)
        pe = self.pe.encode_pixels(points, self.image_size).to(self.label_embed.dtype)
        pe = torch.where((labels == NOT_A_POINT)[..., None], 0.0, pe)
        return pe + self.label_embed[(labels + 1).long()]

    def embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """``boxes`` ``[B, 4]`` pixels (x0, y0, x1, y1) -> two corner tokens ``[B, 2, C]``."""
        corners = (boxes + 0.5).reshape(-1, 2, 2)  # pixel centres, [B, 2, 2]
        pe = self.pe.encode_pixels(corners, self.image_size).to(self.label_embed.dtype)
        return pe + self.label_embed[BOX_TOP_LEFT + 1 : BOX_BOTTOM_RIGHT + 2]  # rows 3 and 4, [2, C]

    def forward(
        self,
        points: torch.Tensor | None,
        labels: torch.Tensor | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed any combination of prompts (shapes already validated by the caller).

        Args:
            points: ``[B, N, 2]`` pixel (x, y) in the resized, padded frame, or None.
            labels: ``[B, N]`` labels of ``points`` (1, 0 or -1), or None.
            boxes: ``[B, 4]`` pixel (x0, y0, x1, y1) in the same frame, or None.
            masks: ``[B, 1, 256, 256]`` mask logits from an earlier prediction, or None.

        Returns:
            sparse ``[B, N', C]`` (points, a padding point if there is no box, then the box corners)
            and dense ``[B, C, 64, 64]``. ``B`` is the points', else the boxes', else the masks' batch,
            else 1.
        """
        batch = next((x.shape[0] for x in (points, boxes, masks) if x is not None), 1)
        tokens = [self.label_embed.new_empty(batch, 0, self.label_embed.shape[1])]
        if points is not None:
            tokens.append(self.embed_points(points, labels, pad=boxes is None))
        if boxes is not None:
            tokens.append(self.embed_boxes(boxes))
        sparse = torch.cat(tokens, dim=1)
        if masks is not None:
            dense = self.mask_downscale(masks)
        else:
            size = self.embedding_size
            dense = self.no_mask_embed.reshape(1, -1, 1, 1).expand(batch, -1, size, size)
        return sparse, dense


class MaskDownscaler(nn.Module):
    """``[B, 1, 256, 256]`` mask logits -> ``[B, C, 64, 64]``: two stride-2 convs and a 1x1 conv."""

    def __init__(self, hidden: int, dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, hidden // 4, kernel_size=2, stride=2)
        self.norm1 = LayerNorm2d(hidden // 4)
        self.conv2 = nn.Conv2d(hidden // 4, hidden, kernel_size=2, stride=2)
        self.norm2 = LayerNorm2d(hidden)
        self.conv3 = nn.Conv2d(hidden, dim, kernel_size=1)
        self.act = nn.GELU()

    def forward(self, masks: torch.Tensor) -> torch.Tensor:
        """``masks``: ``[B, 1, 4h, 4w]`` logits (any float dtype) -> ``[B, C, h, w]`` in the layers' dtype."""
        x = self.act(self.norm1(self.conv1(masks.to(self.conv1.weight.dtype))))
        x = self.act(self.norm2(self.conv2(x)))
        return self.conv3(x)
