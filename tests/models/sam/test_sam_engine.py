"""The SAM engine's logic on the CPU: the bucketed prompt decoder (graphs off) against the eager model, the
low-precision and INT8 models against fp32 (mask IoU on real photos), the encoder's attention backends, and
the CLI's GPU-only options.

Tolerances: the engine runs the same ops as the eager model on padded batches, so logits agree to 1e-5
(batched matmuls may block differently per batch size) and masks must be identical wherever the eager
logit is further than 1e-4 from the threshold. Low precision: the issue's targets, mask IoU >= 0.99 for
bf16 (fp16 decoder) and fp16, >= 0.97 for INT8, per mask, on three photos with point and box prompts.
"""

import argparse

import numpy as np
import pytest
import torch

from turboformer.eval.segmentation import mask_iou  # per mask pair: a 0-d array
from turboformer.models.sam import (
    AutomaticMaskOptions,
    SamAutomaticMaskGenerator,
    SamPredictor,
    load_sam,
)
from turboformer.models.sam.cli import add_parser
from turboformer.models.sam.engine import PromptDecoderEngine, PromptLayout, prepare_sam
from turboformer.models.sam.image_encoder import (
    attention_backend,
    attention_with_rel_pos,
    decomposed_rel_pos,
)
from turboformer.models.sam.layers import LayerNorm2d
from turboformer.nn.linear import Int8Linear

LAYOUTS = {  # name -> (points per prompt, box, mask input)
    "point": (1, False, False),
    "three_points": (3, False, False),
    "box": (0, True, False),
    "box_and_point": (1, True, False),
    "point_and_mask": (2, False, True),
    "mask_only": (0, False, True),
}


def make_prompts(batch: int, layout: tuple[int, bool, bool], seed: int = 0) -> dict:
    """Random prompts in the model's 1024 frame: coords/labels, boxes, mask logits (any may be None)."""
    g = torch.Generator().manual_seed(seed)
    points, box, mask = layout
    coords = labels = boxes = masks = None
    if points:
        coords = torch.rand(batch, points, 2, generator=g) * 1000
        labels = torch.randint(0, 2, (batch, points), generator=g, dtype=torch.int32)
    if box:
        corners = torch.rand(batch, 2, 2, generator=g) * 1000
        boxes = torch.cat([corners.amin(1), corners.amax(1)], dim=1)  # x0 <= x1, y0 <= y1
    if mask:
        masks = torch.randn(batch, 1, 256, 256, generator=g)
    return dict(coords=coords, labels=labels, boxes=boxes, mask_input=masks)


def eager(model, embedding, p):
    sparse, dense = model.prompt_encoder(p["coords"], p["labels"], p["boxes"], p["mask_input"])
    return model.mask_decoder.predict_all(embedding, model.prompt_encoder.dense_pe(), sparse, dense)


def assert_same_masks(logits, expected):
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
    clear = expected.abs() > 1e-4
    assert torch.equal((logits > 0)[clear], (expected > 0)[clear])


@pytest.fixture(scope="module")
def embedding(predictor_pair):
    ours, _ = predictor_pair("coffee")
    return ours.get_image_embedding()


@pytest.mark.parametrize("name", LAYOUTS)
def test_engine_without_graphs_equals_eager(tiny_model, embedding, name):
    engine = PromptDecoderEngine(tiny_model, buckets=(1, 2, 4), cuda_graphs=False)
    prompts = make_prompts(3, LAYOUTS[name])  # padded to bucket 4
    logits, iou = engine.decode(embedding, **prompts)
    expected_logits, expected_iou = eager(tiny_model, embedding, prompts)
    assert logits.shape == (3, 4, 256, 256) and iou.shape == (3, 4)
    assert_same_masks(logits, expected_logits)
    torch.testing.assert_close(iou, expected_iou, atol=1e-5, rtol=0)
    assert engine.graphed(PromptLayout(*LAYOUTS[name])) and len(engine.steps) == 1


def test_padding_and_chunks_do_not_change_masks(tiny_model, embedding):
    prompts = make_prompts(5, LAYOUTS["box_and_point"], seed=3)
    exact = PromptDecoderEngine(tiny_model, buckets=(5,), cuda_graphs=False)
    padded = PromptDecoderEngine(tiny_model, buckets=(8,), cuda_graphs=False)
    chunked = PromptDecoderEngine(tiny_model, buckets=(1, 2), cuda_graphs=False)  # 2 + 2 + 1
    # stale, finite garbage in every static buffer's padding rows
    padded.decode(tiny_model_embedding_noise(embedding), **make_prompts(8, LAYOUTS["box_and_point"], seed=9))
    reference, reference_iou = exact.decode(embedding, **prompts)
    for engine in (padded, chunked):
        logits, iou = engine.decode(embedding, **prompts)
        assert_same_masks(logits, reference)
        torch.testing.assert_close(iou, reference_iou, atol=1e-5, rtol=0)


def tiny_model_embedding_noise(embedding):
    return torch.randn(embedding.shape, generator=torch.Generator().manual_seed(1)).to(embedding.dtype)


def test_engine_outputs_survive_the_next_call(tiny_model, embedding):
    engine = PromptDecoderEngine(tiny_model, buckets=(2,), cuda_graphs=False)
    first = make_prompts(2, LAYOUTS["point"], seed=1)
    logits, _ = engine.decode(embedding, **first)
    kept = logits.clone()
    engine.decode(embedding, **make_prompts(2, LAYOUTS["point"], seed=2))
    assert torch.equal(logits, kept)  # decode returns fresh tensors, not views of the static outputs


def test_unsupported_layout_runs_eagerly(tiny_model, embedding):
    engine = PromptDecoderEngine(tiny_model, buckets=(4,), cuda_graphs=False)
    prompts = make_prompts(2, (17, False, False))  # more points than MAX_GRAPHED_POINTS
    logits, _ = engine.decode(embedding, **prompts)
    assert not engine.steps
    assert_same_masks(logits, eager(tiny_model, embedding, prompts)[0])


def test_graphs_need_cuda(tiny_model):
    with pytest.raises(ValueError, match="CUDA graphs need"):
        PromptDecoderEngine(tiny_model, cuda_graphs=True)


@pytest.mark.parametrize("multimask", [True, False])
def test_predictor_through_engine_matches_upstream(predictor_pair, tiny_model, multimask):
    ours, theirs = predictor_pair("astronaut")
    engine_predictor = SamPredictor(tiny_model)
    engine_predictor.images = ours.images  # same embedding, no second encoder pass
    engine_predictor.decoder = PromptDecoderEngine(tiny_model, buckets=(1, 4), cuda_graphs=False)
    prompt = dict(point_coords=np.array([[250.0, 200.0], [100.0, 400.0]]), point_labels=np.array([1, 0]),
                  box=np.array([60, 40, 480, 380]))
    masks, iou, low_res = theirs.predict(**prompt, multimask_output=multimask)
    result = engine_predictor.predict(**prompt, multimask_output=multimask)
    np.testing.assert_array_equal(result.masks, masks)
    np.testing.assert_allclose(result.iou_predictions, iou, atol=1e-4)
    np.testing.assert_allclose(result.low_res_logits, low_res, atol=1e-4)


def test_automatic_generator_through_engine(small_model, images):
    options = AutomaticMaskOptions(points_per_side=3, points_per_batch=4, pred_iou_thresh=0.0,
                                   stability_score_thresh=0.0, box_nms_thresh=1.0)
    eager_masks = SamAutomaticMaskGenerator(small_model, options).generate(images["coffee"])
    generator = SamAutomaticMaskGenerator(small_model, options)
    generator.predictor.decoder = PromptDecoderEngine(small_model, buckets=(1, 2, 4), cuda_graphs=False)
    engine_masks = generator.generate(images["coffee"])  # 9 points: batches 4, 4, 1
    assert len(engine_masks) == len(eager_masks) == 27
    for a, b in zip(engine_masks, eager_masks):
        assert a.point_coords == b.point_coords
        assert abs(a.predicted_iou - b.predicted_iou) < 1e-5
        assert np.mean(a.segmentation != b.segmentation) < 1e-4


# --- low precision and INT8 against fp32 on real photos ----------------------------------------------------


def photo_prompts(image: np.ndarray) -> dict[str, dict]:
    h, w = image.shape[:2]
    box = np.array([0.15 * w, 0.2 * h, 0.75 * w, 0.9 * h])
    return {
        "point": dict(point_coords=np.array([[0.5 * w, 0.4 * h]]), point_labels=np.array([1])),
        "box": dict(box=box, multimask_output=False),
        "box_and_point": dict(box=box, point_coords=np.array([[0.3 * w, 0.6 * h]]), point_labels=np.array([0]),
                              multimask_output=False),
    }


VARIANTS = {
    "bf16": dict(dtype=torch.bfloat16),  # encoder bf16, decoder fp16 (engine.default_decoder_dtype)
    "fp16": dict(dtype=torch.float16),
    "int8": dict(quantize="int8"),
    "bf16_int8": dict(dtype=torch.bfloat16, quantize="int8"),
}
MIN_IOU = {"bf16": 0.99, "fp16": 0.99, "int8": 0.97, "bf16_int8": 0.97}


@pytest.fixture(scope="module")
def low_precision_models(small_checkpoint):
    """The 256-frame model (16x cheaper per image than the 1024 one; bf16 matmuls are slow on CPUs)."""
    return {name: load_sam(small_checkpoint, **kwargs) for name, kwargs in VARIANTS.items()}


@pytest.mark.parametrize("image_name", ["astronaut", "coffee", "chelsea_portrait"])
def test_low_precision_mask_iou(small_model, low_precision_models, images, image_name):
    image = images[image_name]
    reference = SamPredictor(small_model)  # fp32, equal to upstream (test_sam_cli, test_sam_automatic)
    reference.set_image(image)
    for name, model in low_precision_models.items():
        predictor = SamPredictor(model)
        predictor.set_image(image)
        for kind, prompt in photo_prompts(image).items():
            expected = reference.predict(**prompt).masks
            got = predictor.predict(**prompt)
            assert np.isfinite(got.low_res_logits).all()
            ious = [mask_iou(a, b) for a, b in zip(got.masks, expected)]
            assert min(ious) >= MIN_IOU[name], f"{name} {kind}: IoU {ious}"


def test_int8_replaces_every_encoder_linear(low_precision_models):
    model = low_precision_models["bf16_int8"]
    encoder_linears = [m for m in model.image_encoder.modules() if isinstance(m, torch.nn.Linear)]
    int8 = [m for m in model.image_encoder.modules() if isinstance(m, Int8Linear)]
    assert not encoder_linears and len(int8) == 4 * model.config.encoder_depth
    assert all(m.scale.dtype == torch.float32 and m.weight.dtype == torch.int8 for m in int8)
    assert model.encoder_dtype == torch.bfloat16 and model.dtype == torch.float16
    assert model.prompt_encoder.pe.gaussian.dtype == torch.float32
    assert not any(isinstance(m, Int8Linear) for m in model.mask_decoder.modules())


def test_prepare_rejects_bad_options(tiny_checkpoint):
    with pytest.raises(ValueError, match="quantize"):
        load_sam(tiny_checkpoint, quantize="int4")
    with pytest.raises(ValueError, match="dtype"):
        prepare_sam(load_sam(tiny_checkpoint), dtype=torch.int8)


# --- pieces of the low-precision encoder ---------------------------------------------------------------------


@pytest.mark.parametrize("grid, heads, d", [(4, 2, 16), (5, 3, 8)])
def test_attention_backends_agree(grid, heads, d):
    """q, k, v as the encoder has them: [B, heads, N, D] views of one fused [B, N, 3, heads, D] projection."""
    g = torch.Generator().manual_seed(grid)
    n = grid * grid
    q, k, v = torch.randn(2, n, 3, heads, d, generator=g).permute(2, 0, 3, 1, 4).unbind(0)
    table_h, table_w = (0.5 * torch.randn(2 * grid - 1, d, generator=g) for _ in range(2))
    rel_h, rel_w = decomposed_rel_pos(q, table_h, table_w, (grid, grid))
    with attention_backend("reference"):
        expected = attention_with_rel_pos(q, k, v, rel_h, rel_w)
    for backend in ("sdpa", "kernel", "auto"):  # "kernel": the Triton kernel under the interpreter
        with attention_backend(backend):
            torch.testing.assert_close(attention_with_rel_pos(q, k, v, rel_h, rel_w), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="attention backend"), attention_backend("flash"):
        pass


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_patch_embedding_as_a_matmul_is_the_convolution(dtype):
    """embed_patches (gathered 16 x 16 x 3 patches times the flattened kernel) against the stride-16 convolution
    in fp64: fp32 to 1e-5; bf16 within the error of the bf16 convolution itself (x2)."""
    from turboformer.models.sam.image_encoder import embed_patches

    g = torch.Generator().manual_seed(9)
    conv = torch.nn.Conv2d(3, 24, kernel_size=16, stride=16)
    x = torch.randn(2, 3, 64, 48, generator=g)
    gold = conv.double()(x.double()).permute(0, 2, 3, 1)
    conv = conv.to(dtype)
    got = embed_patches(conv, x.to(dtype))
    assert got.shape == (2, 4, 3, 24) and got.dtype == dtype
    err = (got.double() - gold).abs().max().item()
    bound = 1e-5 if dtype == torch.float32 else 2 * (conv(x.to(dtype)).permute(0, 2, 3, 1).double() - gold).abs().max().item()
    assert err <= bound, f"{dtype}: {err:.3g} > {bound:.3g}"


def test_layer_norm_2d_low_precision_uses_fp32_statistics():
    norm = LayerNorm2d(64)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = 100 + torch.randn(2, 64, 5, 7)  # a large mean: bf16 statistics would cancel badly
    expected = norm(x.bfloat16().float())
    got = norm.bfloat16()(x.bfloat16())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, atol=0.05, rtol=0.01)  # bf16 output rounding only


# --- CLI ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, message",
    [(["--dtype", "bfloat16"], "--dtype bfloat16 is a GPU option"), (["--quantize", "int8"], "--quantize int8 is a GPU option")],
)
def test_cli_gpu_options_on_cpu_are_clear_errors(extra, message, small_checkpoint, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="turboformer")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["segment", "photo.png", "--model", str(small_checkpoint), "--point", "1,1",
                              "--device", "cpu", "-o", str(tmp_path / "m.png"), *extra])
    assert args.func(args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
