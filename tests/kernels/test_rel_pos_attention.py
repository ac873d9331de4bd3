"""Flash attention with SAM's decomposed rel-pos bias against torch SDPA with an explicit additive mask, in fp64.

The gold result is an independent formulation: the ``[BH, N, N]`` additive mask is gathered element by
element from ``rel_h``/``rel_w`` (``mask[i, j] = rel_h[i, j // W] + rel_w[i, j % W]``) and handed to
``F.scaled_dot_product_attention`` in fp64; neither the kernel's one-hot products nor the reference's
broadcast views are used to build it.

On CPU the launcher runs in the Triton interpreter at small shapes (with 16-wide tiles, so every case runs
several query tiles and several key tiles, with ragged tails); on CUDA the ``cuda``-marked tests add SAM's
real shapes (14 x 14 windows and the 64 x 64 global grid, head dim 64).

Tolerances: fp32 within atol = rtol = 2e-5 of the fp64 result (inputs of unit scale, bias up to ~6: the
softmax amplifies the fp32 rounding of the logits). fp16/bf16: the kernel's max error against the fp64
result is at most twice the error of PyTorch's own SDPA (with the additive mask) in that dtype on the same
inputs, plus, under the interpreter, one bf16 ulp of max |result| (``kernel_tolerance.assert_close_to_gold``).
"""

import importlib.util
import sys

import pytest
import torch
import torch.nn.functional as F
from kernel_tolerance import assert_close_to_gold

from turboformer.kernels import KernelInputError, poison_buffers, use_reference, utils
from turboformer.kernels import rel_pos_attention as op
from turboformer.kernels.rel_pos_attention import (
    rel_pos_attention,
    rel_pos_attention_ref,
    rel_pos_attention_triton,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FP32_TOL = 2e-5


def sdpa_with_mask(q, k, v, rel_h, rel_w, scale):
    """Independent formulation: gather the additive bias into a full ``[BH, N, N]`` mask, then SDPA."""
    n, grid_w = q.shape[1], rel_w.shape[2]
    j = torch.arange(n, device=q.device)
    mask = rel_h[:, :, j // grid_w] + rel_w[:, :, j % grid_w]  # [BH, N, N]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def make_inputs(bh, grid_h, grid_w, d, dtype, layout):
    """q, k, v ``[BH, N, D]`` and rel_h ``[BH, N, H]``, rel_w ``[BH, N, W]``.

    'contiguous'; 'fused': q, k, v are thirds of one [BH, N, 3, D] projection (strides 3ND, 3D, 1) and the
    bias terms are column slices of wider buffers (row strides H + 3 and W + 5)."""
    n = grid_h * grid_w
    if layout == "contiguous":
        q, k, v = (torch.randn(bh, n, d, device=DEVICE).to(dtype) for _ in range(3))
        rel_h = (2 * torch.randn(bh, n, grid_h, device=DEVICE)).to(dtype)
        rel_w = (2 * torch.randn(bh, n, grid_w, device=DEVICE)).to(dtype)
    else:
        q, k, v = torch.randn(bh, n, 3, d, device=DEVICE).to(dtype).unbind(2)
        rel_h = (2 * torch.randn(bh, n, grid_h + 3, device=DEVICE)).to(dtype)[:, :, :grid_h]
        rel_w = (2 * torch.randn(bh, n, grid_w + 5, device=DEVICE)).to(dtype)[:, :, 1 : grid_w + 1]
    return q, k, v, rel_h, rel_w


def check(q, k, v, rel_h, rel_w, scale=None, **blocks):
    scale_ = q.shape[-1] ** -0.5 if scale is None else scale
    gold = sdpa_with_mask(*(t.double() for t in (q, k, v, rel_h, rel_w)), scale_)
    torch_lowp = sdpa_with_mask(q, k, v, rel_h, rel_w, scale_)
    with poison_buffers():
        out = rel_pos_attention_triton(q, k, v, rel_h, rel_w, scale, **blocks)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close_to_gold(out, gold, torch_lowp, fp32_tol=FP32_TOL)
    assert_close_to_gold(rel_pos_attention_ref(q, k, v, rel_h, rel_w, scale), gold, torch_lowp, fp32_tol=FP32_TOL)


# (BH, H, W, D, layout, block_m, block_n): H != W, N not a multiple of the tiles, D not a power of two,
# a single-row grid, and one case on the launcher's own tile choice.
CASES = [
    (2, 5, 7, 64, "contiguous", 16, 16),  # N = 35: 3 query tiles x 3 key tiles, tails of 3
    (3, 6, 3, 80, "fused", 16, 32),  # D = 80 (BLOCK_D 128), strided q/k/v and bias
    (1, 1, 20, 32, "contiguous", 32, 16),  # one key row: rel_h is a single column
    (2, 4, 4, 16, "fused", None, None),  # launcher's tiles: one tile covers everything
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bh,grid_h,grid_w,d,layout,block_m,block_n", CASES)
def test_rel_pos_attention(bh, grid_h, grid_w, d, layout, block_m, block_n, dtype):
    q, k, v, rel_h, rel_w = make_inputs(bh, grid_h, grid_w, d, dtype, layout)
    check(q, k, v, rel_h, rel_w, block_m=block_m, block_n=block_n)


def test_explicit_scale_and_bias_dominated_rows():
    """A non-default scale, and a bias large enough (+-30) that one key wins each row: the online softmax must
    rescale across tiles without overflow or losing the winner."""
    q, k, v, rel_h, rel_w = make_inputs(2, 7, 5, 32, torch.float32, "contiguous")
    check(q, k, v, 15 * rel_h, 15 * rel_w, scale=0.3, block_m=16, block_n=16)


def test_window_shape_on_default_tiles():
    """A 14 x 14 window (196 tokens: 4 query tiles of 64 with a tail of 4) with the launcher's own tiles."""
    q, k, v, rel_h, rel_w = make_inputs(1, 14, 14, 64, torch.float16, "contiguous")
    check(q, k, v, rel_h, rel_w)


def test_dispatcher_takes_the_reference_on_cpu_and_under_use_reference(monkeypatch):
    q, k, v, rel_h, rel_w = make_inputs(2, 3, 4, 16, torch.float32, "contiguous")
    expected = rel_pos_attention_ref(q, k, v, rel_h, rel_w)
    calls = []

    def spy(*args, **kwargs):
        calls.append(1)
        return rel_pos_attention_triton(*args, **kwargs)

    monkeypatch.setattr(op, "rel_pos_attention_triton", spy)
    if DEVICE == "cpu":
        torch.testing.assert_close(rel_pos_attention(q, k, v, rel_h, rel_w), expected, rtol=0, atol=0)
        assert not calls
    monkeypatch.setattr(utils, "use_triton", lambda x: not utils.reference_forced())  # as on CUDA
    torch.testing.assert_close(rel_pos_attention(q, k, v, rel_h, rel_w), expected, atol=FP32_TOL, rtol=FP32_TOL)
    assert len(calls) == 1
    with use_reference():
        torch.testing.assert_close(rel_pos_attention(q, k, v, rel_h, rel_w), expected, rtol=0, atol=0)
    assert len(calls) == 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_heads_of_a_fused_projection_read_in_place(dtype):
    """4-D q, k, v ``[B, heads, N, D]``: strided views of one ``[B, N, 3, heads, D]`` qkv projection (the
    encoder's), rel_h/rel_w ``[B, heads, N, .]``. Equal to the 3-D op on the same rows, and the output is
    token-major (``out.transpose(1, 2)`` contiguous: the output projection reads it without a copy)."""
    batch, heads, grid_h, grid_w, d = 2, 3, 4, 5, 16
    n = grid_h * grid_w
    q, k, v = torch.randn(batch, n, 3, heads, d, device=DEVICE).to(dtype).permute(2, 0, 3, 1, 4).unbind(0)
    rel_h = (2 * torch.randn(batch, heads, n, grid_h, device=DEVICE)).to(dtype)
    rel_w = (2 * torch.randn(batch, heads, n, grid_w, device=DEVICE)).to(dtype)
    with poison_buffers():
        out = rel_pos_attention_triton(q, k, v, rel_h, rel_w, block_m=16, block_n=16)
    assert out.shape == q.shape and out.transpose(1, 2).is_contiguous()
    flat = [t.reshape(batch * heads, *t.shape[2:]) for t in (q, k, v, rel_h, rel_w)]
    expected = rel_pos_attention_triton(*flat, block_m=16, block_n=16).view(q.shape)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)  # the same programs on the same rows
    gold = sdpa_with_mask(*(t.double() for t in flat), scale=d**-0.5).view(q.shape)
    torch_lowp = sdpa_with_mask(*flat, scale=d**-0.5).view(q.shape)
    assert_close_to_gold(out, gold, torch_lowp, fp32_tol=FP32_TOL)
    torch.testing.assert_close(rel_pos_attention_ref(q, k, v, rel_h, rel_w), rel_pos_attention_ref(*flat).view(q.shape))


def test_bad_inputs_raise():
    q, k, v, rel_h, rel_w = make_inputs(2, 3, 4, 16, torch.float16, "contiguous")
    cases = [
        ((q, k[:1], v, rel_h, rel_w), "share a \\[BH, N, D\\] shape"),
        ((q, k, v.float(), rel_h, rel_w), "share a dtype"),
        ((q, k, v, rel_h[:, :, :2], rel_w), "N = H \\* W, got \\[2, 12, 2\\]"),
        ((q, k, v, rel_h, rel_w[:1]), "must lead with \\[2, 12\\]"),
        ((q[0], k, v, rel_h, rel_w), "q must be \\[BH, N, .\\] or \\[B, heads, N, .\\]"),
        ((q, k, v, rel_h.unsqueeze(0), rel_w), "rel_h must be .* like q"),
        ((q.int(), k, v, rel_h, rel_w), "q must be float32"),
    ]
    for args, message in cases:
        for fn in (rel_pos_attention_triton, rel_pos_attention_ref):
            with pytest.raises(KernelInputError, match=message):
                fn(*args)
    for bad in (8, 24):
        with pytest.raises(KernelInputError, match="block_m"):
            rel_pos_attention_triton(q, k, v, rel_h, rel_w, block_m=bad)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "bh,grid",
    [(8 * 25 * 12, 14), (8 * 12, 64), (16, 64)],  # ViT-B windows at batch 8; ViT-B global at 8; ViT-H global at 1
)
def test_sam_shapes(bh, grid, dtype):
    q, k, v, rel_h, rel_w = make_inputs(bh, grid, grid, 64, dtype, "fused")
    if grid == 64 and bh > 16:  # the fp64 gold at [96, 4096, 4096] would take 12 GiB: check a slice of heads
        q, k, v, rel_h, rel_w = (t[:16] for t in (q, k, v, rel_h, rel_w))
        with poison_buffers():
            full = rel_pos_attention_triton(*make_inputs(bh, grid, grid, 64, dtype, "fused"))
        assert not full.isnan().any()
    check(q, k, v, rel_h, rel_w)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp32_honours_allow_tf32_off():
    """The fp32 model path on CUDA is verified against upstream at 1e-4 with TF32 off; the kernel must then
    use IEEE fp32 products and meet the fp32 tolerance at the 64 x 64 global shape."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        check(*make_inputs(24, 64, 64, 64, torch.float32, "contiguous"))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def test_tiny_sam_image_encoder_with_the_kernel_matches_the_reference(monkeypatch):
    """A tiny SAM image encoder (8 x 8 token grid: windowed blocks of 3 x 3 over a grid padded to 9 x 9, and
    one global block over all 64 tokens) with every attention forced through the Triton launcher (the
    interpreter on CPU) matches the same encoder on the reference path. fp32: atol = rtol = 1e-4."""
    from turboformer.models.sam.config import SamConfig
    from turboformer.models.sam.image_encoder import ImageEncoder

    config = SamConfig(image_size=128, encoder_embed_dim=32, encoder_depth=3, encoder_num_heads=2,
                       encoder_mlp_dim=64, encoder_global_attn_indexes=(1,), encoder_window_size=3,
                       prompt_embed_dim=16)
    torch.manual_seed(0)
    encoder = ImageEncoder(config).to(DEVICE).eval()
    with torch.no_grad():
        for block in encoder.blocks:  # SAM initialises the tables to zero: make the bias matter
            block.attn.rel_pos_h.normal_(std=0.5)
            block.attn.rel_pos_w.normal_(std=0.5)
        encoder.pos_embed.normal_(std=0.5)
    image = torch.randn(2, 3, 128, 128, device=DEVICE)
    with torch.no_grad(), use_reference():
        expected = encoder(image)
    calls = []

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return rel_pos_attention_triton(*args, **kwargs)

    monkeypatch.setattr(op, "rel_pos_attention_triton", spy)
    monkeypatch.setattr(utils, "use_triton", lambda x: not utils.reference_forced())  # as on CUDA
    with torch.no_grad(), poison_buffers():
        out = encoder(image)
    # [B, heads, N, D] views of each block's qkv projection: windowed blocks over 2 x 9 windows of 9 tokens,
    # the global block over 2 images of 64 tokens; 2 heads
    assert calls == [(18, 2, 9, 16), (2, 2, 64, 16), (18, 2, 9, 16)]
    assert out.shape == (2, 16, 8, 8)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    assert (out - expected).abs().max() > 0  # the kernel really ran (different summation order)


def test_sam_benchmark_logic_on_cpu(tmp_path, capsys):
    """``turboformer bench sam --device cpu``: the tiny config runs every variant and writes JSON + Markdown;
    without CUDA the GPU run exits 2 with a message."""
    import argparse
    import json

    from turboformer.benchmark import sam as bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--device", "cpu", "--batches", "2", "--repeat", "1", "--out", str(tmp_path)])
    assert bench.run(args) == 0
    results = json.loads((tmp_path / "cpu" / "sam.json").read_text())
    row = results["models"]["cpu_tiny"]["rows"]["2"]
    upstream = ("upstream_fp32", "upstream_bf16") if "upstream_fp32" in row else ()  # when segment_anything imports
    if "segment_anything" in sys.modules or importlib.util.find_spec("segment_anything") is not None:
        assert upstream, "segment_anything is installed but the benchmark did not run it"
    for variant in ("ours_bf16", "ours_sdpa_bf16", "ours_int8", "ours_fp32", *upstream):
        assert row[variant]["images_per_s"] > 0  # (peak_GiB is NaN on the CPU: no allocator statistics)
        assert row[variant]["TFLOPs"] == pytest.approx(row["GFLOP"] / row[variant]["encoder_ms"], rel=1e-6)
    assert row["ours_bf16"]["prompt_ms"] > 0 and row["ours_fp32"]["prompt_ms"] > 0
    decoder = results["models"]["cpu_tiny"]["decoder"]
    for prompts in ("1", "64"):
        times = decoder[prompts]
        assert times["ours_ms"] > 0 and times["ours_eager_ms"] > 0
        if upstream:
            assert times["speedup"] == pytest.approx(times["upstream_fp32_ms"] / times["ours_ms"])
    assert set(row["attention_bf16"]) == {"window", "global"}
    assert "| cpu_tiny | 2 |" in (tmp_path / "cpu" / "sam.md").read_text()
    # 2 blocks of a 16 x 16 grid at width 64 (one windowed over 28 x 28 padded, one global), 2 images
    c, t = 64, 256
    blocks = 2 * (8 * t * c * c + 4 * t * c * 128) + 4 * 784 * 196 * c + 4 * 784 * 14 * c + 4 * t * t * c + 4 * t * 16 * c
    expected = 2 * (blocks + 2 * t * c * 768 + 2 * t * c * 256 + 2 * t * 256 * 256 * 9)
    assert row["GFLOP"] == pytest.approx(expected / 1e9)
    if not torch.cuda.is_available():
        assert bench.run(parser.parse_args(["--out", str(tmp_path)])) == 2
        assert "needs a CUDA GPU" in capsys.readouterr().err


def test_sam_benchmark_times_our_decoder_without_upstream(tmp_path, monkeypatch):
    """Where segment_anything is not importable (the GPU machine without its wheel), the decoder is still timed,
    ours alone (it used to be skipped, leaving the decoder table empty)."""
    import argparse
    import json

    from turboformer.benchmark import sam as bench

    monkeypatch.setattr(bench, "import_upstream_modeling", lambda: None)
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--device", "cpu", "--batches", "1", "--repeat", "1", "--out", str(tmp_path)])
    assert bench.run(args) == 0
    results = json.loads((tmp_path / "cpu" / "sam.json").read_text())
    assert not results["upstream"]
    decoder = results["models"]["cpu_tiny"]["decoder"]
    assert set(decoder) == {"1", "64"}
    assert all(d["ours_ms"] > 0 and "upstream_fp32_ms" not in d for d in decoder.values())
