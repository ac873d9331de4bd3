"""Conformer rel-pos flash attention (Transformer-XL bias + mask) against torch SDPA on the concatenated form, fp64.

The gold result is an independent formulation: the two score terms are one product of concatenated vectors,
``(q+u).k + (q+w).p = [q+u, q+w] . [k, p]``, handed to ``F.scaled_dot_product_attention`` in fp64 with
``scale = 1 / sqrt(D)`` and the boolean mask; query rows with no allowed key are then zeroed (upstream's
``masked_fill`` after softmax). Neither the kernel's two accumulating products nor the reference's two
``[B, H, T, S]`` matmuls are used to build it.

On CPU the launcher runs in the Triton interpreter at small shapes (16- and 32-wide tiles, so every case
runs several query tiles and key tiles with ragged tails); the ``cuda``-marked tests add AISHELL's real
shapes (batch 16, 4 heads, head dim 64, T = S = 375 with padding masks, and T = S = 1000).

Tolerances: fp32 within atol = rtol = 2e-5 of the fp64 result (unit-scale inputs, logits of std ~2: the
softmax amplifies the fp32 rounding of the logits). fp16/bf16: the kernel's max error against the fp64 result
is at most twice the error of PyTorch's own SDPA on the concatenated form in that dtype (``q+u``, ``q+w``
rounded to the dtype, as the kernel and the eager model do), plus, under the interpreter, one bf16 ulp of
max |result| (``kernel_tolerance.assert_close_to_gold``).
"""

import pytest
import torch
import torch.nn.functional as F
from kernel_tolerance import assert_close_to_gold

from turboformer.kernels import KernelInputError, poison_buffers, use_reference, utils
from turboformer.kernels import pos_bias_attention as op
from turboformer.kernels.pos_bias_attention import (
    pos_bias_attention,
    pos_bias_attention_ref,
    pos_bias_attention_triton,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FP32_TOL = 2e-5


def sdpa_concatenated(q, k, v, p, u, w, mask):
    """Independent formulation: SDPA over ``[q+u, q+w]`` (2D wide) against ``[k, p]``; zero rows with no key.

    q [B, T, H, D]; k, v [B, H, S, D]; p [1 | B, H, S, D]; u, w [H, D]; mask [1 | B, 1 | T, S] or None.
    Returns [B, T, H, D]."""
    batch, d = q.shape[0], q.shape[3]
    queries = torch.cat([q + u, q + w], dim=-1).transpose(1, 2)  # [B, H, T, 2D]
    keys = torch.cat([k, p.expand(batch, -1, -1, -1)], dim=-1)  # [B, H, S, 2D]
    if mask is None:
        out = F.scaled_dot_product_attention(queries, keys, v, scale=d**-0.5)
        return out.transpose(1, 2)
    any_key = mask.any(dim=-1, keepdim=True)  # [B, 1 | T, 1]
    # Fully masked rows attend everywhere inside SDPA (no NaN from any backend), then are zeroed.
    out = F.scaled_dot_product_attention(queries, keys, v, attn_mask=(mask | ~any_key).unsqueeze(1), scale=d**-0.5)
    out = out.masked_fill(~any_key.unsqueeze(1), 0.0)  # [B, H, T, D]
    return out.transpose(1, 2)


def make_mask(kind, batch, t, s):
    """None; 'padding' [B, 1, S] key padding (the last utterance has 3/5 of the keys); 'chunk' [B, T, S] a
    dynamic-chunk mask (chunks of 8 queries see every key up to their chunk's end, keys aligned to the last
    queries as with a streaming cache) with padding and one query row fully masked; 'shared' [1, T, S] random."""
    if kind is None:
        return None
    lengths = torch.full((batch,), s, device=DEVICE)
    lengths[-1] = max(1, 3 * s // 5)
    padding = torch.arange(s, device=DEVICE)[None, :] < lengths[:, None]  # [B, S]
    if kind == "padding":
        return padding[:, None, :]
    if kind == "chunk":
        i = torch.arange(t, device=DEVICE)[:, None]
        j = torch.arange(s, device=DEVICE)[None, :]
        visible = j < (i // 8 + 1) * 8 + (s - t)  # [T, S]
        mask = padding[:, None, :] & visible[None]
        mask[0, min(3, t - 1)] = False  # a row with no key at all: zero output
        return mask
    if kind == "shared":
        return torch.rand(1, t, s, device=DEVICE) > 0.4
    raise ValueError(kind)


def make_inputs(batch, t, s, heads, d, dtype, p_batch, layout):
    """q [B, T, H, D], k, v [B, H, S, D], p [p_batch, H, S, D], u, w [H, D].

    'contiguous'; 'fused': q is a column slice of a wider [B, T, 3 H D] projection, k and v are the halves of
    one [B, H, S, 2D] key ‖ value cache (WeNet's layout; strides S*2D, 2D, 1), p a slice of a wider buffer."""
    def rand(*shape):
        return torch.randn(*shape, device=DEVICE).to(dtype)

    u, w = rand(heads, d), rand(heads, d)
    if layout == "contiguous":
        return rand(batch, t, heads, d), rand(batch, heads, s, d), rand(batch, heads, s, d), rand(p_batch, heads, s, d), u, w
    q = rand(batch, t, 3 * heads * d)[:, :, heads * d : 2 * heads * d].view(batch, t, heads, d)
    k, v = rand(batch, heads, s, 2 * d).split(d, dim=-1)
    p = rand(p_batch, heads, s + 5, d)[:, :, 2 : s + 2]
    return q, k, v, p, u, w


def check(q, k, v, p, u, w, mask, **blocks):
    gold = sdpa_concatenated(*(t.double() for t in (q, k, v, p, u, w)), mask)
    torch_lowp = sdpa_concatenated(q, k, v, p, u, w, mask)
    with poison_buffers():
        out = pos_bias_attention_triton(q, k, v, p, u, w, mask, **blocks)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    assert_close_to_gold(out, gold, torch_lowp, fp32_tol=FP32_TOL)
    if mask is not None and not mask.any(dim=-1).all():  # fully masked rows are exactly zero
        rows = ~mask.any(dim=-1).expand(q.shape[0], q.shape[1])  # [B, T]
        assert (out[rows] == 0).all()
    return out


# (B, T, S, H, D, p batch, layout, mask, block_m, block_n): T != S, ragged tails, D not a power of two,
# one head, a shared p, k/v views of one cache tensor, every mask kind, and the launcher's own tiles.
CASES = [
    (2, 35, 35, 4, 64, 1, "contiguous", "padding", 16, 16),  # 3 x 3 tiles, tails of 3; a padded batch row
    (2, 20, 43, 1, 24, 2, "fused", "chunk", 16, 32),  # streaming-like S > T, D = 24 (BLOCK_D 32), empty row
    (1, 17, 17, 4, 24, 1, "fused", None, 16, 16),  # no mask
    (3, 9, 26, 2, 32, 3, "contiguous", "shared", None, None),  # [1, T, S] mask; launcher's tiles
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,t,s,heads,d,p_batch,layout,mask_kind,block_m,block_n", CASES)
def test_pos_bias_attention(batch, t, s, heads, d, p_batch, layout, mask_kind, block_m, block_n, dtype):
    q, k, v, p, u, w = make_inputs(batch, t, s, heads, d, dtype, p_batch, layout)
    mask = make_mask(mask_kind, batch, t, s)
    check(q, k, v, p, u, w, mask, block_m=block_m, block_n=block_n)
    if dtype == torch.float32:  # the reference is the eager model's maths: fp32 scores only in fp32
        gold = sdpa_concatenated(*(x.double() for x in (q, k, v, p, u, w)), mask)
        torch.testing.assert_close(pos_bias_attention_ref(q, k, v, p, u, w, mask).double(), gold, atol=FP32_TOL, rtol=FP32_TOL)


def test_large_logits_rescale_across_tiles():
    """Logits of std ~30 (one key wins each row, in a later tile than the first): the online softmax must
    rescale across tiles without overflow or losing the winner; with a chunk mask whose early tiles are
    fully masked for some rows (m stays -inf for a while)."""
    q, k, v, p, u, w = make_inputs(2, 24, 40, 2, 32, torch.float32, 1, "contiguous")
    mask = make_mask("chunk", 2, 24, 40)
    mask[1, :, :20] = False  # rows of batch 1 see keys only from the second key tile on
    check(8 * q, k, v, 2 * p, u, w, mask, block_m=16, block_n=16)


def test_dispatcher_takes_the_reference_on_cpu_and_under_use_reference(monkeypatch):
    q, k, v, p, u, w = make_inputs(2, 10, 12, 2, 16, torch.float32, 1, "contiguous")
    mask = make_mask("padding", 2, 10, 12)
    expected = pos_bias_attention_ref(q, k, v, p, u, w, mask)
    calls = []

    def spy(*args, **kwargs):
        calls.append(1)
        return pos_bias_attention_triton(*args, **kwargs)

    monkeypatch.setattr(op, "pos_bias_attention_triton", spy)
    if DEVICE == "cpu":
        torch.testing.assert_close(pos_bias_attention(q, k, v, p, u, w, mask), expected, rtol=0, atol=0)
        assert not calls
    monkeypatch.setattr(utils, "use_triton", lambda x: not utils.reference_forced())  # as on CUDA
    torch.testing.assert_close(pos_bias_attention(q, k, v, p, u, w, mask), expected, atol=FP32_TOL, rtol=FP32_TOL)
    assert len(calls) == 1
    with use_reference():
        torch.testing.assert_close(pos_bias_attention(q, k, v, p, u, w, mask), expected, rtol=0, atol=0)
    assert len(calls) == 1


def test_bad_inputs_raise():
    q, k, v, p, u, w = make_inputs(2, 5, 6, 3, 16, torch.float16, 1, "contiguous")
    mask = make_mask("padding", 2, 5, 6)
    cases = [
        ((q, k[:1], v, p, u, w, mask), "k and v must be \\[B, H, S, D\\]"),
        ((q, k, v[:, :, :4], p, u, w, mask), "k and v must be"),
        ((q, k, v, p[:, :, :4], u, w, mask), "p must be \\[1 \\| B, H, S, D\\]"),
        ((q, k, v, p.expand(3, -1, -1, -1), u, w, mask), "p must be"),
        ((q, k, v, p, u[:2], w, mask), "pos_bias_u and pos_bias_v must be \\[H, D\\]"),
        ((q, k, v, p, u, w.float(), mask), "share a dtype"),
        ((q, k, v, p, u, w, mask.int()), "mask must be a bool"),
        ((q, k, v, p, u, w, mask[:, :, :5]), "mask must be a bool"),
        ((q, k, v, p, u, w, mask.expand(2, 2, 6)), "mask must be a bool"),  # 2 rows: neither 1 nor T = 5
        ((q[0], k, v, p, u, w, mask), "q must be 4-D"),
        ((q.int(), k, v, p, u, w, mask), "q must be float32"),
        ((q[:, :0], k, v, p, u, w, None), "empty attention"),
    ]
    for args, message in cases:
        for fn in (pos_bias_attention_triton, pos_bias_attention_ref):
            with pytest.raises(KernelInputError, match=message):
                fn(*args)
    for bad in (8, 24):
        with pytest.raises(KernelInputError, match="block_n"):
            pos_bias_attention_triton(q, k, v, p, u, w, mask, block_n=bad)


def test_conformer_attention_module_through_the_kernel(monkeypatch):
    """:class:`RelPositionAttention` (random weights and biases) with its attention routed to the Triton
    launcher (the interpreter on CPU) matches the module on the reference path, offline with a chunk mask
    and streaming with a key/value cache (S = Tc + T keys). fp32: atol = rtol = 1e-5."""
    from turboformer.models.conformer import attention

    torch.manual_seed(0)
    module = attention.RelPositionAttention(48, 4).to(DEVICE).eval()
    with torch.no_grad():
        module.pos_bias_u.normal_()
        module.pos_bias_v.normal_()
    x = torch.randn(2, 19, 48, device=DEVICE)
    pos_emb = torch.randn(1, 19, 48, device=DEVICE)
    mask = make_mask("chunk", 2, 19, 19)
    cache = torch.randn(1, 4, 7, 24, device=DEVICE)  # [B, H, Tc, 2 d_k]: 7 cached keys ‖ values
    pos_cached = torch.randn(1, 7 + 19, 48, device=DEVICE)
    with torch.no_grad(), use_reference():
        expected = module(x, pos_emb, mask)[0]
        expected_stream, expected_cache = module(x[:1], pos_cached, None, cache)
    calls = []

    def launcher(*args, **kwargs):
        calls.append(tuple(args[1].shape))
        with poison_buffers():
            return pos_bias_attention_triton(*args, **kwargs)

    monkeypatch.setattr(op, "pos_bias_attention", launcher)
    with torch.no_grad():
        out = module(x, pos_emb, mask)[0]
        stream, new_cache = module(x[:1], pos_cached, None, cache)
    assert calls == [(2, 4, 19, 12), (1, 4, 26, 12)]  # k [B, H, S, d_k]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stream, expected_stream, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(new_cache, expected_cache, rtol=0, atol=0)
    assert (out - expected).abs().max() > 0  # the kernel really ran (different summation order)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,mask_kind", [(375, "padding"), (375, "chunk"), (1000, "padding"), (1000, None)])
def test_aishell_shapes(t, mask_kind, dtype):
    """AISHELL Conformer: batch 16, 4 heads, head dim 64; 15 s (375 frames) and 40 s (1000 frames) of audio;
    k/v halves of one cache tensor, p shared over the batch, the launcher's own tiles."""
    batch = 16
    q, k, v, p, u, w = make_inputs(batch, t, t, 4, 64, dtype, 1, "fused")
    mask = make_mask(mask_kind, batch, t, t)
    if mask is not None:  # ragged key padding over the whole batch
        lengths = torch.randint(t // 3, t + 1, (batch,), device=DEVICE)
        lengths[0] = t
        mask = mask & (torch.arange(t, device=DEVICE) < lengths[:, None])[:, None, :]
    check(q, k, v, p, u, w, mask)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp32_honours_allow_tf32_off():
    """The fp32 Conformer on CUDA is compared with upstream at 1e-4 with TF32 off; the kernel must then use
    IEEE fp32 products and meet the fp32 tolerance at a real shape."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        q, k, v, p, u, w = make_inputs(4, 375, 375, 4, 64, torch.float32, 1, "contiguous")
        check(q, k, v, p, u, w, make_mask("padding", 4, 375, 375))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_capture():
    """The launcher is capturable (no host syncs, shapes only): a graphed call on static buffers replays to
    the eager result on new inputs copied in."""
    q, k, v, p, u, w = make_inputs(16, 375, 375, 4, 64, torch.float16, 1, "contiguous")
    mask = make_mask("padding", 16, 375, 375)
    pos_bias_attention_triton(q, k, v, p, u, w, mask)  # compile outside the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        pos_bias_attention_triton(q, k, v, p, u, w, mask)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = pos_bias_attention_triton(q, k, v, p, u, w, mask)
    new = make_inputs(16, 375, 375, 4, 64, torch.float16, 1, "contiguous")
    for static, fresh in zip((q, k, v, p, u, w), new):
        static.copy_(fresh)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, pos_bias_attention_triton(*new, mask), rtol=0, atol=0)
