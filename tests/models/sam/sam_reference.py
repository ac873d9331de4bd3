"""Upstream ``segment_anything`` 1.0 as the independent reference for the SAM tests.

Its package ``__init__`` imports torchvision, which cannot be installed with this torch build, so the
submodules are imported under a bare package module (``__path__`` only, ``__init__`` never runs).
Two of them import torchvision functions at module level:

* ``automatic_mask_generator``: ``torchvision.ops.boxes.batched_nms`` and ``box_area``;
* ``utils.transforms``: ``torchvision.transforms.functional.resize`` and ``to_pil_image``.

When torchvision is importable it is used. Otherwise this module provides TEST-ONLY stand-ins, written
from torchvision's own source and installed in ``sys.modules`` only while those two modules import
(so no other test sees a fake torchvision):

* ``nms``: a line-by-line port of the CPU kernel ``torchvision/csrc/ops/cpu/nms_kernel.cpp``
  (stable descending sort by score, scalar greedy loop, suppress when IoU > threshold);
* ``batched_nms``: ``torchvision/ops/boxes.py`` (coordinate-offset trick up to 4000 numbers on CPU,
  per-category loop above);
* ``box_area``: ``(x1 - x0) * (y1 - y0)``;
* ``to_pil_image`` / ``resize``: for a ``[H, W, 3]`` uint8 array and a PIL image, torchvision calls
  ``Image.fromarray`` and ``_functional_pil.resize``, i.e. ``img.resize((w, h), Image.BILINEAR)``,
  returning the image itself when the size does not change.
"""

import contextlib
import importlib
import importlib.util
import sys
import types
from functools import partial

import numpy as np
import torch
from PIL import Image


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """torchvision's CPU NMS kernel, transcribed (float maths in the boxes' dtype, as in C++)."""
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long)
    x1, y1, x2, y2 = (boxes[:, i].contiguous() for i in range(4))
    areas = (x2 - x1) * (y2 - y1)
    order = torch.sort(scores, dim=0, descending=True, stable=True).indices.tolist()
    suppressed = [False] * len(order)
    keep = []
    zero = torch.zeros((), dtype=boxes.dtype)
    for _i, i in enumerate(order):
        if suppressed[i]:
            continue
        keep.append(i)
        for j in order[_i + 1 :]:
            if suppressed[j]:
                continue
            xx1, yy1 = torch.maximum(x1[i], x1[j]), torch.maximum(y1[i], y1[j])
            xx2, yy2 = torch.minimum(x2[i], x2[j]), torch.minimum(y2[i], y2[j])
            inter = torch.maximum(zero, xx2 - xx1) * torch.maximum(zero, yy2 - yy1)
            if inter / (areas[i] + areas[j] - inter) > iou_threshold:
                suppressed[j] = True
    return torch.tensor(keep, dtype=torch.long)


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """torchvision.ops.batched_nms (CPU thresholds)."""
    if boxes.numel() > 4000:  # _batched_nms_vanilla
        keep_mask = torch.zeros_like(scores, dtype=torch.bool)
        for class_id in torch.unique(idxs):
            curr = torch.where(idxs == class_id)[0]
            keep_mask[curr[nms(boxes[curr], scores[curr], iou_threshold)]] = True
        keep = torch.where(keep_mask)[0]
        return keep[scores[keep].sort(descending=True)[1]]
    if boxes.numel() == 0:  # _batched_nms_coordinate_trick
        return torch.empty((0,), dtype=torch.int64)
    offsets = idxs.to(boxes) * (boxes.max() + torch.tensor(1).to(boxes))
    return nms(boxes + offsets[:, None], scores, iou_threshold)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """torchvision.ops.box_area."""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def to_pil_image(array: np.ndarray) -> Image.Image:
    """torchvision.transforms.functional.to_pil_image for an ``[H, W, 3]`` uint8 array."""
    assert array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] == 3
    return Image.fromarray(array)


def resize(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """torchvision.transforms.functional.resize for a PIL image and an explicit ``(h, w)``."""
    h, w = size
    if (image.height, image.width) == (h, w):
        return image
    return image.resize((w, h), Image.BILINEAR)


@contextlib.contextmanager
def _torchvision_for_import():
    """Make ``torchvision.ops.boxes`` and ``torchvision.transforms.functional`` importable meanwhile."""
    try:
        importlib.import_module("torchvision.ops.boxes")
        importlib.import_module("torchvision.transforms.functional")
        yield  # the real torchvision works here
        return
    except ImportError:
        pass
    names = ["torchvision", "torchvision.ops", "torchvision.ops.boxes", "torchvision.transforms",
             "torchvision.transforms.functional"]
    saved = {name: sys.modules.pop(name) for name in names if name in sys.modules}
    fakes = {name: types.ModuleType(name) for name in names}
    fakes["torchvision.ops.boxes"].batched_nms = batched_nms
    fakes["torchvision.ops.boxes"].box_area = box_area
    fakes["torchvision.transforms.functional"].resize = resize
    fakes["torchvision.transforms.functional"].to_pil_image = to_pil_image
    sys.modules.update(fakes)
    try:
        yield
    finally:
        for name in names:
            sys.modules.pop(name, None)
        sys.modules.update(saved)


def import_upstream() -> types.SimpleNamespace:
    """The upstream modules: ``modeling``, ``build_sam``, ``predictor``, ``transforms``, ``amg``
    (the automatic generator) and ``amg_utils`` (its helpers, ``utils/amg.py``)."""
    if "segment_anything" not in sys.modules:
        spec = importlib.util.find_spec("segment_anything")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("the SAM tests need upstream segment-anything: pip install segment-anything==1.0")
        package = types.ModuleType("segment_anything")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["segment_anything"] = package
    with _torchvision_for_import():
        return types.SimpleNamespace(
            modeling=importlib.import_module("segment_anything.modeling"),
            build_sam=importlib.import_module("segment_anything.build_sam"),
            transforms=importlib.import_module("segment_anything.utils.transforms"),
            predictor=importlib.import_module("segment_anything.predictor"),
            amg=importlib.import_module("segment_anything.automatic_mask_generator"),
            amg_utils=importlib.import_module("segment_anything.utils.amg"),
        )


def build_upstream_sam(
    upstream: types.SimpleNamespace,
    embed_dim: int,
    depth: int,
    num_heads: int,
    global_attn_indexes: tuple[int, ...],
    image_size: int = 1024,
) -> torch.nn.Module:
    """An upstream ``Sam`` as ``build_sam._build_sam`` makes it, with a chosen encoder and image size."""
    m = upstream.modeling
    grid = image_size // 16
    return m.Sam(
        image_encoder=m.ImageEncoderViT(
            depth=depth,
            embed_dim=embed_dim,
            img_size=image_size,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=num_heads,
            patch_size=16,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=global_attn_indexes,
            window_size=14,
            out_chans=256,
        ),
        prompt_encoder=m.PromptEncoder(
            embed_dim=256,
            image_embedding_size=(grid, grid),
            input_image_size=(image_size, image_size),
            mask_in_chans=16,
        ),
        mask_decoder=m.MaskDecoder(
            num_multimask_outputs=3,
            transformer=m.TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    ).eval()


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give every tensor a non-trivial random value (upstream zero-inits rel-pos and pos_embed, and
    LayerNorms start at 1/0, which would hide bugs in those paths). Linear/conv weights keep their
    (seeded) default init so activations stay in a sane range."""
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in model.state_dict().items():
        noise = torch.randn(tensor.shape, generator=generator)
        if "rel_pos" in name:
            tensor.copy_(0.5 * noise)
        elif name.endswith("pos_embed"):
            tensor.copy_(0.2 * noise)
        elif tensor.ndim == 1:  # biases and norm scales/shifts
            tensor.add_(0.1 * noise)
    return model
