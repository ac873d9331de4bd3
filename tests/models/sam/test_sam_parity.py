"""Parity of our SAM with upstream segment-anything 1.0 on the same random weights, on real photos.

Tolerances (fp32): image embeddings, low-resolution logits, upscaled logits and IoU predictions agree
within 1e-4 absolute (+1e-4 relative for the embeddings, whose values reach ~5; the random-weight
logits stay below ~1 so absolute is the meaningful bound); binary masks must be identical.
"""

from dataclasses import replace

import numpy as np
import pytest
import torch

from turboformer.models.sam import SAM_CONFIGS, SamPredictor, build_sam, config_name, detect_config, load_sam
from turboformer.models.sam.load import convert_state_dict, weight_map

IMAGES = ["astronaut", "coffee", "chelsea_portrait"]
TOL = dict(atol=1e-4, rtol=0)


def prompts(height: int, width: int) -> dict[str, dict]:
    """Prompts in original-image pixels, placed relative to the image size."""
    point = [[0.5 * width, 0.4 * height]]
    box = [0.15 * width, 0.2 * height, 0.75 * width, 0.9 * height]
    return {
        "point": dict(point_coords=point, point_labels=[1]),
        "multi_point": dict(
            point_coords=[[0.5 * width, 0.4 * height], [0.2 * width, 0.8 * height], [0.7 * width, 0.3 * height]],
            point_labels=[1, 0, 1],
        ),
        "box": dict(box=box),
        "box_and_point": dict(box=box, point_coords=[[0.3 * width, 0.6 * height]], point_labels=[0]),
    }


def as_numpy(prompt: dict) -> dict:
    return {k: np.array(v) for k, v in prompt.items()}


def assert_same(ours, masks, iou, low_res) -> None:
    """Our ``SamPrediction`` equals upstream's ``(masks, iou_predictions, low_res_logits)``."""
    assert ours.masks.shape == masks.shape and np.asarray(ours.masks).dtype == masks.dtype
    np.testing.assert_array_equal(ours.masks, masks)
    np.testing.assert_allclose(ours.iou_predictions, iou, **TOL)
    np.testing.assert_allclose(ours.low_res_logits, low_res, **TOL)


@pytest.mark.parametrize("name", IMAGES)
def test_image_embedding_matches_upstream(predictor_pair, name):
    ours, theirs = predictor_pair(name)
    assert ours.image().input_size == theirs.input_size
    assert ours.image().original_size == theirs.original_size
    torch.testing.assert_close(ours.get_image_embedding(), theirs.get_image_embedding(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "name, kind, multimask",
    [
        ("astronaut", "point", True),
        ("coffee", "multi_point", False),
        ("chelsea_portrait", "box", False),
        ("chelsea_portrait", "box_and_point", True),
    ],
)
def test_prompt_matches_upstream(predictor_pair, images, name, kind, multimask):
    ours, theirs = predictor_pair(name)
    prompt = as_numpy(prompts(*images[name].shape[:2])[kind])
    expected = theirs.predict(**prompt, multimask_output=multimask)
    result = ours.predict(**prompt, multimask_output=multimask)
    assert_same(result, *expected)
    assert result.masks.shape[0] == (3 if multimask else 1)
    assert 0.0 < result.masks.mean() < 1.0  # a real mask, not an empty or full frame


def test_logits_and_mask_input_match_upstream(predictor_pair, images):
    """Upscaled logits (``return_logits``), then a second round fed with the first low-res logits."""
    ours, theirs = predictor_pair("coffee")
    prompt = as_numpy(prompts(*images["coffee"].shape[:2])["point"])
    logits, iou, low_res = theirs.predict(**prompt, return_logits=True)
    first = ours.predict(**prompt, return_logits=True)
    np.testing.assert_allclose(first.masks, logits, **TOL)
    np.testing.assert_allclose(first.iou_predictions, iou, **TOL)

    mask_input = low_res[np.argmax(iou)][None]  # [1, 256, 256]
    for extra in (prompt, {}):  # with the point again, and the mask alone
        expected = theirs.predict(**extra, mask_input=mask_input, multimask_output=False)
        assert_same(ours.predict(**extra, mask_input=mask_input, multimask_output=False), *expected)


def test_batched_prompts_match_upstream(predictor_pair, images):
    """``predict_torch`` on B = 3 prompts: points padded with label -1, with and without boxes."""
    ours, theirs = predictor_pair("chelsea_portrait")
    h, w = images["chelsea_portrait"].shape[:2]
    points = np.array([[[0.5 * w, 0.5 * h], [0.1 * w, 0.1 * h]],
                       [[0.3 * w, 0.7 * h], [0.0, 0.0]],
                       [[0.8 * w, 0.2 * h], [0.6 * w, 0.9 * h]]])
    labels = torch.tensor([[1, 0], [1, -1], [1, 1]], dtype=torch.int32)
    boxes = np.array([[0.1 * w, 0.1 * h, 0.9 * w, 0.6 * h], [0, 0, w, h], [0.4 * w, 0.5 * h, 0.6 * w, 0.7 * h]])

    coords = ours.scale_coords(points)
    np.testing.assert_array_equal(coords, theirs.transform.apply_coords(points, theirs.original_size))
    coords = torch.as_tensor(coords, dtype=torch.float32)
    boxes_t = torch.as_tensor(theirs.transform.apply_boxes(boxes, theirs.original_size), dtype=torch.float32)
    for args, multimask in [((coords, labels, None), True), ((coords, labels, boxes_t), False),
                            ((None, None, boxes_t), True)]:
        expected = theirs.predict_torch(*args, multimask_output=multimask)
        result = ours.predict_torch(*args, multimask_output=multimask)
        assert result.masks.shape == (3, 3 if multimask else 1, h, w)
        assert_same(result, *(x.numpy() for x in expected))


def test_batched_images_match_upstream(upstream, small_upstream_model, small_model, images):
    """One batched encoder pass over three images (ours ``set_images``, upstream ``Sam.forward``);
    on the small (256 frame) model, whose batch costs less than one 1024 image."""
    names = ["astronaut", "coffee", "chelsea_portrait"]
    transform = upstream.transforms.ResizeLongestSide(256)
    batched_input, prompts_per_image = [], []
    for name in names:
        image = images[name]
        h, w = image.shape[:2]
        prompt = prompts(h, w)["box_and_point"]
        prompts_per_image.append(prompt)
        batched_input.append({
            "image": torch.as_tensor(transform.apply_image(image)).permute(2, 0, 1).contiguous(),
            "original_size": (h, w),
            "point_coords": torch.as_tensor(transform.apply_coords(np.array(prompt["point_coords"]), (h, w)),
                                            dtype=torch.float32)[None],
            "point_labels": torch.tensor([prompt["point_labels"]], dtype=torch.int32),
            "boxes": torch.as_tensor(transform.apply_boxes(np.array(prompt["box"]), (h, w)), dtype=torch.float32),
        })
    expected = small_upstream_model(batched_input, multimask_output=True)

    predictor = SamPredictor(small_model)
    predictor.set_images([images[name] for name in names])
    for index, (prompt, reference) in enumerate(zip(prompts_per_image, expected)):
        result = predictor.predict(**as_numpy(prompt), image_index=index)
        assert_same(result, *(reference[k][0].numpy() for k in ("masks", "iou_predictions", "low_res_logits")))


def test_vit_b_dimensions_match_upstream(upstream, reference, images):
    """Real ViT-B encoder dimensions (768 wide, 12 blocks, 12 heads, global 2/5/8/11) at a 256 frame."""
    torch.manual_seed(20)
    theirs = reference.build_upstream_sam(upstream, 768, 12, 12, (2, 5, 8, 11), image_size=256)
    reference.randomize_(theirs, seed=21)
    model = load_sam({k: v.clone() for k, v in theirs.state_dict().items()})
    assert model.config == replace(SAM_CONFIGS["vit_b"], image_size=256)

    ours, reference = SamPredictor(model), upstream.predictor.SamPredictor(theirs)
    ours.set_image(images["astronaut"])
    reference.set_image(images["astronaut"])
    torch.testing.assert_close(ours.get_image_embedding(), reference.get_image_embedding(), atol=1e-4, rtol=1e-4)
    prompt = as_numpy(prompts(512, 512)["box_and_point"])
    assert_same(ours.predict(**prompt), *reference.predict(**prompt))


@pytest.mark.parametrize("name", ["vit_b", "vit_l", "vit_h"])
def test_released_sizes_are_detected_and_fully_mapped(upstream, name):
    """Upstream ``build_sam_vit_*`` state dicts (on the meta device: shapes only) -> our named size,
    with every upstream tensor used once and every one of ours filled with the right shape."""
    with torch.device("meta"):
        theirs = upstream.build_sam.sam_model_registry[name]()
        state_dict = theirs.state_dict()
        config = detect_config(state_dict)
        assert config == SAM_CONFIGS[name] and config_name(config) == name
        converted = convert_state_dict(state_dict, config)
        expected = build_sam(config).state_dict()
    assert set(converted) == set(expected) == set(weight_map(config))
    assert all(converted[k].shape == expected[k].shape for k in expected)
