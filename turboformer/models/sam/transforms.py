"""Image and coordinate transforms around SAM, as upstream ``ResizeLongestSide`` and ``Sam.preprocess``.

An ``H x W`` RGB image is resized so its long side is 1024 (bilinear, through PIL, as upstream's
torchvision ``resize`` does for PIL images), normalised with the ImageNet mean/std and zero-padded at
the bottom/right to ``1024 x 1024``. Prompt coordinates are scaled by the same factors. Decoder logits
(``256 x 256``) are upscaled to 1024, cropped to the resized image and resized to ``H x W``.
"""

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import SamInputError


def check_image(image: object) -> np.ndarray:
    """Return ``image`` if it is an ``[H, W, 3]`` uint8 RGB array; otherwise raise :class:`SamInputError`."""
    if not isinstance(image, np.ndarray):
        raise SamInputError(f"image must be a numpy array [H, W, 3] uint8 RGB, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise SamInputError(f"image must have shape [H, W, 3] (RGB), got {list(image.shape)}")
    if image.dtype != np.uint8:
        raise SamInputError(f"image must be uint8 with values 0..255, got dtype {image.dtype}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise SamInputError(f"image is empty: shape {list(image.shape)}")
    return image


def resized_shape(height: int, width: int, long_side: int) -> tuple[int, int]:
    """``(h, w)`` after scaling the long side to ``long_side``, rounded half up (upstream rule)."""
    scale = long_side * 1.0 / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def resize_image(image: np.ndarray, long_side: int) -> np.ndarray:
    """``[H, W, 3]`` uint8 -> ``[h, w, 3]`` uint8 with ``max(h, w) == long_side`` (PIL bilinear)."""
    h, w = resized_shape(image.shape[0], image.shape[1], long_side)
    if (h, w) == image.shape[:2]:
        return image
    return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))


def normalize_and_pad(
    image: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], size: int
) -> torch.Tensor:
    """``[B, 3, h, w]`` pixels in 0..255 -> ``[B, 3, size, size]`` float32, normalised, zero-padded
    at the bottom and right."""
    mean_t = torch.tensor(mean, dtype=torch.float32, device=image.device).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=image.device).view(-1, 1, 1)
    x = (image - mean_t) / std_t
    h, w = x.shape[-2:]
    return F.pad(x, (0, size - w, 0, size - h))


def scale_coords(coords: np.ndarray, original_size: tuple[int, int], long_side: int) -> np.ndarray:
    """Pixel (x, y) ``[..., 2]`` in the original image -> the resized frame (float64 copy)."""
    old_h, old_w = original_size
    new_h, new_w = resized_shape(old_h, old_w, long_side)
    coords = np.array(coords, dtype=np.float64)
    coords[..., 0] = coords[..., 0] * (new_w / old_w)
    coords[..., 1] = coords[..., 1] * (new_h / old_h)
    return coords


def scale_boxes(boxes: np.ndarray, original_size: tuple[int, int], long_side: int) -> np.ndarray:
    """Boxes (x0, y0, x1, y1) ``[..., 4]`` in the original image -> ``[B, 4]`` in the resized frame."""
    return scale_coords(np.asarray(boxes).reshape(-1, 2, 2), original_size, long_side).reshape(-1, 4)


def postprocess_masks(
    low_res: torch.Tensor, input_size: tuple[int, int], original_size: tuple[int, int], image_size: int
) -> torch.Tensor:
    """Decoder logits ``[B, M, 256, 256]`` -> logits ``[B, M, H, W]`` on the original image.

    Bilinear upscale to the padded ``image_size`` square, crop the padding away (``input_size`` is
    the resized image), bilinear resize to ``original_size``; all with ``align_corners=False``.
    """
    masks = F.interpolate(low_res, (image_size, image_size), mode="bilinear", align_corners=False)
    masks = masks[..., : input_size[0], : input_size[1]]
    return F.interpolate(masks, original_size, mode="bilinear", align_corners=False)
