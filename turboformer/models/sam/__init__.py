"""Segment Anything (Kirillov et al., arXiv 2304.02643): fp32 reference path, parity with upstream.

    from turboformer.models.sam import SamPredictor, load_sam
    predictor = SamPredictor(load_sam("sam_vit_b_01ec64.pth"))
    predictor.set_image(image)  # [H, W, 3] uint8 RGB
    masks = predictor.predict(point_coords=np.array([[500, 375]]), point_labels=np.array([1])).masks
"""

from .automatic import (
    AutomaticMaskOptions,
    GeneratedMask,
    SamAutomaticMaskGenerator,
    box_nms,
)
from .config import SAM_CONFIGS, SamConfig, config_name
from .errors import SamCheckpointError, SamInputError
from .load import detect_config, load_sam
from .predictor import EncodedImage, SamPrediction, SamPredictor
from .sam import Sam, build_sam

__all__ = [
    "SAM_CONFIGS",
    "AutomaticMaskOptions",
    "EncodedImage",
    "GeneratedMask",
    "Sam",
    "SamAutomaticMaskGenerator",
    "SamCheckpointError",
    "SamConfig",
    "SamInputError",
    "SamPrediction",
    "SamPredictor",
    "box_nms",
    "build_sam",
    "config_name",
    "detect_config",
    "load_sam",
]
