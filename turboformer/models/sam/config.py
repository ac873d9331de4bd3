"""Segment Anything model dimensions: the three released sizes, in a plain dict.

Kirillov et al., "Segment Anything", arXiv 2304.02643. The image encoder is a ViTDet-style ViT
(Li et al., arXiv 2203.16527): windowed attention in most blocks, global attention in a few, and
decomposed relative positions (MViTv2, arXiv 2112.01526). The prompt encoder and mask decoder have
the same dimensions in every released size; only the encoder changes (upstream ``build_sam.py``).
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class SamConfig:
    """All the sizes needed to build a :class:`~turboformer.models.sam.sam.Sam`.

    The defaults are ViT-B with SAM's fixed prompt/decoder dimensions.
    """

    # Image encoder (ViT)
    image_size: int = 1024  # pixels; input images are resized (long side) and padded to this square
    patch_size: int = 16  # pixels per patch side: a 1024 image is a 64 x 64 token grid
    encoder_embed_dim: int = 768
    encoder_depth: int = 12
    encoder_num_heads: int = 12
    encoder_mlp_dim: int = 3072
    encoder_global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)  # blocks with global attention
    encoder_window_size: int = 14  # tokens per window side in the other blocks
    # Prompt encoder and mask decoder (fixed in the paper)
    prompt_embed_dim: int = 256  # also the encoder neck's output channels
    mask_in_chans: int = 16  # hidden channels of the mask-prompt downscaler
    decoder_depth: int = 2  # two-way transformer layers
    decoder_num_heads: int = 8
    decoder_mlp_dim: int = 2048
    attention_downsample_rate: int = 2  # token<->image attention runs at prompt_embed_dim / 2
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    # Pixel normalisation (ImageNet statistics in 0..255 units, RGB)
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)

    def __post_init__(self) -> None:
        problems = []
        if self.image_size % self.patch_size:
            problems.append(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.encoder_embed_dim % self.encoder_num_heads:
            problems.append(
                f"encoder_embed_dim {self.encoder_embed_dim} is not divisible by "
                f"encoder_num_heads {self.encoder_num_heads}"
            )
        if any(not 0 <= i < self.encoder_depth for i in self.encoder_global_attn_indexes):
            problems.append(
                f"encoder_global_attn_indexes {self.encoder_global_attn_indexes} must lie in "
                f"[0, {self.encoder_depth})"
            )
        internal_dim = self.prompt_embed_dim // self.attention_downsample_rate
        if self.prompt_embed_dim % self.decoder_num_heads or internal_dim % self.decoder_num_heads:
            problems.append(
                f"decoder_num_heads {self.decoder_num_heads} must divide prompt_embed_dim "
                f"{self.prompt_embed_dim} and its downsampled width {internal_dim}"
            )
        if self.encoder_window_size <= 0:
            problems.append(f"encoder_window_size must be positive, got {self.encoder_window_size}")
        if problems:
            raise ValueError("invalid SAM configuration: " + "; ".join(problems))

    @property
    def image_embedding_size(self) -> int:
        """Side of the image-embedding grid in tokens (64 for 1024 / 16)."""
        return self.image_size // self.patch_size

    @property
    def low_res_mask_size(self) -> int:
        """Side of the decoder's low-resolution mask logits in pixels (4x the embedding: 256)."""
        return 4 * self.image_embedding_size


SAM_CONFIGS: dict[str, SamConfig] = {
    "vit_b": SamConfig(),
    "vit_l": SamConfig(
        encoder_embed_dim=1024,
        encoder_depth=24,
        encoder_num_heads=16,
        encoder_mlp_dim=4096,
        encoder_global_attn_indexes=(5, 11, 17, 23),
    ),
    "vit_h": SamConfig(
        encoder_embed_dim=1280,
        encoder_depth=32,
        encoder_num_heads=16,
        encoder_mlp_dim=5120,
        encoder_global_attn_indexes=(7, 15, 23, 31),
    ),
}


def config_name(config: SamConfig) -> str | None:
    """The released size ("vit_b", "vit_l", "vit_h") that ``config`` equals, or None for a custom one."""
    for name, known in SAM_CONFIGS.items():
        if known == config:
            return name
    return None
