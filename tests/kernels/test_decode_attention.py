"""Flash-decoding attention (fp and int8 KV) against torch's scaled_dot_product_attention in fp64.

On CPU the Triton launchers run in the Triton interpreter (small shapes); on CUDA they run compiled, and the
``cuda``-marked tests add Whisper large-v3 shapes (20 heads of 64, self-KV 448, cross-KV 1500 frames).

Tolerances: fp32 within atol = rtol = 1e-5 of the fp64 result. fp16/bf16: the kernel's max error against
the fp64 result is at most twice the error of PyTorch's own SDPA run in that dtype on the same inputs;
under the interpreter bf16 also gets one bf16 ulp of max |result| (its numpy emulation truncates
fp32 -> bf16 where the GPU rounds to nearest even). int8 KV: the same rules, with the dequantised cache
(``k_int8 * k_scale``) as the exact input.
"""

import math

import pytest
import torch
from kernel_tolerance import assert_close_to_gold
import torch.nn.functional as F

from turboformer.kernels import KernelInputError, poison_buffers
from turboformer.kernels.decode_attention import (
    decode_attention_ref,
    decode_attention_triton,
    quantize_kv,
    split_counters,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def sdpa(q, k, v, lengths, scale):
    """torch SDPA for one query row per (batch, head), keys ``s < lengths[b]`` attended."""
    mask = None
    if lengths is not None:
        keep = torch.arange(k.shape[2], device=k.device) < lengths[:, None]  # [B, S]
        mask = keep[:, None, None, :]
    return F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask, scale=scale)[:, :, 0]


def make_cache(b, h, s, d, dtype, layout):
    """K and V ``[B, H, S, D]`` views: 'contiguous'; 'capacity' (first S rows of a longer cache, as the
    self-attention cache during decoding); 'bshd' (a [B, S, H, D] buffer transposed: S-stride = H * D)."""
    if layout == "contiguous":
        return [torch.randn(b, h, s, d, device=DEVICE).to(dtype) for _ in range(2)]
    if layout == "capacity":
        return [torch.randn(b, h, s + 19, d, device=DEVICE).to(dtype)[:, :, :s] for _ in range(2)]
    return [torch.randn(b, s, h, d, device=DEVICE).to(dtype).transpose(1, 2) for _ in range(2)]


def make_query(b, h, d, dtype):
    """q as the query third of a fused [B, H, 3 * D] projection: strides (3HD, 3D, 1)."""
    return torch.randn(b, h, 3 * d, device=DEVICE).to(dtype)[..., :d]


def make_lengths(b, s, kind):
    if kind == "none":
        return None
    if kind == "full":
        return torch.full((b,), s, dtype=torch.int32, device=DEVICE)
    lengths = torch.randint(1, s + 1, (b,), dtype=torch.int32, device=DEVICE)
    lengths[0] = 1
    lengths[-1] = s
    return lengths


# (B, H, S, D, cache layout, lengths, num_splits (None: the launcher's choice), block_s)
CASES = [
    (1, 2, 37, 64, "contiguous", "none", None, None),
    (3, 2, 100, 64, "capacity", "random", 3, None),
    (3, 2, 70, 80, "bshd", "random", 8, 16),
    (1, 3, 130, 128, "contiguous", "full", None, None),
    (2, 2, 45, 32, "capacity", "random", 1, 32),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,h,s,d,layout,lengths_kind,num_splits,block_s", CASES)
def test_decode_attention(b, h, s, d, layout, lengths_kind, num_splits, block_s, dtype):
    q = make_query(b, h, d, dtype)
    k, v = make_cache(b, h, s, d, dtype, layout)
    lengths = make_lengths(b, s, lengths_kind)
    scale = 0.7 / math.sqrt(d)
    gold = sdpa(q.double(), k.double(), v.double(), lengths, scale)
    torch_lowp = sdpa(q, k, v, lengths, scale)
    with poison_buffers():
        out = decode_attention_triton(q, k, v, lengths, scale, num_splits=num_splits, block_s=block_s)
    assert out.shape == (b, h, d) and out.dtype == dtype
    assert_close_to_gold(out, gold, torch_lowp)
    assert_close_to_gold(decode_attention_ref(q, k, v, lengths, scale), gold, torch_lowp)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,h,s,d,layout,lengths_kind,num_splits,block_s", CASES[1:3])
def test_decode_attention_int8_kv(b, h, s, d, layout, lengths_kind, num_splits, block_s, dtype):
    q = make_query(b, h, d, dtype)
    k, v = make_cache(b, h, s, d, dtype, layout)
    (k8, k_scale), (v8, v_scale) = quantize_kv(k), quantize_kv(v)
    lengths = make_lengths(b, s, lengths_kind)
    k_deq, v_deq = k8.double() * k_scale.double(), v8.double() * v_scale.double()
    gold = sdpa(q.double(), k_deq, v_deq, lengths, None)
    torch_lowp = sdpa(q, k_deq.to(dtype), v_deq.to(dtype), lengths, None)
    with poison_buffers():
        out = decode_attention_triton(
            q, k8, v8, lengths, k_scale=k_scale, v_scale=v_scale, num_splits=num_splits, block_s=block_s
        )
    assert_close_to_gold(out, gold, torch_lowp)
    assert_close_to_gold(decode_attention_ref(q, k8, v8, lengths, k_scale=k_scale, v_scale=v_scale), gold, torch_lowp)


# (B, H, S, D, lengths, num_splits, block_s): several splits, lengths ending inside, at and past a split's first
# tile, a split past every length (it stores an empty partial that the last program must still count)
LAUNCH_CASES = [
    (1, 2, 150, 64, "random", 3, 32),
    (3, 2, 100, 32, "random", 4, 16),
    (2, 3, 70, 80, "full", 5, 16),
    (2, 1, 64, 16, "random", 8, 16),
]


@pytest.mark.parametrize("prefetch", ["none", "all", "all_but_last"])
@pytest.mark.parametrize("b,h,s,d,lengths_kind,num_splits,block_s", LAUNCH_CASES)
def test_prefetch_and_counted_merge(b, h, s, d, lengths_kind, num_splits, block_s, prefetch):
    """The PDL prefetch variants and the last-program merge (``counters``) against fp64 SDPA, fp16 and int8
    K/V; the counters are zero again after every launch, so one set serves launch after launch. (The race that
    'all_but_last' guards against, a key written by the kernel before, needs a GPU: test_prefetch_after_a_writer.)"""
    g = torch.Generator().manual_seed(b * 100 + s)
    q = torch.randn(b, h, d, generator=g).to(DEVICE, torch.float16)
    k, v = (torch.randn(b, h, s, d, generator=g).to(DEVICE, torch.float16) for _ in range(2))
    lengths = make_lengths(b, s, lengths_kind)
    counters = split_counters(b * h + 3, DEVICE)
    gold = sdpa(q.double(), k.double(), v.double(), lengths, None)
    for _ in range(2):  # twice on the same counters
        with poison_buffers():
            out = decode_attention_triton(
                q, k, v, lengths, prefetch=prefetch, counters=counters, num_splits=num_splits, block_s=block_s
            )
        assert_close_to_gold(out, gold, sdpa(q, k, v, lengths, None))
        assert int(counters.abs().sum()) == 0
    (k8, k_scale), (v8, v_scale) = quantize_kv(k), quantize_kv(v)
    k_deq, v_deq = k8.double() * k_scale.double(), v8.double() * v_scale.double()
    with poison_buffers():
        out = decode_attention_triton(q, k8, v8, lengths, k_scale=k_scale, v_scale=v_scale, prefetch=prefetch,
                                      counters=counters, num_splits=num_splits, block_s=block_s)  # fmt: skip
    gold = sdpa(q.double(), k_deq, v_deq, lengths, None)
    assert_close_to_gold(out, gold, sdpa(q, k_deq.half(), v_deq.half(), lengths, None))
    assert int(counters.abs().sum()) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_rows_gather_keys_from_other_cache_rows(num_splits, dtype):
    """Beam search without a cache reorder: key s of sequence b read from row rows[b, s] (a table wider than
    the cache view), against fp64 SDPA on the gathered cache; with the split merge both ways."""
    g = torch.Generator().manual_seed(11)
    b, h, s, d = 5, 2, 70, 32
    q = torch.randn(b, h, d, generator=g).to(DEVICE, dtype)
    k, v = (torch.randn(b, h, s + 6, d, generator=g).to(DEVICE, dtype)[:, :, :s] for _ in range(2))
    rows = torch.randint(0, b, (b, s + 10), generator=g, dtype=torch.int32).to(DEVICE)
    lengths = torch.tensor([70, 1, 33, 64, 65], dtype=torch.int32, device=DEVICE)
    index = rows[:, None, :s, None].long().expand(b, h, s, d)
    kg, vg = k.gather(0, index), v.gather(0, index)
    gold = sdpa(q.double(), kg.double(), vg.double(), lengths, None)
    for counters in (None, split_counters(b * h, DEVICE)):
        with poison_buffers():
            out = decode_attention_triton(q, k, v, lengths, rows=rows, counters=counters, num_splits=num_splits,
                                          block_s=16)  # fmt: skip
        assert_close_to_gold(out, gold, sdpa(q, kg, vg, lengths, None))
    assert_close_to_gold(decode_attention_ref(q, k, v, lengths, rows=rows), gold, sdpa(q, kg, vg, lengths, None))
    # the same table with every row pointing at itself is the plain attention
    own = torch.arange(b, dtype=torch.int64, device=DEVICE)[:, None].expand(b, s).contiguous()
    via_rows = decode_attention_triton(q, k, v, lengths, rows=own, num_splits=num_splits)
    plain = decode_attention_triton(q, k, v, lengths, num_splits=num_splits)
    torch.testing.assert_close(via_rows, plain, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("with_rows", [False, True])
def test_new_kv_is_stored_and_attended(with_rows, num_splits, dtype):
    """``new_kv``: this step's key/value are stored at column lengths[b] - 1 of row b (and nowhere else) and
    attended, as kv_cache_write followed by the attention; against fp64 SDPA on the cache with the new column
    written. ``out``: the result lands in a strided view (a branch's columns of a wider buffer), nothing else
    changes."""
    g = torch.Generator().manual_seed(5)
    b, h, s, d = 5, 2, 70, 32
    q = torch.randn(b, h, d, generator=g).to(DEVICE, dtype)
    k, v = (torch.randn(b, h, s + 6, d, generator=g).to(DEVICE, dtype)[:, :, :s] for _ in range(2))
    qkv = torch.randn(b, 3 * h * d, generator=g).to(DEVICE, dtype)  # a fused projection's output row
    k_new, v_new = (qkv[:, i * h * d : (i + 1) * h * d].view(b, h, d) for i in (1, 2))
    lengths = torch.tensor([70, 1, 33, 64, 65], dtype=torch.int64, device=DEVICE)
    rows = None
    if with_rows:  # other rows' keys, but each row's newest column is its own (as the engine's table)
        rows = torch.randint(0, b, (b, s), generator=g).to(DEVICE)
        rows[torch.arange(b), lengths - 1] = torch.arange(b, device=DEVICE)
    want_k, want_v = k.clone(), v.clone()
    want_k[torch.arange(b), :, lengths - 1] = k_new
    want_v[torch.arange(b), :, lengths - 1] = v_new
    kg, vg = want_k, want_v
    if with_rows:
        index = rows[:, None, :, None].expand(b, h, s, d)
        kg, vg = want_k.gather(0, index), want_v.gather(0, index)
    gold = sdpa(q.double(), kg.double(), vg.double(), lengths, None)
    launches = ((decode_attention_triton, {"num_splits": num_splits, "block_s": 16}), (decode_attention_ref, {}))
    for fn, options in launches:
        kc, vc = k.clone(), v.clone()
        wide = torch.zeros(b, 3 * h * d, device=DEVICE, dtype=dtype)
        out = wide[:, h * d : 2 * h * d].view(b, h, d)
        with poison_buffers():
            got = fn(q, kc, vc, lengths, rows=rows, new_kv=(k_new, v_new), out=out, **options)
        assert got.data_ptr() == out.data_ptr()
        assert_close_to_gold(out, gold, sdpa(q, kg, vg, lengths, None))
        assert torch.equal(kc, want_k) and torch.equal(vc, want_v)  # the new column, nothing else
        assert not wide[:, : h * d].any() and not wide[:, 2 * h * d :].any()


def test_new_kv_and_out_errors():
    q = make_query(2, 2, 32, torch.float16)
    k, v = make_cache(2, 2, 40, 32, torch.float16, "contiguous")
    lengths = torch.tensor([3, 40], device=DEVICE)
    cases = [
        ({"new_kv": (q, q[:1])}, "new_kv must be"),
        ({"new_kv": (q, q), "prefetch": "all_but_last"}, "prefetch='none'"),
        ({"out": torch.empty(2, 2, 33, dtype=torch.float16, device=DEVICE)}, "out must be"),  # wider than D
        ({"out": torch.empty(2, 3, 32, dtype=torch.float16, device=DEVICE)}, "out must be"),
        ({"out": torch.empty(2, 2, 32, device=DEVICE)}, "out must be"),
        ({"out": torch.empty(2, 2, 64, dtype=torch.float16, device=DEVICE)[..., ::2]}, "unit stride"),
    ]
    for kwargs, message in cases:
        for fn in (decode_attention_triton, decode_attention_ref):
            with pytest.raises(KernelInputError, match=message):
                fn(q, k, v, lengths, **kwargs)
    with pytest.raises(KernelInputError, match="needs lengths"):
        decode_attention_triton(q, k, v, None, new_kv=(q, q))


@pytest.mark.parametrize("num_splits,counted,new_kv", [(None, False, False), (3, False, False), (3, True, False),
                                                      (1, False, True)])  # fmt: skip
def test_narrow_out_of_padded_heads(num_splits, counted, new_kv):
    """Heads stored padded (30 lanes of 32, zeros past 30 in q, k, v): a narrower ``out [B, H, 30]`` takes the
    first 30 lanes, equal to the attention over the unpadded heads (with one split, several splits and their merge
    kernel, the last program's merge, and a new key/value stored by the launch); the lanes past it are not
    written."""
    b, h, s, d, padded = 3, 2, 40, 30, 32
    g = torch.Generator().manual_seed(5)
    q, k, v, k_new, v_new = (torch.randn(*shape, generator=g).to(DEVICE, torch.float16)
                             for shape in [(b, h, d), (b, h, s, d), (b, h, s, d), (b, h, d), (b, h, d)])  # fmt: skip
    lengths = torch.tensor([1, 17, 40], device=DEVICE)
    pad = lambda t: F.pad(t, (0, padded - d))  # noqa: E731
    kwargs = {"num_splits": num_splits, "block_s": 16}
    if counted:
        kwargs["counters"] = split_counters(b * h, DEVICE)
    if new_kv:  # the gold attends the new key/value at column lengths - 1
        kwargs["new_kv"] = (pad(k_new), pad(v_new))
        rows = torch.arange(b, device=DEVICE)
        k, v = k.clone(), v.clone()
        k[rows, :, lengths - 1], v[rows, :, lengths - 1] = k_new, v_new
    gold = sdpa(q.double(), k.double(), v.double(), lengths, 0.3)
    for fn in (decode_attention_triton, decode_attention_ref):
        buffer = torch.full((b, h, padded + 2), 7.0, dtype=torch.float16, device=DEVICE)
        kp, vp = pad(k), pad(v)
        with poison_buffers():
            got = fn(pad(q), kp, vp, lengths, 0.3, out=buffer[..., :d], **(kwargs if fn is decode_attention_triton else
                     {"new_kv": kwargs.get("new_kv")}))  # fmt: skip
        assert got.shape == (b, h, d) and got.data_ptr() == buffer.data_ptr()
        assert_close_to_gold(got, gold, sdpa(q, k, v, lengths, 0.3))
        assert bool((buffer[..., d:] == 7).all())
        if new_kv:  # stored padded, zeros included
            torch.testing.assert_close(kp[rows, :, lengths - 1], pad(k_new), atol=0, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_kv(dtype):
    x = (torch.randn(2, 3, 50, 16, device=DEVICE) * torch.rand(1, 1, 1, 16, device=DEVICE) * 4).to(dtype)
    x[0, 1, :, 5] = 0  # an all-zero channel
    x8, scale = quantize_kv(x)
    assert x8.dtype == torch.int8 and x8.shape == x.shape
    assert scale.dtype == torch.float32 and scale.shape == (2, 3, 1, 16)
    amax = x.double().abs().amax(dim=2, keepdim=True)
    nonzero = amax > 0
    torch.testing.assert_close(scale.double()[nonzero], amax[nonzero] / 127)
    assert x8.abs().max() <= 127 and (x8[0, 1, :, 5] == 0).all()
    # symmetric round-to-nearest: every element within half a step, and each channel's max hits +-127
    assert ((x8.double() * scale.double() - x.double()).abs() <= scale.double() * (0.5 + 1e-5)).all()
    assert (x8.abs().amax(dim=2) == 127)[nonzero[:, :, 0]].all()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's 0 / 0
def test_lengths_past_the_cache_act_as_full_and_zero_gives_nan():
    q = make_query(2, 2, 32, torch.float32)
    k, v = make_cache(2, 2, 40, 32, torch.float32, "contiguous")
    full = decode_attention_triton(q, k, v, None, num_splits=3)
    long = torch.tensor([45, 1000], dtype=torch.int32, device=DEVICE)
    torch.testing.assert_close(decode_attention_triton(q, k, v, long, num_splits=3), full)
    torch.testing.assert_close(decode_attention_ref(q, k, v, long), full)
    zero = torch.tensor([0, 40], dtype=torch.int64, device=DEVICE)  # no keys for sequence 0: undefined
    for out in (decode_attention_triton(q, k, v, zero, num_splits=3), decode_attention_ref(q, k, v, zero)):
        assert out[0].isnan().all() and not out[1].isnan().any()


def test_bad_inputs_raise():
    q = make_query(2, 2, 32, torch.float16)
    k, v = make_cache(2, 2, 40, 32, torch.float16, "contiguous")
    k8, k_scale = quantize_kv(k)
    v8, v_scale = quantize_kv(v)
    cases = [
        ((q, k[:, :1], v), {}, "k and v must both be"),
        ((q, k, v.float()), {}, "share a dtype"),
        ((q, k, v, torch.ones(2, device=DEVICE)), {}, "lengths must be int32/int64"),
        ((q, k8, v8), {}, "int8 k/v need k_scale"),
        ((q, k8, v8), {"k_scale": k_scale, "v_scale": v_scale[:, :, :, :16]}, "int8 k/v need v_scale"),
        ((q, k, v), {"k_scale": k_scale, "v_scale": v_scale}, "only for int8"),
        ((q[0], k, v), {}, "expected q"),
        ((q, k, v), {"prefetch": "some"}, "prefetch must be one of"),
        ((q, k, v), {"prefetch": "all_but_last"}, "needs lengths"),
        ((q, k, v), {"counters": torch.zeros(4, dtype=torch.int64, device=DEVICE)}, "int32"),
        ((q, k, v), {"counters": torch.zeros(3, dtype=torch.int32, device=DEVICE)}, ">= B \\* H = 4"),
        ((q, k, v), {"rows": torch.zeros(2, 39, dtype=torch.int32, device=DEVICE)}, "rows must be int32/int64"),
        ((q, k, v), {"rows": torch.zeros(2, 40, device=DEVICE)}, "rows must be int32/int64"),
        ((q, k8, v8), {"k_scale": k_scale, "v_scale": v_scale, "rows": torch.zeros(2, 40, dtype=torch.int32,
                                                                                   device=DEVICE)}, "float k/v"),
    ]
    for args, kwargs, message in cases:
        for fn in (decode_attention_triton, decode_attention_ref):
            with pytest.raises(KernelInputError, match=message):
                fn(*args, **kwargs)
    with pytest.raises(KernelInputError, match="block_s"):
        decode_attention_triton(q, k, v, block_s=24)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 16, 64])
def test_whisper_large_v3_shapes(batch, dtype):
    heads, dim = 20, 64
    q = make_query(batch, heads, dim, dtype)
    # self-attention: a 448-slot cache, partly filled
    k, v = make_cache(batch, heads, 448, dim, dtype, "capacity")
    lengths = make_lengths(batch, 448, "random")
    gold = sdpa(q.double(), k.double(), v.double(), lengths, None)
    with poison_buffers():
        assert_close_to_gold(decode_attention_triton(q, k, v, lengths), gold, sdpa(q, k, v, lengths, None))
    # cross-attention: 1500 encoder frames, fp and int8
    k, v = make_cache(batch, heads, 1500, dim, dtype, "contiguous")
    gold = sdpa(q.double(), k.double(), v.double(), None, None)
    with poison_buffers():
        assert_close_to_gold(decode_attention_triton(q, k, v), gold, sdpa(q, k, v, None, None))
    (k8, k_scale), (v8, v_scale) = quantize_kv(k), quantize_kv(v)
    k_deq, v_deq = k8.double() * k_scale.double(), v8.double() * v_scale.double()
    gold = sdpa(q.double(), k_deq, v_deq, None, None)
    with poison_buffers():
        out = decode_attention_triton(q, k8, v8, k_scale=k_scale, v_scale=v_scale)
    assert_close_to_gold(out, gold, sdpa(q, k_deq.to(dtype), v_deq.to(dtype), None, None))


def test_short_cache_plan():
    """Short caches with many rows take one split of 16-key tiles; long caches and few rows keep the split plan."""
    from turboformer.kernels.decode_attention import _plan

    cpu = torch.device("cpu")  # 4 "multiprocessors" under the interpreter
    assert _plan(64 * 8, 32, 62, False, cpu, None, None) == (16, 64, 1, 32, 4)
    assert _plan(64 * 4, 80, 62, False, cpu, None, None) == (16, 64, 1, 80, 4)
    assert _plan(64 * 4, 448, 64, False, cpu, None, None)[::4] == (32, 2)  # long cache: the general plan
    assert _plan(8, 32, 64, False, cpu, None, None)[0] == 64  # few rows: the general plan


def test_short_cache_plan_matches_reference():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(64, 2, 24, generator=g).to(DEVICE)
    k = torch.randn(64, 2, 40, 24, generator=g).to(DEVICE)
    v = torch.randn(64, 2, 40, 24, generator=g).to(DEVICE)
    lengths = torch.randint(1, 41, (64,), generator=g).to(DEVICE)
    out = decode_attention_triton(q, k, v, lengths)
    torch.testing.assert_close(out, decode_attention_ref(q, k, v, lengths), atol=2e-5, rtol=2e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("heads,dim", [(20, 64), (6, 64)])  # Whisper large-v3 and tiny
def test_prefetch_after_a_writer(heads, dim):
    """The race that prefetch='all_but_last' guards against, on the GPU: in one CUDA graph a decode_linear
    writes each step's new key/value into column pos (its kv_cache epilogue, launched with PDL) and the
    attention that follows loads the rest of the cache before it waits; cross-attention ('all') follows a GEMV
    on a fixed cache. Every step's outputs must equal the reference on the cache as it then is (the old
    cache column held garbage first, so a stale read would show)."""
    from turboformer.kernels.decode_linear import KVCache, decode_linear

    torch.manual_seed(0)
    C, T, S = heads * dim, 448, 1500
    x = torch.randn(1, C, device="cuda")
    w_qkv = (torch.randn(3 * C, C, device="cuda") * C**-0.5).half()
    w_q = (torch.randn(C, C, device="cuda") * C**-0.5).half()
    k_self = torch.randn(1, heads, T, dim, device="cuda").half() * 30  # garbage where new keys will go
    v_self = torch.randn(1, heads, T, dim, device="cuda").half() * 30
    k_cross, v_cross = (torch.randn(1, heads, S, dim, device="cuda").half() for _ in range(2))
    pos = torch.zeros(1, dtype=torch.long, device="cuda")
    counters = split_counters(heads, "cuda")
    outs = {}

    def step():
        lengths = (pos + 1).to(torch.int32)
        q = decode_linear(x, w_qkv, kv_cache=KVCache(k_self, v_self, pos), act_dtype=torch.float16)
        outs["self"] = decode_attention_triton(
            q.view(1, heads, dim), k_self, v_self, lengths, prefetch="all_but_last", counters=counters
        )
        qc = decode_linear(outs["self"].reshape(1, C), w_q, act_dtype=torch.float16)
        outs["cross"] = decode_attention_triton(
            qc.view(1, heads, dim), k_cross, v_cross, prefetch="all", counters=counters
        )
        outs["q"], outs["qc"] = q, qc

    step()  # compile
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for p in [0, 1, 63, 64, 65, 200, 447]:
        pos.fill_(p)
        graph.replay()
        torch.cuda.synchronize()
        lengths = torch.full((1,), p + 1, dtype=torch.int32, device="cuda")
        q = outs["q"].view(1, heads, dim)
        expect = decode_attention_ref(q, k_self, v_self, lengths)
        torch.testing.assert_close(outs["self"], expect, atol=2e-3, rtol=2e-3)
        expect = decode_attention_ref(outs["qc"].view(1, heads, dim), k_cross, v_cross)
        torch.testing.assert_close(outs["cross"], expect, atol=2e-3, rtol=2e-3)
        assert int(counters.abs().sum()) == 0
