"""Automatic ("segment everything") mask generation, as upstream ``SamAutomaticMaskGenerator``.

Kirillov et al., "Segment Anything" (arXiv 2304.02643), Sec. 4 and Appendix B: prompt SAM with a
regular grid of foreground points (three masks each), keep masks whose predicted IoU and stability
score are high, drop masks that touch a crop's inner edge, then remove duplicates with box NMS,
first within each crop, then across crops (preferring smaller crops). Optional crop layers rerun the
whole process on ``(2^i)^2`` overlapping zoomed-in crops of the image.

The NMS here is plain PyTorch with torchvision's exact greedy semantics (stable descending sort by
score; a box is dropped when its IoU with a kept box is ``> threshold``), so no torchvision is needed.
"""

import math
from dataclasses import dataclass
from itertools import product

import numpy as np
import torch

from turboformer.runtime.cuda_graphs import DEFAULT_BUCKETS

from .errors import SamInputError
from .predictor import SamPredictor
from .sam import Sam
from .transforms import check_image

CROP_EDGE_TOLERANCE = 20.0  # pixels: a box this close to an inner crop edge is cut off by the crop


@dataclass(frozen=True)
class AutomaticMaskOptions:
    """Options of :class:`SamAutomaticMaskGenerator`; defaults are upstream's (tuned for ViT-H)."""

    points_per_side: int = 32  # grid of points_per_side^2 prompts on the full image
    points_per_batch: int = 64  # prompts decoded together
    pred_iou_thresh: float = 0.88  # keep masks with predicted IoU > this (0 disables)
    stability_score_thresh: float = 0.95  # keep masks with stability >= this (0 disables)
    stability_score_offset: float = 1.0  # logit offset of the stability score's two thresholds
    box_nms_thresh: float = 0.7  # box IoU above which the lower-IoU mask of a crop is dropped
    crop_n_layers: int = 0  # extra crop layers; layer i has (2^i)^2 crops
    crop_nms_thresh: float = 0.7  # box IoU for removing duplicates between crops
    crop_overlap_ratio: float = 512 / 1500  # crop overlap as a fraction of the short image side
    crop_n_points_downscale_factor: int = 1  # points per side in layer i: points_per_side / factor^i

    def __post_init__(self) -> None:
        if self.points_per_side < 1 or self.points_per_batch < 1:
            raise SamInputError("points_per_side and points_per_batch must be at least 1")
        if self.crop_n_layers < 0 or self.crop_n_points_downscale_factor < 1:
            raise SamInputError("crop_n_layers must be >= 0 and crop_n_points_downscale_factor >= 1")
        if int(self.points_per_side / self.crop_n_points_downscale_factor**self.crop_n_layers) < 1:
            raise SamInputError("the deepest crop layer would have no points: lower crop_n_layers")
        for name in ("box_nms_thresh", "crop_nms_thresh", "crop_overlap_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise SamInputError(f"{name} must lie in [0, 1], got {getattr(self, name)}")


@dataclass(frozen=True)
class GeneratedMask:
    """One automatically generated mask, in original-image pixels (upstream's record, as fields)."""

    segmentation: np.ndarray  # [H, W] bool
    area: int  # pixels in the mask
    bbox: tuple[int, int, int, int]  # (x, y, w, h) from the inclusive min/max mask pixels (upstream)
    predicted_iou: float
    point_coords: tuple[float, float]  # the (x, y) prompt that produced the mask
    stability_score: float
    crop_box: tuple[int, int, int, int]  # (x, y, w, h) of the crop it was found in


def box_nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression with torchvision's exact semantics.

    Args:
        boxes: ``[N, 4]`` float (x0, y0, x1, y1).
        scores: ``[N]``.
        iou_threshold: a box is suppressed when its IoU with a kept box is ``> iou_threshold``.

    Returns:
        ``[K]`` int64 indices of the kept boxes, by decreasing score (ties in input order).
    """
    order = torch.sort(scores, descending=True, stable=True).indices
    b = boxes[order]
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])  # [N]
    w = (torch.minimum(b[:, None, 2], b[None, :, 2]) - torch.maximum(b[:, None, 0], b[None, :, 0])).clamp(min=0)
    h = (torch.minimum(b[:, None, 3], b[None, :, 3]) - torch.maximum(b[:, None, 1], b[None, :, 1])).clamp(min=0)
    inter = w * h  # [N, N]
    overlaps = (inter / (area[:, None] + area[None, :] - inter) > iou_threshold).cpu().numpy()
    suppressed = np.zeros(len(order), dtype=bool)
    keep = []
    for i in range(len(order)):  # in score order; a kept box suppresses the later ones it overlaps
        if not suppressed[i]:
            keep.append(i)
            suppressed[i + 1 :] |= overlaps[i, i + 1 :]
    return order[torch.as_tensor(keep, dtype=torch.long, device=order.device)]


def point_grid(n_per_side: int) -> np.ndarray:
    """``[n^2, 2]`` (x, y) cell centres of an ``n x n`` grid over ``[0, 1]^2``, row by row."""
    offset = 1 / (2 * n_per_side)
    side = np.linspace(offset, 1 - offset, n_per_side)
    xs = np.tile(side[None, :], (n_per_side, 1))
    ys = np.tile(side[:, None], (1, n_per_side))
    return np.stack([xs, ys], axis=-1).reshape(-1, 2)


def crop_boxes(image_size: tuple[int, int], n_layers: int, overlap_ratio: float) -> list[tuple[list[int], int]]:
    """``(crop box [x0, y0, x1, y1], layer)`` for the whole image and ``(2^i)^2`` crops per layer i."""
    im_h, im_w = image_size
    crops = [([0, 0, im_w, im_h], 0)]
    for layer in range(1, n_layers + 1):
        n = 2**layer
        overlap = int(overlap_ratio * min(im_h, im_w) * (2 / n))
        crop_w = int(math.ceil((overlap * (n - 1) + im_w) / n))
        crop_h = int(math.ceil((overlap * (n - 1) + im_h) / n))
        x0s = [int((crop_w - overlap) * i) for i in range(n)]
        y0s = [int((crop_h - overlap) * i) for i in range(n)]
        for x0, y0 in product(x0s, y0s):  # column-major over crops, as upstream
            crops.append(([x0, y0, min(x0 + crop_w, im_w), min(y0 + crop_h, im_h)], layer))
    return crops


def stability_score(logits: torch.Tensor, threshold: float, offset: float) -> torch.Tensor:
    """IoU of the masks thresholded at ``threshold + offset`` and ``threshold - offset``: ``[N]``.

    The high mask lies inside the low one, so the IoU is a ratio of pixel counts.
    """
    inter = (logits > threshold + offset).sum(-1, dtype=torch.int16).sum(-1, dtype=torch.int32)
    union = (logits > threshold - offset).sum(-1, dtype=torch.int16).sum(-1, dtype=torch.int32)
    return inter / union


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """``[N, H, W]`` bool -> ``[N, 4]`` int64 (x0, y0, x1, y1) of the first/last pixel rows and
    columns (inclusive); ``[0, 0, 0, 0]`` for an empty mask."""
    if masks.numel() == 0:
        return torch.zeros(masks.shape[0], 4, dtype=torch.long, device=masks.device)
    h, w = masks.shape[-2:]
    rows = masks.any(dim=-1)  # [N, H]
    cols = masks.any(dim=-2)  # [N, W]
    row_idx = torch.arange(h, device=masks.device)
    col_idx = torch.arange(w, device=masks.device)
    bottom = (rows * row_idx).amax(-1)
    top = torch.where(rows, row_idx, h).amin(-1)
    right = (cols * col_idx).amax(-1)
    left = torch.where(cols, col_idx, w).amin(-1)
    boxes = torch.stack([left, top, right, bottom], dim=-1)
    empty = ~rows.any(-1)
    return boxes * (~empty)[:, None]


def near_crop_edge(boxes: torch.Tensor, crop_box: list[int], image_box: list[int]) -> torch.Tensor:
    """``[N]`` True where a box (crop frame) lies within 20 px of a crop edge that is not an image edge."""
    x0, y0 = crop_box[0], crop_box[1]
    boxes = (boxes + torch.tensor([x0, y0, x0, y0], device=boxes.device)).float()
    crop_t = torch.tensor(crop_box, dtype=torch.float32, device=boxes.device)
    image_t = torch.tensor(image_box, dtype=torch.float32, device=boxes.device)
    at_crop = torch.isclose(boxes, crop_t[None], atol=CROP_EDGE_TOLERANCE, rtol=0)
    at_image = torch.isclose(boxes, image_t[None], atol=CROP_EDGE_TOLERANCE, rtol=0)
    return (at_crop & ~at_image).any(dim=1)


@dataclass
class _Candidates:
    """Surviving masks of one crop, all tensors indexed alike (internal, mutable)."""

    masks: torch.Tensor  # [N, H, W] bool, pasted into the full image
    boxes: torch.Tensor  # [N, 4] int64 (x0, y0, x1, y1), crop frame until moved to the image
    iou: torch.Tensor  # [N] float
    stability: torch.Tensor  # [N] float
    points: torch.Tensor  # [N, 2] float64 (x, y), crop frame until moved to the image
    crop: torch.Tensor  # [N, 4] int64 crop box (x0, y0, x1, y1) in the image

    def select(self, keep: torch.Tensor) -> "_Candidates":
        """The candidates at ``keep`` (bool mask or indices, in that order)."""
        return _Candidates(*(getattr(self, f)[keep] for f in self.__dataclass_fields__))

    @staticmethod
    def concat(parts: list["_Candidates"]) -> "_Candidates":
        fields = _Candidates.__dataclass_fields__
        return _Candidates(*(torch.cat([getattr(p, f) for p in parts]) for f in fields))


class SamAutomaticMaskGenerator:
    """Generate masks for everything in an image with a point grid (see the module docstring)."""

    def __init__(
        self, model: Sam, options: AutomaticMaskOptions = AutomaticMaskOptions(), cuda_graphs: bool | None = None
    ) -> None:
        """``cuda_graphs``: decode the point batches with the graphed engine (default: on CUDA), captured
        for batch buckets up to ``points_per_batch`` (the last, partial batch of a grid pads to a bucket)."""
        batch = options.points_per_batch
        buckets = tuple(b for b in DEFAULT_BUCKETS if b < batch) + (batch,)
        self.predictor = SamPredictor(model, cuda_graphs=cuda_graphs, decoder_buckets=buckets)
        self.options = options
        self.point_grids = [  # [P, 2] in [0, 1]^2 per crop layer
            point_grid(int(options.points_per_side / options.crop_n_points_downscale_factor**layer))
            for layer in range(options.crop_n_layers + 1)
        ]

    @torch.no_grad()
    def generate(self, image: np.ndarray) -> list[GeneratedMask]:
        """Masks for ``image`` (``[H, W, 3]`` uint8 RGB), in upstream's order (NMS score order)."""
        check_image(image)
        orig_size = image.shape[:2]
        crops = crop_boxes(orig_size, self.options.crop_n_layers, self.options.crop_overlap_ratio)
        found = _Candidates.concat([self._process_crop(image, box, layer, orig_size) for box, layer in crops])
        if len(crops) > 1:  # duplicates between crops: prefer the smaller crop
            crop_area = (found.crop[:, 2] - found.crop[:, 0]) * (found.crop[:, 3] - found.crop[:, 1])
            found = found.select(box_nms(found.boxes.float(), 1 / crop_area, self.options.crop_nms_thresh))
        return [self._record(found, i) for i in range(len(found.iou))]

    def _process_crop(
        self, image: np.ndarray, crop_box: list[int], layer: int, orig_size: tuple[int, int]
    ) -> _Candidates:
        """Candidates of one crop after filtering and within-crop NMS, moved to the image frame."""
        x0, y0, x1, y1 = crop_box
        crop = image[y0:y1, x0:x1, :]
        self.predictor.set_image(crop)
        points = self.point_grids[layer] * np.array(crop.shape[:2])[None, ::-1]  # [P, 2] (x, y) crop pixels
        batch = self.options.points_per_batch
        parts = [
            self._process_batch(points[i : i + batch], crop_box, orig_size)
            for i in range(0, len(points), batch)
        ]
        self.predictor.reset_image()
        found = _Candidates.concat(parts)
        found = found.select(box_nms(found.boxes.float(), found.iou, self.options.box_nms_thresh))
        offset = torch.tensor([x0, y0], device=found.boxes.device)
        found.boxes = found.boxes + offset.repeat(2)
        found.points = found.points + offset
        return found

    def _process_batch(
        self, points: np.ndarray, crop_box: list[int], orig_size: tuple[int, int]
    ) -> _Candidates:
        """Decode one batch of grid points (crop pixels) and filter the 3 masks of each."""
        opts, threshold = self.options, self.predictor.model.mask_threshold
        device = self.predictor.model.device
        coords = torch.as_tensor(self.predictor.scale_coords(points), device=device)  # [b, 2] float64
        labels = torch.ones(len(points), dtype=torch.int32, device=device)
        result = self.predictor.predict_torch(coords[:, None, :], labels[:, None], return_logits=True)
        logits = result.masks.flatten(0, 1)  # [3b, h, w]
        iou = result.iou_predictions.flatten(0, 1)  # [3b]
        point_t = torch.as_tensor(points.repeat(result.masks.shape[1], axis=0), device=device)  # [3b, 2]

        if opts.pred_iou_thresh > 0.0:
            keep = iou > opts.pred_iou_thresh
            logits, iou, point_t = logits[keep], iou[keep], point_t[keep]
        stability = stability_score(logits, threshold, opts.stability_score_offset)
        if opts.stability_score_thresh > 0.0:
            keep = stability >= opts.stability_score_thresh
            logits, iou, point_t, stability = logits[keep], iou[keep], point_t[keep], stability[keep]
        masks = logits > threshold
        boxes = mask_boxes(masks)
        keep = ~near_crop_edge(boxes, crop_box, [0, 0, orig_size[1], orig_size[0]])
        masks, boxes, iou, stability, point_t = masks[keep], boxes[keep], iou[keep], stability[keep], point_t[keep]

        x0, y0, x1, y1 = crop_box
        full = torch.zeros(len(masks), *orig_size, dtype=torch.bool, device=device)  # [n, H, W]
        full[:, y0:y1, x0:x1] = masks
        crop_t = torch.tensor(crop_box, dtype=torch.long, device=device).expand(len(masks), 4)
        return _Candidates(full, boxes, iou, stability, point_t, crop_t)

    @staticmethod
    def _record(found: _Candidates, i: int) -> GeneratedMask:
        """Candidate ``i`` as a :class:`GeneratedMask`."""
        segmentation = found.masks[i].cpu().numpy()
        bx0, by0, bx1, by1 = found.boxes[i].tolist()
        x0, y0, x1, y1 = found.crop[i].tolist()
        return GeneratedMask(
            segmentation=segmentation,
            area=int(segmentation.sum()),
            bbox=(bx0, by0, bx1 - bx0, by1 - by0),
            predicted_iou=float(found.iou[i]),
            point_coords=tuple(found.points[i].tolist()),
            stability_score=float(found.stability[i]),
            crop_box=(x0, y0, x1 - x0, y1 - y0),
        )
