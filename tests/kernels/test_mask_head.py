"""SAM's fused mask head against an fp64 formulation: conv_transpose2d + GELU + einsum over the channels.

On CPU the Triton launcher runs in the Triton interpreter (small shapes: channel counts that are not powers
of two, M = 1 and 4 masks, pixel counts that are not a multiple of the tile, several tiles per image,
non-square maps, so a swapped (di, dj) or (i, j) shows); on CUDA it runs compiled, and the ``cuda``-marked
tests add SAM's shape (64 prompts, Cin 64 -> Cout 32 at 128 x 128 -> 256 x 256, M = 4) and capture in a
CUDA graph.

The output is fp32 whatever the inputs' dtype, so the shared rule of kernel_tolerance.py is applied by hand:
fp32 inputs within atol = rtol = 1e-4 of the fp64 result (sums of 64 + 32 products of O(1) terms); fp16/bf16
inputs: the kernel's max error against fp64 at most twice the error of the unfused PyTorch ops in that
dtype (``mask_head_ref``, what the decoder ran before). Under the interpreter bf16 casts truncate where the
GPU rounds to nearest, so bf16 also gets the truncation of the two rounded intermediates (conv output and
GELU output, each < 1 bf16 ulp = 2^-7 relative; GELU's slope is below 1.13) carried through the mask sum:
``3 * 2^-7 * max(|hyper| @ |conv output|)``.
"""

import pytest
import torch
import torch.nn.functional as F

from turboformer.kernels import KernelInputError, poison_buffers, use_reference, utils
from turboformer.kernels import mask_head as module
from turboformer.kernels.mask_head import MAX_CHANNELS, mask_head, mask_head_ref, mask_head_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def true_fp32():
    """The fp32 reference's conv_transpose2d runs in cuDNN: keep it (and the kernel) out of TF32."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def make_inputs(batch, cin, cout, masks, h, w, dtype, seed=0):
    """y, weight, bias, hyper at the scales of SAM's decoder: y after LayerNorm + GELU (O(1)), a conv
    weight of fan-in scale, hypernetwork weights O(1)."""
    g = torch.Generator().manual_seed(seed)
    y = F.gelu(torch.randn(batch, cin, h, w, generator=g))
    weight = torch.randn(cin, cout, 2, 2, generator=g) * (2 / cin) ** 0.5
    bias = torch.randn(cout, generator=g) * 0.2
    hyper = torch.randn(batch, masks, cout, generator=g)
    return tuple(t.to(DEVICE, dtype) for t in (y, weight, bias, hyper))


def gold_of(y, weight, bias, hyper):
    """fp64: masks[b, m, x, y] = sum_c hyper[b, m, c] gelu(conv_transpose2d(y)[b, c, x, y]); and the conv."""
    z = F.conv_transpose2d(y.double(), weight.double(), bias.double(), stride=2)
    return torch.einsum("bmc,bcxy->bmxy", hyper.double(), F.gelu(z)), z


def assert_close_to_gold(out, gold, z, y, hyper, lowp_ref):
    assert out.dtype == torch.float32 and out.shape == gold.shape
    assert not out.isnan().any(), "kernel left NaN (unwritten or poisoned) elements"
    if y.dtype == torch.float32:
        torch.testing.assert_close(out.double(), gold, atol=1e-4, rtol=1e-4)
        return
    err = (out.double() - gold).abs().max().item()
    bound = 2 * (lowp_ref.double() - gold).abs().max().item() + 1e-6
    if y.dtype == torch.bfloat16 and utils.interpreting():
        bound += 3 * 2**-7 * torch.einsum("bmc,bcxy->bmxy", hyper.double().abs(), z.abs()).max().item()
    assert err <= bound, f"{y.dtype}: max error {err:.3g} > bound {bound:.3g}"


def check(y, weight, bias, hyper, block_p=None):
    gold, z = gold_of(y, weight, bias, hyper)
    ref = mask_head_ref(y, weight, bias, hyper)
    with poison_buffers():
        out = mask_head_triton(y, weight, bias, hyper, block_p=block_p)
    assert_close_to_gold(out, gold, z, y, hyper, ref)
    assert_close_to_gold(ref, gold, z, y, hyper, ref)


# (B, Cin, Cout, M, h, w, block_p): Cin 24 and Cout 20 pad to 32; M = 1 and 4 pad to 16; 5 x 7 = 35 pixels
# are 3 tiles of 16 with a ragged tail; B = 3 with 12 x 11 = 132 pixels = 9 tiles; SAM's Cin 64 / Cout 32.
SHAPES = [
    (1, 24, 20, 4, 5, 7, 16),
    (3, 64, 32, 4, 12, 11, 16),
    (3, 64, 32, 1, 6, 9, None),
    (1, 16, 8, 3, 1, 1, None),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,cin,cout,masks,h,w,block_p", SHAPES)
def test_mask_head(batch, cin, cout, masks, h, w, block_p, dtype):
    check(*make_inputs(batch, cin, cout, masks, h, w, dtype), block_p=block_p)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,cin,cout,masks,h,w,block_p", SHAPES[:3])
def test_channels_last_and_strided_inputs(batch, cin, cout, masks, h, w, block_p, dtype):
    """A channels-last map (what the decoder's first transposed convolution gives) is read in place; a map in
    neither layout (every other column of a wider one) is copied first. Same results either way."""
    y, weight, bias, hyper = make_inputs(batch, cin, cout, masks, h, w, dtype)
    check(y.contiguous(memory_format=torch.channels_last), weight, bias, hyper, block_p=block_p)
    wide = torch.zeros(batch, cin, h, 2 * w, device=y.device, dtype=dtype)
    wide[..., ::2] = y
    check(wide[..., ::2], weight, bias, hyper, block_p=block_p)


def test_reference_is_the_unfused_decoder_tail():
    """mask_head_ref is conv2 -> GELU in the input dtype, then the fp32 product (what predict_all ran)."""
    y, weight, bias, hyper = make_inputs(2, 16, 8, 4, 3, 5, torch.bfloat16)
    conv = torch.nn.ConvTranspose2d(16, 8, kernel_size=2, stride=2).to(DEVICE, torch.bfloat16)
    with torch.no_grad():
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
        up = F.gelu(conv(y))  # [2, 8, 6, 10], bf16
        expected = (hyper.float() @ up.flatten(2).float()).view(2, 4, 6, 10)
    torch.testing.assert_close(mask_head_ref(y, weight, bias, hyper), expected, rtol=0, atol=0)


def test_bad_inputs_raise():
    y, weight, bias, hyper = make_inputs(2, 16, 8, 4, 3, 3, torch.float32)
    with pytest.raises(KernelInputError, match="kernel-2 ConvTranspose2d weight"):
        mask_head_triton(y, weight[:, :, :1], bias, hyper)
    with pytest.raises(KernelInputError, match="kernel-2 ConvTranspose2d weight"):
        mask_head_triton(y, weight[:8], bias, hyper)
    with pytest.raises(KernelInputError, match="bias must have shape"):
        mask_head_triton(y, weight, bias[:4], hyper)
    with pytest.raises(KernelInputError, match="hyper must have shape"):
        mask_head_triton(y, weight, bias, hyper[:1])
    with pytest.raises(KernelInputError, match="share a dtype"):
        mask_head_triton(y.half(), weight, bias, hyper)
    with pytest.raises(KernelInputError, match=r"\[B, Cin, h, w\]"):
        mask_head_ref(y[0], weight, bias, hyper)
    with pytest.raises(KernelInputError, match="block_p"):
        mask_head_triton(y, weight, bias, hyper, block_p=24)
    wide = make_inputs(1, MAX_CHANNELS + 1, 8, 1, 2, 2, torch.float32)
    with pytest.raises(KernelInputError, match="exceed"):
        mask_head_triton(*wide)


def test_dispatcher(monkeypatch):
    """CPU tensors and use_reference() take the reference; CUDA tensors take the launcher."""
    monkeypatch.delenv("TURBOFORMER_KERNELS", raising=False)
    args = make_inputs(2, 16, 8, 4, 3, 5, torch.float16)
    calls = []
    launcher = module.mask_head_triton
    monkeypatch.setattr(module, "mask_head_triton", lambda *a: calls.append(1) or launcher(*a))
    with use_reference():
        torch.testing.assert_close(mask_head(*args), mask_head_ref(*args), rtol=0, atol=0)
    assert calls == []
    mask_head(*args)
    assert calls == ([1] if DEVICE == "cuda" else [])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES)
def test_sam_shape(dtype):
    """The mask decoder's tail at 64 prompts: [64, 64, 128, 128] -> masks [64, 4, 256, 256]."""
    check(*make_inputs(64, 64, 32, 4, 128, 128, dtype))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_captures_in_a_cuda_graph():
    args = make_inputs(4, 64, 32, 4, 32, 32, torch.float16)
    mask_head_triton(*args)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = mask_head_triton(*args)
    for static, new in zip(args, make_inputs(4, 64, 32, 4, 32, 32, torch.float16, seed=1)):
        static.copy_(new)
    graph.replay()
    torch.testing.assert_close(out, mask_head_triton(*args), rtol=0, atol=0)
