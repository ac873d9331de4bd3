"""One decoding step of Lite Transformer's convolution branch between its two projections, in one launch: the GLU
of ``linear1``'s output, the dynamic convolution's kernel prediction (``weight_linear``, Wu et al., ICLR 2019,
arXiv 1901.10430, Eq. 3), the softmax over the taps and the causal convolution over the beams' input history
(:func:`.dynamic_conv.dynamic_conv_step_rows`).

For one row b (``u`` is ``linear1``'s output, ``C`` channels in ``H`` heads of ``R = C / H``, ``K`` taps)::

    x      = u[b, :C] * sigmoid(u[b, C:])             (GLU; x = u[b] without it)   rounded to x's dtype
    logits = W x                                       W = weight_linear.weight [H * K, C], fp32 sums, rounded
    out[b, h*R + r] = sum_k softmax(logits[h, :])[k] * x_{t - K + 1 + k}[h*R + r]   (the step op, x_t = x)

every rounding where the unfused ops round (``F.glu``, the linear's output, the normalised taps), so the result
is the three-launch path's. The PyTorch ops it replaces cost one launch each (GLU, the kernel-prediction GEMM, the
convolution step) at ~3-4 us apiece on an H200 in a graphed decode step, for ~5 us of work in total.

Kernel layout: one program per (row, head). It predicts its head's K taps from all ``C`` channels (its ``K x C``
rows of ``weight_linear``, 15 KB at the paper's sizes, load first: under PDL while the previous kernel runs), takes
the softmax over them in registers, and convolves its ``R`` channels with a ``[K, R]`` window of the history
gathered through the row table (loaded before the wait too when the caller promises, ``prefetch``). The GLU of the
row is computed by each of its H programs (2C loads); nothing goes through memory between the steps.
On an H200 a first version with one program per row and the taps in a scratch row (a CTA barrier between) took
8.7 us per launch at 64 rows; the same with all of weight_linear in registers spilled (24.5 us).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from turboformer.kernels import utils
from turboformer.kernels.dynamic_conv import _check_step_rows, dynamic_conv_step_rows_ref
from turboformer.kernels.utils import KernelInputError, tl, triton

MAX_CHANNELS = 1024  # channels of a branch held in one program's registers (the paper's branches have <= 256)
MAX_BLOCK = 16384  # weight_linear values per program (K taps x C channels, padded to powers of two)


@triton.jit
def _glu(u_ptr, cols, mask, C, GLU: tl.constexpr):
    """The convolution's input at channels ``cols`` of one row of u: GLU(value, gate) in fp32, rounded to the
    history's dtype by the caller."""
    x = tl.load(u_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if GLU:
        x = x * tl.sigmoid(tl.load(u_ptr + C + cols, mask=mask, other=0.0).to(tl.float32))
    return x


@triton.jit
def _dynamic_conv_branch_kernel(
    u_ptr,  # [B, 2C] (GLU: value | gate) or [B, C]: linear1's output (unit stride along features)
    w_ptr,  # [H * K, C] weight_linear.weight (unit stride along C)
    hist_ptr,  # [B, L, C] input history, column `step` written here
    rows_ptr,  # HAS_ROWS: [B, L] int64, the cache row holding step s of row b's prefix
    step_ptr,  # [] int64, this step
    out_ptr,  # [B, C] out (unit stride along C)
    C,
    R,
    K,
    stride_ub,
    stride_wj,
    stride_hb,
    stride_hl,
    stride_rb,
    stride_ob,
    GLU: tl.constexpr,
    SOFTMAX: tl.constexpr,
    HAS_ROWS: tl.constexpr,
    PDL: tl.constexpr,
    PREFETCH: tl.constexpr,  # the history and the row table may be read before the PDL wait
    OVERLAP: tl.constexpr,  # no wait for the previous kernel before the work, only before exiting (``overlap``)
    BLOCK_C: tl.constexpr,  # >= C: every channel, for the prediction
    BLOCK_K: tl.constexpr,  # >= K
    BLOCK_R: tl.constexpr,  # >= R: this head's channels
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    k = tl.arange(0, BLOCK_K)
    r = tl.arange(0, BLOCK_R)
    own = h * R + r  # this head's channels
    own_mask = r < R
    # head h's rows of weight_linear (a constant): loaded before the PDL wait (Hopper), while the previous kernel
    # runs, so the prediction waits only for u
    w = tl.load(w_ptr + (h * K + k)[:, None] * stride_wj + cols[None, :], mask=(k < K)[:, None] & mask[None, :],
                other=0.0)  # fmt: skip
    # The K - 1 earlier inputs of row b's prefix: tap k reads step t - K + 1 + k from cache row rows[b, step]
    # (zeros before step 0). Tap K - 1 is this step's input, from u below.
    t = tl.load(step_ptr)
    steps = t - (K - 1) + k
    earlier = (k < K - 1) & (steps >= 0)
    seen = tl.maximum(steps, 0)
    if PREFETCH:
        window = _window(hist_ptr, rows_ptr, b, seen, earlier, own, own_mask, stride_hb, stride_hl, stride_rb, HAS_ROWS)
    if PDL:
        if not OVERLAP:
            tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    if not PREFETCH:
        window = _window(hist_ptr, rows_ptr, b, seen, earlier, own, own_mask, stride_hb, stride_hl, stride_rb, HAS_ROWS)
    u_row = u_ptr + b * stride_ub
    x = _glu(u_row, cols, mask, C, GLU).to(hist_ptr.dtype.element_ty)  # [BLOCK_C] every channel, as F.glu rounds
    x_own = _glu(u_row, own, own_mask, C, GLU).to(hist_ptr.dtype.element_ty)  # [BLOCK_R] the same, this head's

    # head h's kernel: logits = W_h x (fp32 sums rounded to x's dtype, as the linear's output), the softmax over
    # its K taps in fp32 rounded to x's dtype, as the reference's taps
    logits = tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], axis=1).to(x.dtype).to(tl.float32)  # [BLOCK_K]
    if SOFTMAX:
        logits = tl.where(k < K, logits, -float("inf"))
        e = tl.exp(logits - tl.max(logits, axis=0))
        logits = e / tl.sum(e, axis=0)
    taps = logits.to(x.dtype).to(tl.float32)

    tl.store(hist_ptr + b * stride_hb + t * stride_hl + own, x_own, mask=own_mask)  # column t, read by no tap here
    window = tl.where((k == K - 1)[:, None], x_own.to(tl.float32)[None, :], window)
    out = tl.sum(taps[:, None] * window, axis=0)  # [BLOCK_R]
    tl.store(out_ptr + b * stride_ob + own, out.to(out_ptr.dtype.element_ty), mask=own_mask)
    if PDL and OVERLAP:  # done only when the previous kernel is: the kernels after this one read both outputs
        tl.extra.cuda.gdc_wait()


@triton.jit
def _window(hist_ptr, rows_ptr, b, seen, earlier, own, own_mask, stride_hb, stride_hl, stride_rb,
            HAS_ROWS: tl.constexpr):  # fmt: skip
    """[BLOCK_K, BLOCK_R] fp32: the inputs of steps ``seen`` of row b's prefix at this head's channels, zero
    where not ``earlier``."""
    src = b
    if HAS_ROWS:
        src = tl.load(rows_ptr + b * stride_rb + seen, mask=earlier, other=0)
    at = hist_ptr + (src * stride_hb + seen * stride_hl)[:, None] + own[None, :]
    return tl.load(at, mask=earlier[:, None] & own_mask[None, :], other=0.0).to(tl.float32)


def _check(u, weight, history, step, rows, heads: int, glu: bool) -> tuple[int, int, int, int]:
    """Returns (B, C, H, K) after checking the branch's inputs against each other."""
    utils.check_float("u", u)
    utils.check_float("weight", weight)
    if u.dim() != 2 or weight.dim() != 2 or history.dim() != 3:
        raise KernelInputError(
            f"u must be [B, 2C|C], weight [H*K, C], history [B, L, C]; got {list(u.shape)}, {list(weight.shape)}, "
            f"{list(history.shape)}"
        )
    B, C = u.shape[0], history.shape[2]
    if u.shape[1] != (2 * C if glu else C):
        raise KernelInputError(f"u must have {'2 x ' if glu else ''}{C} features (the history's), got {u.shape[1]}")
    if heads < 1 or weight.shape[1] != C or weight.shape[0] % heads:
        raise KernelInputError(f"weight must be [heads * K, {C}] with heads = {heads}, got {list(weight.shape)}")
    if weight.dtype != u.dtype:
        raise KernelInputError(f"weight dtype {weight.dtype} differs from u's {u.dtype}")
    K = weight.shape[0] // heads
    _check_step_rows(u[:, :C], history, weight[:1, :1, None].expand(1, heads, K), step, rows)  # [1, H, K] view
    return B, C, heads, K


def _fits(C: int, H: int, K: int) -> bool:
    """Whether one program's tile of weight_linear (its head's K rows by every channel) fits in registers."""
    return utils.next_power_of_2(K) * utils.next_power_of_2(C) <= MAX_BLOCK and C <= MAX_CHANNELS


def dynamic_conv_branch_step_triton(
    u: torch.Tensor,
    weight: torch.Tensor,
    history: torch.Tensor,
    step: torch.Tensor,
    rows: torch.Tensor | None = None,
    *,
    heads: int,
    glu: bool = True,
    softmax: bool = True,
    out: torch.Tensor | None = None,
    prefetch: bool = False,
    overlap: bool = False,
) -> torch.Tensor:
    """:func:`dynamic_conv_branch_step` with the Triton kernel."""
    B, C, H, K = _check(u, weight, history, step, rows, heads, glu)
    utils.check_launchable(*(t for t in (u, weight, history, step, rows) if t is not None))
    if u.stride(-1) != 1 or weight.stride(-1) != 1 or history.stride(-1) != 1:
        raise KernelInputError("u, weight and history must have unit stride along the features")
    if not _fits(C, H, K):
        raise KernelInputError(
            f"{K} taps over {C} channels exceed the kernel's {MAX_BLOCK} weights per program (or {MAX_CHANNELS} "
            "channels); use the reference"
        )
    out = utils.output(out, (B, C), u.dtype, u.device)
    pdl = utils.pdl_supported(u.device)
    if B > 0:
        _dynamic_conv_branch_kernel[(B, H)](
            u, weight, history, rows if rows is not None else step, step, out,
            C, C // H, K,
            u.stride(0), weight.stride(0), history.stride(0), history.stride(1),
            rows.stride(0) if rows is not None else 0, out.stride(0),
            GLU=glu, SOFTMAX=softmax, HAS_ROWS=rows is not None, PDL=pdl, PREFETCH=prefetch, OVERLAP=overlap,
            BLOCK_C=utils.next_power_of_2(C), BLOCK_K=utils.next_power_of_2(K),
            BLOCK_R=utils.next_power_of_2(C // H), num_warps=4,
            **({"launch_pdl": True} if pdl else {}),
        )  # fmt: skip
    return out


def dynamic_conv_branch_step_ref(
    u: torch.Tensor,
    weight: torch.Tensor,
    history: torch.Tensor,
    step: torch.Tensor,
    rows: torch.Tensor | None = None,
    *,
    heads: int,
    glu: bool = True,
    softmax: bool = True,
    out: torch.Tensor | None = None,
    prefetch: bool = False,
    overlap: bool = False,
) -> torch.Tensor:
    """PyTorch reference: ``F.glu``, the kernel prediction as an fp32 matmul rounded to x's dtype, then
    :func:`.dynamic_conv.dynamic_conv_step_rows_ref` (``prefetch`` and ``overlap``, launch options, are ignored)."""
    B, C, H, K = _check(u, weight, history, step, rows, heads, glu)
    x = F.glu(u, dim=-1) if glu else u
    logits = (x.float() @ weight.float().T).to(x.dtype).view(B, H, K)
    return dynamic_conv_step_rows_ref(x, history, logits, step, rows, softmax, out)


def dynamic_conv_branch_step(
    u: torch.Tensor,
    weight: torch.Tensor,
    history: torch.Tensor,
    step: torch.Tensor,
    rows: torch.Tensor | None = None,
    *,
    heads: int,
    glu: bool = True,
    softmax: bool = True,
    out: torch.Tensor | None = None,
    prefetch: bool = False,
    overlap: bool = False,
) -> torch.Tensor:
    """One decoding step of a dynamic-convolution branch from its input projection's output.

    Args:
        u: ``[B, 2C]`` (``glu``: value | gate halves) or ``[B, C]``, ``linear1``'s output for this step (a
            column slice of a wider GEMM output is fine: unit stride along the features).
        weight: ``[heads * K, C]``, ``weight_linear.weight`` (no bias), u's dtype.
        history, step, rows: as :func:`.dynamic_conv.dynamic_conv_step_rows`: the convolution's input ``x`` is
            written into column ``step`` of ``history [B, L, C]``, and the K - 1 inputs before it are read from
            cache rows ``rows[b, s]`` (zeros before step 0).
        heads: H, the number of kernels per step (K = weight rows / H).
        softmax: the kernels are softmax-normalised over the taps (``weight_softmax``).
        out: an optional ``[B, C]`` destination (unit stride along C).
        prefetch: the caller's promise that ``history`` and ``rows`` were last written before the previous kernel
            on the stream began (in an engine's step: by earlier steps and the step's first kernels, with the
            input projection in between): under programmatic dependent launch (Hopper) they are read while that
            kernel still runs. A wrong promise reads stale inputs.
        overlap: the caller's promise that the previous kernel on the stream reads and writes nothing that this
            one touches, and that it was launched with PDL and signals its dependents only after its own wait for
            the kernel before it (``decode_attention`` does: the self-attention branch of the same layer). Then all
            of this kernel's inputs are complete when it starts, and it runs alongside that kernel instead of
            after it; it waits for it only before exiting, so the kernels after it see both outputs. A wrong
            promise reads unfinished inputs.

    Returns:
        ``[B, C]`` in u's dtype, before ``linear2``. Triton on CUDA, the reference otherwise.
    """
    if utils.use_triton_or_interpreter(u) and _fits(history.shape[-1], heads, weight.shape[0] // max(heads, 1)):
        return dynamic_conv_branch_step_triton(
            u, weight, history, step, rows, heads=heads, glu=glu, softmax=softmax, out=out, prefetch=prefetch,
            overlap=overlap,
        )
    return dynamic_conv_branch_step_ref(u, weight, history, step, rows, heads=heads, glu=glu, softmax=softmax, out=out)
