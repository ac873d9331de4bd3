"""SAM's windowed/global attention read from the fused qkv projection, against an independent fp64 formulation.

The gold result does not use the kernel's or the reference's decomposition: it pads the projection's grid with
the bias, then for every window builds the full ``[N, N]`` rel-pos bias by indexing the tables per (query, key)
pair (``q_i . R_h[row(i) - row(j) + S - 1] + q_i . R_w[col(i) - col(j) + S - 1]``, an ``[N, N, D]`` gather)
and runs ``F.scaled_dot_product_attention`` with it as an additive mask in fp64; the output is cut back to the
real grid with plain indexing.

On CPU the launcher runs in the Triton interpreter at small shapes: grids that the window does not divide
(padded keys = the bias), H != W, head dims that are not powers of two (24, 80), edge windows whose last
query tiles are empty, row tiles (a key tile = one key row) and one-hot tiles. On CUDA the
``cuda``-marked tests add SAM's real shapes (ViT-B and ViT-H windows at batch 8, the 64 x 64 global blocks).

Tolerances: fp32 within atol = rtol = 2e-5 of fp64. fp16/bf16: twice the error of the same gold formulation
run by PyTorch in that dtype (its mask in that dtype, as upstream's einsum output), plus half an ulp of the
largest result, plus under the interpreter one bf16 ulp (``kernel_tolerance.assert_close_to_gold``).
"""

import pytest
import torch
import torch.nn.functional as F
from kernel_tolerance import assert_close_to_gold

from turboformer.kernels import KernelInputError, poison_buffers, use_reference, utils
from turboformer.kernels import window_attention as op
from turboformer.kernels.window_attention import (
    window_attention,
    window_attention_ref,
    window_attention_triton,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FP32_TOL = 2e-5


def gold_attention(qkv, bias, table_h, table_w, heads, window, scale=None):
    """Independent formulation (see the module docstring), in qkv's dtype (fp64 for the gold)."""
    b, h, w, c3 = qkv.shape
    d = c3 // (3 * heads)
    sh, sw = (window, window) if window else (h, w)
    hp, wp = -(-h // sh) * sh, -(-w // sw) * sw
    grid = (torch.zeros(c3, dtype=qkv.dtype, device=qkv.device) if bias is None else bias).repeat(b, hp, wp, 1)
    grid[:, :h, :w] = qkv
    n = sh * sw
    # [B, nWh, SH, nWw, SW, 3, heads, D] -> [B * nW, heads, N, D] per q/k/v
    win = grid.view(b, hp // sh, sh, wp // sw, sw, 3, heads, d).permute(5, 0, 1, 3, 6, 2, 4, 7)
    q, k, v = win.reshape(3, -1, heads, n, d).unbind(0)
    tok = torch.arange(n, device=qkv.device)
    r, c = tok // sw, tok % sw
    rel_h = table_h[r[:, None] - r[None, :] + sh - 1]  # [N, N, D]: the table row of each (query, key) pair
    rel_w = table_w[c[:, None] - c[None, :] + sw - 1]
    mask = torch.einsum("xhnd,nmd->xhnm", q, rel_h) + torch.einsum("xhnd,nmd->xhnm", q, rel_w)
    scale = d**-0.5 if scale is None else scale
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)  # [B * nW, heads, N, D]
    out = out.view(b, hp // sh, wp // sw, heads, sh, sw, d).permute(0, 1, 4, 2, 5, 3, 6).reshape(b, hp, wp, -1)
    return out[:, :h, :w]


def make_inputs(b, h, w, heads, d, window, dtype, strided=False):
    """qkv ``[B, H, W, 3 heads D]`` (a column slice of a wider buffer when ``strided``), bias, tables."""
    sh, sw = (window, window) if window else (h, w)
    c3 = 3 * heads * d
    qkv = torch.randn(b, h, w, c3 + (8 if strided else 0), device=DEVICE)[..., :c3].to(dtype)
    bias = torch.randn(c3, device=DEVICE).to(dtype)
    table_h = (0.5 * torch.randn(2 * sh - 1, d, device=DEVICE)).to(dtype)
    table_w = (0.5 * torch.randn(2 * sw - 1, d, device=DEVICE)).to(dtype)
    return qkv, bias, table_h, table_w


def check(qkv, bias, table_h, table_w, heads, window, scale=None, **blocks):
    gold = gold_attention(*(t.double() if t is not None else None for t in (qkv, bias, table_h, table_w)),
                          heads, window, scale)
    torch_lowp = gold_attention(qkv, bias, table_h, table_w, heads, window, scale)
    with poison_buffers():
        out = window_attention_triton(qkv, bias, table_h, table_w, heads, window, scale, **blocks)
    assert out.shape == (*qkv.shape[:3], qkv.shape[3] // 3) and out.dtype == qkv.dtype and out.is_contiguous()
    assert_close_to_gold(out, gold, torch_lowp, fp32_tol=FP32_TOL)
    ref = window_attention_ref(qkv, bias, table_h, table_w, heads, window, scale)
    assert_close_to_gold(ref, gold, torch_lowp, fp32_tol=FP32_TOL)


# (B, H, W, heads, D, window, block_m, block_n)
CASES = [
    (2, 7, 5, 2, 16, 4, 16, 16),  # 2 x 2 windows of 4 x 4, both sides padded; edge windows of 12, 12 and 9 queries
    (1, 9, 9, 3, 24, 4, 16, 16),  # D = 24 (padded to 32); 3 x 3 windows, the last row/column of 1 token
    (2, 6, 6, 2, 80, 4, 16, 32),  # D = 80 (ViT-H); one key tile of 32 holds a whole 16-token window
    (1, 5, 16, 2, 16, 0, 16, 16),  # global over 5 x 16: key tile = one key row (row tiles), H != W
    (1, 6, 5, 2, 32, 0, 32, 16),  # global over 6 x 5: one-hot tiles crossing key rows
    (2, 14, 14, 2, 16, 14, None, None),  # one SAM-sized window per image on the launcher's own tiles
    (1, 8, 6, 1, 48, 4, 16, 16),  # only the last column of windows is padded; D = 48 in two parts (32 + 16)
    (1, 6, 8, 1, 16, 4, 16, 16),  # only the last row of windows is padded
    (1, 18, 20, 2, 16, 16, 16, 16),  # 16 x 16 windows, key tile = one key row, padded edge windows
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,h,w,heads,d,window,block_m,block_n", CASES)
def test_window_attention(b, h, w, heads, d, window, block_m, block_n, dtype):
    inputs = make_inputs(b, h, w, heads, d, window, dtype, strided=(h + w) % 2 == 0)
    check(*inputs, heads, window, block_m=block_m, block_n=block_n)


def test_row_tiles_are_chosen_for_a_power_of_two_row():
    """The launcher's own tiles: the measured plan at SAM's shapes; on a 32-wide fp32 global grid, key tiles of
    one key row (ROW_TILES)."""
    vit_h_global = op._plan(64, 64, 80, torch.bfloat16, None, None)
    assert vit_h_global == dict(BLOCK_M=64, BLOCK_N=64, BLOCK_TAIL=0, BLOCK_D=64, BLOCK_D2=16, ROW_TILES=True,
                                num_warps=4, num_stages=3)
    vit_h_windows = op._plan(14, 14, 80, torch.bfloat16, None, None)  # 196 keys = 6 x 32 + a tail of 4 (16)
    assert vit_h_windows == dict(BLOCK_M=128, BLOCK_N=32, BLOCK_TAIL=16, BLOCK_D=64, BLOCK_D2=16, ROW_TILES=False,
                                 num_warps=4, num_stages=3)
    assert op._plan(14, 14, 64, torch.bfloat16, None, None)["BLOCK_N"] == 64  # ViT-B windows: 3 x 64 + 16
    assert op._plan(14, 14, 80, torch.bfloat16, None, None, split_head_dim=False)["BLOCK_D"] == 128
    assert op._plan(4, 4, 24, torch.float32, None, None)["BLOCK_D2"] == 0  # 16 + 16 saves nothing over 32
    assert op._plan(4, 32, 16, torch.float32, None, None)["ROW_TILES"]
    check(*make_inputs(1, 4, 32, 2, 16, 0, torch.float32), 2, 0)


def test_no_bias_means_zero_padded_keys_and_explicit_scale():
    """Without a projection bias a padded key is zero (upstream pads with zeros); a non-default scale and a
    bias-dominated softmax (tables x 8)."""
    qkv, _, table_h, table_w = make_inputs(1, 5, 6, 2, 16, 4, torch.float32)
    check(qkv, None, 8 * table_h, 8 * table_w, 2, 4, scale=0.3, block_m=16, block_n=16)


def test_padded_keys_change_the_result():
    """The bias at the padded keys matters: the result differs from one with another bias at padded keys only
    (the real tokens' q/k/v are the same tensor)."""
    qkv, bias, table_h, table_w = make_inputs(1, 5, 5, 1, 16, 4, torch.float32)
    a = window_attention_triton(qkv, bias, table_h, table_w, 1, 4, block_m=16, block_n=16)
    b = window_attention_triton(qkv, bias + 1, table_h, table_w, 1, 4, block_m=16, block_n=16)
    assert (a - b).abs().max() > 1e-3


def test_dispatcher_takes_the_reference_on_cpu_and_under_use_reference(monkeypatch):
    inputs = make_inputs(1, 5, 5, 2, 16, 4, torch.float32)
    expected = window_attention_ref(*inputs, 2, 4)
    calls = []

    def spy(*args, **kwargs):
        calls.append(1)
        return window_attention_triton(*args, **kwargs)

    monkeypatch.setattr(op, "window_attention_triton", spy)
    if DEVICE == "cpu":
        torch.testing.assert_close(window_attention(*inputs, 2, 4), expected, rtol=0, atol=0)
        assert not calls
    monkeypatch.setattr(utils, "use_triton", lambda x: not utils.reference_forced())  # as on CUDA
    torch.testing.assert_close(window_attention(*inputs, 2, 4), expected, atol=FP32_TOL, rtol=FP32_TOL)
    assert len(calls) == 1
    with use_reference():
        torch.testing.assert_close(window_attention(*inputs, 2, 4), expected, rtol=0, atol=0)
    assert len(calls) == 1


def test_bad_inputs_raise():
    qkv, bias, table_h, table_w = make_inputs(1, 5, 5, 2, 16, 4, torch.float16)
    cases = [
        ((qkv[0], bias, table_h, table_w, 2, 4), "qkv must be \\[B, H, W, 3 \\* C\\]"),
        ((qkv, bias, table_h, table_w, 5, 4), "not 3 \\* heads \\* head_dim for 5 heads"),
        ((qkv, bias, table_h, table_w, 2, -1), "window must be >= 0"),
        ((qkv, bias, table_h[:5], table_w, 2, 4), "rel-pos tables must be \\[7, 16\\] and \\[7, 16\\]"),
        ((qkv, bias, table_h, table_w, 2, 0), "must be \\[9, 16\\] and \\[9, 16\\] for a 5 x 5 window"),
        ((qkv, bias[:-1], table_h, table_w, 2, 4), "qkv_bias must have shape \\[96\\]"),
        ((qkv, bias.float(), table_h, table_w, 2, 4), "must share a dtype"),
        ((qkv.int(), bias, table_h, table_w, 2, 4), "qkv must be float32"),
    ]
    for args, message in cases:
        for fn in (window_attention_triton, window_attention_ref):
            with pytest.raises(KernelInputError, match=message):
                fn(*args)
    for bad in (8, 24):
        with pytest.raises(KernelInputError, match="block_n"):
            window_attention_triton(qkv, bias, table_h, table_w, 2, 4, block_n=bad)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "b,heads,d,window",
    [(8, 12, 64, 14), (8, 16, 80, 14), (1, 12, 64, 0), (1, 16, 80, 0)],  # ViT-B/H windows at 8; global at 1
)
def test_sam_shapes(b, heads, d, window, dtype):
    inputs = make_inputs(b, 64, 64, heads, d, window, dtype)
    check(*inputs, heads, window)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp32_honours_allow_tf32_off():
    """With TF32 off (the fp32 parity path) the kernel uses IEEE fp32 products: fp32 tolerance at the global
    64 x 64 shape."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        check(*make_inputs(1, 64, 64, 4, 64, 0, torch.float32), 4, 0)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
