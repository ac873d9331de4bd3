"""Where the Whisper encoder's time goes, and what the alternatives would give (CUDA, random weights).

    python benchmarks/profile_encoder.py [--cases large-v3:16 tiny:1] [--out DIR]
For each model:batch case, in one run on the same weights and inputs: the module (eager, as transformers' and
openai-whisper's encoders run), our EncoderEngine eager and graphed, and two variants of the engine: the FFN's
bias + GELU as cuBLASLt's GEMM epilogue (tanh-approximated GELU: ``torch._addmm_activation``) and SDPA's cuDNN
backend instead of flash; then the matmul rate of each encoder GEMM shape alone and torch.profiler's kernel
table of the engine. Times are medians of CUDA-event timings; TFLOP/s count the encoder's matmul FLOPs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from turboformer.benchmark import common  # noqa: E402
from turboformer.models.whisper.config import WHISPER_CONFIGS  # noqa: E402
from turboformer.models.whisper.convert import random_model  # noqa: E402
from turboformer.models.whisper.encoder_engine import EncoderEngine  # noqa: E402
from turboformer.models.whisper.model import merge_heads  # noqa: E402


def median_ms(fn, repeat: int) -> float:
    return common.median_ms(fn, repeat, "cuda", warmup=2)


def encoder_flops(config, batch: int) -> float:
    """Matmul FLOPs of the encoder per call: conv stem, q/k/v/out, FFN, attention scores and values."""
    c, t, layers = config.n_audio_state, config.n_audio_ctx, config.n_audio_layer
    stem = 2 * (2 * t) * config.n_mels * c * 3 + 2 * t * c * c * 3
    per_layer = 2 * t * c * (4 * c + 8 * c) + 4 * t * t * c
    return batch * (stem + layers * per_layer)


class GeluEpilogue(EncoderEngine):
    """The engine with fc1's bias + GELU in cuBLASLt's epilogue (tanh approximation), one pass fewer."""

    def mlp_hidden(self, h, block):
        rows = h.reshape(-1, h.shape[-1])
        hidden = torch._addmm_activation(block.fc1_bias, rows, block.fc1.t(), use_gelu=True)
        return hidden.view(*h.shape[:-1], -1)


class CudnnStrided(EncoderEngine):
    """SDPA's cuDNN backend on the strided q/k/v views of the qkv matmul's output."""

    def attend(self, qkv):
        with backend("cudnn"):
            return super().attend(qkv)


class CudnnContiguous(EncoderEngine):
    """SDPA's cuDNN backend on q/k/v copied to contiguous [n, H, T, D] (one permute pass)."""

    def attend(self, qkv):
        n, t, width = qkv.shape
        q, k, v = qkv.view(n, t, 3, self.heads, width // (3 * self.heads)).permute(2, 0, 3, 1, 4).contiguous()
        with backend("cudnn"):
            out = F.scaled_dot_product_attention(q, k, v)
        if not hasattr(self, "printed"):
            self.printed = print("cudnn output", tuple(out.shape), out.stride())
        return merge_heads(out)


def backend(name: str):
    if name == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel({"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[name])


def gemm_rates(config, batch: int, dtype, repeat: int) -> list[dict]:
    c, m = config.n_audio_state, batch * config.n_audio_ctx
    rows = []
    for name, n, k in (("qkv", 3 * c, c), ("out", c, c), ("fc1", 4 * c, c), ("fc2", c, 4 * c)):
        a = torch.randn(m, k, device="cuda", dtype=dtype)
        w = torch.randn(n, k, device="cuda", dtype=dtype)
        b = torch.randn(n, device="cuda", dtype=dtype)
        ms = median_ms(lambda: F.linear(a, w, b), repeat)
        rows.append({"gemm": name, "m": m, "n": n, "k": k, "ms": ms, "tflops": 2 * m * n * k / ms / 1e9})
    heads, dim = config.n_audio_head, c // config.n_audio_head
    q = torch.randn(batch, heads, config.n_audio_ctx, dim, device="cuda", dtype=dtype)
    for name in ("flash", "cudnn"):
        try:
            with backend(name):
                ms = median_ms(lambda: F.scaled_dot_product_attention(q, q, q), repeat)
            flops = 4 * batch * heads * config.n_audio_ctx**2 * dim
            rows.append({"gemm": f"sdpa-{name}", "m": batch * heads, "n": config.n_audio_ctx, "k": dim, "ms": ms,
                         "tflops": flops / ms / 1e9})  # fmt: skip
        except RuntimeError as e:
            rows.append({"gemm": f"sdpa-{name}", "error": str(e).splitlines()[0][:120]})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", nargs="+", default=["large-v3:16", "tiny:1", "large-v3:1"])
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--profile", type=int, default=1, help="print the kernel table of the first case")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    results = []
    for index, case in enumerate(args.cases):
        name, batch = case.split(":")
        batch = int(batch)
        config = WHISPER_CONFIGS[name]
        model = random_model(config, device="cuda", dtype=dtype)
        mel = torch.randn(batch, config.n_mels, 3000, device="cuda", dtype=dtype)
        engine = EncoderEngine(model.encoder, dtype, (batch,), torch.device("cuda"))
        eager = EncoderEngine(model.encoder, dtype, (batch,), torch.device("cuda"), cuda_graphs=False)
        epilogue = GeluEpilogue(model.encoder, dtype, (batch,), torch.device("cuda"), cuda_graphs=False)
        with torch.inference_mode():
            reference = model.encoder(mel).float()
            timings = {"module": median_ms(lambda: model.encoder(mel), args.repeat)}
            timings["engine-eager"] = median_ms(lambda: eager(mel), args.repeat)
            timings["engine-graphed"] = median_ms(lambda: engine(mel), args.repeat)
            timings["gelu-epilogue-eager"] = median_ms(lambda: epilogue(mel), args.repeat)
            errors = {"engine": (engine(mel).float() - reference).abs().max().item(),
                      "gelu-epilogue": (epilogue(mel).float() - reference).abs().max().item()}  # fmt: skip
            for label, cls in (("cudnn-strided", CudnnStrided), ("cudnn-contiguous", CudnnContiguous)):
                try:
                    variant = cls(model.encoder, dtype, (batch,), torch.device("cuda"), cuda_graphs=False)
                    timings[label] = median_ms(lambda: variant(mel), args.repeat)
                    errors[label] = (variant(mel).float() - reference).abs().max().item()
                    graphed = cls(model.encoder, dtype, (batch,), torch.device("cuda"))
                    timings[label + "-graphed"] = median_ms(lambda: graphed(mel), args.repeat)
                except RuntimeError as e:
                    timings[label] = float("nan")
                    print(label, str(e).splitlines()[0][:200])
            flops = encoder_flops(config, batch)
            row = {"model": name, "batch": batch, "dtype": args.dtype, "tflop": flops / 1e12, "ms": timings,
                   "tflops": {k: flops / v / 1e9 for k, v in timings.items()}, "max_abs_vs_module": errors,
                   "gemms": gemm_rates(config, batch, dtype, args.repeat)}  # fmt: skip
            results.append(row)
            print(json.dumps(row, indent=1))
            if args.profile and index == 0:
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                    eager(mel)
                    torch.cuda.synchronize()
                table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60)
                print(table)
                if args.out:
                    Path(args.out).mkdir(parents=True, exist_ok=True)
                    (Path(args.out) / f"profile_encoder_{name}_b{batch}.txt").write_text(table)
        torch.cuda.empty_cache()
    for row in results:
        print(f"\n{row['model']}:{row['batch']} ({row['tflop']:.1f} TFLOP)")
        for k, v in row["ms"].items():
            print(
                f"  {k:<28} {v:9.2f} ms {row['tflops'].get(k, 0):5.0f} TFLOP/s  max|err| {row['max_abs_vs_module'].get(k, '')}"
            )
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        gpu = torch.cuda.get_device_name().replace(" ", "-")
        (Path(args.out) / f"profile_encoder_{gpu}.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
