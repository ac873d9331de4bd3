"""CUDA graphs captured per batch bucket: the same step replayed with its launches recorded once.

A graph freezes tensor addresses, so every bucket's step reads and writes static buffers; the engine copies
inputs in before ``replay`` and reads outputs after. All buckets share one memory pool. Where CUDA is absent
(CPU tests) or graphs are turned off, ``run`` calls the step directly: the same code path, eagerly.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterator, Sequence

import torch

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def bucket_for(rows: int, buckets: Sequence[int]) -> int:
    """The smallest declared bucket that holds ``rows``; ValueError when none does."""
    for bucket in sorted(buckets):
        if rows <= bucket:
            return bucket
    raise ValueError(f"{rows} rows exceed the engine's largest batch bucket ({max(buckets)}); build it with larger buckets")


@contextlib.contextmanager
def no_gc_during_capture() -> Iterator[None]:
    """Collect garbage now, then keep Python's cyclic garbage collector off until the block ends.

    Why: an engine and its graphs form reference cycles (a step closure holds the engine, the engine its
    graphs), so a dropped engine's ``CUDAGraph`` objects are freed whenever the collector next runs. If that is
    during another graph's capture (an allocation there can trigger it), their destruction calls the CUDA
    runtime, which is not permitted while a stream is capturing, and the capture is invalidated: the
    next kernel fails (``CUBLAS_STATUS_EXECUTION_FAILED``, ``cudaErrorStreamCaptureInvalidated``) after many
    ``operation not permitted when stream is capturing (function reset)`` warnings. It happened on the H200
    in a test session that had built and dropped several SAM engines before capturing another.
    """
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


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
    with no_gc_during_capture(), torch.cuda.graph(graph, pool=pool):
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
        with no_gc_during_capture():  # one collection for all the buckets' captures
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


def copy_padded(static: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> None:
    """Each ``value [n, ...]`` into the leading corner of its larger ``static`` buffer (the rest of a row zeroed);
    the buffer's rows past n get row 0 again, so a graph over a row bucket redoes row 0's work there (writing the
    same values to the same place) instead of touching anything else."""
    for buffer, value in zip(static, values, strict=True):
        if buffer.shape[1:] != value.shape[1:]:
            buffer.zero_()
        fill = torch.arange(buffer.shape[0], device=value.device)
        fill[value.shape[0] :] = 0
        buffer[(slice(None), *(slice(0, size) for size in value.shape[1:]))] = value[fill]


class PaddedGraphs:
    """``fn(*inputs)`` captured once per key over static inputs of fixed (bucketed) shapes, on the key's first
    call: ``run`` pads the call's inputs into the key's buffers (``copy_padded``) and replays. The capture's
    warm-up runs ``fn`` on the real inputs, so ``fn`` must be idempotent (a cache fill, a prefill, a pure
    function) and the first call needs no dummy data that could clobber live state. Graphs share one memory
    pool: callers copy what they keep out of the returned static outputs before the next replay."""

    def __init__(self):
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[object, tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...], object]] = {}

    def keys(self) -> list:
        return list(self.graphs)

    def run(self, key, fn: Callable[..., object], values: Sequence[torch.Tensor], shapes: Sequence[tuple[int, ...]]):
        """Replay the graph of ``key`` (capturing it first if new) on ``values`` padded to ``shapes``; returns
        the graph's static outputs (what ``fn`` returned at capture)."""
        entry = self.graphs.get(key)
        static = entry[1] if entry else tuple(torch.zeros(shape, dtype=v.dtype, device=v.device)
                                              for v, shape in zip(values, shapes, strict=True))  # fmt: skip
        copy_padded(static, values)
        if entry is None:
            graph, outputs = capture(lambda: fn(*static), self.pool, warmup=1)
            entry = self.graphs[key] = (graph, static, outputs)
        entry[0].replay()
        return entry[2]
