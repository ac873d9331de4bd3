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
from turboformer.kernels import poison_buffers, use_reference, utils
from turboformer.kernels import window_attention as window_op
from turboformer.models.sam import (
    AutomaticMaskOptions,
    SamAutomaticMaskGenerator,
    SamPredictor,
    load_sam,
)
from turboformer.models.sam.cli import add_parser
from turboformer.models.sam.engine import PromptDecoderEngine, PromptLayout, prepare_sam
from turboformer.models.sam.image_encoder import attention, attention_backend
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


@pytest.mark.parametrize("grid, window, heads, d", [(5, 3, 2, 16), (4, 0, 3, 8)])
def test_attention_backends_agree(grid, window, heads, d):
    """The attention as the encoder calls it, from a ``[B, H, W, 3C]`` projection: a 5 x 5 grid in padded 3 x 3
    windows, and a global 4 x 4 block. "kernel" is the Triton kernel under the interpreter."""
    g = torch.Generator().manual_seed(grid)
    side = window or grid
    qkv = torch.randn(2, grid, grid, 3 * heads * d, generator=g)
    bias = torch.randn(3 * heads * d, generator=g)
    table_h, table_w = (0.5 * torch.randn(2 * side - 1, d, generator=g) for _ in range(2))
    args = (qkv, bias, table_h, table_w, heads, window)
    with attention_backend("reference"):
        expected = attention(*args)
    assert expected.shape == (2, grid, grid, heads * d)
    for backend in ("sdpa", "kernel", "auto"):
        with attention_backend(backend):
            torch.testing.assert_close(attention(*args), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="attention backend"), attention_backend("flash"):
        pass


def test_tiny_image_encoder_with_the_kernel_matches_the_reference(monkeypatch):
    """A tiny SAM image encoder (8 x 8 token grid: windowed blocks of 3 x 3 over a grid padded to 9 x 9, and
    one global block over all 64 tokens) with every attention forced through the Triton launcher (the
    interpreter on CPU), fp32 and bf16, against the same encoder on the reference path: fp32 to atol = rtol =
    1e-4; bf16 within two bf16 epsilons of the largest output (~3 ulps; measured: 2 ulps, 0.031 of 2.9)."""
    from turboformer.models.sam.config import SamConfig
    from turboformer.models.sam.image_encoder import ImageEncoder

    config = SamConfig(image_size=128, encoder_embed_dim=32, encoder_depth=3, encoder_num_heads=2,
                       encoder_mlp_dim=64, encoder_global_attn_indexes=(1,), encoder_window_size=3,
                       prompt_embed_dim=16)
    torch.manual_seed(0)
    encoder = ImageEncoder(config).eval()
    with torch.no_grad():
        for block in encoder.blocks:  # SAM initialises the tables to zero: make the bias matter
            block.attn.rel_pos_h.normal_(std=0.5)
            block.attn.rel_pos_w.normal_(std=0.5)
        encoder.pos_embed.normal_(std=0.5)
    image = torch.randn(2, 3, 128, 128)
    calls, launcher = [], window_op.window_attention_triton

    def spy(*args, **kwargs):
        calls.append((tuple(args[0].shape), args[5]))
        return launcher(*args, **kwargs)

    monkeypatch.setattr(window_op, "window_attention_triton", spy)
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 0.0)):
        encoder = encoder.to(dtype)
        with torch.no_grad(), use_reference():
            expected = encoder(image.to(dtype))
        calls.clear()
        with monkeypatch.context() as patch, torch.no_grad(), poison_buffers():
            patch.setattr(utils, "use_triton", lambda x: not utils.reference_forced())  # as on CUDA
            out = encoder(image.to(dtype))
        # each block's [B, 8, 8, 3 * 32] projection: windows of 3, the global block, windows of 3
        assert calls == [((2, 8, 8, 96), 3), ((2, 8, 8, 96), 0), ((2, 8, 8, 96), 3)]
        assert out.shape == (2, 16, 8, 8) and out.dtype == dtype
        atol = tol if dtype == torch.float32 else 2 * torch.finfo(dtype).eps * expected.float().abs().max().item()
        torch.testing.assert_close(out.float(), expected.float(), atol=atol, rtol=tol)
        assert (out - expected).abs().max() > 0  # the kernel really ran (different summation order)


def test_gelu_epilogue_is_chosen_only_where_it_applies(monkeypatch):
    """The encoder MLP's fc1 + exact GELU as one ``_addmm_activation`` call: only for fp16/bf16 with the kernels on
    (CUDA; faked here), an ``nn.Linear`` with a bias and an exact GELU; the same result as the two passes within
    the bf16 rounding of the product (on the CPU ``_addmm_activation`` computes the exact GELU too)."""
    from turboformer.models.sam.layers import FeedForward

    torch.manual_seed(0)
    mlp = FeedForward(32, 128, torch.nn.GELU).to(torch.bfloat16)
    x = torch.randn(2, 5, 32).to(torch.bfloat16)
    assert not mlp.gelu_epilogue(x)  # a CPU tensor: the kernels' dispatch says no
    monkeypatch.setattr(utils, "use_triton", lambda t: not utils.reference_forced())  # as on CUDA
    assert mlp.gelu_epilogue(x)
    assert not mlp.gelu_epilogue(x.float())
    with use_reference():
        assert not mlp.gelu_epilogue(x)
        two_passes = mlp(x)
    fused = mlp(x)
    assert fused.shape == x.shape and fused.dtype == torch.bfloat16
    torch.testing.assert_close(fused.float(), two_passes.float(), atol=0.02, rtol=0.02)
    assert not FeedForward(32, 128, torch.nn.ReLU).to(torch.bfloat16).gelu_epilogue(x)
    tanh = FeedForward(32, 128, lambda: torch.nn.GELU(approximate="tanh")).to(torch.bfloat16)
    assert not tanh.gelu_epilogue(x)
    mlp.fc1 = Int8Linear(mlp.fc1)
    assert not mlp.gelu_epilogue(x)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gelu_epilogue_on_the_gpu_is_within_bf16_rounding_of_exact_gelu():
    """On CUDA the epilogue is cuBLASLt's (tanh-form) GELU of the fp32 product: against the exact GELU of the fp64
    product, within half a bf16 ulp of each value (<= 2^-8 relative) plus 5e-4 (the tanh form deviates by up
    to ~3e-4), at ViT-B width."""
    from turboformer.models.sam.layers import FeedForward

    torch.manual_seed(0)
    mlp = FeedForward(768, 3072, torch.nn.GELU).cuda().to(torch.bfloat16)
    x = torch.randn(4096, 768, device="cuda").to(torch.bfloat16)
    assert mlp.gelu_epilogue(x)
    h = torch._addmm_activation(mlp.fc1.bias, x, mlp.fc1.weight.t(), use_gelu=True).double()
    exact = torch.nn.functional.gelu(torch.nn.functional.linear(x.double(), mlp.fc1.weight.double(),
                                                                mlp.fc1.bias.double()))
    bound = exact.abs() * 2**-8 + 5e-4  # the output rounding + the tanh form
    assert ((h - exact).abs() <= bound).all(), (h - exact).abs().max().item()


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
