"""A/B of decode-step variants of the graph engine (CUDA): ms per token, same weights and prompt, graphed.

    python benchmarks/ab_decode_step.py [--models tiny large-v3] [--batches 1 4]
Variants: ``batched`` (cuBLAS GEMMs + fused residual/LayerNorm kernels, ``fused_rows=0``), ``fused`` (one
``decode_linear`` launch per weight, PDL on Hopper), ``fused-no-pdl`` (the same with TURBOFORMER_PDL=0), and the
INT8 engine both ways. Tokens are compared with the ``batched`` variant's (greedy, fp16: small differences in
rounding may flip a near-tie).
Tried and dropped (H200, 2026-11-21): cuBLAS GEMV (addmv) for the single-row step instead of GEMM with M = 1:
large-v3 2.248 vs 2.076 ms/token, tiny 0.266 vs 0.246 (slower).
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from turboformer.benchmark.whisper import cuda_ms, prompt_for  # noqa: E402
from turboformer.models.whisper.config import WHISPER_CONFIGS  # noqa: E402
from turboformer.models.whisper.convert import random_model  # noqa: E402
from turboformer.models.whisper.graph_engine import EngineOptions, GraphEngine  # noqa: E402

# name: (EngineOptions fields, PDL on)
VARIANTS = {
    "batched": ({"fused_rows": 0}, True),
    "fused": ({}, True),
    "fused-no-pdl": ({}, False),
    "batched-int8": ({"fused_rows": 0, "quantize": "int8"}, True),
    "fused-int8": ({"quantize": "int8"}, True),
}


def per_token_ms(engine, config, batch, n_tokens=100):
    eot = 50257 if config.multilingual else 50256
    suppress = torch.zeros(config.n_vocab, device=engine.device)
    suppress[eot] = -math.inf
    features = engine.encode(torch.randn(batch, config.n_mels, 3000, device="cuda"))
    prompt = torch.tensor([prompt_for(config)] * batch)

    def head():
        engine.start(features, 1, torch.zeros(batch, dtype=torch.long))
        return engine.prefill(prompt, torch.zeros(batch, dtype=torch.long))[0]

    def decode():
        return engine.greedy((head() + suppress).argmax(-1), n_tokens, suppress)

    tokens = decode()
    return (cuda_ms(decode, 5) - cuda_ms(head, 5)) / (n_tokens - 1), tokens


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["tiny", "large-v3"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}: ms per token, graphed, fp16 activations")
    print("| model | batch | " + " | ".join(VARIANTS) + " |")
    print("|---|---|" + "---|" * len(VARIANTS))
    for name in args.models:
        config = WHISPER_CONFIGS[name]
        model = random_model(config, device="cuda", dtype=torch.float16)
        for batch in args.batches:
            results = {}
            for variant, (extra, pdl) in VARIANTS.items():
                os.environ["TURBOFORMER_PDL"] = "1" if pdl else "0"  # read at each launch (capture)
                engine = GraphEngine(model, EngineOptions(buckets=(batch,), **extra), "cuda")
                results[variant] = per_token_ms(engine, config, batch)
                del engine
                gc.collect()
                torch.cuda.empty_cache()
            os.environ.pop("TURBOFORMER_PDL")
            base = results["batched"][1]
            cells = [f"{ms:.3f} ms ({(t == base).float().mean():.0%} tokens =)" for ms, t in results.values()]
            print(f"| {name} | {batch} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
