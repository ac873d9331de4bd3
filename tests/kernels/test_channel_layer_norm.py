"""Channel LayerNorm (+ GELU) of NCHW maps against F.layer_norm on the NHWC permutation in fp64.

On CPU the Triton launcher runs in the Triton interpreter (small shapes: channel counts that are not powers
of two, pixel counts that are not a multiple of the tile, several tiles per image); on CUDA it runs compiled,
and the ``cuda``-marked tests add SAM's mask-decoder shape ([64, 64, 128, 128] at 64 prompts) and capture in
a CUDA graph.

Tolerances: fp32 within atol = rtol = 1e-5 of the fp64 result. fp16/bf16: the kernel's max error against
the fp64 result is at most twice the error of PyTorch's own ops in that dtype (F.layer_norm on the
permuted map, then F.gelu); under the interpreter bf16 also gets one bf16 ulp of max |result| (see
tests/support/kernel_tolerance.py).
"""

import pytest
import torch
import torch.nn.functional as F
from kernel_tolerance import assert_close_to_gold

from turboformer.kernels import KernelInputError, poison_buffers, use_reference
from turboformer.kernels import channel_layer_norm as module
from turboformer.kernels.channel_layer_norm import (
    MAX_CHANNELS,
    channel_layer_norm,
    channel_layer_norm_ref,
    channel_layer_norm_triton,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPS = 1e-6  # SAM's LayerNorm2d


def make_map(shape, dtype):
    """A feature map with a non-zero mean per pixel (as after a convolution) and a spread of scales."""
    return (torch.randn(shape, device=DEVICE) * 2 + 0.5).to(dtype)


def affine(c):
    return torch.randn(c, device=DEVICE) * 0.5 + 1, torch.randn(c, device=DEVICE) * 0.3


def gold_and_lowp(x, weight, bias, gelu):
    """fp64 gold (F.layer_norm over the last axis of the NHWC view) and PyTorch's own ops in x's dtype."""
    c = x.shape[1]

    def ops(t, w, b):
        y = F.layer_norm(t.permute(0, 2, 3, 1), (c,), w, b, EPS).permute(0, 3, 1, 2)
        return F.gelu(y) if gelu else y

    gold = ops(x.double(), weight.double(), bias.double())
    return gold, ops(x, weight.to(x.dtype), bias.to(x.dtype))


def _layout(x):
    nchw = x.is_contiguous()
    return torch.channels_last if not nchw and x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format


def check(x, weight, bias, gelu, block_p=None):
    gold, torch_lowp = gold_and_lowp(x, weight, bias, gelu)
    with poison_buffers():
        out = channel_layer_norm_triton(x, weight, bias, EPS, gelu, block_p=block_p)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.stride() == x.contiguous(memory_format=_layout(x)).stride()  # x's layout kept
    assert_close_to_gold(out, gold, torch_lowp)
    assert_close_to_gold(channel_layer_norm_ref(x, weight, bias, EPS, gelu), gold, torch_lowp)


# (B, C, H, W), pixels per program: C = 24, 3 and 40 (not powers of two), 64 and 256 (SAM's upscaler, its
# encoder neck); H * W = 35, 130, 1122 and 1 are not multiples of the tile; 130 pixels in tiles of 128 and
# 63 pixels in tiles of 16 make several tiles per image with a ragged last one.
SHAPES = [
    ((1, 24, 5, 7), None),
    ((3, 64, 10, 13), None),
    ((3, 24, 7, 9), 16),
    ((2, 3, 33, 34), None),
    ((1, 256, 6, 6), None),
    ((3, 40, 1, 1), None),
]


@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,block_p", SHAPES)
def test_channel_layer_norm(shape, block_p, dtype, gelu):
    check(make_map(shape, dtype), *affine(shape[1]), gelu, block_p)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,block_p", SHAPES)
def test_channels_last_map_read_in_place(shape, block_p, dtype):
    """A channels-last map (the mask decoder's transposed convolution of token-major image features) is read
    with its own strides and normalised into a channels-last output; a map in neither layout is copied."""
    x = make_map(shape, dtype).contiguous(memory_format=torch.channels_last)
    check(x, *affine(shape[1]), True, block_p)
    strided = make_map((shape[0], shape[1], shape[2], 2 * shape[3]), dtype)[..., ::2]  # every other column
    check(strided, *affine(shape[1]), False, block_p)


def test_large_mean_keeps_fp32_statistics():
    """A mean of 100 over unit spread: fp16/bf16 statistics would cancel away most digits."""
    x = (100 + torch.randn(2, 64, 5, 7, device=DEVICE)).to(torch.float16)
    check(x, *affine(64), gelu=True)


def test_non_contiguous_input_and_half_weights():
    x = make_map((2, 7, 24, 9), torch.float16).transpose(1, 2)  # [2, 24, 7, 9], channels not outermost
    weight, bias = affine(24)
    check(x, weight.half(), bias.half(), gelu=False)


def test_fp32_without_gelu_is_upstream_layer_norm_2d():
    """The reference is upstream SAM's LayerNorm2d maths, operation for operation."""
    from turboformer.models.sam.layers import LayerNorm2d

    norm = LayerNorm2d(24).to(DEVICE)
    with torch.no_grad():
        norm.weight.copy_(affine(24)[0])
        norm.bias.copy_(affine(24)[1])
    x = make_map((2, 24, 5, 6), torch.float32)
    torch.testing.assert_close(channel_layer_norm_ref(x, norm.weight, norm.bias, norm.eps), norm(x), rtol=0, atol=0)


def test_bad_inputs_raise():
    x = make_map((2, 16, 3, 3), torch.float32)
    weight, bias = affine(16)
    with pytest.raises(KernelInputError, match="weight must have shape"):
        channel_layer_norm_triton(x, weight[:8], bias, EPS)
    with pytest.raises(KernelInputError, match=r"\[B, C, H, W\]"):
        channel_layer_norm_triton(x[0], weight, bias, EPS)
    with pytest.raises(KernelInputError, match="x must be float32"):
        channel_layer_norm_ref(x.to(torch.int32), weight, bias, EPS)
    wide = torch.zeros(1, MAX_CHANNELS + 1, 2, 2, device=DEVICE)
    with pytest.raises(KernelInputError, match="exceed"):
        channel_layer_norm_triton(wide, *affine(MAX_CHANNELS + 1), EPS)
    with pytest.raises(KernelInputError, match="block_p"):
        channel_layer_norm_triton(x, weight, bias, EPS, block_p=24)


def test_dispatcher(monkeypatch):
    """CPU tensors and use_reference() take the reference; CUDA tensors take the launcher."""
    monkeypatch.delenv("TURBOFORMER_KERNELS", raising=False)
    x = make_map((2, 24, 5, 7), torch.float16)
    weight, bias = affine(24)
    calls = []
    launcher = module.channel_layer_norm_triton
    monkeypatch.setattr(module, "channel_layer_norm_triton", lambda *a: calls.append(1) or launcher(*a))
    with use_reference():
        torch.testing.assert_close(
            channel_layer_norm(x, weight, bias, EPS, True), channel_layer_norm_ref(x, weight, bias, EPS, True),
            rtol=0, atol=0,
        )
    assert calls == []
    channel_layer_norm(x, weight, bias, EPS, True)
    assert calls == ([1] if DEVICE == "cuda" else [])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES)
def test_sam_upscaler_shape(dtype):
    """The mask decoder's first upscaling stage at 64 prompts: [64, 64, 128, 128], LayerNorm + GELU."""
    check(make_map((64, 64, 128, 128), dtype), *affine(64), gelu=True)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_captures_in_a_cuda_graph():
    x = make_map((4, 64, 32, 32), torch.float16)
    weight, bias = affine(64)
    channel_layer_norm_triton(x, weight, bias, EPS, True)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = channel_layer_norm_triton(x, weight, bias, EPS, True)
    x.copy_(make_map(x.shape, x.dtype))
    graph.replay()
    torch.testing.assert_close(out, channel_layer_norm_triton(x, weight, bias, EPS, True), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_shift_is_added_before_the_statistics(dtype):
    """``shift`` (a preceding convolution's bias) is added to x in fp32 before the LayerNorm: equal to the fp64
    LayerNorm of x + shift, NCHW and channels-last."""
    x = make_map((2, 24, 5, 7), dtype)
    weight, bias = affine(24)
    shift = torch.randn(24, device=DEVICE).to(dtype)
    shifted = (x.double() + shift.double()[:, None, None])
    gold, _ = gold_and_lowp(shifted, weight, bias, True)
    torch_lowp = gold_and_lowp(shifted.to(dtype), weight, bias, True)[1]
    for layout in (torch.contiguous_format, torch.channels_last):
        xl = x.contiguous(memory_format=layout)
        with poison_buffers():
            out = channel_layer_norm_triton(xl, weight, bias, EPS, True, shift)
        assert_close_to_gold(out, gold, torch_lowp)
        assert_close_to_gold(channel_layer_norm_ref(xl, weight, bias, EPS, True, shift), gold, torch_lowp)
    with pytest.raises(KernelInputError, match="shift"):
        channel_layer_norm_ref(x, weight, bias, EPS, True, shift[:3])
