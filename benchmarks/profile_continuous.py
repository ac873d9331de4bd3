"""Where the host time of continuous batching goes: cProfile of one transcription of the natural workload.

    python benchmarks/profile_continuous.py --model DIR --speech DIR [--files 32 --slots 8]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_whisper_natural import _long_form, read_wav  # noqa: E402

from turboformer.models.whisper.load import read_checkpoint  # noqa: E402
from turboformer.models.whisper.pipeline import WhisperModel  # noqa: E402
from turboformer.models.whisper.transcribe import TranscribeOptions, transcribe_batch  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--speech", required=True)
    parser.add_argument("--files", type=int, default=32)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    clips = [read_wav(p) for d in ("librivox", "cards") for p in sorted((Path(args.speech) / d).glob("*.wav"))]
    files = [_long_form(clips[:5], 1 + (i // 8) % 2) if i % 8 == 7 else clips[i % len(clips)] for i in range(args.files)]
    model = WhisperModel.from_checkpoint(read_checkpoint(args.model), "cuda", torch.float16)
    for continuous in (True, False):
        options = TranscribeOptions(batch_size=args.slots, continuous_batching=continuous)
        transcribe_batch(model.engine, model.tokenizer, files, options)  # warm-up
        torch.cuda.synchronize()
        profiler = cProfile.Profile()
        started = time.perf_counter()
        profiler.enable()
        transcribe_batch(model.engine, model.tokenizer, files, options)
        torch.cuda.synchronize()
        profiler.disable()
        print(f"\n=== continuous={continuous}: {time.perf_counter() - started:.3f} s (profiled)")
        stats = pstats.Stats(profiler)
        stats.sort_stats("tottime").print_stats(args.top)
        stats.sort_stats("cumulative").print_stats("turboformer", args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
