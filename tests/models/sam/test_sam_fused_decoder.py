"""The mask decoder's fast paths against the plain ops: the fused upscaler tail and the image side shared by
the prompts.

In fp16/bf16, ``Upscaler.stage1`` is one channel LayerNorm + GELU kernel and ``Upscaler.masks`` computes
``hyper_in @ gelu(conv2(.))`` with the fused mask-head kernel; fp32 keeps upstream's ops. When every prompt
has the same dense map (no mask input), ``predict_all`` keeps one ``[1, C, 64, 64]`` image side until the
image tokens first attend to the prompts. Checked here:

* with the kernels' PyTorch references (what the CPU runs), ``masks`` is exactly the unfused
  ``hyper_in.float() @ forward(x).float()``, and fp32 is exactly upstream's ``output_upscaling`` + matmul;
* with the Triton kernels (the interpreter on CPU, compiled on CUDA), ``predict_all`` of the random tiny
  SAM (real decoder sizes: Cin 64, Cout 32, 4 masks, 256 x 256 logits) agrees with the unfused decoder
  (``use_reference()``): logits within 2% of their largest magnitude (fp16 rounding of the 268 MB
  intermediate now skipped or reordered) and binary masks with IoU >= 0.99 per mask (the issue's target);
* the shared image side gives the per-prompt image side's logits (fp32: to 1e-5, the products' summation
  order; the upstream parity tests also run through it).

The fp16/bf16 attention kernel has its own tests (``tests/kernels/test_heads_attention.py``).
"""

import numpy as np
import pytest
import torch

from turboformer.eval.segmentation import mask_iou
from turboformer.kernels import use_reference, utils
from turboformer.models.sam import load_sam
from turboformer.models.sam.mask_decoder import Upscaler


def random_upscaler(dtype: torch.dtype, dim: int = 256) -> Upscaler:
    g = torch.Generator().manual_seed(3)
    upscaler = Upscaler(dim)
    with torch.no_grad():
        for p in upscaler.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.2 if p.dim() == 1 else 2 / p.shape[0] ** 0.5))
    return upscaler.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_masks_equal_unfused_ops_with_references(dtype):
    upscaler = random_upscaler(dtype)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 256, 3, 5, generator=g).to(dtype)
    hyper = torch.randn(2, 4, 32, generator=g).to(dtype)
    with torch.no_grad():
        expected = (hyper.float() @ upscaler(x).flatten(2).float()).view(2, 4, 12, 20)
        got = upscaler.masks(x, hyper)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_fp32_is_upstream_output_upscaling(upstream, tiny_upstream_model, tiny_model):
    """fp32 runs upstream's exact modules: conv1, LayerNorm2d, GELU, conv2, GELU, then hyper_in @ ."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 256, 4, 4, generator=g)
    hyper = torch.randn(2, 4, 32, generator=g)
    with torch.no_grad():
        upscaled = tiny_upstream_model.mask_decoder.output_upscaling(x)
        expected = (hyper @ upscaled.flatten(2)).view(2, 4, 16, 16)
        got = tiny_model.mask_decoder.upscale.masks(x, hyper)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def one_point_prompts(model, batch: int):
    """Sparse and dense embeddings of ``batch`` one-point prompts at random places of the 1024 frame."""
    g = torch.Generator().manual_seed(6)
    coords = (torch.rand(batch, 1, 2, generator=g) * 1000).to(model.device, torch.float64)
    labels = torch.ones(batch, 1, dtype=torch.int32, device=model.device)
    return model.prompt_encoder(coords, labels, None, None)


def assert_fused_matches_unfused(model, embedding, batch):
    decoder, image_pe = model.mask_decoder, model.prompt_encoder.dense_pe()
    with torch.no_grad():
        sparse, dense = one_point_prompts(model, batch)
        fused, iou = decoder.predict_all(embedding, image_pe, sparse, dense)
        with use_reference():
            unfused, iou_ref = decoder.predict_all(embedding, image_pe, sparse, dense)
    assert fused.dtype == torch.float32 and fused.shape == (batch, 4, 256, 256)
    assert torch.isfinite(fused).all()
    # the IoU head does not use the upscaler; the attention kernel sums in another order than its reference
    torch.testing.assert_close(iou, iou_ref, rtol=0, atol=2e-3)
    scale = unfused.abs().amax(dim=(-2, -1), keepdim=True)
    assert ((fused - unfused).abs() <= 0.02 * scale).all(), "logits differ by more than 2% of their range"
    fused_masks, unfused_masks = (fused > 0).cpu().numpy(), (unfused > 0).cpu().numpy()
    assert 0 < unfused_masks.mean() < 1, "degenerate test: every pixel on one side of the threshold"
    ious = mask_iou(fused_masks, unfused_masks)
    assert np.min(ious) >= 0.99, f"mask IoU {np.min(ious):.4f}"


def test_predict_all_with_kernels_under_the_interpreter(tiny_checkpoint, predictor_pair, monkeypatch):
    """The fp16 decoder on the CPU with the Triton kernels (interpreted) forced on, two prompts."""
    if not utils.interpreting():
        pytest.skip("CUDA machine: test_predict_all_fused_vs_unfused_cuda runs the compiled kernels")
    model = load_sam(tiny_checkpoint, dtype=torch.float16)
    embedding = predictor_pair("coffee")[0].get_image_embedding().half()  # the fp32 encoder's
    monkeypatch.setattr(utils, "use_triton", lambda x: not utils.reference_forced())
    assert_fused_matches_unfused(model, embedding, batch=2)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_predict_all_fused_vs_unfused_cuda(tiny_checkpoint, predictor_pair):
    """64 one-point prompts (the profiled batch) on the fp16 decoder, compiled kernels, eager."""
    model = load_sam(tiny_checkpoint, device="cuda", dtype=torch.float16)
    embedding = predictor_pair("coffee")[0].get_image_embedding().to("cuda", torch.float16)
    assert_fused_matches_unfused(model, embedding, batch=64)


def test_shared_image_side_equals_per_prompt_image_side(tiny_model, predictor_pair):
    """Three one-point prompts with the no-mask dense map expanded (shared: one image side until the first
    image-to-token attention) and materialised per prompt (upstream's repeated image): the same logits."""
    decoder, image_pe = tiny_model.mask_decoder, tiny_model.prompt_encoder.dense_pe()
    embedding = predictor_pair("coffee")[0].get_image_embedding()
    with torch.no_grad():
        sparse, dense = one_point_prompts(tiny_model, 3)
        assert dense.stride(0) == 0  # the prompt encoder's no-mask map is an expanded view
        shared, iou_shared = decoder.predict_all(embedding, image_pe, sparse, dense)
        per_prompt, iou = decoder.predict_all(embedding, image_pe, sparse, dense.contiguous())
    torch.testing.assert_close(shared, per_prompt, rtol=0, atol=1e-5 * per_prompt.abs().max().item())
    torch.testing.assert_close(iou_shared, iou, rtol=0, atol=1e-5)
    assert ((shared > 0) == (per_prompt > 0)).float().mean() > 0.9999



@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_add_norm_is_norm_of_the_rounded_sum(dtype):
    """The image tokens' residual add + LayerNorm: fused in fp16/bf16 (the sum rounded to the dtype, fp32
    statistics, as nn.LayerNorm computes), upstream's two ops in fp32; a shared (batch-1) x broadcasts."""
    from turboformer.models.sam.transformer import add_norm

    g = torch.Generator().manual_seed(8)
    norm = torch.nn.LayerNorm(32).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(32, generator=g) * 0.5 + 1)
        norm.bias.copy_(torch.randn(32, generator=g) * 0.3)
    x = (torch.randn(3, 10, 32, generator=g) * 3).to(dtype)
    delta = torch.randn(3, 10, 32, generator=g).to(dtype)
    with torch.no_grad():
        rounded_sum = (x.float() + delta.float()).to(dtype).float()
        expected = torch.nn.functional.layer_norm(rounded_sum, (32,), norm.weight.float(), norm.bias.float(), norm.eps)
        got = add_norm(x, delta, norm)
        shared = add_norm(x[:1], delta, norm)
    ulp = 2.0 ** (-10 if dtype == torch.float16 else -7 if dtype == torch.bfloat16 else -20)
    torch.testing.assert_close(got.float(), expected.to(dtype).float(), rtol=ulp, atol=ulp)
    shared_sum = (x[:1].float() + delta.float()).to(dtype).float()
    shared_expected = torch.nn.functional.layer_norm(shared_sum, (32,), norm.weight.float(), norm.bias.float(), norm.eps)
    torch.testing.assert_close(shared.float(), shared_expected.to(dtype).float(), rtol=ulp, atol=ulp)
