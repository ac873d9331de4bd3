"""Benchmark the SAM mask decoder's upscaler tail at 64 prompts (the profiled batch) in fp16.

Shapes are those of every SAM size (the decoder is the same for ViT-B/L/H): conv1's output
``x [64, 64, 128, 128]``, conv2 ``[64, 32, 2, 2]``, 4 mask tokens, logits ``[64, 4, 256, 256]`` fp32.

Ops and variants (``triton`` = ours, as the fp16 decoder runs it):

* ``ln_gelu``: GELU(LayerNorm2d(x)). ``torch`` = the previous decoder: upcast to fp32, upstream's
  mean / var / sqrt / affine ops, cast back, GELU in fp16; ``torch_fln`` = ``F.layer_norm`` on the NHWC
  view + GELU (one fused LayerNorm kernel, channels-last output).
* ``mask_head``: ``hyper @ GELU(conv2(y))`` with fp32 logits. ``torch`` = the previous decoder: cuDNN
  ConvTranspose2d and GELU in fp16, ``.float()`` copies, fp32 batched matmul. ``triton_p<N>`` = ours with
  N input pixels per program (the default is 128), for tuning.
* ``tail``: both, from conv1's output to the logits.
* ``_cl`` variants read a channels-last map in place (the decoder's layout: its image tokens are token-major,
  so the first transposed convolution returns channels-last), ``_w8`` ones run 8 warps per program.

Bytes model (ours): ``ln_gelu`` reads and writes x once (2 x 134 MB); ``mask_head`` reads y once and writes
the fp32 logits once (134 + 67 MB). The unfused variants move several times more; their GB/s column is
the same bytes model over their time (effective GB/s), so it compares directly with ours.

Run on a CUDA machine: ``python benchmarks/kernels/bench_sam_upscaler.py``.
"""

import torch
import torch.nn.functional as F

from bench_common import check, require_cuda, row, time_us, write_results

BATCH, CHANNELS, SIDE = 64, 64, 128  # conv1 output [64, 64, 128, 128]
COUT, MASKS = 32, 4
EPS = 1e-6  # SAM's LayerNorm2d
DTYPE = torch.float16


def unfused_ln_gelu(x, weight, bias):
    """The decoder before the kernels: LayerNorm2d upcast to fp32 with upstream's ops, cast back, GELU."""
    xf = x.float()
    mean = xf.mean(1, keepdim=True)
    var = (xf - mean).pow(2).mean(1, keepdim=True)
    y = (xf - mean) / torch.sqrt(var + EPS)
    return F.gelu((weight.float()[:, None, None] * y + bias.float()[:, None, None]).to(x.dtype))


def layer_norm_nhwc_gelu(x, weight, bias):
    y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), weight, bias, EPS)
    return F.gelu(y).permute(0, 3, 1, 2)


def channels_last(make):
    """An input maker whose 4-D maps are channels-last."""
    return lambda: tuple(t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t for t in make())


def main() -> None:
    require_cuda("bench_sam_upscaler.py")
    from turboformer.kernels.channel_layer_norm import channel_layer_norm_triton
    from turboformer.kernels.mask_head import mask_head_ref, mask_head_triton

    g = torch.Generator(device="cuda").manual_seed(0)
    ln_weight = (1 + 0.3 * torch.randn(CHANNELS, device="cuda", generator=g)).to(DTYPE)
    ln_bias = (0.3 * torch.randn(CHANNELS, device="cuda", generator=g)).to(DTYPE)
    conv_weight = (torch.randn(CHANNELS, COUT, 2, 2, device="cuda", generator=g) * (2 / CHANNELS) ** 0.5).to(DTYPE)
    conv_bias = (0.2 * torch.randn(COUT, device="cuda", generator=g)).to(DTYPE)

    def make_x():
        return (torch.randn(BATCH, CHANNELS, SIDE, SIDE, device="cuda", generator=g, dtype=DTYPE) * 2 + 0.5,)

    def make_y_hyper():
        y = F.gelu(torch.randn(BATCH, CHANNELS, SIDE, SIDE, device="cuda", generator=g, dtype=DTYPE))
        return y, torch.randn(BATCH, MASKS, COUT, device="cuda", generator=g, dtype=DTYPE)

    def make_x_hyper():
        return make_x()[0], torch.randn(BATCH, MASKS, COUT, device="cuda", generator=g, dtype=DTYPE)

    case = {"dtype": "float16", "B": BATCH, "C": CHANNELS, "hw": f"{SIDE}x{SIDE}"}
    x_bytes = BATCH * CHANNELS * SIDE * SIDE * 2
    logit_bytes = BATCH * MASKS * (2 * SIDE) ** 2 * 4
    rows = []

    # --- LayerNorm2d + GELU -----------------------------------------------------------------------------------
    (x,) = make_x()
    ours = channel_layer_norm_triton(x, ln_weight, ln_bias, EPS, gelu=True)
    check("ln_gelu", ours, unfused_ln_gelu(x, ln_weight, ln_bias), 2e-2, 1e-2)
    variants = {
        "triton": lambda x: channel_layer_norm_triton(x, ln_weight, ln_bias, EPS, gelu=True),
        "torch": lambda x: unfused_ln_gelu(x, ln_weight, ln_bias),
        "torch_fln": lambda x: layer_norm_nhwc_gelu(x, ln_weight, ln_bias),
        "triton_cl": lambda x: channel_layer_norm_triton(x, ln_weight, ln_bias, EPS, gelu=True),
    }
    times = {name: time_us(fn, channels_last(make_x) if "_cl" in name else make_x, 2 * x_bytes)
             for name, fn in variants.items()}  # fmt: skip
    rows.append(row({"op": "ln_gelu", **case}, 2 * x_bytes, times))

    # --- conv2 + GELU + mask product ------------------------------------------------------------------------------
    y, hyper = make_y_hyper()
    check("mask_head", mask_head_triton(y, conv_weight, conv_bias, hyper),
          mask_head_ref(y, conv_weight, conv_bias, hyper), 5e-2, 1e-2)  # fmt: skip
    variants = {"triton": lambda y, h: mask_head_triton(y, conv_weight, conv_bias, h)}
    for block_p in (32, 64, 256):
        variants[f"triton_p{block_p}"] = lambda y, h, p=block_p: mask_head_triton(y, conv_weight, conv_bias, h, block_p=p)
    for block_p in (32, 64, 128):
        for warps in (4, 8):
            variants[f"triton_cl_p{block_p}_w{warps}"] = lambda y, h, p=block_p, w=warps: mask_head_triton(
                y, conv_weight, conv_bias, h, block_p=p, num_warps=w)
    variants["torch"] = lambda y, h: mask_head_ref(y, conv_weight, conv_bias, h)
    times = {name: time_us(fn, channels_last(make_y_hyper) if "_cl" in name else make_y_hyper, x_bytes + logit_bytes)
             for name, fn in variants.items()}  # fmt: skip
    rows.append(row({"op": "mask_head", **case}, x_bytes + logit_bytes, times))

    # --- the whole tail: conv1 output -> logits ---------------------------------------------------------------------
    def ours_tail(x, h):
        return mask_head_triton(channel_layer_norm_triton(x, ln_weight, ln_bias, EPS, gelu=True), conv_weight, conv_bias, h)

    def unfused_tail(x, h):
        return mask_head_ref(unfused_ln_gelu(x, ln_weight, ln_bias), conv_weight, conv_bias, h)

    x, hyper = make_x_hyper()
    check("tail", ours_tail(x, hyper), unfused_tail(x, hyper), 0.25, 2e-2)  # LN + GELU rounded once, not twice
    tail_bytes = 3 * x_bytes + logit_bytes  # x read, y written and read, logits written
    times = {"triton": time_us(ours_tail, make_x_hyper, tail_bytes), "torch": time_us(unfused_tail, make_x_hyper, tail_bytes)}
    rows.append(row({"op": "tail", **case}, tail_bytes, times))

    write_results(
        "sam_upscaler",
        rows,
        "SAM mask decoder upscaler tail at 64 prompts, fp16. torch = the unfused decoder ops (LayerNorm2d upcast + "
        "GELU; ConvTranspose2d + GELU + fp32 matmul); torch_fln = F.layer_norm on the NHWC view + GELU; "
        "triton_pN = mask head with N input pixels per program (default 128). GB/s of every variant = our bytes "
        "model / its time.",
    )


if __name__ == "__main__":
    main()
