"""norm_cross_attention: the Triton kernel (the interpreter on CPU, the GPU where there is one) against plain PyTorch
(the add rounded to the stream's dtype, F.layer_norm and F.linear in fp32 with the unfused layers' roundings, a
masked softmax over each group's keys), over dtypes, groups, key lengths across several key tiles and both
residual modes; and against the op's own reference (the two unfused ops it replaces)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from turboformer.kernels import KernelInputError, poison_buffers
from turboformer.kernels.norm_cross_attention import (
    norm_cross_attention,
    norm_cross_attention_ref,
    norm_cross_attention_triton,
)
from turboformer.kernels.utils import launch_on_cpu

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # relative to the output's scale


def _inputs(N, C, H, S, D, dtype, group, stream=None, seed=0):
    """(x, delta, weight, bias, ln, k, v, lengths): random rows and encoder states; every group's rows share
    their first row's keys, the other rows hold different ones (never read); lengths from 1 to past S."""
    stream = stream or dtype
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, generator=g) * 2 + 0.5
    delta = torch.randn(N, C, generator=g)
    weight = torch.randn(H * D, C, generator=g) / C**0.5
    bias = torch.randn(H * D, generator=g) * 0.5
    ln = (1 + 0.3 * torch.randn(C, generator=g), 0.2 * torch.randn(C, generator=g))
    k, v = torch.randn(2, N, H, S, D, generator=g)
    lengths = torch.randint(1, S + 3, (N,), generator=g)
    lengths[0] = 1
    lengths[-group] = S + 2  # more than S: all keys
    dev = lambda t, dt: t.to(DEVICE, dt)  # noqa: E731
    return (dev(x, stream), dev(delta, stream), dev(weight, dtype), dev(bias, dtype), (dev(ln[0], stream),
            dev(ln[1], stream)), dev(k, dtype), dev(v, dtype), lengths.to(DEVICE))  # fmt: skip


def _plain(x, delta, weight, bias, ln, k, v, lengths, scale, group, keep):
    """The sublayer in plain PyTorch ops, rounded where the unfused engine stores a tensor."""
    N, H, S, D = k.shape
    s = (x.float() + delta.float()).to(x.dtype).float()
    n = F.layer_norm(s, (x.shape[1],), ln[0].float(), ln[1].float(), 1e-5)
    q = F.linear(n.to(weight.dtype).float(), weight.float(), bias.float()).to(weight.dtype).float().view(N, H, D)
    first = torch.arange(N, device=x.device) // group * group
    keys, values = k[first].float(), v[first].float()
    scores = torch.einsum("nhd,nhsd->nhs", q, keys) * scale
    attended = torch.arange(S, device=x.device)[None, :] < lengths[first][:, None]  # [N, S]
    probs = torch.softmax(scores.masked_fill(~attended[:, None, :], float("-inf")), dim=-1)
    out = torch.einsum("nhs,nhsd->nhd", probs, values)
    return out, (n if keep == "norm" else s)


@pytest.mark.parametrize("dtype, stream", [(torch.float32, None), (torch.float16, None), (torch.bfloat16, None),
                                           (torch.float16, torch.float32)])  # fmt: skip
@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("keep", ["norm", "sum"])
@pytest.mark.parametrize("N, C, H, S, D", [(6, 40, 2, 7, 8), (12, 100, 3, 150, 10)])
def test_kernel_matches_plain_pytorch(N, C, H, S, D, keep, group, dtype, stream):
    """S = 150: three 64-key tiles, lengths from 1 (one key) to past S; D = 10 and C = 100 pad to 16 and 128."""
    args = _inputs(N, C, H, S, D, dtype, group, stream)
    scale = 0.7 * D**-0.5
    with poison_buffers():
        out, res = norm_cross_attention_triton(*args, scale, group=group, keep=keep)
    want_out, want_res = _plain(*args, scale, group, keep)
    assert out.shape == (N, H, D) and out.dtype == dtype and res.dtype == args[0].dtype
    torch.testing.assert_close(out.float(), want_out, rtol=0, atol=TOL[dtype] * want_out.abs().max().item())
    torch.testing.assert_close(res.float(), want_res, rtol=TOL[res.dtype], atol=TOL[res.dtype])
    ref_out, ref_res = norm_cross_attention_ref(*args, scale, group=group, keep=keep)
    torch.testing.assert_close(out.float(), ref_out.float(), rtol=0, atol=TOL[dtype] * want_out.abs().max().item())
    torch.testing.assert_close(res, ref_res, rtol=TOL[res.dtype], atol=TOL[res.dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_out_dim_of_padded_heads(dtype):
    """Heads stored padded (10 lanes of 16: zero weight rows and bias, zero key/value lanes): ``out_dim=10`` gives
    the unpadded heads' output, for the kernel and the reference."""
    N, C, H, S, D, padded, group = 6, 40, 2, 20, 10, 16, 3
    x, delta, weight, bias, ln, k, v, lengths = _inputs(N, C, H, S, D, dtype, group)
    want_out, want_res = _plain(x, delta, weight, bias, ln, k, v, lengths, 0.5, group, "norm")
    pad_rows = lambda t: F.pad(t.view(H, D, *t.shape[1:]), (0, 0) * (t.dim() - 1) + (0, padded - D)).flatten(0, 1)  # noqa: E731
    args = (x, delta, pad_rows(weight), pad_rows(bias), ln, F.pad(k, (0, padded - D)), F.pad(v, (0, padded - D)))
    for fn in (norm_cross_attention_triton, norm_cross_attention_ref):
        with poison_buffers():
            out, res = fn(*args, lengths, 0.5, group=group, out_dim=D)
        assert out.shape == (N, H, D)
        torch.testing.assert_close(out.float(), want_out, rtol=0, atol=TOL[dtype] * want_out.abs().max().item())
        torch.testing.assert_close(res.float(), want_res, rtol=TOL[dtype], atol=TOL[dtype])
    with pytest.raises(KernelInputError, match="out_dim"):
        norm_cross_attention_ref(*args, lengths, 0.5, group=group, out_dim=padded + 1)


def test_rows_of_a_group_read_the_first_rows_keys():
    """The other rows' keys are never read: changing them changes nothing; changing the first row's does."""
    args = list(_inputs(6, 40, 2, 9, 8, torch.float32, 3))
    out, _ = norm_cross_attention_triton(*args, group=3)
    k = args[5].clone()
    k[[1, 2, 4, 5]] = torch.randn_like(k[[1, 2, 4, 5]])
    args[5] = k
    again, _ = norm_cross_attention_triton(*args, group=3)
    torch.testing.assert_close(again, out, rtol=0, atol=0)
    k[3] = torch.randn_like(k[3])  # (a constant added to every key would not change the softmax)
    changed, _ = norm_cross_attention_triton(*args, group=3)
    assert torch.equal(changed[:3], out[:3]) and not torch.allclose(changed[3:], out[3:])


def test_dispatcher_and_bad_input():
    args = _inputs(4, 24, 2, 5, 8, torch.float32, 2, seed=1)
    want = norm_cross_attention_ref(*args, group=2)
    with launch_on_cpu():
        got = norm_cross_attention(*args, group=2)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    x, delta, weight, bias, ln, k, v, lengths = args
    with pytest.raises(KernelInputError, match="group"):
        norm_cross_attention_triton(*args, group=3)
    with pytest.raises(KernelInputError, match=r"H \* D"):
        norm_cross_attention_triton(x, delta, weight[:-1], bias, ln, k, v, lengths)
    with pytest.raises(KernelInputError, match="delta"):
        norm_cross_attention_triton(x, delta[:, :-1], weight, bias, ln, k, v, lengths)
    with pytest.raises(KernelInputError, match="lengths"):
        norm_cross_attention_triton(x, delta, weight, bias, ln, k, v, lengths.float())
    with pytest.raises(KernelInputError, match="dtype"):
        norm_cross_attention_triton(x, delta, weight, bias, ln, k.half(), v.half(), lengths)
    with pytest.raises(KernelInputError, match="keep"):
        norm_cross_attention_triton(*args, keep="both")


@pytest.mark.cuda
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lite_shapes_on_the_gpu(dtype, group):
    """The Lite Transformer WMT step: 64 rows, C = 496, 8 heads of 62, 32 source tokens."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    args = _inputs(64, 496, 8, 32, 62, dtype, group, seed=5)
    out, res = norm_cross_attention_triton(*args, group=group)
    want_out, want_res = _plain(*args, 62**-0.5, group, "norm")
    torch.testing.assert_close(out.float(), want_out, rtol=0, atol=TOL[dtype] * want_out.abs().max().item())
    torch.testing.assert_close(res.float(), want_res, rtol=TOL[dtype], atol=TOL[dtype])
