"""Where a decode step's time goes: torch.profiler over one eager step of the graph engine (CUDA).

    python benchmarks/profile_decode_step.py [--model large-v3] [--batch 1] [--quantize int8]
Prints the kernels by total GPU time; compare their sum with the graphed step from bench_whisper.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from turboformer.models.whisper.config import WHISPER_CONFIGS  # noqa: E402
from turboformer.models.whisper.convert import random_model  # noqa: E402
from turboformer.models.whisper.graph_engine import EngineOptions, GraphEngine  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="large-v3")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--quantize", default=None, choices=[None, "int8"])
    args = parser.parse_args()
    config = WHISPER_CONFIGS[args.model]
    model = random_model(config, device="cuda", dtype=torch.float16)
    engine = GraphEngine(model, EngineOptions(buckets=(args.batch,), cuda_graphs=False, quantize=args.quantize), "cuda")
    features = engine.encode(torch.randn(args.batch, config.n_mels, 3000, device="cuda"))
    engine.start(features, 1, torch.zeros(args.batch, dtype=torch.long))
    engine.prefill(torch.full((args.batch, 4), 50258), torch.zeros(args.batch, dtype=torch.long))
    for _ in range(3):
        engine._decode(args.batch)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            engine._decode(args.batch)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))
    return 0


if __name__ == "__main__":
    sys.exit(main())
