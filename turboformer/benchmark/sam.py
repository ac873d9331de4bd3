"""Segment Anything: turboformer's GPU engine against upstream ``segment_anything`` on the same weights.

For each model size (upstream's own random init, real dimensions, loaded into ours from its state dict) and
batch size, on real photos from scikit-image resized and padded to SAM's 1024 frame:
- image encoder: images/s (CUDA events, median) and achieved TFLOP/s against the encoder's FLOPs (below), with
  the measured bf16 matmul peak as the ceiling; peak GPU memory of one encoder pass. Variants:
  ``ours bf16`` (fp32 residual stream, bf16 branches, the fused window/rel-pos flash attention, fused
  residual + LayerNorm), ``ours int8`` (the same with weight-only INT8 linears), ``ours SDPA`` (ours in bf16
  with upstream's window partition and rel-pos einsums and torch SDPA with the bias as an explicit [N, N]
  additive mask instead of the fused kernel: segment-anything-fast's fallback), ``upstream fp32`` and
  ``upstream bf16`` (``ImageEncoderViT`` eager, explicit attention);
- mask decoder per prompt batch (1 and 64 one-point prompts, all four masks): ours (bucketed CUDA graphs,
  fp16 decoder of the bf16 model) and ours eager (same dtype, no graphs) against upstream's prompt encoder +
  mask decoder in fp32 on the same weights, with the speedup;
- prompt-to-mask latency: one point + one box prompt in original-image pixels to boolean masks at the
  original size (``SamPredictor.predict``), image already embedded, wall clock after a device sync;
- the attention alone at each block type (14 x 14 windows, the 64 x 64 global grid), from the qkv projection
  to the output projection's input: ours (one kernel) vs upstream's layout with torch SDPA in bf16 and the
  explicit additive mask (window partition, einsums, SDPA, unpartition) vs the eager reference, in TFLOP/s of
  ``4 T n D`` per (image, head) for T = 4096 real queries over n keys (196 in a window, T globally).

fp32 runs with PyTorch's defaults (no TF32 for matmuls), as upstream users get them.

    turboformer bench sam [--models vit_b vit_h] [--batches 1 8] [--prompts 1 64]
    turboformer bench sam --device cpu        (a tiny config on the CPU: checks the logic, times nothing real)

Writes benchmarks/results/<gpu>/sam.{json,md} under the current directory.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import importlib
import importlib.util
import statistics
import sys
import time
import types
from functools import partial

import numpy as np
import torch

from turboformer.benchmark.common import median_ms, write_results
from turboformer.kernels import use_reference
from turboformer.kernels.window_attention import window_attention, window_attention_ref
from turboformer.models.sam import (
    SAM_CONFIGS,
    SamConfig,
    SamPredictor,
    build_sam,
    load_sam,
)
from turboformer.models.sam.engine import PromptDecoderEngine, prepare_sam
from turboformer.models.sam.image_encoder import attention_backend, sdpa_attention
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
    per query (n = window^2 keys in a window, n = T in global blocks; T real queries: upstream also computes
    the padded windows' queries and drops them, work not counted here) plus the rel-pos terms 2 T (H + W) C;
    patch embedding 2 T C (3 * 16^2); neck 2 T C 256 + 2 T 256^2 * 9.
    """
    c, grid, win = config.encoder_embed_dim, config.image_embedding_size, config.encoder_window_size
    t = grid * grid
    total = 2 * t * c * 3 * config.patch_size**2
    for i in range(config.encoder_depth):
        total += 8 * t * c * c + 4 * t * c * config.encoder_mlp_dim
        if i in config.encoder_global_attn_indexes:
            total += 4 * t * t * c + 4 * t * grid * c
        else:
            total += 4 * t * win * win * c + 4 * t * win * c
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


def upstream_sam(modeling, config: SamConfig) -> torch.nn.Module:
    """Upstream's ``Sam`` as its ``build_sam`` makes it, at ``config``'s sizes (its own random init), fp32 CPU."""
    grid = config.image_embedding_size
    return modeling.Sam(
        image_encoder=modeling.ImageEncoderViT(
            depth=config.encoder_depth, embed_dim=config.encoder_embed_dim, img_size=config.image_size,
            mlp_ratio=config.encoder_mlp_dim / config.encoder_embed_dim,
            norm_layer=lambda dim: torch.nn.LayerNorm(dim, eps=1e-6), num_heads=config.encoder_num_heads,
            patch_size=config.patch_size, qkv_bias=True, use_rel_pos=True,
            global_attn_indexes=config.encoder_global_attn_indexes, window_size=config.encoder_window_size,
            out_chans=config.prompt_embed_dim,
        ),
        prompt_encoder=modeling.PromptEncoder(
            embed_dim=config.prompt_embed_dim, image_embedding_size=(grid, grid),
            input_image_size=(config.image_size, config.image_size), mask_in_chans=config.mask_in_chans,
        ),
        mask_decoder=modeling.MaskDecoder(
            num_multimask_outputs=config.num_multimask_outputs,
            transformer=modeling.TwoWayTransformer(depth=config.decoder_depth, embedding_dim=config.prompt_embed_dim,
                                                   mlp_dim=config.decoder_mlp_dim, num_heads=config.decoder_num_heads),
            transformer_dim=config.prompt_embed_dim, iou_head_depth=config.iou_head_depth,
            iou_head_hidden_dim=config.iou_head_hidden_dim,
        ),
        pixel_mean=list(config.pixel_mean), pixel_std=list(config.pixel_std),
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


def bench_encoder(model, pixels, photos, device, timer, repeat, flops, context=contextlib.nullcontext) -> dict:
    """Encoder ms, images/s, TFLOP/s, peak memory and prompt latency of one variant of our model, run inside
    ``context()`` (e.g. an attention backend)."""
    with context(), torch.no_grad():
        ms = timer.ms(lambda: model.encode_image(pixels))
        memory = peak_memory_gib(device, lambda: model.encode_image(pixels))
        predictor = SamPredictor(model)
        predictor.set_images(photos[:1])
        latency = prompt_ms(predictor, photos[0], device, repeat)
    return {"encoder_ms": ms, "images_per_s": 1e3 * pixels.shape[0] / ms, "TFLOPs": flops / ms / 1e9,
            "peak_GiB": memory, "prompt_ms": latency}


def time_attention(batch: int, grid: int, window: int, heads: int, d: int, device, dtype, timer: Timer) -> dict:
    """One block type's attention on a ``grid x grid`` projection ``[B, grid, grid, 3 heads D]`` (window 0:
    global): ours, upstream's layout with SDPA and an explicit additive mask, the eager reference; ms and
    TFLOP/s of ``4 T n D`` per (image, head) (T real queries, n keys each)."""
    side = window or grid
    qkv = torch.randn(batch, grid, grid, 3 * heads * d, device=device, dtype=dtype)
    bias = torch.randn(3 * heads * d, device=device, dtype=dtype)
    table_h, table_w = (0.5 * torch.randn(2 * side - 1, d, device=device, dtype=dtype) for _ in range(2))
    args = (qkv, bias, table_h, table_w, heads, window)
    row = {"ours_ms": timer.ms(lambda: window_attention(*args)), "sdpa_ms": timer.ms(lambda: sdpa_attention(*args))}
    with use_reference():
        row["eager_ms"] = timer.ms(lambda: window_attention_ref(*args))
    flops = 4 * batch * heads * grid * grid * side * side * d
    return row | {f"{name}_TFLOPs": flops / row[f"{name}_ms"] / 1e9 for name in ("ours", "sdpa", "eager")}


def bench_attention(config: SamConfig, batch: int, device, dtype, timer: Timer) -> dict:
    """The attention op alone at the model's window and global shapes."""
    d = config.encoder_embed_dim // config.encoder_num_heads
    grid, win, heads = config.image_embedding_size, config.encoder_window_size, config.encoder_num_heads
    return {
        "window": time_attention(batch, grid, win, heads, d, device, dtype, timer),
        "global": time_attention(batch, grid, 0, heads, d, device, dtype, timer),
    }


@torch.no_grad()
def bench_upstream(encoder: torch.nn.Module, pixels: torch.Tensor, device, timer: Timer, flops: float) -> dict:
    """Upstream's encoder in its parameters' dtype: ms, images/s, TFLOP/s, peak memory."""
    pixels = pixels.to(next(encoder.parameters()).dtype)
    ms = timer.ms(lambda: encoder(pixels))
    memory = peak_memory_gib(device, lambda: encoder(pixels))
    return {"encoder_ms": ms, "images_per_s": 1e3 * pixels.shape[0] / ms, "TFLOPs": flops / ms / 1e9,
            "peak_GiB": memory}


@torch.no_grad()
def bench_decoder(ours, upstream, embedding: torch.Tensor, prompts: list[int], device, timer: Timer) -> dict:
    """Prompt encoder + mask decoder, one foreground point per prompt, all masks: ms per prompt batch for ours
    graphed, ours eager (same dtype) and upstream fp32 (``None`` when upstream is not importable)."""
    rows = {}
    graphed = PromptDecoderEngine(ours, buckets=tuple(prompts))  # graphs on CUDA, eager on the CPU
    eager = PromptDecoderEngine(ours, buckets=tuple(prompts), cuda_graphs=False)
    for batch in prompts:
        g = torch.Generator().manual_seed(batch)
        coords = (torch.rand(batch, 1, 2, generator=g) * ours.config.image_size).to(device)
        labels = torch.ones(batch, 1, dtype=torch.int32, device=device)
        ours_embedding = embedding.to(ours.dtype)
        row = {"ours_ms": timer.ms(partial(graphed.decode, ours_embedding, coords, labels, None, None)),
               "ours_eager_ms": timer.ms(partial(eager.decode, ours_embedding, coords, labels, None, None))}
        if upstream is not None:
            row["upstream_fp32_ms"] = timer.ms(partial(_upstream_decode, upstream, embedding.float(), coords, labels))
            row["speedup"] = row["upstream_fp32_ms"] / row["ours_ms"]
        rows[batch] = row
    return rows


def _upstream_decode(upstream, embedding: torch.Tensor, coords: torch.Tensor, labels: torch.Tensor):
    """Upstream's prompt encoder + mask decoder (``Sam.forward`` without pre/postprocessing), all masks."""
    sparse, dense = upstream.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
    return upstream.mask_decoder(image_embeddings=embedding, image_pe=upstream.prompt_encoder.get_dense_pe(),
                                 sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                 multimask_output=True)


def bench_model(name: str, config: SamConfig, args, device, timer, modeling) -> dict:
    """Every encoder variant per batch, the decoder per prompt batch, the attention alone."""
    torch.manual_seed(0)
    upstream = upstream_sam(modeling, config) if modeling is not None else None
    if upstream is not None:  # ours from upstream's state dict: the same weights on both sides
        state = {k: v.clone() for k, v in upstream.state_dict().items()}

        def load(dtype=torch.float32, quantize=None):
            return load_sam(state, device=device, dtype=dtype, quantize=quantize)
    else:
        base = build_sam(config)

        def load(dtype=torch.float32, quantize=None):
            return prepare_sam(copy.deepcopy(base), device, dtype, quantize)

    entry = {"rows": {}, "decoder": {}}
    ours = load(dtype=torch.bfloat16)
    for batch in args.batches:
        photos, pixels = load_images(config, batch, device)
        flops = encoder_flops(config, batch)
        row = {"GFLOP": flops / 1e9}
        row["ours_bf16"] = bench_encoder(ours, pixels, photos, device, timer, args.repeat, flops)
        row["ours_sdpa_bf16"] = bench_encoder(ours, pixels, photos, device, timer, args.repeat, flops,
                                              lambda: attention_backend("sdpa"))
        entry["rows"][batch] = row
    # the decoder, on the embedding of a real photo (ours alone where segment_anything is not importable)
    photos, pixels = load_images(config, 1, device)
    embedding = ours.encode_image(pixels)
    upstream_decoder = None if upstream is None else upstream.to(device)
    entry["decoder"] = bench_decoder(ours, upstream_decoder, embedding, args.prompts, device, timer)
    if upstream is not None:
        upstream.cpu()
    del ours
    _free(device)

    int8 = load(dtype=torch.bfloat16, quantize="int8")
    for batch in args.batches:
        photos, pixels = load_images(config, batch, device)
        entry["rows"][batch]["ours_int8"] = bench_encoder(int8, pixels, photos, device, timer, args.repeat,
                                                          entry["rows"][batch]["GFLOP"] * 1e9)
    del int8
    _free(device)

    fp32 = load()
    for batch in args.batches:
        photos, pixels = load_images(config, batch, device)
        row, flops = entry["rows"][batch], entry["rows"][batch]["GFLOP"] * 1e9
        # prompt latency of the fp32 model; its encoder time is upstream's maths op for op
        row["ours_fp32"] = bench_encoder(fp32, pixels, photos, device, timer, args.repeat, flops, use_reference)
    del fp32
    _free(device)

    if upstream is not None:
        encoder = upstream.image_encoder.to(device)
        for batch in args.batches:
            _, pixels = load_images(config, batch, device)
            flops = entry["rows"][batch]["GFLOP"] * 1e9
            entry["rows"][batch]["upstream_fp32"] = bench_upstream(encoder, pixels, device, timer, flops)
        encoder.to(torch.bfloat16)
        for batch in args.batches:
            _, pixels = load_images(config, batch, device)
            flops = entry["rows"][batch]["GFLOP"] * 1e9
            entry["rows"][batch]["upstream_bf16"] = bench_upstream(encoder, pixels, device, timer, flops)
        del encoder, upstream
        _free(device)
    for batch in args.batches:
        entry["rows"][batch]["attention_bf16"] = bench_attention(config, batch, device, torch.bfloat16, timer)
    return entry


def _free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def markdown(results: dict) -> str:
    peak = results["matmul_TFLOPs"]
    nan = {"images_per_s": float("nan"), "peak_GiB": float("nan")}
    lines = [
        f"# Segment Anything on {results['device']}",
        "",
        f"Measured peak: {peak:.2f} TFLOP/s {results['peak_matmul']} matmul. Upstream's random init of the real "
        f"sizes, the same weights in ours; real photos ({', '.join(IMAGES)}) in the {results['image_size']} frame. "
        "Ours bf16: fp32 residual stream, bf16 branches, fused rel-pos flash attention; int8: the same with "
        "weight-only INT8 linears; SDPA: ours with torch SDPA + explicit bias mask instead of the fused kernel; "
        f"upstream: segment_anything ({'measured' if results['upstream'] else 'not importable, not measured'}). "
        "Prompt latency: point + box to boolean masks at the original size, image already embedded."
        + (" CPU run: every op takes the PyTorch reference; the numbers check the logic only." if results["device"] == "cpu" else ""),
        "",
        "Image encoder, images/s:",
        "",
        "| model | batch | ours bf16 | ours int8 | ours SDPA bf16 | upstream bf16 | upstream fp32 "
        + "| speedup vs upstream fp32 | ours TFLOP/s (% peak) | int8 TFLOP/s (% peak) | peak GiB ours / upstream fp32 "
        + "| prompt ms ours / fp32 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in results["models"].items():
        for batch, row in entry["rows"].items():
            ours, int8, sdpa, fp32 = row["ours_bf16"], row["ours_int8"], row["ours_sdpa_bf16"], row["ours_fp32"]
            up32, up16 = row.get("upstream_fp32", nan), row.get("upstream_bf16", nan)
            lines.append(
                f"| {name} | {batch} | {ours['images_per_s']:.2f} | {int8['images_per_s']:.2f} "
                f"| {sdpa['images_per_s']:.2f} | {up16['images_per_s']:.2f} | {up32['images_per_s']:.2f} "
                f"| {ours['images_per_s'] / up32['images_per_s']:.1f}x "
                f"| {ours['TFLOPs']:.1f} ({100 * ours['TFLOPs'] / peak:.0f}%) "
                f"| {int8['TFLOPs']:.1f} ({100 * int8['TFLOPs'] / peak:.0f}%) "
                f"| {ours['peak_GiB']:.2f} / {up32['peak_GiB']:.2f} | {ours['prompt_ms']:.1f} / {fp32['prompt_ms']:.1f} |"
            )
    lines += ["", "Prompt encoder + mask decoder, one point per prompt, all 4 masks, ms per prompt batch:", "",
              "| model | prompts | ours graphed | ours eager | upstream fp32 | speedup vs upstream |",
              "|---|---|---|---|---|---|"]
    for name, entry in results["models"].items():
        for batch, d in entry["decoder"].items():
            lines.append(
                f"| {name} | {batch} | {d['ours_ms']:.3f} | {d['ours_eager_ms']:.3f} "
                f"| {d.get('upstream_fp32_ms', float('nan')):.3f} | {d.get('speedup', float('nan')):.1f}x |"
            )
    lines += ["", ("Attention alone (qkv projection in, token-major output), bf16, TFLOP/s of 4 T n D per (image, "
                   "head), T real queries over n keys (ms):"), "",
              "| model | batch | block | ours | upstream layout + SDPA + additive mask | eager |",
              "|---|---|---|---|---|---|"]
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
    parser.add_argument("--prompts", nargs="+", type=int, default=[1, 64],
                        help="prompt batch sizes of the mask decoder measurement")
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
    if min(args.batches) < 1 or max(args.batches) > 64 or min(args.prompts) < 1 or args.repeat < 1:
        print("error: batches must be between 1 and 64 images, prompts and repeat at least 1", file=sys.stderr)
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
        results["models"][name] = bench_model(name, config, args, device, timer, modeling)
        print(markdown({**results, "models": {name: results["models"][name]}}), flush=True)
    out = write_results(results, args.out, args.name, label, markdown(results))
    print(f"wrote {out / args.name}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
