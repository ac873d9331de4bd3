"""Segment Anything: turboformer's bf16 image encoder (fused rel-pos flash attention) against eager baselines.

For each model size (random weights of the real dimensions) and batch size, on real photos from scikit-image
resized and padded to SAM's 1024 frame:
- encoder: images/s (CUDA events, median) and achieved TFLOP/s against the encoder's FLOPs (below), with the
  measured bf16 matmul peak as the ceiling; peak GPU memory of one encoder pass;
- prompt-to-mask latency: one point + one box prompt in original-image pixels to boolean masks at the
  original size (``SamPredictor.predict``: prompt encoder, mask decoder, upsampling, host copy), image already
  embedded, wall clock after a device sync;
- the attention alone at each block type (14 x 14 windows, the 64 x 64 global grid): ours vs torch SDPA in
  bf16 with the rel-pos bias as an explicit additive mask (what segment-anything-fast's fallback does) vs the
  eager reference, in TFLOP/s of ``4 N^2 D`` per (image, head).

Baselines, measured in the same run on the same weights and images:
- ``eager fp32``: our module with every kernel disabled (``use_reference()``): upstream's maths op for op;
- ``eager bf16``: the same in bf16 (explicit [N, N] scores, no fused kernel);
- ``upstream fp32``: ``segment_anything``'s own ``ImageEncoderViT`` (random weights), when importable.

    turboformer bench sam [--models vit_b vit_h] [--batches 1 8]
    turboformer bench sam --device cpu        (a tiny config on the CPU: checks the logic, times nothing real)

Writes benchmarks/results/<gpu>/sam.{json,md} under the current directory.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import importlib.util
import os
import statistics
import sys
import time
import types

import numpy as np
import torch
import torch.nn.functional as F

from turboformer.benchmark.common import median_ms, write_results
from turboformer.kernels import use_reference, utils
from turboformer.kernels.rel_pos_attention import (
    rel_pos_attention,
    rel_pos_attention_ref,
)
from turboformer.models.sam import SAM_CONFIGS, SamConfig, SamPredictor, build_sam
from turboformer.models.sam.transforms import normalize_and_pad, resize_image

IMAGES = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry")  # skimage.data photos
# The CPU escape hatch: SAM's real prompt path on a 256 frame (16 x 16 tokens) with a 2-block ViT.
CPU_CONFIG = SamConfig(image_size=256, encoder_embed_dim=64, encoder_depth=2, encoder_num_heads=2,
                       encoder_mlp_dim=128, encoder_global_attn_indexes=(1,))


class Timer:
    """Median milliseconds of ``fn()``: CUDA events on a GPU, ``perf_counter`` on the CPU."""

    def __init__(self, device: torch.device, repeat: int, warmup: int = 1) -> None:
        self.cuda, self.repeat, self.warmup = device.type == "cuda", repeat, warmup

    def ms(self, fn) -> float:
        return median_ms(fn, self.repeat, "cuda" if self.cuda else "cpu", self.warmup)


def matmul_peak_tflops(device: torch.device, timer: Timer) -> float:
    """Measured bf16 matmul rate (8192^3 on a GPU; 512^3 fp32 on the CPU)."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (512, torch.float32)
    x, y = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n**3 / timer.ms(lambda: x @ y) / 1e9


def encoder_flops(config: SamConfig, batch: int) -> float:
    """Multiply-adds x 2 of one encoder pass (the matmuls and convolutions; norms and softmax ignored).

    Per image, T = grid^2 tokens of width C: qkv 6TC^2, proj 2TC^2, MLP 4TC*mlp; attention 4 T n C over n keys
    per query (n = window^2 on the window-padded grid, n = T in global blocks) plus the rel-pos terms
    2 T (H + W) C; patch embedding 2 T C (3 * 16^2); neck 2 T C 256 + 2 T 256^2 * 9.
    """
    c, grid, win = config.encoder_embed_dim, config.image_embedding_size, config.encoder_window_size
    t = grid * grid
    padded = (-(-grid // win) * win) ** 2
    total = 2 * t * c * 3 * config.patch_size**2
    for i in range(config.encoder_depth):
        total += 8 * t * c * c + 4 * t * c * config.encoder_mlp_dim
        if i in config.encoder_global_attn_indexes:
            total += 4 * t * t * c + 4 * t * grid * c
        else:
            total += 4 * padded * win * win * c + 4 * padded * win * c
    out = config.prompt_embed_dim
    total += 2 * t * c * out + 2 * t * out * out * 9
    return batch * total


def load_images(config: SamConfig, batch: int, device: torch.device) -> tuple[list[np.ndarray], torch.Tensor]:
    """``batch`` real photos (cycling through IMAGES) and their ``[B, 3, S, S]`` normalised, padded pixels."""
    import skimage.data

    photos = [getattr(skimage.data, IMAGES[i % len(IMAGES)])() for i in range(batch)]
    pixels = [
        normalize_and_pad(torch.tensor(resize_image(p, config.image_size), device=device).permute(2, 0, 1)[None],
                          config.pixel_mean, config.pixel_std, config.image_size)
        for p in photos
    ]
    return photos, torch.cat(pixels)


def import_upstream_modeling() -> types.ModuleType | None:
    """Upstream ``segment_anything.modeling``, or None. Its package ``__init__`` imports torchvision (for the
    automatic generator only), so the package is entered as a bare module (``__path__`` only), as in
    ``tests/models/sam/sam_reference.py``; ``modeling`` itself needs only torch."""
    if "segment_anything" not in sys.modules:
        spec = importlib.util.find_spec("segment_anything")
        if spec is None or not spec.submodule_search_locations:
            return None
        package = types.ModuleType("segment_anything")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["segment_anything"] = package
    try:
        return importlib.import_module("segment_anything.modeling")
    except ImportError:
        return None


def upstream_encoder(modeling, config: SamConfig) -> torch.nn.Module:
    """Upstream's ``ImageEncoderViT`` as its ``build_sam`` makes it, at ``config``'s sizes (random weights)."""
    return modeling.ImageEncoderViT(
        depth=config.encoder_depth, embed_dim=config.encoder_embed_dim, img_size=config.image_size,
        mlp_ratio=config.encoder_mlp_dim / config.encoder_embed_dim,
        norm_layer=lambda dim: torch.nn.LayerNorm(dim, eps=1e-6), num_heads=config.encoder_num_heads,
        patch_size=config.patch_size, qkv_bias=True, use_rel_pos=True,
        global_attn_indexes=config.encoder_global_attn_indexes, window_size=config.encoder_window_size,
        out_chans=config.prompt_embed_dim,
    ).eval()  # fmt: skip


def peak_memory_gib(device: torch.device, fn) -> float:
    """Peak allocated GPU memory (GiB) during ``fn()``; NaN on the CPU."""
    if device.type != "cuda":
        fn()
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def prompt_ms(predictor: SamPredictor, photo: np.ndarray, device: torch.device, repeat: int) -> float:
    """Wall-clock ms from a point + box prompt (original pixels) to boolean masks on the host."""
    h, w = photo.shape[:2]
    prompt = {"point_coords": np.array([[0.55 * w, 0.4 * h]]), "point_labels": np.array([1]),
              "box": np.array([0.1 * w, 0.1 * h, 0.9 * w, 0.8 * h])}
    predictor.predict(**prompt)  # warm-up
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        predictor.predict(**prompt)  # ends with a device -> host copy of the masks
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def bench_encoder(model, pixels, photos, device, timer, repeat, flops, reference: bool) -> dict:
    """Encoder ms, images/s, TFLOP/s, peak memory and prompt latency of one variant of our model."""
    switch = use_reference() if reference else contextlib.nullcontext()
    with switch, torch.no_grad():
        ms = timer.ms(lambda: model.encode_image(pixels))
        memory = peak_memory_gib(device, lambda: model.encode_image(pixels))
        predictor = SamPredictor(model)
        predictor.set_images(photos[:1])
        latency = prompt_ms(predictor, photos[0], device, repeat)
    return {"encoder_ms": ms, "images_per_s": 1e3 * pixels.shape[0] / ms, "TFLOPs": flops / ms / 1e9,
            "peak_GiB": memory, "prompt_ms": latency}


def time_attention(bh: int, side: int, d: int, device, dtype, timer: Timer) -> dict:
    """One attention shape (``bh`` grids of ``side x side`` tokens, head dim ``d``): ours, torch SDPA with the
    bias as an explicit additive ``[BH, N, N]`` mask, and the eager reference; ms and TFLOP/s of ``4 N^2 D``."""
    n = side * side
    q, k, v = (torch.randn(bh, n, d, device=device, dtype=dtype) for _ in range(3))
    rel_h, rel_w = (torch.randn(bh, n, side, device=device, dtype=dtype) for _ in range(2))
    cols = torch.arange(n, device=device)

    def sdpa():
        mask = rel_h[:, :, cols // side] + rel_w[:, :, cols % side]  # [BH, N, N]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    row = {"ours_ms": timer.ms(lambda: rel_pos_attention(q, k, v, rel_h, rel_w)), "sdpa_ms": timer.ms(sdpa)}
    with use_reference():
        row["eager_ms"] = timer.ms(lambda: rel_pos_attention_ref(q, k, v, rel_h, rel_w))
    flops = 4 * bh * n * n * d
    return row | {f"{name}_TFLOPs": flops / row[f"{name}_ms"] / 1e9 for name in ("ours", "sdpa", "eager")}


def bench_attention(config: SamConfig, batch: int, device, dtype, timer: Timer) -> dict:
    """The attention op alone at the model's window and global shapes."""
    d = config.encoder_embed_dim // config.encoder_num_heads
    grid, win, heads = config.image_embedding_size, config.encoder_window_size, config.encoder_num_heads
    windows = (-(-grid // win)) ** 2
    return {
        "window": time_attention(batch * windows * heads, win, d, device, dtype, timer),
        "global": time_attention(batch * heads, grid, d, device, dtype, timer),
    }


@torch.no_grad()
def bench_upstream(encoder: torch.nn.Module, pixels: torch.Tensor, device, timer: Timer, flops: float) -> dict:
    """Upstream's fp32 encoder: ms, images/s, TFLOP/s, peak memory."""
    ms = timer.ms(lambda: encoder(pixels))
    memory = peak_memory_gib(device, lambda: encoder(pixels))
    return {"encoder_ms": ms, "images_per_s": 1e3 * pixels.shape[0] / ms, "TFLOPs": flops / ms / 1e9,
            "peak_GiB": memory}


def bench_model(name: str, config: SamConfig, batches: list[int], device, timer, repeat, modeling) -> dict:
    torch.manual_seed(0)
    model = build_sam(config).to(device)
    low = torch.bfloat16
    entry = {"rows": {}}
    for batch in batches:
        photos, pixels = load_images(config, batch, device)
        flops = encoder_flops(config, batch)
        row = {"GFLOP": flops / 1e9}
        row["eager_fp32"] = bench_encoder(model, pixels, photos, device, timer, repeat, flops, reference=True)
        model.to(low)
        row["ours_bf16"] = bench_encoder(model, pixels, photos, device, timer, repeat, flops, reference=False)
        row["eager_bf16"] = bench_encoder(model, pixels, photos, device, timer, repeat, flops, reference=True)
        model.float()
        if modeling is not None:
            row["upstream_fp32"] = bench_upstream(upstream_encoder(modeling, config).to(device), pixels, device,
                                                  timer, flops)
        row["attention_bf16"] = bench_attention(config, batch, device, low, timer)
        entry["rows"][batch] = row
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    del model
    return entry


def markdown(results: dict) -> str:
    peak = results["matmul_TFLOPs"]
    lines = [
        f"# Segment Anything image encoder on {results['device']}",
        "",
        f"Measured peak: {peak:.2f} TFLOP/s {results['peak_matmul']} matmul. Random weights of the real sizes; real photos "
        f"({', '.join(IMAGES)}) in the {results['image_size']} frame. Ours: bf16 with the fused rel-pos flash "
        "attention; eager: our module with the kernels off (upstream's maths); upstream: segment_anything's "
        f"ImageEncoderViT ({'measured' if results['upstream'] else 'not importable, not measured'}). "
        "Prompt latency: point + box to boolean masks at the original size, image already embedded."
        + (" CPU run: every op takes the PyTorch reference; the numbers check the logic only." if results["device"] == "cpu" else ""),
        "",
        "| model | batch | ours img/s | eager fp32 img/s | eager bf16 img/s | upstream fp32 img/s "
        + "| speedup vs fp32 | ours TFLOP/s (% peak) | peak GiB ours / fp32 | prompt ms ours / fp32 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in results["models"].items():
        for batch, row in entry["rows"].items():
            ours, fp32, bf16 = row["ours_bf16"], row["eager_fp32"], row["eager_bf16"]
            up = row.get("upstream_fp32", {}).get("images_per_s", float("nan"))
            lines.append(
                f"| {name} | {batch} | {ours['images_per_s']:.2f} | {fp32['images_per_s']:.2f} "
                f"| {bf16['images_per_s']:.2f} | {up:.2f} | {ours['images_per_s'] / fp32['images_per_s']:.1f}x "
                f"| {ours['TFLOPs']:.1f} ({100 * ours['TFLOPs'] / peak:.0f}%) "
                f"| {ours['peak_GiB']:.2f} / {fp32['peak_GiB']:.2f} | {ours['prompt_ms']:.1f} / {fp32['prompt_ms']:.1f} |"
            )
    lines += ["", "Attention alone, bf16, TFLOP/s of 4 N^2 D per (image, head) (ms):", "",
              "| model | batch | block | ours | SDPA + additive mask | eager |", "|---|---|---|---|---|---|"]
    for name, entry in results["models"].items():
        for batch, row in entry["rows"].items():
            for kind, a in row["attention_bf16"].items():
                lines.append(
                    f"| {name} | {batch} | {kind} | {a['ours_TFLOPs']:.1f} ({a['ours_ms']:.2f}) "
                    f"| {a['sdpa_TFLOPs']:.1f} ({a['sdpa_ms']:.2f}) | {a['eager_TFLOPs']:.1f} ({a['eager_ms']:.2f}) |"
                )
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", default=["vit_b", "vit_h"], choices=sorted(SAM_CONFIGS),
                        metavar="SIZE")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--repeat", type=int, default=10, help="timed runs per measurement (median)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cpu: a tiny config, to check the benchmark's logic without a GPU")
    parser.add_argument("--out", default="benchmarks/results", help="results folder (a <device> folder goes inside)")
    parser.add_argument("--name", default="sam", help="stem of the JSON/Markdown files written")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


def run(args) -> int:
    # the benchmark measures our kernels: turn on the ones not yet verified on a GPU (kernels/utils.py)
    os.environ.setdefault(utils.UNVERIFIED_ENV_VAR, "1")
    if min(args.batches) < 1 or max(args.batches) > 64 or args.repeat < 1:
        print("error: batches must be between 1 and 64 images, repeat at least 1", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: bench sam needs a CUDA GPU (or --device cpu for a tiny logic check)", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    timer = Timer(device, args.repeat)
    modeling = import_upstream_modeling()
    if device.type == "cuda":
        label, configs = torch.cuda.get_device_name(), {name: SAM_CONFIGS[name] for name in args.models}
    else:
        label, configs = "cpu", {"cpu_tiny": CPU_CONFIG}
    results = {"device": label, "torch": torch.__version__, "upstream": modeling is not None,
               "image_size": next(iter(configs.values())).image_size,
               "matmul_TFLOPs": matmul_peak_tflops(device, timer),
               "peak_matmul": "bf16 8192^3" if device.type == "cuda" else "fp32 512^3", "models": {}}
    for name, config in configs.items():
        results["models"][name] = bench_model(name, config, args.batches, device, timer, args.repeat, modeling)
        print(markdown({**results, "models": {name: results["models"][name]}}), flush=True)
    out = write_results(results, args.out, args.name, label, markdown(results))
    print(f"wrote {out / args.name}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
