"""The SAM GPU engine (runs on the GPU machine only): bf16/fp16/INT8 masks against fp32, the CUDA-graphed
prompt decoder against the same decoder run eagerly, and no NaN at the real ViT-B size.

The fused rel-pos flash-attention kernel runs (as everywhere on CUDA) in every
test here, so these tests are also that kernel's end-to-end check. Reference: the fp32 model on the CPU
(equal to upstream, ``test_sam_parity.py``). Targets of issue 5: mask IoU >= 0.99 (bf16 with its fp16
decoder, fp16), >= 0.97 (INT8 encoder), per mask, on three photos with point and box prompts.
Graphed vs eager: the same kernels on the same shapes, so logits agree to 1e-3 and masks wherever the eager
logit is further than 1e-2 from the threshold (1e-2 and 1e-1 against an unpadded call, whose other batch
shapes sum fp16 products in other orders).
"""

import numpy as np
import pytest
import torch

from turboformer.eval.segmentation import mask_iou  # per mask pair: a 0-d array
from turboformer.models.sam import (
    SAM_CONFIGS,
    AutomaticMaskOptions,
    SamAutomaticMaskGenerator,
    SamPredictor,
    build_sam,
    load_sam,
)
from turboformer.models.sam.engine import PromptDecoderEngine, prepare_sam
from turboformer.nn.linear import Int8Linear

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the GPU machine)"),
]

VARIANTS = {
    "bf16": dict(dtype=torch.bfloat16),
    "fp16": dict(dtype=torch.float16),
    "bf16_int8": dict(dtype=torch.bfloat16, quantize="int8"),
}
MIN_IOU = {"bf16": 0.99, "fp16": 0.99, "bf16_int8": 0.97}
IMAGES = ["astronaut", "coffee", "chelsea_portrait"]


@pytest.fixture(scope="module")
def gpu_models(tiny_checkpoint):
    return {name: load_sam(tiny_checkpoint, device="cuda", **kwargs) for name, kwargs in VARIANTS.items()}


def photo_prompts(image: np.ndarray) -> dict[str, dict]:
    h, w = image.shape[:2]
    box = np.array([0.15 * w, 0.2 * h, 0.75 * w, 0.9 * h])
    return {
        "point": dict(point_coords=np.array([[0.5 * w, 0.4 * h]]), point_labels=np.array([1])),
        "two_points": dict(point_coords=np.array([[0.5 * w, 0.4 * h], [0.2 * w, 0.8 * h]]),
                           point_labels=np.array([1, 0])),
        "box": dict(box=box, multimask_output=False),
        "box_and_point": dict(box=box, point_coords=np.array([[0.3 * w, 0.6 * h]]), point_labels=np.array([0]),
                              multimask_output=False),
    }


@pytest.mark.parametrize("image_name", IMAGES)
def test_low_precision_masks_match_fp32(predictor_pair, gpu_models, images, image_name):
    reference, _ = predictor_pair(image_name)  # fp32 on the CPU
    image = images[image_name]
    for name, model in gpu_models.items():
        predictor = SamPredictor(model)  # graphed decoder (the default on CUDA)
        assert predictor.decoder is not None and predictor.decoder.cuda_graphs
        predictor.set_image(image)
        assert torch.isfinite(predictor.get_image_embedding()).all()
        for kind, prompt in photo_prompts(image).items():
            expected = reference.predict(**prompt).masks
            got = predictor.predict(**prompt)
            assert np.isfinite(got.low_res_logits).all() and np.isfinite(got.iou_predictions).all()
            ious = [mask_iou(a, b) for a, b in zip(got.masks, expected)]
            assert min(ious) >= MIN_IOU[name], f"{name} {image_name} {kind}: IoU {ious}"


def test_int8_model_uses_int8_linears(gpu_models):
    model = gpu_models["bf16_int8"]
    assert sum(isinstance(m, Int8Linear) for m in model.image_encoder.modules()) == 4 * model.config.encoder_depth
    assert not any(type(m) is torch.nn.Linear for m in model.image_encoder.modules())


def random_prompts(batch: int, points: int, box: bool, mask: bool, device: str, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = dict(coords=None, labels=None, boxes=None, mask_input=None)
    if points:
        out["coords"] = (torch.rand(batch, points, 2, generator=g) * 1000).to(device)
        out["labels"] = torch.randint(0, 2, (batch, points), generator=g, dtype=torch.int32).to(device)
    if box:
        corners = torch.rand(batch, 2, 2, generator=g) * 1000
        out["boxes"] = torch.cat([corners.amin(1), corners.amax(1)], dim=1).to(device)
    if mask:
        out["mask_input"] = torch.randn(batch, 1, 256, 256, generator=g).to(device)
    return out


def assert_close_masks(logits: torch.Tensor, expected: torch.Tensor, atol: float) -> None:
    torch.testing.assert_close(logits, expected, atol=atol, rtol=0)
    clear = expected.abs() > 10 * atol
    assert torch.equal((logits > 0)[clear], (expected > 0)[clear])


@pytest.mark.parametrize("layout", [(1, False, False), (3, False, False), (0, True, False), (1, True, False),
                                    (2, False, True)])
def test_graphed_decoder_equals_eager(gpu_models, layout):
    model = gpu_models["bf16"]
    embedding = torch.randn(1, 256, 64, 64, device="cuda").to(model.dtype)
    graphed = PromptDecoderEngine(model, buckets=(1, 2, 4, 8), cuda_graphs=True)
    eager = PromptDecoderEngine(model, buckets=(1, 2, 4, 8), cuda_graphs=False)
    for batch, seed in ((3, 0), (8, 1), (1, 2), (11, 3)):  # padded, exact, single, chunked (8 + 3)
        prompts = random_prompts(batch, *layout, device="cuda", seed=seed)
        logits, iou = graphed.decode(embedding, **prompts)
        expected_logits, expected_iou = eager.decode(embedding, **prompts)
        assert torch.isfinite(logits).all() and logits.shape == (batch, 4, 256, 256)
        assert_close_masks(logits, expected_logits, atol=1e-3)  # same shapes, same kernels
        torch.testing.assert_close(iou, expected_iou, atol=1e-3, rtol=0)
        # and against the plain, unpadded model call (other batch shapes: other fp16 summation orders)
        sparse, dense = model.prompt_encoder(prompts["coords"], prompts["labels"], prompts["boxes"],
                                             prompts["mask_input"])
        plain, _ = model.mask_decoder.predict_all(embedding, model.prompt_encoder.dense_pe(), sparse, dense)
        assert_close_masks(logits, plain, atol=1e-2)
    torch.cuda.synchronize()


def test_graphed_outputs_survive_the_next_replay(gpu_models):
    model = gpu_models["fp16"]
    embedding = torch.randn(1, 256, 64, 64, device="cuda").to(model.dtype)
    engine = PromptDecoderEngine(model, buckets=(4,), cuda_graphs=True)
    first, _ = engine.decode(embedding, **random_prompts(4, 1, False, False, "cuda", seed=0))
    kept = first.clone()
    second, _ = engine.decode(embedding, **random_prompts(4, 1, False, False, "cuda", seed=1))
    assert torch.equal(first, kept) and not torch.equal(first, second)


def test_automatic_generator_graphed_equals_eager(gpu_models, images):
    model = gpu_models["bf16"]
    options = AutomaticMaskOptions(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                                   box_nms_thresh=1.0)
    graphed = SamAutomaticMaskGenerator(model, options).generate(images["coffee"])
    eager = SamAutomaticMaskGenerator(model, options, cuda_graphs=False).generate(images["coffee"])
    assert len(graphed) == len(eager) == 48
    # near-equal scores may swap places in the NMS order: match each mask to its point's closest eager mask
    for a in graphed:
        same_point = [b for b in eager if b.point_coords == a.point_coords]
        assert len(same_point) == 3
        best = max(same_point, key=lambda b: mask_iou(a.segmentation, b.segmentation))
        assert mask_iou(a.segmentation, best.segmentation) >= 0.99
        assert abs(a.predicted_iou - best.predicted_iou) < 1e-2


@pytest.mark.parametrize("dtype, quantize", [(torch.bfloat16, None), (torch.float16, None), (torch.bfloat16, "int8")])
def test_vit_b_size_has_no_nan(images, dtype, quantize):
    """The real ViT-B dimensions (random weights, build_sam's init): finite embeddings and logits, batch 2."""
    torch.manual_seed(0)
    model = prepare_sam(build_sam(SAM_CONFIGS["vit_b"]), "cuda", dtype, quantize)
    predictor = SamPredictor(model)
    predictor.set_images([images["astronaut"], images["coffee"]])
    for index in range(2):
        assert torch.isfinite(predictor.get_image_embedding(index)).all()
    coords = torch.rand(64, 1, 2, device="cuda") * 1000
    result = predictor.predict_torch(coords, torch.ones(64, 1, dtype=torch.int32, device="cuda"), image_index=1)
    assert torch.isfinite(result.low_res_logits).all() and torch.isfinite(result.iou_predictions).all()
