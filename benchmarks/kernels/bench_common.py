"""Helpers shared by the kernel benchmarks ``bench_<op>.py`` (this file is not a benchmark itself).

Every benchmark checks the Triton op against its PyTorch reference before timing it, then times each
variant as the engine runs it: captured in a CUDA graph (no Python or launch overhead between kernels), over
enough distinct input sets that together they overflow the L2 cache (a decode step streams ~1 GB of weights,
so every layer reads from HBM), with ``triton.testing.do_bench`` (median of graph replays). Times convert to
achieved GB/s with a bytes model (each input read once, each output written once); results go to
``benchmarks/results/<gpu>/kernels_<op>.{json,md}``.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parents[1] / "results"


def require_cuda(script: str) -> None:
    """Exit with a clear message where no CUDA GPU is present."""
    if not torch.cuda.is_available():
        sys.exit(f"{script}: needs a CUDA GPU (the Triton kernels are timed on the device); none is visible here.")


def gpu_name() -> str:
    """The results folder name: the CUDA device name with spaces as '-' (e.g. 'NVIDIA-H100-80GB-HBM3')."""
    return torch.cuda.get_device_name().replace(" ", "-")


def time_us(fn: Callable, make_inputs: Callable[[], Sequence], nbytes: int, rep_ms: int = 200) -> float:
    """Device time of one ``fn(*make_inputs())`` in microseconds: median over replays of a CUDA graph that
    calls ``fn`` once on each of ``n`` input sets (``n * nbytes`` >= 3x the L2 size, at most 64 sets), / n."""
    import triton.testing  # imported here so that the CPU-only exit above needs no triton

    l2_bytes = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 64 << 20)
    sets = [make_inputs() for _ in range(min(64, max(1, math.ceil(3 * l2_bytes / nbytes))))]
    fn(*sets[0])  # compile / pick algorithms outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for args in sets:
            fn(*args)
    return 1e3 * triton.testing.do_bench(graph.replay, warmup=25, rep=rep_ms, return_mode="median") / len(sets)


def check(name: str, out: torch.Tensor, ref: torch.Tensor, atol: float, rtol: float) -> None:
    """Stop the benchmark if the op disagrees with its reference: a wrong kernel has no speed."""
    if out.isnan().any() or not torch.allclose(out.float(), ref.float(), atol=atol, rtol=rtol):
        err = (out.float() - ref.float()).abs().max().item()
        sys.exit(f"{name}: output differs from the reference (max abs error {err:.3g}); not timing it")


def row(case: dict, nbytes: int, times_us: dict[str, float], other_bytes: dict[str, int] | None = None) -> dict:
    """One result row: the case, the bytes model of our op, each variant's time and GB/s, and speed-ups of
    'triton'. ``other_bytes`` gives the bytes of variants that move a different amount (an fp16 weight or
    cache where ours reads int8); the others are counted with ``nbytes``."""
    out = dict(case, mbytes=round(nbytes / 1e6, 3))
    for variant, t in times_us.items():
        out[f"{variant}_us"] = round(t, 2)
        out[f"{variant}_GBps"] = round((other_bytes or {}).get(variant, nbytes) / t / 1e3, 1)
    for variant, t in times_us.items():
        if variant != "triton":
            out[f"speedup_vs_{variant}"] = round(t / times_us["triton"], 2)
    return out


def write_results(op: str, rows: list[dict], notes: str) -> Path:
    """Write ``kernels_<op>.json`` and a Markdown table ``kernels_<op>.md``; print the table; return the folder."""
    import triton

    folder = RESULTS / gpu_name()
    folder.mkdir(parents=True, exist_ok=True)
    meta = {
        "op": op,
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "timing": "median of CUDA-graph replays (triton.testing.do_bench), inputs rotated past the L2 cache",
        "notes": notes,
    }
    (folder / f"kernels_{op}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    columns = list(dict.fromkeys(c for r in rows for c in r))  # every row's columns, first-seen order
    lines = [
        f"# `{op}` on {meta['gpu']}",
        "",
        f"torch {meta['torch']}, triton {meta['triton']}; {meta['timing']}. {notes}",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
    text = "\n".join(lines) + "\n"
    (folder / f"kernels_{op}.md").write_text(text)
    print(text)
    return folder
