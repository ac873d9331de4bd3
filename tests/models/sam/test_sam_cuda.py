"""The fp32 path on a CUDA device against upstream on the CPU (runs on the GPU machine only).

TF32 is switched off for the test, so the GPU computes true fp32; only summation order differs from
the CPU. Tolerances: embeddings and logits 1e-4 (absolute, + 1e-4 relative for the embeddings); a
mask pixel may differ only where upstream's logit lies within 1e-3 of the threshold.
"""

import numpy as np
import pytest
import torch

from turboformer.models.sam import AutomaticMaskOptions, SamAutomaticMaskGenerator, SamPredictor, load_sam

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the GPU machine)"),
]


@pytest.fixture
def true_fp32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_cuda_prompts_match_upstream_cpu(true_fp32, upstream, tiny_checkpoint, tiny_upstream_model, images):
    image = images["coffee"]
    ours = SamPredictor(load_sam(tiny_checkpoint, device="cuda"))
    ours.set_images([image, images["astronaut"]])
    theirs = upstream.predictor.SamPredictor(tiny_upstream_model)
    theirs.set_image(image)
    torch.testing.assert_close(ours.get_image_embedding().cpu(), theirs.get_image_embedding(), atol=1e-4, rtol=1e-4)

    prompt = dict(point_coords=np.array([[300.0, 160.0], [90.0, 320.0]]), point_labels=np.array([1, 0]),
                  box=np.array([60, 40, 480, 380]))
    logits, iou, low_res = theirs.predict(**prompt, return_logits=True)
    result = ours.predict(**prompt, return_logits=True)
    np.testing.assert_allclose(result.low_res_logits, low_res, atol=1e-4)
    np.testing.assert_allclose(result.iou_predictions, iou, atol=1e-4)
    np.testing.assert_allclose(result.masks, logits, atol=1e-4)
    masks = ours.predict(**prompt).masks
    disagree = masks != (logits > 0)
    assert np.all(np.abs(logits[disagree]) < 1e-3)


def test_cuda_automatic_matches_cpu(true_fp32, small_checkpoint, small_model, images):
    options = AutomaticMaskOptions(points_per_side=4, pred_iou_thresh=0.01, stability_score_thresh=0.24,
                                   stability_score_offset=0.05, box_nms_thresh=1.0)
    cpu = SamAutomaticMaskGenerator(small_model, options).generate(images["coffee"])
    gpu = SamAutomaticMaskGenerator(load_sam(small_checkpoint, device="cuda"), options).generate(images["coffee"])
    assert len(gpu) == len(cpu) > 0
    for a, b in zip(gpu, cpu):
        assert a.point_coords == b.point_coords and a.crop_box == b.crop_box
        assert abs(a.predicted_iou - b.predicted_iou) < 1e-4
        assert np.mean(a.segmentation != b.segmentation) < 1e-3
