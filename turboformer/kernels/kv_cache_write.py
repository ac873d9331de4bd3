"""Write one decode step's keys and values into a static cache, each row at its own column, in one launch.

``k_cache[b, h, pos[b], :] = k[b, h, :]`` and the same for v. In the Whisper decode step, PyTorch's advanced
indexing spends two generic index kernels (~3.6 us each on an H200, profiled at large-v3 batch 1) to move
2 x 2.5 KB per layer; this kernel moves both in one ~1.5 us launch. One program per (row, head) copies a
``[D]`` vector of k and one of v; the reads may be strided views of the fused qkv output.
"""

from __future__ import annotations

import torch

from turboformer.kernels import utils
from turboformer.kernels.utils import KernelInputError, tl, triton


@triton.jit
def _kv_cache_write_kernel(
    k_ptr, v_ptr,  # [B, H, D] new keys / values (any strides)
    kc_ptr, vc_ptr,  # [B, H, S, D] caches (unit stride along D)
    pos_ptr,  # [B] int32/int64 column of each row
    H, D,
    sk_b, sk_h, sv_b, sv_h,
    sc_b, sc_h, sc_s,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0) // H
    head = tl.program_id(0) % H
    d = tl.arange(0, BLOCK_D)
    mask = d < D
    column = tl.load(pos_ptr + row).to(tl.int64)
    k = tl.load(k_ptr + row * sk_b + head * sk_h + d, mask=mask)
    v = tl.load(v_ptr + row * sv_b + head * sv_h + d, mask=mask)
    at = row.to(tl.int64) * sc_b + head * sc_h + column * sc_s + d
    tl.store(kc_ptr + at, k.to(kc_ptr.dtype.element_ty), mask=mask)
    tl.store(vc_ptr + at, v.to(vc_ptr.dtype.element_ty), mask=mask)


def _check(k, v, k_cache, v_cache, pos) -> None:
    if k.dim() != 3 or v.shape != k.shape:
        raise KernelInputError(f"k and v must both be [B, H, D], got {list(k.shape)} and {list(v.shape)}")
    b, h, d = k.shape
    if k_cache.dim() != 4 or k_cache.shape[:2] != (b, h) or k_cache.shape[3] != d or v_cache.shape != k_cache.shape:
        raise KernelInputError(f"caches must be [{b}, {h}, S, {d}], got {list(k_cache.shape)}, {list(v_cache.shape)}")
    if k_cache.stride() != v_cache.stride() or k_cache.stride(3) != 1 or k.stride(2) != 1 or v.stride(2) != 1:
        raise KernelInputError("caches must share strides, and caches, k and v need unit stride along D")
    if pos.shape != (b,) or pos.dtype not in (torch.int32, torch.int64):
        raise KernelInputError(f"pos must be int32/int64 of shape [{b}], got {list(pos.shape)} {pos.dtype}")


def kv_cache_write_triton(k, v, k_cache, v_cache, pos) -> None:
    """In place, with the Triton kernel; see :func:`kv_cache_write`."""
    _check(k, v, k_cache, v_cache, pos)
    utils.check_launchable(k, v, k_cache, v_cache, pos)
    b, h, d = k.shape
    if b * h == 0:
        return
    _kv_cache_write_kernel[(b * h,)](
        k, v, k_cache, v_cache, pos, h, d,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        BLOCK_D=utils.next_power_of_2(d), num_warps=1,
    )  # fmt: skip


def kv_cache_write_ref(k, v, k_cache, v_cache, pos) -> None:
    """PyTorch reference: advanced-index assignment, in place."""
    _check(k, v, k_cache, v_cache, pos)
    rows = torch.arange(k.shape[0], device=k.device)
    k_cache[rows, :, pos] = k.to(k_cache.dtype)
    v_cache[rows, :, pos] = v.to(v_cache.dtype)


def kv_cache_write(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor) -> None:
    """Store ``k, v [B, H, D]`` at column ``pos[b]`` of ``k_cache, v_cache [B, H, S, D]``, in place.

    Columns must be < S (not checked on the device: that would need a host sync). Triton on CUDA, the
    PyTorch reference otherwise.
    """
    if utils.use_triton(k):
        kv_cache_write_triton(k, v, k_cache, v_cache, pos)
    else:
        kv_cache_write_ref(k, v, k_cache, v_cache, pos)
