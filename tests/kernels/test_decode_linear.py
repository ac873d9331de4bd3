"""The decode-step linear layer (LayerNorm prologue; bias, GELU, residual or KV-cache epilogue) against the same
ops composed in fp64 from torch.nn.functional.

On CPU the Triton launcher runs in the Triton interpreter (small, awkward shapes); on CUDA it runs compiled, and the
``cuda``-marked tests add Whisper large-v3 and tiny shapes, INT8 weights and a CUDA-graph capture.

Tolerances: the gold is the fp64 composition with the activations rounded where the op rounds them (the LayerNorm
output to the activation dtype); the kernel's max error against it is at most twice that of PyTorch's own ops run
in the activation dtype (F.layer_norm, F.linear, F.gelu), plus 8 fp32 ulps of max |result| (fp32 sums of K
products carry a K-dependent error that a fixed tolerance would not track); under the interpreter bf16 also gets one
bf16 ulp of max |result| (its numpy emulation truncates fp32 -> bf16 where the GPU rounds to nearest even).
"""

import pytest
import torch
import torch.nn.functional as F

from turboformer.kernels import KernelInputError, poison_buffers, utils
from turboformer.kernels.decode_linear import (
    MAX_FEATURES,
    MAX_ROWS,
    KVCache,
    decode_linear,
    decode_linear_ref,
    decode_linear_triton,
)
from turboformer.kernels.int8_linear import dequantize_weight, quantize_weight

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPS = 1e-5


def bound_of(gold, torch_lowp, dtype):
    bound = 2 * (torch_lowp.double() - gold).abs().max().item() + 1e-6
    bound += 8 * torch.finfo(torch.float32).eps * gold.abs().max().item()
    bound += 0.5 * torch.finfo(dtype).eps * gold.abs().max().item()  # the output's own rounding (kernel_tolerance)
    if dtype == torch.bfloat16 and utils.interpreting():
        bound += gold.abs().max().item() * 2**-7
    return bound


def assert_within(out, gold, bound):
    assert not out.isnan().any(), "kernel left NaN (unwritten or poisoned) elements"
    err = (out.double() - gold).abs().max().item()
    assert err <= bound, f"{out.dtype}: max error {err:.3g} > bound {bound:.3g}"


def make_case(m, n, k, dtype, int8=False, group=None, with_ln=False):
    """x: the fp32 residual stream (non-zero mean) when with_ln, else activations in dtype; a weight whose rows'
    magnitudes spread over 100x, as in trained layers."""
    w = torch.randn(n, k, device=DEVICE) * torch.logspace(-2, 0, n, device=DEVICE)[:, None] / k**0.5 * 4
    if int8:
        weight, scale = quantize_weight(w, group)
        w_exact = dequantize_weight(weight, scale)
    else:
        weight, scale = w.to(dtype), None
        w_exact = weight.float()
    bias = (torch.randn(n, device=DEVICE) * 0.1).to(dtype)
    if with_ln:
        x = torch.randn(m, k, device=DEVICE) * 2 + 0.5
        ln = (torch.randn(k, device=DEVICE) * 0.3 + 1).to(dtype), (torch.randn(k, device=DEVICE) * 0.1).to(dtype)
    else:
        x, ln = torch.randn(m, k, device=DEVICE).to(dtype), None
    return x, weight, scale, w_exact, bias, ln


def gold_and_lowp(x, w_exact, bias, ln, gelu, dtype):
    """(fp64 gold, PyTorch's own ops in dtype) of prologue -> linear -> bias -> GELU."""
    k = x.shape[1]
    if ln is not None:
        h = F.layer_norm(x.double(), (k,), ln[0].double(), ln[1].double(), EPS).to(dtype)
        h_lowp = F.layer_norm(x.to(dtype), (k,), ln[0], ln[1], EPS)
    else:
        h = h_lowp = x.to(dtype)
    gold = F.linear(h.double(), w_exact.double(), bias.double())
    lowp = F.linear(h_lowp, w_exact.to(dtype), bias.to(dtype))
    if gelu:
        gold, lowp = F.gelu(gold), F.gelu(lowp)
    return gold, lowp


# (M, N, K): single rows, odd M up to MAX_ROWS, K not a multiple of any tile, N not a multiple of BLOCK_N
SHAPES = [(1, 40, 100), (3, 37, 130), (MAX_ROWS, 24, 64), (5, 130, 300)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("with_ln,gelu", [(False, False), (True, False), (True, True)])
def test_plain_and_ln_gelu_match_gold(dtype, m, n, k, with_ln, gelu):
    x, weight, _, w_exact, bias, ln = make_case(m, n, k, dtype, with_ln=with_ln)
    gold, lowp = gold_and_lowp(x, w_exact, bias, ln, gelu, dtype)
    with poison_buffers():
        out = decode_linear_triton(x, weight, bias, ln=ln, eps=EPS, gelu=gelu)
    assert out.shape == (m, n) and out.dtype == dtype
    bound = bound_of(gold, lowp, dtype)
    assert_within(out, gold, bound)
    assert_within(decode_linear_ref(x, weight, bias, ln=ln, eps=EPS, gelu=gelu), gold, bound)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fp32_logits_from_half_weights(dtype):
    """The vocabulary projection: final LayerNorm fused, fp16/bf16 weights, fp32 output."""
    x, weight, _, w_exact, bias, ln = make_case(2, 77, 96, dtype, with_ln=True)
    gold, lowp = gold_and_lowp(x, w_exact, bias, ln, False, dtype)
    out = decode_linear_triton(x, weight, bias, ln=ln, eps=EPS, out_dtype=torch.float32)
    assert out.dtype == torch.float32
    assert_within(out, gold, bound_of(gold, lowp, dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_residual_epilogue_adds_in_place(dtype):
    m, n, k = 3, 50, 120
    x, weight, _, w_exact, bias, _ = make_case(m, n, k, dtype)
    stream = torch.randn(m, n, device=DEVICE) * 3  # the fp32 residual stream
    gold, lowp = gold_and_lowp(x, w_exact, bias, None, False, dtype)
    before = stream.clone()
    out = decode_linear_triton(x, weight, bias, residual=stream)
    assert out.data_ptr() == stream.data_ptr()
    bound = bound_of(gold, lowp, dtype) + 8 * torch.finfo(torch.float32).eps * before.abs().max().item()
    assert_within(stream, before.double() + gold, bound)
    again = before.clone()
    decode_linear_ref(x, weight, bias, residual=again)
    assert_within(again, before.double() + gold, bound)


def kv_case(m, heads, head_dim, k, dtype, int8=False):
    c = heads * head_dim
    x, weight, scale, w_exact, bias, ln = make_case(m, 3 * c, k, dtype, int8=int8, group=32 if int8 else None,
                                                    with_ln=True)  # fmt: skip
    if int8:
        bias = bias.to(dtype)
    t = 9
    caches = [torch.full((m + 2, heads, t, head_dim), 7.0, device=DEVICE, dtype=dtype)[1 : m + 1] for _ in range(2)]
    pos = torch.tensor([(3 * i + 2) % t for i in range(m)], device=DEVICE)
    return x, weight, scale, w_exact, bias, ln, caches, pos


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("int8", [False, True])
def test_kv_cache_epilogue_writes_keys_and_values(dtype, int8):
    m, heads, head_dim, k = 3, 2, 8, 48
    x, weight, scale, w_exact, bias, ln, (kc, vc), pos = kv_case(m, heads, head_dim, k, dtype, int8)
    gold, lowp = gold_and_lowp(x, w_exact, bias, ln, False, dtype)
    bound = bound_of(gold, lowp, dtype)
    c = heads * head_dim
    ref_caches = kc.clone(), vc.clone()
    q = decode_linear_triton(x, weight, bias, scale=scale, ln=ln, eps=EPS, kv_cache=KVCache(kc, vc, pos),
                             act_dtype=dtype)  # fmt: skip
    q_ref = decode_linear_ref(x, weight, bias, scale=scale, ln=ln, eps=EPS, kv_cache=KVCache(*ref_caches, pos),
                              act_dtype=dtype)  # fmt: skip
    assert q.shape == (m, c)
    for out_q, (out_k, out_v) in ((q, (kc, vc)), (q_ref, ref_caches)):
        assert_within(out_q, gold[:, :c], bound)
        rows = torch.arange(m, device=DEVICE)
        for cache, part in ((out_k, 1), (out_v, 2)):
            written = cache[rows, :, pos].reshape(m, c)
            assert_within(written, gold[:, part * c : (part + 1) * c], bound)
            untouched = torch.ones_like(cache, dtype=torch.bool)
            untouched[rows, :, pos] = False
            assert (cache[untouched] == 7).all(), "the epilogue wrote outside the rows' columns"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group", [None, 32, 24])
@pytest.mark.parametrize("with_ln,gelu", [(False, False), (True, True)])
def test_int8_weights(dtype, group, with_ln, gelu):
    x, weight, scale, w_exact, bias, ln = make_case(3, 40, 96, dtype, int8=True, group=group, with_ln=with_ln)
    gold, lowp = gold_and_lowp(x, w_exact, bias, ln, gelu, dtype)
    out = decode_linear_triton(x, weight, bias, scale=scale, ln=ln, eps=EPS, gelu=gelu, act_dtype=dtype)
    assert out.dtype == dtype
    assert_within(out, gold, bound_of(gold, lowp, dtype))


def test_dispatcher_takes_the_reference_on_cpu_and_for_many_rows():
    x, weight, _, w_exact, bias, ln = make_case(MAX_ROWS + 3, 20, 40, torch.float32, with_ln=True)
    gold, lowp = gold_and_lowp(x, w_exact, bias, ln, True, torch.float32)
    out = decode_linear(x, weight, bias, ln=ln, eps=EPS, gelu=True)
    assert_within(out, gold, bound_of(gold, lowp, torch.float32))
    with pytest.raises(KernelInputError, match="at most"):
        decode_linear_triton(x, weight, bias)
    x, weight, _, w_exact, bias, _ = make_case(2, 3, MAX_FEATURES + 8, torch.float32)
    gold, lowp = gold_and_lowp(x, w_exact, bias, None, False, torch.float32)
    assert_within(decode_linear(x, weight, bias), gold, bound_of(gold, lowp, torch.float32))
    with pytest.raises(KernelInputError, match="features"):
        decode_linear_triton(x, weight, bias)


def test_bad_inputs_are_refused():
    x, weight, _, _, bias, ln = make_case(2, 30, 12, torch.float32, with_ln=True)
    with pytest.raises(KernelInputError, match=r"\[N, K=12\]"):
        decode_linear_ref(x, weight[:, :10], bias)
    with pytest.raises(KernelInputError, match="two different epilogues"):
        kc = torch.zeros(2, 1, 4, 10)
        decode_linear_ref(x, weight, bias, residual=torch.zeros(2, 30), kv_cache=KVCache(kc, kc, torch.zeros(2).long()))
    with pytest.raises(KernelInputError, match="N = 3 C"):
        kc = torch.zeros(2, 1, 4, 10)
        decode_linear_ref(x, weight[:29], bias[:29], kv_cache=KVCache(kc, kc, torch.zeros(2).long()))
    with pytest.raises(KernelInputError, match="act_dtype"):
        w8, s = quantize_weight(weight)
        decode_linear_ref(x, w8, bias, scale=s)
    with pytest.raises(KernelInputError, match="residual must be"):
        decode_linear_ref(x, weight, bias, residual=torch.zeros(3, 30))


# ---------------------------------------------------------------------------------------------------- CUDA ---


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 2, 5, 8])
@pytest.mark.parametrize("n,k,with_ln,gelu", [(3840, 1280, True, False), (1280, 1280, False, False),
                                              (5120, 1280, True, True), (1280, 5120, False, False),
                                              (51866, 1280, True, False), (1152, 384, True, False)])  # fmt: skip
def test_whisper_shapes_cuda(dtype, m, n, k, with_ln, gelu):
    x, weight, _, w_exact, bias, ln = make_case(m, n, k, dtype, with_ln=with_ln)
    gold, lowp = gold_and_lowp(x, w_exact, bias, ln, gelu, dtype)
    with poison_buffers():
        out = decode_linear_triton(x, weight, bias, ln=ln, eps=EPS, gelu=gelu)
    assert_within(out, gold, bound_of(gold, lowp, dtype))


@pytest.mark.cuda
@pytest.mark.parametrize("group", [None, 64])
def test_int8_whisper_shapes_cuda(group):
    for n, k, with_ln in ((3840, 1280, True), (1280, 5120, False)):
        x, weight, scale, w_exact, bias, ln = make_case(2, n, k, torch.float16, int8=True, group=group,
                                                        with_ln=with_ln)  # fmt: skip
        gold, lowp = gold_and_lowp(x, w_exact, bias, ln, False, torch.float16)
        out = decode_linear_triton(x, weight, bias, scale=scale, ln=ln, eps=EPS, act_dtype=torch.float16)
        assert_within(out, gold, bound_of(gold, lowp, torch.float16))


@pytest.mark.cuda
def test_kv_cache_epilogue_in_a_cuda_graph():
    """Whisper large-v3's self-attention projection writes its keys at per-row columns inside a captured graph."""
    m, heads, head_dim, k = 4, 20, 64, 1280
    x, weight, _, w_exact, bias, ln, (kc, vc), pos = kv_case(m, heads, head_dim, k, torch.float16)
    gold, lowp = gold_and_lowp(x, w_exact, bias, ln, False, torch.float16)
    bound = bound_of(gold, lowp, torch.float16)
    cache = KVCache(kc, vc, pos)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        decode_linear_triton(x, weight, bias, ln=ln, eps=EPS, kv_cache=cache)  # compile + warm up
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        q = decode_linear_triton(x, weight, bias, ln=ln, eps=EPS, kv_cache=cache)
    kc.fill_(7), vc.fill_(7), q.zero_()
    graph.replay()
    torch.cuda.synchronize()
    c = heads * head_dim
    rows = torch.arange(m, device=DEVICE)
    assert_within(q, gold[:, :c], bound)
    assert_within(kc[rows, :, pos].reshape(m, c), gold[:, c : 2 * c], bound)
    assert_within(vc[rows, :, pos].reshape(m, c), gold[:, 2 * c :], bound)
