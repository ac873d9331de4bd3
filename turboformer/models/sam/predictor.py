"""Stateful SAM API (as upstream ``SamPredictor``): embed an image once, then prompt it many times.

    predictor = SamPredictor(load_sam("sam_vit_b.pth"))
    predictor.set_image(image)                     # [H, W, 3] uint8 RGB: one encoder pass
    result = predictor.predict(point_coords=np.array([[500, 375]]), point_labels=np.array([1]))
    result.masks                                   # [3, H, W] bool (multimask by default)

``set_images`` embeds several images in one batched encoder pass; ``image_index`` then picks the one
to prompt. ``predict`` takes one prompt in original-image pixels and returns numpy arrays;
``predict_torch`` takes a batch of prompts already in the model's 1024 frame (see ``scale_coords``)
and returns tensors.

On CUDA the prompts go through :class:`.engine.PromptDecoderEngine`: prompt batches padded to buckets
and replayed as CUDA graphs (``cuda_graphs=False`` keeps the eager model). Logits and IoU predictions
are returned in float32 whatever the model's dtype.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from turboformer.runtime.cuda_graphs import DEFAULT_BUCKETS

from .engine import PromptDecoderEngine
from .errors import SamInputError
from .mask_decoder import select_outputs
from .sam import Sam
from .transforms import (
    check_image,
    normalize_and_pad,
    postprocess_masks,
    resize_image,
    scale_boxes,
    scale_coords,
)

VALID_LABELS = (-1, 0, 1)  # padding, background, foreground


@dataclass(frozen=True)
class EncodedImage:
    """One image's embedding and the sizes needed to map prompts and masks to and from it."""

    embedding: torch.Tensor  # [1, 256, 64, 64]
    original_size: tuple[int, int]  # (H, W) of the image given
    input_size: tuple[int, int]  # (h, w) after resizing the long side to 1024, before padding


@dataclass(frozen=True)
class SamPrediction:
    """Masks for one prompt (``predict``: numpy, no batch axis) or a batch (``predict_torch``: tensors).

    ``masks`` is ``[(B,) M, H, W]`` bool on the original image (float logits with ``return_logits``),
    ``iou_predictions`` ``[(B,) M]`` the predicted mask quality, ``low_res_logits`` ``[(B,) M, 256, 256]``
    (can be fed back as ``mask_input``). ``M`` is 3 with ``multimask_output``, else 1.
    """

    masks: np.ndarray | torch.Tensor
    iou_predictions: np.ndarray | torch.Tensor
    low_res_logits: np.ndarray | torch.Tensor


class SamPredictor:
    """Embed images with a :class:`Sam` model and predict masks from point, box and mask prompts."""

    def __init__(
        self, model: Sam, cuda_graphs: bool | None = None, decoder_buckets: tuple[int, ...] = DEFAULT_BUCKETS
    ) -> None:
        """``cuda_graphs``: decode prompts with the graphed engine (default: when the model is on CUDA);
        ``decoder_buckets``: the prompt batch sizes it captures (larger batches run in chunks)."""
        self.model = model
        self.image_size = model.config.image_size
        self.images: list[EncodedImage] = []
        use_engine = model.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self.decoder = PromptDecoderEngine(model, decoder_buckets, cuda_graphs=True) if use_engine else None

    def reset_image(self) -> None:
        """Forget the embedded images."""
        self.images = []

    def set_image(self, image: np.ndarray) -> None:
        """Embed one ``[H, W, 3]`` uint8 RGB image (replaces any embedded before)."""
        self.set_images([image])

    @torch.no_grad()
    def set_images(self, images: Sequence[np.ndarray]) -> None:
        """Embed ``[H, W, 3]`` uint8 RGB images (any sizes) in one batched encoder pass."""
        if len(images) == 0:
            raise SamInputError("set_images needs at least one image")
        cfg = self.model.config
        batch, sizes = [], []
        for image in images:
            check_image(image)
            resized = resize_image(image, self.image_size)  # [h, w, 3] uint8
            pixels = torch.tensor(resized, device=self.model.device).permute(2, 0, 1).contiguous()[None]
            batch.append(normalize_and_pad(pixels, cfg.pixel_mean, cfg.pixel_std, self.image_size))
            sizes.append((image.shape[:2], resized.shape[:2]))
        embeddings = self.model.encode_image(torch.cat(batch))  # [B, 256, 64, 64]
        self.images = [
            EncodedImage(embeddings[i : i + 1], tuple(original), tuple(resized))
            for i, (original, resized) in enumerate(sizes)
        ]

    def image(self, image_index: int = 0) -> EncodedImage:
        """The embedded image ``image_index`` (raises if none is set)."""
        if not self.images:
            raise SamInputError("no image is set: call set_image() or set_images() before predicting")
        if not 0 <= image_index < len(self.images):
            raise SamInputError(f"image_index {image_index} is out of range: {len(self.images)} image(s) are set")
        return self.images[image_index]

    def get_image_embedding(self, image_index: int = 0) -> torch.Tensor:
        """The image embedding ``[1, 256, 64, 64]``."""
        return self.image(image_index).embedding

    def scale_coords(self, coords: np.ndarray, image_index: int = 0) -> np.ndarray:
        """Original-image pixel (x, y) ``[..., 2]`` -> the model's 1024 frame, for ``predict_torch``."""
        return scale_coords(coords, self.image(image_index).original_size, self.image_size)

    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        image_index: int = 0,
    ) -> SamPrediction:
        """Predict masks for one prompt given in original-image pixels.

        Args:
            point_coords: ``[N, 2]`` pixel (x, y), inside the image.
            point_labels: ``[N]``: 1 foreground, 0 background (-1 padding).
            box: ``[4]`` pixel (x0, y0, x1, y1) with x0 <= x1, y0 <= y1, inside the image.
            mask_input: ``[1, 256, 256]`` logits, typically ``low_res_logits`` of an earlier call.
            multimask_output: return 3 masks (best for one ambiguous click) instead of 1.
            return_logits: return mask logits instead of booleans.
            image_index: which of the images given to ``set_images``.

        Returns:
            :class:`SamPrediction` of numpy arrays: masks ``[M, H, W]``, IoU ``[M]``, logits ``[M, 256, 256]``.
        """
        encoded = self.image(image_index)
        height, width = encoded.original_size
        coords_t = labels_t = box_t = mask_t = None
        if point_coords is not None or point_labels is not None:
            coords, labels = _check_points(point_coords, point_labels, width, height)
            coords_t = torch.as_tensor(scale_coords(coords, encoded.original_size, self.image_size),
                                       dtype=torch.float32, device=self.model.device)[None]
            labels_t = torch.as_tensor(labels, dtype=torch.int32, device=self.model.device)[None]
        if box is not None:
            box = _check_box(box, width, height)
            box_t = torch.as_tensor(scale_boxes(box, encoded.original_size, self.image_size),
                                    dtype=torch.float32, device=self.model.device)
        if mask_input is not None:
            size = self.model.config.low_res_mask_size
            mask_input = np.asarray(mask_input)
            if mask_input.shape != (1, size, size):
                raise SamInputError(f"mask_input must have shape [1, {size}, {size}], got {list(mask_input.shape)}")
            mask_t = torch.as_tensor(mask_input, dtype=torch.float32, device=self.model.device)[None]
        result = self.predict_torch(coords_t, labels_t, box_t, mask_t, multimask_output, return_logits, image_index)
        fields = (result.masks, result.iou_predictions, result.low_res_logits)
        return SamPrediction(*(_numpy(x[0]) for x in fields))  # drop the prompt batch axis

    @torch.no_grad()
    def predict_torch(
        self,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        image_index: int = 0,
    ) -> SamPrediction:
        """Predict masks for a batch of B prompts already in the model's 1024 frame.

        Args:
            point_coords: ``[B, N, 2]`` pixel (x, y) in the resized frame (``scale_coords``).
            point_labels: ``[B, N]`` (1, 0, or -1 to pad prompts with fewer points).
            boxes: ``[B, 4]`` (x0, y0, x1, y1) in the resized frame.
            mask_input: ``[B, 1, 256, 256]`` logits.
            multimask_output, return_logits, image_index: as in :meth:`predict`.

        Returns:
            :class:`SamPrediction` of tensors: masks ``[B, M, H, W]``, IoU ``[B, M]``,
            logits ``[B, M, 256, 256]``.
        """
        encoded = self.image(image_index)
        _check_prompt_batch(point_coords, point_labels, boxes, mask_input, self.model.config.low_res_mask_size)
        if mask_input is not None:
            mask_input = mask_input.to(self.model.dtype)
        if self.decoder is not None:
            all_masks = self.decoder.decode(encoded.embedding, point_coords, point_labels, boxes, mask_input)
            low_res, iou = select_outputs(*all_masks, multimask_output)
        else:
            low_res, iou = self.model(
                encoded.embedding, point_coords, point_labels, boxes, mask_input, multimask_output
            )
        low_res, iou = low_res.float(), iou.float()  # no-ops for an fp32 model
        masks = postprocess_masks(low_res, encoded.input_size, encoded.original_size, self.image_size)
        if not return_logits:
            masks = masks > self.model.mask_threshold
        return SamPrediction(masks, iou, low_res)


def _numpy(x: torch.Tensor) -> np.ndarray:
    """A CPU numpy copy; float tensors as float32 (numpy has no bfloat16)."""
    return (x if x.dtype == torch.bool else x.float()).cpu().numpy()


def _check_points(coords: object, labels: object, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Validate one prompt's points (original-image pixels) and labels; return them as arrays."""
    if coords is None or labels is None:
        raise SamInputError("point_coords and point_labels must be given together")
    coords, labels = np.asarray(coords, dtype=np.float64), np.asarray(labels)
    if coords.ndim != 2 or coords.shape[1] != 2 or coords.shape[0] == 0:
        raise SamInputError(f"point_coords must have shape [N, 2] with N >= 1, got {list(coords.shape)}")
    if labels.shape != (coords.shape[0],):
        raise SamInputError(f"point_labels must have shape [{coords.shape[0]}], got {list(labels.shape)}")
    if not np.all(np.isin(labels, VALID_LABELS)):
        raise SamInputError(
            f"point_labels must be 1 (foreground), 0 (background) or -1 (padding), got {labels.tolist()}"
        )
    inside = np.isfinite(coords).all(1) & (coords[:, 0] >= 0) & (coords[:, 0] <= width)
    inside &= (coords[:, 1] >= 0) & (coords[:, 1] <= height)
    if not inside.all():
        bad = coords[~inside][0].tolist()
        raise SamInputError(f"point (x, y) = {bad} lies outside the {width} x {height} image")
    return coords, labels


def _check_box(box: object, width: int, height: int) -> np.ndarray:
    """Validate one box (x0, y0, x1, y1) in original-image pixels; return it as a ``[4]`` array."""
    box = np.asarray(box, dtype=np.float64).reshape(-1)
    if box.shape != (4,):
        raise SamInputError(f"box must have 4 numbers (x0, y0, x1, y1), got {box.size}")
    x0, y0, x1, y1 = box.tolist()
    if not np.isfinite(box).all() or not (0 <= x0 <= x1 <= width and 0 <= y0 <= y1 <= height):
        raise SamInputError(
            f"box {box.tolist()} must satisfy 0 <= x0 <= x1 <= {width} and 0 <= y0 <= y1 <= {height}"
        )
    return box


def _check_prompt_batch(
    coords: torch.Tensor | None,
    labels: torch.Tensor | None,
    boxes: torch.Tensor | None,
    masks: torch.Tensor | None,
    mask_size: int,
) -> None:
    """Validate the shapes (and labels) of a batch of prompts for ``predict_torch``."""
    if coords is None and boxes is None and masks is None:
        raise SamInputError("empty prompt: give points, a box or a mask input")
    if (coords is None) != (labels is None):
        raise SamInputError("point_coords and point_labels must be given together")
    batches = {}
    if coords is not None:
        if coords.ndim != 3 or coords.shape[-1] != 2:
            raise SamInputError(f"point_coords must have shape [B, N, 2], got {list(coords.shape)}")
        if labels.shape != coords.shape[:2]:
            raise SamInputError(f"point_labels must have shape {list(coords.shape[:2])}, got {list(labels.shape)}")
        if not torch.isin(labels, torch.tensor(VALID_LABELS, device=labels.device)).all():
            raise SamInputError("point_labels must be 1 (foreground), 0 (background) or -1 (padding)")
        batches["point_coords"] = coords.shape[0]
    if boxes is not None:
        if boxes.ndim != 2 or boxes.shape[-1] != 4:
            raise SamInputError(f"boxes must have shape [B, 4], got {list(boxes.shape)}")
        batches["boxes"] = boxes.shape[0]
    if masks is not None:
        if masks.ndim != 4 or tuple(masks.shape[1:]) != (1, mask_size, mask_size):
            raise SamInputError(f"mask_input must have shape [B, 1, {mask_size}, {mask_size}], got {list(masks.shape)}")
        batches["mask_input"] = masks.shape[0]
    if len(set(batches.values())) > 1:
        raise SamInputError(f"prompt batch sizes differ: {batches}")
