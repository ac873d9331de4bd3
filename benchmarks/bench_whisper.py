"""Whisper: turboformer's GPU engine against Hugging Face transformers (see turboformer/benchmark/whisper.py).

    python benchmarks/bench_whisper.py [--models tiny base small large-v3 large-v3-turbo] [--batches 1 16 64] [--int8]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from turboformer.benchmark.whisper import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
