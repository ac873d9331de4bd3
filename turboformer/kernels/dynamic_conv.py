"""Dynamic / lightweight convolution (Wu et al., ICLR 2019, arXiv 1901.10430, Sec. 3), with the softmax over the
taps fused in: the short-range branch of Lite Transformer (Wu et al., ICLR 2020, arXiv 2004.11886).

The ``C`` channels are split into ``H`` heads of ``R = C / H`` channels; all channels of a head share one kernel of
``K`` taps per batch row and time step (dynamic, Eq. 3) or one kernel for all steps (lightweight, Eq. 1-2):

    w[b, t, h, :] = softmax(logits[b, t, h, :]) in fp32, rounded to x's dtype     (when ``softmax``; Sec. 3.1)
    out[b, t, h*R + r] = sum_k w[b, t, h, k] * x[b, t - P + k, h*R + r]           (x = 0 outside [0, T))

``P`` (``padding_l``) is ``K // 2`` in the encoder (centred) and ``K - 1`` in the decoder (causal). The maths is
exactly the module's (:mod:`turboformer.models.lite_transformer.dynamic_conv`): normalised taps are rounded to the
activations' dtype before the products, which accumulate in fp32 and are rounded once.

Two ops:

* :func:`dynamic_conv` -- the full sequence, ``x [B, T, C]``, ``logits [B|1, T|1, H, K]``;
* :func:`dynamic_conv_step` -- one causal decoding step: writes ``x [B, C]`` into slot ``position % K`` of the
  static ring buffer ``[B, K, C]`` (slot s holds step t' = s mod K) and convolves the last K inputs; tap k reads
  slot ``(position + 1 + k) % K``, the newest input (tap K - 1) is taken from registers;
* :func:`dynamic_conv_step_rows` -- the same step for beams: inputs are kept by (cache row, step) in a ``[B, L, C]``
  history, column ``step`` (a device tensor) is written and tap k reads step ``step - K + 1 + k`` of row b's
  prefix from cache row ``rows[b, step - K + 1 + k]`` (the beam search's row table): a beam reorder copies nothing.

Kernel layout: one program per output row (b, t) and block of ``BLOCK_C`` channels; each channel gathers its head's
K logits (H distinct values per row, served from L1) and its K input rows. At Lite Transformer sizes (C <= 248
channels per branch, K <= 31, T <= a few hundred) the op is launch-bound; fusing the softmax and the ring-buffer
write removes two launches per layer and step compared with the PyTorch path (softmax, copy, unfold/roll, matmul).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from turboformer.kernels import utils
from turboformer.kernels.utils import KernelInputError, tl, triton

MAX_TAPS = 64  # taps unrolled in the kernel (Lite Transformer uses up to 31)
BLOCK_C = 128  # channels per program (a branch has 100..248 channels at the paper's sizes)


@triton.jit
def _tap_weights_max_sum(w_row_ptr, head_off, mask, stride_wk, K: tl.constexpr, BLOCK_C: tl.constexpr):
    """Max and sum of exp over a head's K logits, per channel (fp32): the softmax's two statistics."""
    m = tl.full([BLOCK_C], float("-inf"), tl.float32)
    for k in tl.static_range(K):
        w = tl.load(w_row_ptr + head_off + k * stride_wk, mask=mask, other=0.0).to(tl.float32)
        m = tl.maximum(m, w)
    s = tl.zeros([BLOCK_C], tl.float32)
    for k in tl.static_range(K):
        w = tl.load(w_row_ptr + head_off + k * stride_wk, mask=mask, other=0.0).to(tl.float32)
        s += tl.exp(w - m)
    return m, s


@triton.jit
def _dynamic_conv_kernel(
    x_ptr,  # [B, T, C] inputs (unit stride along C)
    w_ptr,  # [B, T, H, K] logits or normalised taps (stride 0 along broadcast axes)
    out_ptr,  # [B, T, C] out, x's dtype
    T,
    C,
    R,  # channels per head
    padding_l,
    stride_xb,
    stride_xt,
    stride_wb,
    stride_wt,
    stride_wh,
    stride_wk,
    stride_ob,
    stride_ot,
    K: tl.constexpr,
    SOFTMAX: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0)  # b * T + t
    b = (row // T).to(tl.int64)
    t = row % T
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = cols < C
    head_off = (cols // R) * stride_wh  # [BLOCK_C] offset of each channel's head
    w_row_ptr = w_ptr + b * stride_wb + t * stride_wt
    if SOFTMAX:
        m, s = _tap_weights_max_sum(w_row_ptr, head_off, mask, stride_wk, K, BLOCK_C)
    acc = tl.zeros([BLOCK_C], tl.float32)
    for k in tl.static_range(K):
        w = tl.load(w_row_ptr + head_off + k * stride_wk, mask=mask, other=0.0).to(tl.float32)
        if SOFTMAX:
            w = tl.exp(w - m) / s
        w = w.to(out_ptr.dtype.element_ty).to(tl.float32)  # the module rounds the taps to x's dtype
        # input step read by tap k, as a block (the interpreter wants block-shaped bool masks); outside [0, T)
        # it is the zero padding
        src = tl.zeros([BLOCK_C], tl.int32) + (t - padding_l + k)
        valid = mask & (src >= 0) & (src < T)
        xv = tl.load(x_ptr + b * stride_xb + src * stride_xt + cols, mask=valid, other=0.0)
        acc += w * xv.to(tl.float32)
    tl.store(out_ptr + b * stride_ob + t * stride_ot + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dynamic_conv_step_kernel(
    x_ptr,  # [B, C] this step's input (unit stride along C)
    buf_ptr,  # [B, K, C] ring buffer, slot position % K written here; HISTORY: [B, L, C], column step written
    w_ptr,  # [B, H, K] logits or normalised taps (stride 0 along a broadcast batch)
    out_ptr,  # [B, C] out
    rows_ptr,  # HAS_ROWS: [B, L] int64, the cache row holding step s of row b's prefix (else row b itself)
    step_ptr,  # HISTORY: [] int64, this step
    C,
    R,
    position,  # ring buffer: this step
    stride_xb,
    stride_bb,
    stride_bk,  # between slots (ring buffer) or steps (HISTORY)
    stride_wb,
    stride_wh,
    stride_wk,
    stride_ob,
    stride_rb,
    K: tl.constexpr,
    SOFTMAX: tl.constexpr,
    HISTORY: tl.constexpr,
    HAS_ROWS: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = cols < C
    head_off = (cols // R) * stride_wh
    w_row_ptr = w_ptr + b * stride_wb
    x_new = tl.load(x_ptr + b * stride_xb + cols, mask=mask, other=0.0).to(buf_ptr.dtype.element_ty)
    # The only slot (column) written is this step's, which no tap k < K - 1 reads: no hazard within the program.
    if HISTORY:
        t = tl.load(step_ptr)
        tl.store(buf_ptr + b * stride_bb + t * stride_bk + cols, x_new, mask=mask)
    else:
        t = position
        tl.store(buf_ptr + b * stride_bb + (t % K) * stride_bk + cols, x_new, mask=mask)
    if SOFTMAX:
        m, s = _tap_weights_max_sum(w_row_ptr, head_off, mask, stride_wk, K, BLOCK_C)
    acc = tl.zeros([BLOCK_C], tl.float32)
    for k in tl.static_range(K):
        w = tl.load(w_row_ptr + head_off + k * stride_wk, mask=mask, other=0.0).to(tl.float32)
        if SOFTMAX:
            w = tl.exp(w - m) / s
        w = w.to(buf_ptr.dtype.element_ty).to(tl.float32)
        if k == K - 1:
            xv = x_new.to(tl.float32)
        elif HISTORY:
            step = t - (K - 1 - k)  # steps before the first are zeros, as upstream's truncated first steps
            seen = tl.maximum(step, 0)
            src = tl.load(rows_ptr + b * stride_rb + seen) if HAS_ROWS else b
            in_range = cols < tl.where(step >= 0, C, 0)  # mask & (step >= 0), as a vector comparison
            xv = tl.load(buf_ptr + src * stride_bb + seen * stride_bk + cols, mask=in_range, other=0.0)
            xv = xv.to(tl.float32)
        else:
            slot = (t + 1 + k) % K
            xv = tl.load(buf_ptr + b * stride_bb + slot * stride_bk + cols, mask=mask, other=0.0).to(tl.float32)
        acc += w * xv
    tl.store(out_ptr + b * stride_ob + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------
# Checks shared by the launchers and the references.


def _check_heads(C: int, H: int, K: int) -> None:
    if H < 1 or K < 1:
        raise KernelInputError(f"need at least one head and one tap, got H={H}, K={K}")
    if C % H:
        raise KernelInputError(f"{C} channels cannot be split into {H} heads")


def _check(x: torch.Tensor, weight: torch.Tensor, padding_l: int) -> tuple[int, int, int, int, int]:
    utils.check_float("x", x)
    utils.check_float("weight", weight)
    if x.dim() != 3 or weight.dim() != 4:
        raise KernelInputError(f"x must be [B, T, C] and weight [B|1, T|1, H, K], got {list(x.shape)}, {list(weight.shape)}")
    B, T, C = x.shape
    H, K = weight.shape[-2:]
    if weight.shape[0] not in (1, B) or weight.shape[1] not in (1, T):
        raise KernelInputError(f"weight {list(weight.shape)} does not broadcast to [{B}, {T}, H, K]")
    _check_heads(C, H, K)
    if not 0 <= padding_l < K:
        raise KernelInputError(f"padding_l {padding_l} must be in [0, {K})")
    return B, T, C, H, K


def _check_step_inputs(x, store, weight, name: str, layout: str) -> tuple[int, int, int, int]:
    """Checks shared by the two step ops: ``x [B, C]``, the step's ``store`` (called ``name``, shaped ``layout``)
    in x's dtype, ``weight [B|1, H, K]``; returns (B, C, H, K)."""
    utils.check_float("x", x)
    utils.check_float("weight", weight)
    if x.dim() != 2 or store.dim() != 3 or weight.dim() != 3:
        raise KernelInputError(
            f"x must be [B, C], {name} {layout}, weight [B|1, H, K]; got "
            f"{list(x.shape)}, {list(store.shape)}, {list(weight.shape)}"
        )
    B, C = x.shape
    H, K = weight.shape[-2:]
    if store.dtype != x.dtype:
        raise KernelInputError(f"{name} dtype {store.dtype} differs from x's {x.dtype}")
    if weight.shape[0] not in (1, B):
        raise KernelInputError(f"weight {list(weight.shape)} does not broadcast to [{B}, H, K]")
    _check_heads(C, H, K)
    return B, C, H, K


def _check_step(x: torch.Tensor, buffer: torch.Tensor, weight: torch.Tensor, position: int) -> tuple[int, ...]:
    B, C, H, K = _check_step_inputs(x, buffer, weight, "buffer", "[B, K, C]")
    if buffer.shape != (B, K, C):
        raise KernelInputError(f"buffer must be [{B}, {K}, {C}], got {list(buffer.shape)}")
    if position < 0:
        raise KernelInputError(f"position must be >= 0, got {position}")
    return B, C, H, K


def _check_step_rows(x, history, weight, step, rows) -> tuple[int, ...]:
    B, C, H, K = _check_step_inputs(x, history, weight, "history", "[B, L, C]")
    if history.shape[0] != B or history.shape[2] != C:
        raise KernelInputError(f"history must be [{B}, L, {C}], got {list(history.shape)}")
    if step.dim() != 0 or step.dtype not in (torch.int32, torch.int64):
        raise KernelInputError(f"step must be a 0-d integer tensor, got {step.dtype} {list(step.shape)}")
    if rows is not None and (rows.dim() != 2 or rows.shape[0] != B or rows.shape[1] < history.shape[1]
                             or rows.dtype != torch.int64):  # fmt: skip
        raise KernelInputError(f"rows must be int64 [{B}, >= {history.shape[1]}], got {rows.dtype} {list(rows.shape)}")
    return B, C, H, K


def _channels_unit_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


# ----------------------------------------------------------------------------------------------------------
# Launchers.


def dynamic_conv_triton(x: torch.Tensor, weight: torch.Tensor, padding_l: int, softmax: bool = False) -> torch.Tensor:
    """Full-sequence convolution with the Triton kernel: ``x [B, T, C]``, ``weight [B|1, T|1, H, K]`` (logits when
    ``softmax``, else normalised taps); returns ``[B, T, C]`` in x's dtype."""
    B, T, C, H, K = _check(x, weight, padding_l)
    utils.check_launchable(x, weight)
    if K > MAX_TAPS:
        raise KernelInputError(f"{K} taps exceed the kernel's {MAX_TAPS}; use dynamic_conv_ref")
    x = _channels_unit_stride(x)
    w = weight.expand(B, T, H, K)  # stride 0 along broadcast axes: nothing is copied
    out = utils.empty((B, T, C), x.dtype, x.device)
    if B * T > 0:
        _dynamic_conv_kernel[(B * T, utils.cdiv(C, BLOCK_C))](
            x, w, out,
            T, C, C // H, padding_l,
            x.stride(0), x.stride(1),
            w.stride(0), w.stride(1), w.stride(2), w.stride(3),
            out.stride(0), out.stride(1),
            K=K, SOFTMAX=softmax, BLOCK_C=BLOCK_C,
            num_warps=4,
        )  # fmt: skip
    return out


def _launch_step(x, store, weight, dims, softmax, name, position=0, step=None, rows=None, out=None) -> torch.Tensor:
    """The step kernel on the ring buffer (``step`` None) or on the history (``step``, optional ``rows``)."""
    B, C, H, K = dims
    utils.check_launchable(*(t for t in (x, store, weight, step, rows) if t is not None))
    if K > MAX_TAPS:
        raise KernelInputError(f"{K} taps exceed the kernel's {MAX_TAPS}; use the reference")
    if store.stride(-1) != 1:
        raise KernelInputError(f"{name} must have unit stride along C (it is written in place)")
    x = _channels_unit_stride(x)
    w = weight.expand(B, H, K)
    out = utils.output(out, (B, C), x.dtype, x.device)
    if B > 0:
        _dynamic_conv_step_kernel[(B, utils.cdiv(C, BLOCK_C))](
            x, store, w, out, rows if rows is not None else store, step if step is not None else store,
            C, C // H, position,
            x.stride(0), store.stride(0), store.stride(1),
            w.stride(0), w.stride(1), w.stride(2),
            out.stride(0), rows.stride(0) if rows is not None else 0,
            K=K, SOFTMAX=softmax, HISTORY=step is not None, HAS_ROWS=rows is not None, BLOCK_C=BLOCK_C,
            num_warps=4,
        )  # fmt: skip
    return out


def dynamic_conv_step_triton(
    x: torch.Tensor, buffer: torch.Tensor, weight: torch.Tensor, position: int, softmax: bool = False
) -> torch.Tensor:
    """One causal step with the Triton kernel: ``x [B, C]`` is written into slot ``position % K`` of ``buffer
    [B, K, C]`` (in place), then ``[B, C]`` is returned: the taps ``weight [B|1, H, K]`` over the last K inputs."""
    dims = _check_step(x, buffer, weight, position)
    return _launch_step(x, buffer, weight, dims, softmax, "buffer", position=position)


def dynamic_conv_step_rows_triton(
    x: torch.Tensor,
    history: torch.Tensor,
    weight: torch.Tensor,
    step: torch.Tensor,
    rows: torch.Tensor | None = None,
    softmax: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`dynamic_conv_step_rows` with the Triton kernel."""
    dims = _check_step_rows(x, history, weight, step, rows)
    return _launch_step(x, history, weight, dims, softmax, "history", step=step, rows=rows, out=out)


# ----------------------------------------------------------------------------------------------------------
# References: the module's own computation (softmax in fp32 rounded to x's dtype, unfolded windows @ taps).


def _taps(weight: torch.Tensor, softmax: bool, dtype: torch.dtype) -> torch.Tensor:
    return F.softmax(weight, dim=-1, dtype=torch.float32).to(dtype) if softmax else weight.to(dtype)


def dynamic_conv_ref(x: torch.Tensor, weight: torch.Tensor, padding_l: int, softmax: bool = False) -> torch.Tensor:
    """PyTorch reference of :func:`dynamic_conv`: pad, unfold into K-tap windows, one matmul per (b, t, h)."""
    B, T, C, H, K = _check(x, weight, padding_l)
    taps = _taps(weight, softmax, x.dtype)
    padded = F.pad(x, (0, 0, padding_l, K - 1 - padding_l))  # [B, T + K - 1, C]
    windows = padded.unfold(1, K, 1).reshape(B, T, H, C // H, K)  # [B, T, H, R, K]: taps of each output step
    out = windows @ taps.expand(B, T, H, K).unsqueeze(-1)  # [B, T, H, R, 1]
    return out.reshape(B, T, C)


def dynamic_conv_step_ref(
    x: torch.Tensor, buffer: torch.Tensor, weight: torch.Tensor, position: int, softmax: bool = False
) -> torch.Tensor:
    """PyTorch reference of :func:`dynamic_conv_step`: write the slot, roll the taps by ``(position + 1) % K`` so
    that they line up with the ring buffer's slots, one matmul per (b, h)."""
    B, C, H, K = _check_step(x, buffer, weight, position)
    buffer[:, position % K] = x
    taps = torch.roll(_taps(weight, softmax, x.dtype).expand(B, H, K), shifts=(position + 1) % K, dims=-1)
    window = buffer.view(B, K, H, C // H).permute(0, 2, 3, 1)  # [B, H, R, K]
    return (window @ taps.unsqueeze(-1)).reshape(B, C)


def dynamic_conv_step_rows_ref(
    x: torch.Tensor,
    history: torch.Tensor,
    weight: torch.Tensor,
    step: torch.Tensor,
    rows: torch.Tensor | None = None,
    softmax: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """PyTorch reference of :func:`dynamic_conv_step_rows` (device ops only, no host sync): write column ``step``,
    gather each row's last K inputs through ``rows``, one matmul per (b, h)."""
    B, C, H, K = _check_step_rows(x, history, weight, step, rows)
    history.index_copy_(1, step.view(1).long(), x[:, None])
    steps = step.long() - (K - 1) + torch.arange(K, device=x.device)  # [K]
    seen = steps.clamp(min=0)
    src = torch.arange(B, device=x.device)[:, None].expand(B, K) if rows is None else rows.gather(1, seen.expand(B, K))
    window = history[src, seen.expand(B, K)]  # [B, K, C]
    window = window * (steps >= 0).to(x.dtype)[None, :, None]
    window = window.view(B, K, H, C // H).permute(0, 2, 3, 1)  # [B, H, R, K]
    taps = _taps(weight, softmax, x.dtype).expand(B, H, K)
    result = (window @ taps.unsqueeze(-1)).reshape(B, C)
    return result if out is None else utils.output(out, (B, C), x.dtype, x.device).copy_(result)


# ----------------------------------------------------------------------------------------------------------
# Dispatchers.

def _use_kernel(x: torch.Tensor, K: int) -> bool:
    return K <= MAX_TAPS and utils.use_triton_or_interpreter(x)


def dynamic_conv(x: torch.Tensor, weight: torch.Tensor, padding_l: int, softmax: bool = False) -> torch.Tensor:
    """Dynamic / lightweight convolution over a sequence: ``x [B, T, C]``, ``weight [B|1, T|1, H, K]`` (logits
    normalised here in fp32 when ``softmax``), left padding ``padding_l``; returns ``[B, T, C]``. Triton on CUDA,
    the reference otherwise."""
    if _use_kernel(x, weight.shape[-1]):
        return dynamic_conv_triton(x, weight, padding_l, softmax)
    return dynamic_conv_ref(x, weight, padding_l, softmax)


def dynamic_conv_step(
    x: torch.Tensor, buffer: torch.Tensor, weight: torch.Tensor, position: int, softmax: bool = False
) -> torch.Tensor:
    """One causal decoding step: ``x [B, C]`` into ``buffer [B, K, C]`` slot ``position % K`` (in place), returns
    ``[B, C]`` convolved with ``weight [B|1, H, K]``. Triton on CUDA, the reference otherwise."""
    if _use_kernel(x, weight.shape[-1]):
        return dynamic_conv_step_triton(x, buffer, weight, position, softmax)
    return dynamic_conv_step_ref(x, buffer, weight, position, softmax)


def dynamic_conv_step_rows(
    x: torch.Tensor,
    history: torch.Tensor,
    weight: torch.Tensor,
    step: torch.Tensor,
    rows: torch.Tensor | None = None,
    softmax: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One causal decoding step over an input history shared by beams: ``x [B, C]`` is written into column
    ``step`` (a 0-d device tensor) of ``history [B, L, C]`` (in place); the output ``[B, C]`` is ``x`` and the
    inputs of steps ``step - K + 1 .. step - 1`` of row b's prefix, ``history[rows[b, s], s]`` (zeros before step
    0; without ``rows`` row b's own history), convolved with ``weight [B|1, H, K]``. With ``rows`` the beam
    search's self-attention row table, beams never copy their convolution windows. ``out``: an optional ``[B, C]``
    destination (unit stride along C; e.g. this branch's columns of a concatenation). Triton on CUDA, the
    reference otherwise."""
    if _use_kernel(x, weight.shape[-1]):
        return dynamic_conv_step_rows_triton(x, history, weight, step, rows, softmax, out)
    return dynamic_conv_step_rows_ref(x, history, weight, step, rows, softmax, out)
