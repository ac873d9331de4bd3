"""Dynamic / lightweight convolution against an independent band-matrix formulation.

``dynamic_conv1d`` unfolds the padded input into K-tap windows; the reference below builds, per batch row and head,
the [T, T] band matrix M[t, s] = w[t, s - t + P] (0 outside the K taps) and multiplies it with the input, as
fairseq's ``_forward_expanded`` does. The modules' full-sequence and one-step (ring buffer) forms are both checked
against that reference composed with the projections (linear1 -> GLU, kernel prediction, softmax, linear2).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from turboformer.models.lite_transformer.dynamic_conv import DynamicConv, LightweightConv, dynamic_conv1d

ATOL = 1e-5


def band_matrix_conv(x: torch.Tensor, weight: torch.Tensor, padding_l: int) -> torch.Tensor:
    """x [B, T, C], weight [B, T, H, K] -> [B, T, C] via band matrices [B, H, T, T]."""
    B, T, C = x.shape
    H, K = weight.shape[-2:]
    band = torch.zeros(B, H, T, T, dtype=x.dtype)
    for t in range(T):
        for k in range(K):
            s = t - padding_l + k
            if 0 <= s < T:
                band[:, :, t, s] = weight[:, t, :, k]
    heads = x.view(B, T, H, C // H).permute(0, 2, 1, 3)  # [B, H, T, R]
    return (band @ heads).permute(0, 2, 1, 3).reshape(B, T, C)


# (B, T, C, H, K, padding_l): centred, causal, K > T (both), K = 1, one head, even causal kernel
SHAPES = [
    (2, 7, 12, 3, 3, 1),
    (1, 9, 8, 2, 7, 6),
    (1, 5, 8, 2, 7, 6),
    (2, 9, 6, 1, 15, 7),
    (3, 1, 4, 4, 1, 0),
    (1, 13, 10, 5, 4, 3),
]


@pytest.mark.parametrize("shape", SHAPES)
def test_dynamic_conv1d_matches_band_matrix(shape):
    B, T, C, H, K, P = shape
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(B, T, C, generator=g)
    weight = torch.randn(B, T, H, K, generator=g).softmax(-1)
    torch.testing.assert_close(dynamic_conv1d(x, weight, P), band_matrix_conv(x, weight, P), atol=ATOL, rtol=0)
    shared = weight[:1, :1]  # lightweight: one kernel for every row and step, broadcast
    torch.testing.assert_close(
        dynamic_conv1d(x, shared, P), band_matrix_conv(x, shared.expand(B, T, H, K), P), atol=ATOL, rtol=0
    )


def _reference(module, x: torch.Tensor) -> torch.Tensor:
    """The module's maths spelled out with the band-matrix convolution."""
    B, T, _ = x.shape
    H, K = module.heads, module.kernel_size
    if module.linear1 is not None:
        x = F.linear(x, module.linear1.weight, module.linear1.bias)
    if isinstance(module, DynamicConv):
        if module.glu:
            x = x[..., : x.size(-1) // 2] * torch.sigmoid(x[..., x.size(-1) // 2 :])
        weight = (x @ module.weight_linear.weight.T).view(B, T, H, K)
    else:
        weight = module.weight.view(1, 1, H, K).expand(B, T, H, K)
    if module.weight_softmax:
        weight = weight.softmax(-1)
    out = band_matrix_conv(x, weight, module.padding_l)
    return out if module.linear2 is None else F.linear(out, module.linear2.weight, module.linear2.bias)


def _modules(dim: int, K: int, H: int, padding_l: int):
    return {
        "dynamic-glu": DynamicConv(dim, K, H, padding_l, weight_softmax=True, glu=True),
        "dynamic-noglu-nosoftmax": DynamicConv(dim, K, H, padding_l, weight_softmax=False, glu=False),
        "dynamic-nolinear": DynamicConv(dim, K, H, padding_l, with_linear=False),
        "lightweight": LightweightConv(dim, K, H, padding_l),
        "lightweight-nolinear": LightweightConv(dim, K, H, padding_l, with_linear=False),
    }


@pytest.mark.parametrize("kind", list(_modules(8, 3, 2, 1)))
@pytest.mark.parametrize("T,K", [(9, 3), (4, 7)])
def test_modules_full_sequence_and_steps(kind, T, K):
    torch.manual_seed(T * K)
    B, C, H = 2, 8, 2
    x = torch.randn(B, T, C)
    centred = _modules(C, K, H, K // 2)[kind]
    with torch.no_grad():
        torch.testing.assert_close(centred(x), _reference(centred, x), atol=ATOL, rtol=0)

        causal = _modules(C, K, H, K - 1)[kind]
        want = _reference(causal, x)
        torch.testing.assert_close(causal(x), want, atol=ATOL, rtol=0)
        buffer = causal.new_buffer(B, x.dtype, x.device)
        steps = torch.cat([causal.step(x[:, t : t + 1], buffer, t) for t in range(T)], dim=1)
    torch.testing.assert_close(steps, want, atol=ATOL, rtol=0)
    assert buffer.shape == (B, K, C)  # static: the buffer never grows


def test_errors():
    with pytest.raises(ValueError, match="heads"):
        DynamicConv(10, 3, 4, 2)
    with pytest.raises(ValueError, match="causal"):
        DynamicConv(8, 3, 2, padding_l=1).new_buffer(1, torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match="padding_l"):
        dynamic_conv1d(torch.zeros(1, 4, 4), torch.zeros(1, 4, 2, 3), 3)
