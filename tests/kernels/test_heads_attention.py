"""Multi-head attention in the projections' [B, N, heads * D] layout against torch SDPA in fp64.

The gold result is an independent formulation: each side is expanded to the full batch and split into heads
with ``view``/``permute`` and handed to ``F.scaled_dot_product_attention`` in fp64 (no code of the op's
reference is used).

On CPU the launcher runs in the Triton interpreter at small shapes: SAM's lopsided decoder attentions
(few queries against many keys and the reverse) with ragged query and key tails, head dims 16 and 32 (and 24,
not a power of two), a shared side (batch 1 against B, either side), strided inputs (column slices of a
wider projection). On CUDA the ``cuda``-marked tests add the decoder's real shapes at 64 prompts and a CUDA
graph capture.

Tolerances: fp32 within atol = rtol = 1e-5 of the fp64 result. fp16/bf16: the kernel's max error is at most
twice the error of PyTorch's own SDPA in that dtype on the same inputs (plus one bf16 ulp under the
interpreter, ``kernel_tolerance.assert_close_to_gold``).
"""

import pytest
import torch
import torch.nn.functional as F
from kernel_tolerance import assert_close_to_gold

from turboformer.kernels import KernelInputError, poison_buffers, use_reference, utils
from turboformer.kernels import heads_attention as op
from turboformer.kernels.heads_attention import heads_attention, heads_attention_ref, heads_attention_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def sdpa_gold(q, k, v, heads, dtype=torch.float64):
    """SDPA on both sides expanded to the batch and split into heads, in ``dtype``."""
    batch = max(q.shape[0], k.shape[0])

    def split(t):
        _, n, width = t.shape
        return t.expand(batch, n, width).reshape(batch, n, heads, width // heads).permute(0, 2, 1, 3).to(dtype)

    out = F.scaled_dot_product_attention(split(q), split(k), split(v))  # [B, heads, Nq, D]
    return out.permute(0, 2, 1, 3).reshape(batch, q.shape[1], q.shape[2])


def make_inputs(q_batch, k_batch, num_q, num_k, heads, head_dim, dtype, strided=False):
    """q ``[Bq, Nq, heads * D]``, k and v ``[Bk, Nk, heads * D]``, scaled like LayerNorm'd projections;
    ``strided``: column slices of wider buffers (row strides not the width)."""
    width = heads * head_dim
    pad = 5 if strided else 0
    q = (torch.randn(q_batch, num_q, width + pad, device=DEVICE) * 1.5).to(dtype)[:, :, pad:]
    k = (torch.randn(k_batch, num_k, width + pad, device=DEVICE) * 1.5).to(dtype)[:, :, :width]
    v = torch.randn(k_batch, num_k, width + 2 * pad, device=DEVICE).to(dtype)[:, :, pad : pad + width]
    return q, k, v


def check(q, k, v, heads, fp32_tol=1e-5):
    gold = sdpa_gold(q, k, v, heads)
    torch_lowp = sdpa_gold(q, k, v, heads, q.dtype)
    with poison_buffers():
        out = heads_attention_triton(q, k, v, heads)
    assert out.shape == gold.shape and out.dtype == q.dtype and out.is_contiguous()
    assert_close_to_gold(out, gold, torch_lowp, fp32_tol)
    assert_close_to_gold(heads_attention_ref(q, k, v, heads), gold, torch_lowp, fp32_tol)


# (Bq, Bk, Nq, Nk, heads, D, strided): token-to-image (7 queries, 150 keys: 3 key tiles with a tail),
# image-to-token (150 queries, 7 keys), the prompt tokens' self-attention (D 32), a side shared by the batch
# either way, head dim 24 (padded to 32), strided column slices.
CASES = [
    (3, 3, 7, 150, 2, 16, False),
    (3, 3, 150, 7, 2, 16, False),
    (2, 2, 9, 9, 2, 32, False),
    (3, 1, 7, 150, 2, 16, False),
    (1, 3, 150, 7, 2, 16, False),
    (2, 2, 20, 70, 3, 24, False),
    (2, 1, 7, 100, 2, 16, True),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("q_batch,k_batch,num_q,num_k,heads,head_dim,strided", CASES)
def test_heads_attention(q_batch, k_batch, num_q, num_k, heads, head_dim, strided, dtype):
    check(*make_inputs(q_batch, k_batch, num_q, num_k, heads, head_dim, dtype, strided), heads)


@pytest.mark.parametrize("dtype", DTYPES)
def test_peaked_softmax_rows(dtype):
    """Scores up to ~±40: a row's max moves between key tiles (the online rescaling) and some rows are
    nearly one-hot. fp32 within 1e-4 (the logits' fp32 rounding, ~40 x 2^-24, is amplified by the softmax)."""
    q, k, v = make_inputs(2, 2, 40, 150, 2, 16, dtype)
    check(q * 4, k * 2, v, 2, fp32_tol=1e-4)


def test_dispatcher_takes_the_reference_on_cpu_and_under_use_reference(monkeypatch):
    q, k, v = make_inputs(2, 2, 5, 9, 2, 16, torch.float16)
    calls = []
    monkeypatch.setattr(op, "heads_attention_triton", lambda *a: calls.append("triton") or heads_attention_ref(*a))
    heads_attention(q, k, v, 2)
    assert calls == (["triton"] if DEVICE == "cuda" else [])
    calls.clear()
    with use_reference():
        heads_attention(q, k, v, 2)
    assert calls == []


def test_bad_inputs_raise():
    q, k, v = make_inputs(2, 2, 5, 9, 2, 16, torch.float16)
    cases = [
        ((q[0], k, v, 2), "must be \\[B, N, heads \\* D\\]"),
        ((q, k.float(), v, 2), "share a dtype"),
        ((q, k, v[:, :4], 2), "k and v must share a shape"),
        ((q[..., :16], k, v, 2), "same width"),
        ((q, k, v, 3), "does not split into 3 heads"),
        ((q, k[:1].expand(2, -1, -1)[:, :0], v[:, :0], 2), "no keys"),
        ((q[:1].expand(3, -1, -1), k, v, 2), "batches must match"),
        ((q.int(), k, v, 2), "float"),
    ]
    for args, message in cases:
        with pytest.raises(KernelInputError, match=message):
            heads_attention_ref(*args)


def test_sam_decoder_attention_with_the_kernel_matches_the_reference(monkeypatch):
    """The fp16 two-way transformer (SAM's real decoder widths, 2 prompts) with the kernel forced on (the
    interpreter on CPU) agrees with the same model on the reference path."""
    from turboformer.models.sam.config import SAM_CONFIGS
    from turboformer.models.sam.transformer import TwoWayTransformer

    if DEVICE == "cpu" and not utils.interpreting():
        pytest.skip("needs the Triton interpreter (TRITON_INTERPRET=1) on CPU")
    torch.manual_seed(0)
    transformer = TwoWayTransformer(SAM_CONFIGS["vit_b"]).to(DEVICE, torch.float16).eval()
    image = torch.randn(1, 256, 8, 8, device=DEVICE).half()  # a small grid: the interpreter is slow
    pe = torch.randn(1, 256, 8, 8, device=DEVICE).half()
    tokens = torch.randn(2, 7, 256, device=DEVICE).half()
    with torch.no_grad(), use_reference():
        ref_tokens, ref_keys = transformer(image, pe, tokens)
    monkeypatch.setattr(utils, "use_triton", lambda x: not utils.reference_forced())
    with torch.no_grad():
        got_tokens, got_keys = transformer(image, pe, tokens)
    for got, ref in ((got_tokens, ref_tokens), (got_keys, ref_keys)):
        assert got.shape == ref.shape and torch.isfinite(got).all()
        torch.testing.assert_close(got.float(), ref.float(), atol=2e-2, rtol=0)  # LayerNorm'd: unit scale


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("q_batch,k_batch,num_q,num_k,head_dim", [(64, 64, 7, 4096, 16), (64, 1, 7, 4096, 16),
                                                                   (64, 64, 4096, 7, 16), (1, 64, 4096, 7, 16),
                                                                   (64, 64, 7, 7, 32)])  # fmt: skip
def test_sam_decoder_shapes(q_batch, k_batch, num_q, num_k, head_dim, dtype):
    """The decoder's attentions at 64 one-point prompts (5 output tokens + point + padding point)."""
    check(*make_inputs(q_batch, k_batch, num_q, num_k, 8, head_dim, dtype), 8)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_captures_in_a_cuda_graph():
    q, k, v = make_inputs(4, 1, 7, 300, 8, 16, torch.float16)
    expected = heads_attention_triton(q, k, v, 8)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = heads_attention_triton(q, k, v, 8)
    q.mul_(-1)
    graph.replay()
    torch.testing.assert_close(out, heads_attention_triton(q, k, v, 8), rtol=0, atol=0)
    assert not torch.equal(out, expected)
