"""Automatic mask generation against upstream ``SamAutomaticMaskGenerator`` on the same random weights.

Upstream needs ``torchvision.ops.batched_nms`` / ``box_area``; where torchvision is missing, the
reference runs with the TEST-ONLY port of torchvision's CPU NMS kernel in ``sam_reference.py``. Our
generator uses its own plain-PyTorch ``box_nms``. Everything must come out identical (same masks, in
the same order, same boxes, areas, points and crops; scores within 1e-4 in fp32).

Random weights give low, narrow scores and speckled masks whose boxes span the whole image, so:
the IoU and stability thresholds are set where they bite on this model (each drops part of the 3
masks per point); one run disables box NMS (IoU > 1 never holds) so many masks reach the output and
their order is checked; the other runs crop layer 1 with NMS on. Random masks always touch the inner
crop edges, so no crop mask survives there: the helpers (boxes, stability, crop-edge filter, crop and
point grids) are therefore also checked one by one against upstream on synthetic masks with holes,
blobs and empty frames. The small (256 input) model keeps the 5 encoder passes of a crop layer cheap.
"""

import numpy as np
import pytest
import torch

from turboformer.models.sam import AutomaticMaskOptions, SamAutomaticMaskGenerator, SamInputError, box_nms
from turboformer.models.sam.automatic import crop_boxes, mask_boxes, near_crop_edge, point_grid, stability_score

OPTIONS = dict(points_per_side=4, pred_iou_thresh=0.01, stability_score_thresh=0.24, stability_score_offset=0.05)


@pytest.mark.parametrize("crop_n_layers, box_nms_thresh", [(0, 1.0), (1, 0.7)])
def test_generate_matches_upstream(upstream, small_upstream_model, small_model, images, crop_n_layers, box_nms_thresh):
    image = images["coffee"]
    options = dict(OPTIONS, crop_n_layers=crop_n_layers, box_nms_thresh=box_nms_thresh)
    expected = upstream.amg.SamAutomaticMaskGenerator(small_upstream_model, **options).generate(image)
    result = SamAutomaticMaskGenerator(small_model, AutomaticMaskOptions(**options)).generate(image)

    assert len(result) == len(expected) > 0
    if box_nms_thresh == 1.0:  # no NMS: only the two score filters removed masks, from 48 candidates
        assert 4 <= len(result) <= 40
    for ours, ref in zip(result, expected):
        np.testing.assert_array_equal(ours.segmentation, ref["segmentation"])
        assert ours.area == ref["area"]
        assert list(ours.bbox) == ref["bbox"]
        assert list(ours.crop_box) == ref["crop_box"]
        assert [list(ours.point_coords)] == ref["point_coords"]
        assert ours.predicted_iou == pytest.approx(ref["predicted_iou"], abs=1e-4)
        assert ours.stability_score == pytest.approx(ref["stability_score"], abs=1e-4)


def synthetic_masks(generator: torch.Generator) -> torch.Tensor:
    """``[12, 37, 53]`` bool: rectangles, rectangles with holes, speckle, one empty, one full."""
    masks = torch.zeros(12, 37, 53, dtype=torch.bool)
    for i in range(8):
        y0, x0 = torch.randint(0, 30, (2,), generator=generator).tolist()
        h, w = torch.randint(1, 20, (2,), generator=generator).tolist()
        masks[i, y0 : y0 + h, x0 : x0 + w] = True
        if i % 2:
            masks[i, y0 + h // 2, :] = False  # a hole across the blob
    masks[8:10] = torch.rand(2, 37, 53, generator=generator) > 0.97
    masks[11] = True  # masks[10] stays empty
    return masks


def test_helpers_match_upstream(upstream):
    amg = upstream.amg_utils
    generator = torch.Generator().manual_seed(0)
    masks = synthetic_masks(generator)
    assert torch.equal(mask_boxes(masks), amg.batched_mask_to_box(masks))

    logits = 2 * torch.randn(6, 37, 53, generator=generator)
    for offset in (0.05, 1.0):
        expected = amg.calculate_stability_score(logits, 0.0, offset)
        torch.testing.assert_close(stability_score(logits, 0.0, offset), expected, atol=0, rtol=0, equal_nan=True)

    boxes = torch.randint(0, 400, (64, 4), generator=generator)
    for crop in ([0, 0, 400, 300], [100, 50, 300, 250], [0, 120, 220, 300]):
        expected = amg.is_box_near_crop_edge(boxes, crop, [0, 0, 400, 300])
        assert torch.equal(near_crop_edge(boxes, crop, [0, 0, 400, 300]), expected)

    for size, layers in [((400, 600), 2), ((451, 300), 1), ((512, 512), 3)]:
        expected_boxes, expected_layers = amg.generate_crop_boxes(size, layers, 512 / 1500)
        assert crop_boxes(size, layers, 512 / 1500) == list(zip(expected_boxes, expected_layers))
    for n in (1, 4, 7):
        np.testing.assert_array_equal(point_grid(n), amg.build_point_grid(n))


def test_box_nms_matches_torchvision_kernel(reference):
    """Our vectorised NMS against the transcribed torchvision CPU kernel: overlapping boxes, tied
    scores (stable order decides), degenerate (zero-area) boxes, and an empty input."""
    generator = torch.Generator().manual_seed(0)
    xy = torch.randint(0, 60, (120, 2), generator=generator).float()
    wh = torch.randint(0, 40, (120, 2), generator=generator).float()  # some zero-width boxes
    boxes = torch.cat([xy, xy + wh], dim=1)
    scores = torch.randint(0, 20, (120,), generator=generator).float() / 20  # many ties
    for threshold in (0.0, 0.3, 0.7, 1.0):
        expected = reference.nms(boxes, scores, threshold)
        kept = box_nms(boxes, scores, threshold)
        assert kept.tolist() == expected.tolist()
    assert 0 < len(box_nms(boxes, scores, 0.5)) < len(boxes)
    assert box_nms(torch.zeros(0, 4), torch.zeros(0), 0.7).tolist() == []


@pytest.mark.parametrize(
    "bad",
    [dict(points_per_side=0), dict(points_per_batch=0), dict(box_nms_thresh=1.5), dict(crop_n_layers=-1),
     dict(points_per_side=2, crop_n_layers=2, crop_n_points_downscale_factor=2)],
)
def test_bad_options_are_rejected(bad):
    with pytest.raises(SamInputError):
        AutomaticMaskOptions(**bad)


def test_generate_rejects_a_non_image(small_model):
    with pytest.raises(SamInputError, match="uint8"):
        SamAutomaticMaskGenerator(small_model).generate(np.zeros((20, 30, 3), dtype=np.float32))
