"""CUDA graphs captured per batch bucket: the same step replayed with its launches recorded once.

A graph freezes tensor addresses, so every bucket's step reads and writes static buffers; the engine copies
inputs in before ``replay`` and reads outputs after. All buckets share one memory pool. Where CUDA is absent
(CPU tests) or graphs are turned off, ``run`` calls the step directly: the same code path, eagerly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def bucket_for(rows: int, buckets: Sequence[int]) -> int:
    """The smallest declared bucket that holds ``rows``; ValueError when none does."""
    for bucket in sorted(buckets):
        if rows <= bucket:
            return bucket
    raise ValueError(f"{rows} rows exceed the engine's largest batch bucket ({max(buckets)}); build it with larger buckets")


def capture(fn: Callable[[], object], pool=None, warmup: int = 2) -> tuple[torch.cuda.CUDAGraph, object]:
    """Run ``fn`` ``warmup`` times on a side stream (Triton compiles, cuBLAS picks its algorithms), then capture
    one call into a graph in ``pool``. Returns (graph, what the captured call returned: its static outputs)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        outputs = fn()
    torch.cuda.synchronize()
    return graph, outputs


class GraphedStep:
    """``step(bucket)`` captured once per bucket; ``run(bucket)`` replays it (or calls it when not graphed)."""

    def __init__(self, step: Callable[[int], None], buckets: Sequence[int], enabled: bool, warmup: int = 2):
        self.step, self.buckets, self.enabled = step, tuple(sorted(buckets)), enabled
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        if not enabled:
            return
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for bucket in self.buckets:  # compile the Triton kernels and let cuBLAS pick its algorithms
                for _ in range(warmup):
                    step(bucket)
        torch.cuda.current_stream().wait_stream(stream)
        for bucket in reversed(self.buckets):  # largest first: smaller graphs reuse its pool blocks
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                step(bucket)
            self.graphs[bucket] = graph
        torch.cuda.synchronize()

    def run(self, bucket: int) -> None:
        if self.enabled:
            self.graphs[bucket].replay()
        else:
            self.step(bucket)
