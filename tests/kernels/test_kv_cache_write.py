"""The KV-cache write kernel against a plain loop over rows (an independent formulation of the same copy).

Exact for every dtype (it is a copy, with a cast only when cache and input dtypes differ). On CPU the launcher
runs under the Triton interpreter; the ``cuda`` test uses Whisper large-v3 shapes.
"""

import pytest
import torch

from turboformer.kernels import KernelInputError
from turboformer.kernels.kv_cache_write import kv_cache_write_ref, kv_cache_write_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def expected(k, v, k_cache, v_cache, pos):
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    for b in range(k.shape[0]):
        k_cache[b, :, int(pos[b])] = k[b].to(k_cache.dtype)
        v_cache[b, :, int(pos[b])] = v[b].to(v_cache.dtype)
    return k_cache, v_cache


def run(write, b, h, s, d, dtype, pos_dtype=torch.int64, fused=True):
    qkv = torch.randn(b, 3, h, d, device=DEVICE).to(dtype)
    k, v = (qkv[:, 1], qkv[:, 2]) if fused else (qkv[:, 1].contiguous(), qkv[:, 2].contiguous())
    big = torch.randn(b + 2, h, s, d, device=DEVICE).to(dtype)  # the caches are row prefixes of a larger buffer
    k_cache, v_cache = big[:b], torch.randn_like(big)[:b]
    pos = torch.randint(0, s, (b,), device=DEVICE, dtype=pos_dtype)
    want_k, want_v = expected(k, v, k_cache, v_cache, pos)
    write(k, v, k_cache, v_cache, pos)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)


@pytest.mark.parametrize("write", [kv_cache_write_triton, kv_cache_write_ref], ids=["triton", "ref"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b, h, s, d", [(1, 6, 7, 64), (3, 4, 33, 80), (5, 2, 5, 24)])
def test_writes_each_row_at_its_column(write, dtype, b, h, s, d):
    run(write, b, h, s, d, dtype)


@pytest.mark.parametrize("fused", [True, False])
def test_strided_inputs_and_int32_positions(fused):
    run(kv_cache_write_triton, 4, 3, 9, 32, torch.float16, torch.int32, fused)


def test_rejects_mismatched_shapes():
    k = torch.zeros(2, 4, 8)
    with pytest.raises(KernelInputError, match="caches must be"):
        kv_cache_write_ref(k, k, torch.zeros(2, 4, 5, 16), torch.zeros(2, 4, 5, 16), torch.zeros(2, dtype=torch.long))
    with pytest.raises(KernelInputError, match="pos must be"):
        kv_cache_write_ref(k, k, torch.zeros(2, 4, 5, 8), torch.zeros(2, 4, 5, 8), torch.zeros(3, dtype=torch.long))


@pytest.mark.cuda
@pytest.mark.parametrize("b", [1, 16, 64])
def test_whisper_large_shapes(b):
    run(kv_cache_write_triton, b, 20, 448, 64, torch.float16)
