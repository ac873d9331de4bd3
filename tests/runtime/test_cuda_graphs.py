"""The capture helpers' host-side logic (CPU): garbage is collected before a capture and the cyclic
collector stays off while it runs, so no dropped engine's CUDA graph is destroyed mid-capture (on the GPU
that invalidates the capture; the engines' CUDA tests capture many graphs in one process)."""

import gc
import weakref

import pytest

from turboformer.runtime.cuda_graphs import no_gc_during_capture


class Node:
    """Half of a reference cycle, like an engine and the step closure that holds it."""

    def __init__(self):
        self.other = None


def cycle() -> weakref.ref:
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a)


def test_garbage_is_collected_before_and_the_collector_is_off_during():
    dropped = cycle()
    assert dropped() is not None  # only the cyclic collector can free it
    with no_gc_during_capture():
        assert dropped() is None  # collected on entry
        assert not gc.isenabled()
        during = cycle()
        for _ in range(3):
            [Node() for _ in range(10_000)]  # allocations that would trigger automatic collections
        assert during() is not None  # not collected while "capturing"
    assert gc.isenabled()
    gc.collect()
    assert during() is None


def test_collector_state_restored_on_error_and_when_it_was_off():
    with pytest.raises(RuntimeError), no_gc_during_capture():
        raise RuntimeError("capture failed")
    assert gc.isenabled()
    gc.disable()
    try:
        with no_gc_during_capture():
            pass
        assert not gc.isenabled()  # left as the caller had it
    finally:
        gc.enable()
