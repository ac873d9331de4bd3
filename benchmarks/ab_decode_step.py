"""A/B of decode-step variants of the graph engine at batch 1 (CUDA): ms per token, same weights and prompt.

    python benchmarks/ab_decode_step.py [--models tiny large-v3]
Variants: fp16 weights through cuBLAS, and weight-only INT8 (+ INT8 cross-KV) through our kernels, graphed.
Tried and dropped (H200, 2026-11-21): cuBLAS GEMV (addmv) for the single-row step instead of GEMM with M = 1:
large-v3 2.248 vs 2.076 ms/token, tiny 0.266 vs 0.246 (slower).
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from turboformer.benchmark.whisper import cuda_ms, prompt_for  # noqa: E402
from turboformer.models.whisper.config import WHISPER_CONFIGS  # noqa: E402
from turboformer.models.whisper.convert import random_model  # noqa: E402
from turboformer.models.whisper.graph_engine import EngineOptions, GraphEngine  # noqa: E402

VARIANTS = {"gemm": {}, "int8": {"quantize": "int8"}}


def per_token_ms(engine, config, n_tokens=100):
    eot = 50257 if config.multilingual else 50256
    suppress = torch.zeros(config.n_vocab, device=engine.device)
    suppress[eot] = -math.inf
    features = engine.encode(torch.randn(1, config.n_mels, 3000, device="cuda"))
    prompt = torch.tensor([prompt_for(config)])

    def head():
        engine.start(features, 1, torch.zeros(1, dtype=torch.long))
        return engine.prefill(prompt, torch.zeros(1, dtype=torch.long))[0]

    def decode():
        return engine.greedy((head() + suppress).argmax(-1), n_tokens, suppress)

    tokens = decode()
    return (cuda_ms(decode, 5) - cuda_ms(head, 5)) / (n_tokens - 1), tokens


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["tiny", "large-v3"])
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}: ms per token at batch 1, graphed, fp16 activations")
    for name in args.models:
        config = WHISPER_CONFIGS[name]
        results = {}
        for variant, extra in VARIANTS.items():
            model = random_model(config, device="cuda", dtype=torch.float16)
            engine = GraphEngine(model, EngineOptions(buckets=(1,), **extra), "cuda")
            results[variant] = per_token_ms(engine, config)
            del engine, model
            gc.collect()
            torch.cuda.empty_cache()
        base_tokens = results["gemm"][1]
        row = " | ".join(
            f"{v} {ms:.3f} ms (tokens equal to gemm: {(t == base_tokens).float().mean():.0%})" for v, (ms, t) in results.items()
        )
        print(f"| {name} | {row} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
