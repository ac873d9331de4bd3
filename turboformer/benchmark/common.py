"""What every benchmark shares: timing and writing results under benchmarks/results/<gpu>/."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch


def median_ms(fn: Callable[[], object], repeat: int, device: torch.device | str = "cuda", warmup: int = 1) -> float:
    """Median milliseconds of fn() over ``repeat`` runs after ``warmup``: CUDA events on a GPU (the work is
    asynchronous), the wall clock on the CPU."""
    cuda = torch.device(device).type == "cuda"
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            started = time.perf_counter()
            fn()
            times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def write_results(results: dict, out: str | Path, name: str, gpu: str, markdown: str) -> Path:
    """``<out>/<gpu with dashes>/<name>.json`` and ``.md``; returns the folder."""
    folder = Path(out) / gpu.replace(" ", "-")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(results, indent=1))
    (folder / f"{name}.md").write_text(markdown)
    return folder
