"""Accuracy report of Segment Anything on a device/dtype against the fp32 CPU path: mask IoU and logits error.

    turboformer eval sam photo.jpg --model sam_vit_b_01ec64.pth [--points-per-side 4] [--device cuda --dtype bfloat16]

Both predictors get the same image and a grid of single-point prompts (multimask); the report gives the IoU of
each candidate mask with the fp32 mask (mean and minimum), the low-resolution logits' error statistics and the
largest difference of the predicted IoU scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from turboformer.eval.tensor_stats import TensorStats, tensor_stats
from turboformer.models.sam import SamPredictor, load_sam


@dataclass(frozen=True)
class SegmentationEvalReport:
    engine: str
    prompts: int
    mean_iou: float  # IoU of candidate masks with the fp32 masks, averaged over prompts x masks
    min_iou: float
    logits: TensorStats  # low-resolution mask logits against fp32
    max_iou_prediction_diff: float

    def text(self) -> str:
        return "\n".join([
            f"engine: {self.engine}",
            f"{self.prompts} point prompts: mask IoU with fp32 CPU mean {self.mean_iou:.4f}, min {self.min_iou:.4f}; "
            f"predicted-IoU max difference {self.max_iou_prediction_diff:.3g}",
            f"low-res mask logits vs fp32 CPU: {self.logits.row()} (finite: {self.logits.finite})",
        ])


def mask_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boolean masks [..., H, W] (1 where both are empty)."""
    intersection = np.logical_and(a, b).sum(axis=(-2, -1))
    union = np.logical_or(a, b).sum(axis=(-2, -1))
    return np.where(union > 0, intersection / np.maximum(union, 1), 1.0)


def point_grid(height: int, width: int, per_side: int) -> np.ndarray:
    """[per_side^2, 2] (x, y) pixel coordinates at the centres of a per_side x per_side grid."""
    centres = (np.arange(per_side) + 0.5) / per_side
    xs, ys = np.meshgrid(centres * width, centres * height)
    return np.stack([xs.ravel(), ys.ravel()], axis=-1)


def evaluate_segmentation(
    checkpoint: str, image: np.ndarray, device: str, dtype: torch.dtype, points_per_side: int = 4,
    quantize: str | None = None,
) -> SegmentationEvalReport:
    reference = SamPredictor(load_sam(checkpoint))
    candidate = SamPredictor(load_sam(checkpoint, device, dtype, quantize=quantize))
    reference.set_image(image)
    candidate.set_image(image)
    ious, ref_logits, cand_logits, score_diffs = [], [], [], []
    for point in point_grid(*image.shape[:2], points_per_side):
        prompt = dict(point_coords=point[None], point_labels=np.array([1]), multimask_output=True)
        a, b = reference.predict(**prompt), candidate.predict(**prompt)
        ious.append(mask_iou(np.asarray(a.masks), np.asarray(b.masks)))
        ref_logits.append(torch.as_tensor(np.asarray(a.low_res_logits, dtype=np.float32)))
        cand_logits.append(torch.as_tensor(np.asarray(b.low_res_logits, dtype=np.float32)))
        score_diffs.append(np.abs(np.asarray(a.iou_predictions, np.float64) - np.asarray(b.iou_predictions, np.float64)).max())
    ious = np.concatenate(ious)
    return SegmentationEvalReport(
        engine=f"{checkpoint} on {device}, {str(dtype).removeprefix('torch.')}" + (f", {quantize}" if quantize else ""),
        prompts=points_per_side**2,
        mean_iou=float(ious.mean()),
        min_iou=float(ious.min()),
        logits=tensor_stats(torch.stack(cand_logits), torch.stack(ref_logits)),
        max_iou_prediction_diff=float(max(score_diffs)),
    )
