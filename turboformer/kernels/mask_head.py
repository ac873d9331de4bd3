"""SAM's mask head: the last stride-2 transposed convolution, GELU and the hypernetwork product, fused.

For ``y [B, Cin, h, w]`` (the upscaler's first stage), ``weight [Cin, Cout, 2, 2]``, ``bias [Cout]`` (its
second ``ConvTranspose2d``, kernel 2, stride 2) and ``hyper [B, M, Cout]`` (one weight vector per mask
token, from the hypernetwork MLPs; Kirillov et al. 2023, arXiv 2304.02643, Appendix A)::

    up[b, c, 2i + di, 2j + dj] = gelu(bias[c] + sum_cin y[b, cin, i, j] * weight[cin, c, di, dj])
    masks[b, m, 2i + di, 2j + dj] = sum_c hyper[b, m, c] * up[b, c, 2i + di, 2j + dj]

A kernel-2 stride-2 transposed convolution has no overlapping windows: each input pixel ``(i, j)`` alone
makes the 2 x 2 output pixels ``(2i + di, 2j + dj)``, by four ``[Cin] x [Cin, Cout]`` products. So a tile of
input pixels yields its output pixels' masks directly, and the upscaled map ``up`` (``[B, 32, 256, 256]``,
268 MB in fp16 at 64 prompts, written, read by GELU, written, read and copied to fp32 by the eager
decoder) never leaves registers: the kernel reads ``y`` once and writes the fp32 masks once.

Rounding follows the unfused half-precision decoder: the convolution accumulates in fp32 and its output is
rounded to the input dtype (the stored conv output), GELU runs in fp32 and is rounded again (the stored
GELU output); the mask product then runs in fp32 like ``hyper.float() @ up.float()``. With fp16/bf16
operands the tensor cores' products are exact in fp32 (11- or 8-bit mantissas, at most 22 bits of
product), so ``tl.dot`` with fp32 accumulation is that fp32 product up to summation order.

Kernel layout: programs over (tiles of ``BLOCK_P`` input pixels, batch). A program loads its
``[BLOCK_P, Cin]`` input tile once (from an NCHW map or, read in place, a channels-last one), then for each of the four ``(di, dj)``:
``z = y_tile @ weight[:, :, di, dj]`` ``[BLOCK_P, Cout]`` (tensor cores) + bias, GELU, and
``masks = gelu(z) @ hyper[b]^T`` ``[BLOCK_P, M]`` (M = 4 padded to tl.dot's minimum of 16 with zero
columns), stored to every other column of output rows ``2i + di``.
"""

from __future__ import annotations

import torch

from turboformer.kernels import utils
from turboformer.kernels.utils import KernelInputError, tl, triton

MAX_CHANNELS = 128  # Cin and Cout: a [BLOCK_P, Cin] tile and four [Cin, Cout] slices in registers
MAX_MASKS = 64


@triton.jit
def _mask_head_kernel(
    y_ptr,  # [B, CIN, h * w], strides (stride_yb, stride_yc, stride_yp): NCHW or channels-last
    w_ptr,  # [CIN, COUT, 2, 2] contiguous
    bias_ptr,  # [COUT]
    hyper_ptr,  # [B, M, COUT] contiguous
    out_ptr,  # [B, M, 2h, 2w] fp32 out, contiguous
    CIN,
    COUT,
    M,
    H,  # input height h
    W,  # input width w
    stride_yb,
    stride_yc,
    stride_yp,
    BLOCK_P: tl.constexpr,
    BLOCK_CIN: tl.constexpr,
    BLOCK_COUT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    DOT_DTYPE: tl.constexpr,  # the inputs' dtype; fp32 for bf16 under the interpreter (numpy has no bf16 dot)
    PRECISION: tl.constexpr,  # tl.dot input precision for fp32 operands: "ieee" or "tf32"
):
    hw = H * W
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)  # input pixel indices i * W + j
    batch = tl.program_id(1).to(tl.int64)
    p_mask = p < hw
    cin = tl.arange(0, BLOCK_CIN)
    cout = tl.arange(0, BLOCK_COUT)
    m = tl.arange(0, BLOCK_M)
    cin_mask = cin < CIN
    cout_mask = cout < COUT
    m_mask = m < M

    y = tl.load(
        y_ptr + batch * stride_yb + cin[None, :].to(tl.int64) * stride_yc + p[:, None].to(tl.int64) * stride_yp,
        mask=p_mask[:, None] & cin_mask[None, :], other=0.0,
    ).to(DOT_DTYPE)  # [BLOCK_P, BLOCK_CIN]
    bias = tl.load(bias_ptr + cout, mask=cout_mask, other=0.0).to(tl.float32)  # [BLOCK_COUT]
    # hyper[b]^T, zero in the padded mask columns and channel rows
    hyper_t = tl.load(
        hyper_ptr + batch * M * COUT + m[None, :] * COUT + cout[:, None],
        mask=cout_mask[:, None] & m_mask[None, :], other=0.0,
    ).to(DOT_DTYPE)  # [BLOCK_COUT, BLOCK_M]

    i = p // W
    j = p % W
    out_base = out_ptr + batch * M * 4 * hw + m[None, :].to(tl.int64) * 4 * hw  # [1, BLOCK_M]
    out_mask = p_mask[:, None] & m_mask[None, :]
    w_mask = cin_mask[:, None] & cout_mask[None, :]
    for k in tl.static_range(4):  # (di, dj) = (k // 2, k % 2)
        w_k = tl.load(
            w_ptr + cin[:, None] * COUT * 4 + cout[None, :] * 4 + k, mask=w_mask, other=0.0
        ).to(DOT_DTYPE)  # weight[:, :, di, dj], [BLOCK_CIN, BLOCK_COUT]
        z = tl.dot(y, w_k, input_precision=PRECISION) + bias[None, :]  # [BLOCK_P, BLOCK_COUT] fp32
        z = z.to(y_ptr.dtype.element_ty).to(tl.float32)  # the stored conv output
        g = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))  # exact GELU, 1/sqrt(2)
        g = g.to(y_ptr.dtype.element_ty).to(DOT_DTYPE)  # the stored GELU output
        masks = tl.dot(g, hyper_t, input_precision=PRECISION)  # [BLOCK_P, BLOCK_M] fp32
        row = 2 * i + k // 2
        col = 2 * j + k % 2
        tl.store(out_base + (row * 2 * W + col)[:, None], masks, mask=out_mask)


def _check(y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, hyper: torch.Tensor) -> None:
    for name, t in (("y", y), ("weight", weight), ("bias", bias), ("hyper", hyper)):
        utils.check_float(name, t)
    if y.dim() != 4:
        raise KernelInputError(f"y must be a [B, Cin, h, w] map, got shape {list(y.shape)}")
    batch, cin = y.shape[:2]
    if weight.dim() != 4 or weight.shape[0] != cin or tuple(weight.shape[2:]) != (2, 2):
        raise KernelInputError(
            f"weight must be a kernel-2 ConvTranspose2d weight [{cin}, Cout, 2, 2], got {list(weight.shape)}"
        )
    cout = weight.shape[1]
    utils.check_vector("bias", bias, cout)
    if hyper.dim() != 3 or hyper.shape[0] != batch or hyper.shape[2] != cout:
        raise KernelInputError(f"hyper must have shape [{batch}, M, {cout}], got {list(hyper.shape)}")
    if len({y.dtype, weight.dtype, bias.dtype, hyper.dtype}) != 1:
        raise KernelInputError(
            f"y, weight, bias and hyper must share a dtype, got {y.dtype}, {weight.dtype}, {bias.dtype}, {hyper.dtype}"
        )


def mask_head_triton(
    y: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    hyper: torch.Tensor,
    *,
    block_p: int | None = None,
    num_warps: int = 4,
) -> torch.Tensor:
    """:func:`mask_head` with the Triton kernel (Cin, Cout up to ``MAX_CHANNELS``, M up to ``MAX_MASKS``).
    ``block_p`` (input pixels per program, a power of two >= 16) and ``num_warps`` override the defaults, for
    tests and tuning."""
    _check(y, weight, bias, hyper)
    utils.check_launchable(y, weight, bias, hyper)
    batch, cin, height, width = y.shape
    cout, num_masks = weight.shape[1], hyper.shape[1]
    if max(cin, cout) > MAX_CHANNELS or num_masks > MAX_MASKS:
        raise KernelInputError(
            f"Cin = {cin}, Cout = {cout}, M = {num_masks} exceed the kernel's {MAX_CHANNELS} channels / "
            f"{MAX_MASKS} masks; use mask_head_ref"
        )
    if block_p is not None and (block_p < 16 or block_p & (block_p - 1)):
        raise KernelInputError(f"block_p must be a power of two >= 16, got {block_p}")
    y, _ = utils.dense_map(y)  # NCHW or channels-last, both read in place
    weight, hyper = weight.contiguous(), hyper.contiguous()
    out = utils.empty((batch, num_masks, 2 * height, 2 * width), torch.float32, y.device)
    hw = height * width
    if batch == 0 or hw == 0 or num_masks == 0:
        return out
    # Untuned starting point: 128 input pixels (512 output pixels) per program on 4 warps; the fp16
    # [128, 64] input tile is 32 registers per thread, z [128, 32] fp32 another 32.
    block_p = block_p or min(128, max(16, utils.next_power_of_2(hw)))
    dot_dtype, precision = utils.dot_settings(y.dtype)
    _mask_head_kernel[(utils.cdiv(hw, block_p), batch)](
        y, weight, bias, hyper, out, cin, cout, num_masks, height, width,
        *utils.map_strides(y),
        BLOCK_P=block_p,
        BLOCK_CIN=max(16, utils.next_power_of_2(cin)),
        BLOCK_COUT=max(16, utils.next_power_of_2(cout)),
        BLOCK_M=max(16, utils.next_power_of_2(num_masks)),
        DOT_DTYPE=dot_dtype, PRECISION=precision, num_warps=num_warps,
    )  # fmt: skip
    return out


def mask_head_ref(y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, hyper: torch.Tensor) -> torch.Tensor:
    """PyTorch reference, the unfused decoder's ops: transposed convolution and GELU in y's dtype, then the
    mask product in fp32 (for fp32 inputs exactly upstream SAM's operations)."""
    _check(y, weight, bias, hyper)
    up = torch.nn.functional.gelu(torch.nn.functional.conv_transpose2d(y, weight, bias, stride=2))
    b, c, h, w = up.shape  # [B, Cout, 2h, 2w]
    return (hyper.float() @ up.view(b, c, h * w).float()).view(b, -1, h, w)


def mask_head(y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, hyper: torch.Tensor) -> torch.Tensor:
    """Mask logits ``hyper @ gelu(conv_transpose2d(y, weight, bias, stride=2))``.

    Args:
        y: ``[B, Cin, h, w]`` feature map (fp32/fp16/bf16).
        weight: ``[Cin, Cout, 2, 2]`` ConvTranspose2d weight (kernel 2, stride 2), bias ``[Cout]``.
        hyper: ``[B, M, Cout]`` per-mask weights over the ``Cout`` channels.
        All four share a dtype.

    Returns:
        ``[B, M, 2h, 2w]`` float32 logits. Triton on CUDA (Cin, Cout up to ``MAX_CHANNELS``, M up to
        ``MAX_MASKS``), the reference otherwise.
    """
    fits = y.dim() == 4 and weight.dim() == 4 and hyper.dim() == 3
    fits = fits and max(weight.shape[:2]) <= MAX_CHANNELS and hyper.shape[1] <= MAX_MASKS
    if utils.use_triton(y) and fits:
        return mask_head_triton(y, weight, bias, hyper)
    return mask_head_ref(y, weight, bias, hyper)
