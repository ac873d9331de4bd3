"""Depthwise 1-D convolution of the Conformer convolution module, with BatchNorm folded and Swish fused.

Gulati et al., "Conformer" (arXiv 2005.08100), Fig. 2: pointwise conv -> GLU -> **depthwise conv -> BatchNorm
-> Swish** -> pointwise conv. Per channel c and output frame t::

    y[b, t, c] = act(bias[c] + sum_k weight[c, k] * x[b, t + k - pad_left, c])

with ``x`` read as zero outside ``[0, T_in)`` and, when a ``valid [B, T_in]`` mask is given, on frames where
it is False (the padded tail of a shorter utterance in a batch: they must read as the zeros an unpadded
utterance would see). ``act`` is SiLU (Swish, Ramachandran et al. arXiv 1710.05941) or the identity.

BatchNorm in eval mode is an affine map per channel, so it folds into the conv (:func:`fold_batch_norm`):
``w' = w * g``, ``b' = (b - mean) * g + beta`` with ``g = gamma / sqrt(running_var + eps)``. A model with
``cnn_module_norm: layer_norm`` (the U2++ recipes) normalises over channels between the conv and the Swish:
there the kernel does conv + bias only and the LayerNorm stays a separate op.

Layout: channel-last ``[B, T, C]``, the layout the module already has after its GLU (no transposes). Causal
convolution is ``padding=(K - 1, 0)``; a centred one ``((K - 1) // 2, (K - 1) // 2)`` (odd K).

Kernel layout: one program per ``[BLOCK_T, BLOCK_C]`` output tile of one utterance; the K taps are an
unrolled loop of shifted tile loads (each input frame is read K times, from L1/L2 after the first: the op
streams at memory speed, ~2 x B x T x C elements moved). Accumulation in fp32 whatever the storage dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from turboformer.kernels import utils
from turboformer.kernels.utils import KernelInputError, tl, triton

ACTIVATIONS = (None, "silu")
MAX_KERNEL = 64  # taps unrolled in one program (Conformer uses 7..31)


@triton.jit
def _depthwise_conv1d_kernel(
    x_ptr,  # [B, T_in, C], unit stride along C
    w_ptr,  # [C, K] contiguous
    b_ptr,  # [C]
    valid_ptr,  # [B, T_in] uint8 (1 = valid frame), read only when MASKED
    y_ptr,  # [B, T_out, C] out, contiguous
    T_in,
    T_out,
    C,
    pad_left,
    stride_xb,
    stride_xt,
    stride_vb,
    K: tl.constexpr,
    MASKED: tl.constexpr,
    SILU: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T] output frames
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C] channels
    c_mask = c < C
    acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    for k in tl.static_range(K):
        src = t + k - pad_left  # [BLOCK_T] input frames read by tap k
        ok = (src >= 0) & (src < T_in)
        if MASKED:
            ok = ok & (tl.load(valid_ptr + b * stride_vb + src, mask=ok, other=0) != 0)
        x = tl.load(
            x_ptr + b * stride_xb + src.to(tl.int64)[:, None] * stride_xt + c[None, :],
            mask=ok[:, None] & c_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        w = tl.load(w_ptr + c * K + k, mask=c_mask, other=0.0).to(tl.float32)  # [BLOCK_C]
        acc += x * w[None, :]
    acc += tl.load(b_ptr + c, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    if SILU:
        acc = acc / (1.0 + tl.exp(-acc))  # x * sigmoid(x)
    out = y_ptr + b * T_out * C + t.to(tl.int64)[:, None] * C + c[None, :]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=(t < T_out)[:, None] & c_mask[None, :])


def _check(x, weight, bias, padding, valid, activation) -> int:
    """Validate the arguments; return T_out."""
    utils.check_float("x", x)
    if x.dim() != 3:
        raise KernelInputError(f"x must be [B, T, C], got shape {list(x.shape)}")
    batch, t_in, channels = x.shape
    utils.check_float("weight", weight)
    if weight.dim() != 2 or weight.shape[0] != channels or not 1 <= weight.shape[1] <= MAX_KERNEL:
        raise KernelInputError(
            f"weight must be [C={channels}, K] with 1 <= K <= {MAX_KERNEL}, got {list(weight.shape)}"
        )
    utils.check_vector("bias", bias, channels)
    left, right = padding
    if left < 0 or right < 0:
        raise KernelInputError(f"padding must be non-negative, got {padding}")
    if valid is not None and (valid.dtype != torch.bool or valid.shape != (batch, t_in)):
        raise KernelInputError(
            f"valid must be a bool [B, T_in] = {[batch, t_in]} mask, got {valid.dtype} {list(valid.shape)}"
        )
    if activation not in ACTIVATIONS:
        raise KernelInputError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    t_out = t_in + left + right - weight.shape[1] + 1
    if t_out < 0:
        raise KernelInputError(f"{t_in} frames with padding {padding} are fewer than the {weight.shape[1]} taps")
    return t_out


def depthwise_conv1d_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    padding: tuple[int, int],
    valid: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """Depthwise conv of ``x [B, T_in, C]`` with ``weight [C, K]``, ``bias [C]``, zero ``padding = (left,
    right)`` frames and optional ``valid [B, T_in]`` bool mask (False frames read as zero), then
    ``activation`` (None or "silu"), with the Triton kernel. Returns ``[B, T_in + left + right - K + 1, C]``
    in x's dtype."""
    t_out = _check(x, weight, bias, padding, valid, activation)
    tensors = [x, weight, bias] + ([valid] if valid is not None else [])
    utils.check_launchable(*tensors)
    batch, t_in, channels = x.shape
    if x.stride(2) != 1 and channels > 1:
        x = x.contiguous()
    weight = weight.contiguous()
    y = utils.empty((batch, t_out, channels), x.dtype, x.device)
    if batch * t_out * channels == 0:
        return y
    mask = valid.contiguous().view(torch.uint8) if valid is not None else x  # x: unread unless MASKED
    block_c = min(utils.next_power_of_2(channels), 128)
    block_t = min(utils.next_power_of_2(t_out), max(2048 // block_c, 1))  # <= 2048 outputs per program
    grid = (utils.cdiv(t_out, block_t), utils.cdiv(channels, block_c), batch)
    _depthwise_conv1d_kernel[grid](
        x, weight, bias, mask, y,
        t_in, t_out, channels, padding[0],
        x.stride(0), x.stride(1), mask.stride(0) if valid is not None else 0,
        K=weight.shape[1], MASKED=valid is not None, SILU=activation == "silu",
        BLOCK_T=block_t, BLOCK_C=block_c, num_warps=4,
    )  # fmt: skip
    return y


def depthwise_conv1d_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    padding: tuple[int, int],
    valid: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """PyTorch reference: ``F.conv1d(groups=C)`` on the channel-first view in x's dtype (the module's own maths,
    so the CPU path of a float32 model is unchanged), then the activation."""
    _check(x, weight, bias, padding, valid, activation)
    if valid is not None:
        x = x.masked_fill(~valid.unsqueeze(-1), 0.0)
    xc = F.pad(x.transpose(1, 2), padding)  # [B, C, T_in + left + right]
    y = F.conv1d(xc, weight.to(x.dtype).unsqueeze(1), bias.to(x.dtype), groups=x.shape[-1]).transpose(1, 2)
    return F.silu(y) if activation == "silu" else y


def depthwise_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    padding: tuple[int, int],
    valid: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """Depthwise conv (+ optional SiLU) of channel-last ``x [B, T_in, C]``, ``weight [C, K]``, ``bias [C]``;
    see :func:`depthwise_conv1d_triton`. Triton on CUDA, the reference otherwise."""
    if utils.use_triton(x):
        return depthwise_conv1d_triton(x, weight, bias, padding, valid, activation)
    return depthwise_conv1d_ref(x, weight, bias, padding, valid, activation)


def fold_batch_norm(
    conv_weight: torch.Tensor, conv_bias: torch.Tensor | None, bn: torch.nn.BatchNorm1d
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold an eval-mode BatchNorm that follows a depthwise conv into it: ``conv_weight [C, 1, K]`` or
    ``[C, K]``, ``conv_bias [C]`` or None -> ``(w [C, K], b [C])`` with ``bn(conv(x)) == conv'(x)``.

    Folded in float32 (float64 if the inputs are) and returned in ``conv_weight``'s dtype, so a half-precision
    model rounds each folded value once. Uses the running statistics: valid only for ``bn.eval()``.
    """
    channels = conv_weight.shape[0]
    if bn.running_mean is None or bn.running_var is None:
        raise KernelInputError("BatchNorm without running statistics cannot be folded")
    if bn.num_features != channels:
        raise KernelInputError(f"BatchNorm has {bn.num_features} features, the conv {channels} channels")
    math_dtype = torch.float64 if conv_weight.dtype == torch.float64 else torch.float32
    w = conv_weight.reshape(channels, -1).to(math_dtype)
    b = conv_bias.to(math_dtype) if conv_bias is not None else w.new_zeros(channels)
    scale = torch.rsqrt(bn.running_var.to(math_dtype) + bn.eps)  # [C] 1 / sqrt(var + eps)
    if bn.weight is not None:
        scale = scale * bn.weight.to(math_dtype)
    shift = -bn.running_mean.to(math_dtype) * scale
    if bn.bias is not None:
        shift = shift + bn.bias.to(math_dtype)
    return (w * scale[:, None]).to(conv_weight.dtype), (b * scale + shift).to(conv_weight.dtype)
