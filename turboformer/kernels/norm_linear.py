"""The linear layer of a batched decode step with the residual add + LayerNorm before it fused in.

For ``x [M, K]`` (M rows of one decode step: sentences x beams, K <= ``MAX_FEATURES``), the residual stream in
fp32 or in the weight's dtype, and a weight in fp16/bf16/fp32:

    s = x + delta                 rounded to x's dtype (when ``delta``; the residual add of the previous sublayer)
    n = LayerNorm(s)              fp32 statistics (when ``ln``), n = s otherwise
    y = round(n) @ W^T + b        n rounded to the weight's dtype; fp32 accumulation (tensor cores), ``relu``
                                  optional, stored in the weight's dtype
    res = n (keep="norm": post-norm, the residual stream is the LayerNorm's output) or s (keep="sum": pre-norm),
          in x's dtype

Returns ``(y, res)``. This is the unfused ``add_layer_norm`` + ``F.linear`` (+ ReLU) of a post-norm Transformer
step, where every sublayer ends with ``x = LayerNorm(x + delta)`` and the next one starts with ``x @ W^T``: the
LayerNorm moves into the next GEMM's prologue, one launch instead of two. Each program normalises its own rows
(recomputed by every column block: the rows are a few KB) and the first column block stores ``res``.

Why: the Lite Transformer decode step at batch 16 x beam 4 (64 rows, 496 features) runs 36 such GEMMs per token,
each ~0.5 MB of weight: they are launch-bound (cuBLAS: ~3.6 us each on an H200), and 18 LayerNorm launches sat
between them. On Hopper the kernel is launched with programmatic dependent launch (PDL, as ``decode_linear``):
it loads its weight tile and the LayerNorm parameters before it waits for the previous kernel's writes.

Kernel layout: one program per (``BLOCK_N`` output features, ``BLOCK_M`` rows); the whole K extent is one tile
(K rounded up to a power of two), one ``tl.dot``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from turboformer.kernels import utils
from turboformer.kernels.utils import KernelInputError, tl, triton

MAX_FEATURES = 1024  # K held whole in a program's tiles
KEEP = ("norm", "sum")


def _plan(m: int, n: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, warps) from the shapes. H200 sweep at K = 496 (``bench_norm_linear.py --sweep``):
    [16, 32] x 4 warps is best or within 5% up to 64 rows; at 256 rows [16, 64] for N = 496 and [64, 64] x 8
    warps for N = 1240 (each program re-reads its weight tile per row block: fewer, taller blocks)."""
    if m <= 64:
        return 16, 32, 4
    return (16, 64, 4) if n <= 512 else (64, 64, 8)


@triton.jit
def add_norm_rows(x_ptr, delta_ptr, rm, k, tile, stride_x, stride_delta, gain, shift, K, eps, ADD: tl.constexpr,
                  LN: tl.constexpr):  # fmt: skip
    """The prologue for rows ``rm [BLOCK_M]`` over features ``k [BLOCK_K]`` (``tile`` masks both): ``(s, n)``, fp32
    ``[BLOCK_M, BLOCK_K]``: s = x (+ delta when ADD, rounded to x's dtype: the residual stream exactly as stored)
    and n = LayerNorm(s) with ``gain``, ``shift`` [BLOCK_K] when LN (two-pass statistics: the mean, then the
    centred variance, as layer_norm), else s."""
    x = tl.load(x_ptr + rm[:, None] * stride_x + k[None, :], mask=tile, other=0.0)
    if ADD:
        d = tl.load(delta_ptr + rm[:, None] * stride_delta + k[None, :], mask=tile, other=0.0)
        x = (x.to(tl.float32) + d.to(tl.float32)).to(x_ptr.dtype.element_ty)
    s = x.to(tl.float32)
    n = s
    if LN:
        mean = tl.sum(s, axis=1) / K
        centred = tl.where(tile, s - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / K + eps)
        n = centred * rstd[:, None] * gain[None, :] + shift[None, :]
    return s, n


@triton.jit
def _norm_linear_kernel(
    x_ptr,  # [M, K] rows (the residual stream when ADD / LN), fp32 or the weight's dtype
    delta_ptr,  # [M, K] the previous sublayer's output (ADD), any float dtype
    res_ptr,  # [M, K] out: the new residual stream (STORE_RES), x's dtype
    w_ptr,  # [N, K] weight, unit stride along K
    bias_ptr,  # [N]
    ln_w_ptr, ln_b_ptr,  # [K] LayerNorm gain and shift (LN)
    out_ptr,  # [M, N]
    M, N, K,
    stride_x, stride_delta, stride_res, stride_w, stride_out,
    eps,
    HAS_BIAS: tl.constexpr, ADD: tl.constexpr, LN: tl.constexpr, STORE_RES: tl.constexpr,
    KEEP_NORM: tl.constexpr, RELU: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    k = tl.arange(0, BLOCK_K)
    k_mask = k < K
    # nothing here depends on the previous kernel: load it before waiting for it
    w = tl.load(w_ptr + rn.to(tl.int64)[:, None] * stride_w + k[None, :], mask=n_mask[:, None] & k_mask[None, :],
                other=0.0)  # [BLOCK_N, BLOCK_K]  # fmt: skip
    bias = tl.zeros([BLOCK_N], tl.float32)
    gain = 0.0
    shift = 0.0
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
    if LN:
        gain = tl.load(ln_w_ptr + k, mask=k_mask, other=0.0).to(tl.float32)
        shift = tl.load(ln_b_ptr + k, mask=k_mask, other=0.0).to(tl.float32)
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()

    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = rm < M
    tile = m_mask[:, None] & k_mask[None, :]
    s, n = add_norm_rows(x_ptr, delta_ptr, rm, k, tile, stride_x, stride_delta, gain, shift, K, eps, ADD, LN)
    if STORE_RES:
        if pid_n == 0:
            kept = n if KEEP_NORM else s
            tl.store(res_ptr + rm[:, None] * stride_res + k[None, :], kept.to(res_ptr.dtype.element_ty), mask=tile)
    h = n.to(w_ptr.dtype.element_ty)  # the GEMM's input, rounded as an unfused LayerNorm would store it
    acc = tl.dot(h.to(DOT_DTYPE), tl.trans(w.to(DOT_DTYPE)), input_precision=PRECISION)  # [BLOCK_M, BLOCK_N] fp32
    acc += bias[None, :]
    if RELU:
        acc = tl.maximum(acc, 0.0)
    tl.store(out_ptr + rm[:, None] * stride_out + rn[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])  # fmt: skip


def _check(x, weight, bias, delta, ln, keep) -> tuple[int, int, int]:
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise KernelInputError(f"x must be [M, K] and weight [N, K], got {list(x.shape)} and {list(weight.shape)}")
    utils.check_float("x", x)
    utils.check_float("weight", weight)
    if x.dtype not in (weight.dtype, torch.float32):
        raise KernelInputError(f"x must be float32 or the weight's dtype {weight.dtype}, got {x.dtype}")
    M, K = x.shape
    N = weight.shape[0]
    if bias is not None:
        utils.check_vector("bias", bias, N)
    if delta is not None:
        utils.check_float("delta", delta)
        if delta.shape != x.shape:
            raise KernelInputError(f"delta must have x's shape {list(x.shape)}, got {list(delta.shape)}")
        if ln is None:
            raise KernelInputError("delta needs ln: the add is fused only before a LayerNorm")
    if ln is not None:
        utils.check_vector("ln weight", ln[0], K)
        utils.check_vector("ln bias", ln[1], K)
    if keep not in KEEP:
        raise KernelInputError(f"keep must be one of {KEEP}, got {keep!r}")
    return M, N, K


def norm_linear_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    delta: torch.Tensor | None = None,
    ln: tuple[torch.Tensor, torch.Tensor] | None = None,
    eps: float = 1e-5,
    keep: str = "norm",
    relu: bool = False,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """With the Triton kernel; see :func:`norm_linear`. ``block_m``, ``block_n``, ``num_warps`` override the
    plan (tuning sweeps)."""
    M, N, K = _check(x, weight, bias, delta, ln, keep)
    plan = _plan(M, N)
    block_m, block_n, num_warps = block_m or plan[0], block_n or plan[1], num_warps or plan[2]
    if K > MAX_FEATURES:
        raise KernelInputError(f"norm_linear_triton takes at most {MAX_FEATURES} features, got {K}")
    tensors = [t for t in (x, weight, bias, delta, *(ln or ())) if t is not None]
    utils.check_launchable(*tensors)
    x = x if x.stride(1) == 1 else x.contiguous()
    weight = weight if weight.stride(1) == 1 else weight.contiguous()
    delta = None if delta is None else (delta if delta.stride(1) == 1 else delta.contiguous())
    out = utils.empty((M, N), weight.dtype, x.device)
    store_res = ln is not None and (delta is not None or keep == "norm")
    res = utils.empty((M, K), x.dtype, x.device) if store_res else x
    if M == 0 or N == 0:
        return out, res
    dot_dtype, precision = utils.dot_settings(weight.dtype)
    pdl = utils.pdl_supported(x.device)
    dummy = weight
    grid = (utils.cdiv(N, block_n), utils.cdiv(M, block_m))
    _norm_linear_kernel[grid](
        x, delta if delta is not None else dummy, res, weight, bias if bias is not None else dummy,
        ln[0] if ln is not None else dummy, ln[1] if ln is not None else dummy, out,
        M, N, K, x.stride(0), delta.stride(0) if delta is not None else 0, res.stride(0), weight.stride(0),
        out.stride(0), float(eps),
        HAS_BIAS=bias is not None, ADD=delta is not None, LN=ln is not None, STORE_RES=store_res,
        KEEP_NORM=keep == "norm", RELU=relu, DOT_DTYPE=dot_dtype, PRECISION=precision, PDL=pdl,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=max(16, utils.next_power_of_2(K)), num_warps=num_warps,
        **({"launch_pdl": True} if pdl else {}),
    )  # fmt: skip
    return out, res


def norm_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    delta: torch.Tensor | None = None,
    ln: tuple[torch.Tensor, torch.Tensor] | None = None,
    eps: float = 1e-5,
    keep: str = "norm",
    relu: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch reference: the add rounded to x's dtype, LayerNorm in fp32, its input to the product rounded to the
    weight's dtype, the product in fp32 rounded once."""
    _check(x, weight, bias, delta, ln, keep)
    s = x if delta is None else (x.float() + delta.float()).to(x.dtype)
    n = s.float() if ln is None else F.layer_norm(s.float(), (x.shape[1],), ln[0].float(), ln[1].float(), eps)
    y = F.linear(n.to(weight.dtype).float(), weight.float(), None if bias is None else bias.float())
    if relu:
        y = torch.relu(y)
    return y.to(weight.dtype), (n.to(x.dtype) if keep == "norm" else s)


def norm_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    delta: torch.Tensor | None = None,
    ln: tuple[torch.Tensor, torch.Tensor] | None = None,
    eps: float = 1e-5,
    keep: str = "norm",
    relu: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, res)`` of the module docstring for ``x [M, K]`` (fp32 or the weight's dtype), ``weight [N, K]``,
    ``bias [N]``, ``delta [M, K]`` (needs ``ln``), ``ln = (gain [K], shift [K])``. ``res`` is x itself where nothing
    changes it (no ``ln``; ``keep="sum"`` without ``delta``). Triton on CUDA
    (K <= ``MAX_FEATURES``; and on CPU inside :func:`.utils.launch_on_cpu` with the interpreter), the reference
    otherwise."""
    if utils.use_triton_or_interpreter(x) and x.shape[-1] <= MAX_FEATURES:
        return norm_linear_triton(x, weight, bias, delta=delta, ln=ln, eps=eps, keep=keep, relu=relu)
    return norm_linear_ref(x, weight, bias, delta=delta, ln=ln, eps=eps, keep=keep, relu=relu)
