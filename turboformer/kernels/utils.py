"""Shared plumbing of the Triton ops: the optional Triton import, the reference switch, input errors, sizes.

Triton is optional. Where it is not installed, ``triton`` and ``tl`` below are stand-ins that let the op
files define their ``@triton.jit`` kernels (nothing is compiled at definition time), every dispatcher takes
the PyTorch reference path, and a launcher called directly raises :class:`TritonUnavailableError`.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from collections.abc import Iterator

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU-only installs: the reference paths still run.
    HAS_TRITON = False

    class _TritonStandIn:
        """Stands in for ``triton`` and ``triton.language``: ``@triton.jit`` returns the function unchanged
        (it is never launched, launchers check :func:`triton_available` first) and ``tl.constexpr`` and
        friends, read only in annotations, are ``None``."""

        @staticmethod
        def jit(fn):
            return fn

        def __getattr__(self, name: str) -> None:
            return None

    triton = tl = _TritonStandIn()


class KernelInputError(ValueError):
    """An op was given tensors it cannot handle (shape, dtype, device or layout); the message says which."""


class TritonUnavailableError(RuntimeError):
    """A Triton launcher was called where Triton cannot run (not installed, or CPU tensors without the
    interpreter)."""


# ----------------------------------------------------------------------------------------------------------
# The switch that forces the PyTorch reference path.

_ENV_VAR = "TURBOFORMER_KERNELS"
_ENV_CHOICES = ("", "auto", "reference")
_FORCED_REFERENCE: contextvars.ContextVar[bool] = contextvars.ContextVar("turboformer_reference", default=False)
_POISON: contextvars.ContextVar[bool] = contextvars.ContextVar("turboformer_poison", default=False)


def triton_available() -> bool:
    """True where ``import triton`` succeeds."""
    return HAS_TRITON


@contextlib.contextmanager
def use_reference() -> Iterator[None]:
    """Within this block every dispatcher runs the PyTorch reference (``*_ref``), also on CUDA tensors.

    Nests, and is local to the thread / asyncio task (a ``contextvars.ContextVar``).
    """
    token = _FORCED_REFERENCE.set(True)
    try:
        yield
    finally:
        _FORCED_REFERENCE.reset(token)


def reference_forced() -> bool:
    """True inside :func:`use_reference` or when the environment sets ``TURBOFORMER_KERNELS=reference``."""
    mode = os.environ.get(_ENV_VAR, "").strip().lower()
    if mode not in _ENV_CHOICES:
        raise KernelInputError(f"{_ENV_VAR}={mode!r} is not understood; use 'reference' or 'auto' (or unset it)")
    return _FORCED_REFERENCE.get() or mode == "reference"


def use_triton(x: torch.Tensor) -> bool:
    """The dispatchers' choice: the Triton launcher for CUDA tensors when Triton is installed and the
    reference is not forced; the PyTorch reference otherwise (CPU tensors always take the reference: the
    Triton interpreter is for tests, which call the launchers themselves)."""
    return x.device.type == "cuda" and triton_available() and not reference_forced()


_LAUNCH_ON_CPU: contextvars.ContextVar[bool] = contextvars.ContextVar("turboformer_launch_on_cpu", default=False)


@contextlib.contextmanager
def launch_on_cpu() -> Iterator[None]:
    """Within this block the dispatchers that honour it (:func:`use_triton_or_interpreter`) also run their Triton
    launchers on CPU tensors, in the interpreter (``TRITON_INTERPRET=1``): lets a CPU test run a whole model
    through the kernels. No effect without the interpreter; :func:`use_reference` still wins."""
    token = _LAUNCH_ON_CPU.set(True)
    try:
        yield
    finally:
        _LAUNCH_ON_CPU.reset(token)


def use_triton_or_interpreter(x: torch.Tensor) -> bool:
    """:func:`use_triton`, or a CPU tensor inside :func:`launch_on_cpu` with the interpreter on."""
    if use_triton(x):
        return True
    return (
        _LAUNCH_ON_CPU.get()
        and x.device.type == "cpu"
        and interpreting()
        and triton_available()
        and not reference_forced()
    )


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def pdl_supported(device: torch.device) -> bool:
    """Programmatic dependent launch (Hopper and newer; not in the interpreter; ``TURBOFORMER_PDL=0`` turns it
    off, for A/B runs): a kernel launched so starts while the previous one runs, does what does not depend on it
    (a GEMV loads its weight), then waits (``gdc_wait``) before reading the previous kernel's output; it calls
    ``gdc_launch_dependents`` so the next kernel can start in turn (decode_linear, decode_attention)."""
    if device.type != "cuda" or interpreting() or os.environ.get("TURBOFORMER_PDL", "1") == "0":
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


def check_launchable(*tensors: torch.Tensor) -> None:
    """Raise a clear error unless a Triton launcher can run on these tensors: Triton installed, all tensors
    on one device, and that device CUDA (or CPU under the interpreter)."""
    if not HAS_TRITON:
        raise TritonUnavailableError("Triton is not installed; use the dispatcher, which falls back to PyTorch")
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise KernelInputError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    device = devices.pop()
    if device.type != "cuda" and not (device.type == "cpu" and interpreting()):
        raise TritonUnavailableError(
            f"Triton kernels need CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {device}"
        )


# ----------------------------------------------------------------------------------------------------------
# Small helpers shared by the launchers.

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_float(name: str, t: torch.Tensor) -> None:
    """Raise unless ``t`` holds fp32, fp16 or bf16."""
    if t.dtype not in FLOAT_DTYPES:
        raise KernelInputError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def check_vector(name: str, t: torch.Tensor, n: int) -> None:
    """Raise unless ``t`` is a float vector of length ``n`` (a per-feature weight, bias or scale)."""
    if t.dim() != 1 or t.shape[0] != n:
        raise KernelInputError(f"{name} must have shape [{n}], got {list(t.shape)}")
    check_float(name, t)


def as_rows(name: str, x: torch.Tensor) -> torch.Tensor:
    """View ``x [..., N]`` as rows ``[M, N]`` with unit stride along N (copies only if it must)."""
    if x.dim() == 0:
        raise KernelInputError(f"{name} must have at least one dimension, got a scalar")
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(1) == 1 or rows.shape[1] == 1 else rows.contiguous()


def cdiv(a: int, b: int) -> int:
    """Ceiling of a / b for positive ints."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (Triton block sizes must be powers of two; tails are masked)."""
    return 1 << max(n - 1, 0).bit_length()


@contextlib.contextmanager
def poison_buffers() -> Iterator[None]:
    """Within this block every buffer a launcher allocates (outputs and fp32 workspaces) starts as NaN (integer
    ones as their most negative value), so a kernel that leaves any element unwritten shows it instead of stale
    memory. For tests and debugging."""
    token = _POISON.set(True)
    try:
        yield
    finally:
        _POISON.reset(token)


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocate an output or workspace buffer on the launch device: ``torch.empty`` (no host sync, capturable
    in a CUDA graph), NaN-filled inside :func:`poison_buffers`. Every launcher allocates through here."""
    buffer = torch.empty(shape, dtype=dtype, device=device)
    if _POISON.get():  # integer buffers: the most negative value
        buffer.fill_(float("nan") if dtype.is_floating_point else torch.iinfo(dtype).min)
    return buffer


def output(out: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A launcher's output: a new buffer (:func:`empty`), or the caller's ``out`` after checking its shape, dtype
    and device. ``out`` may be a strided view (e.g. columns of a wider buffer) with unit stride along its last
    axis: the kernels store through its strides, so an engine can have two ops write one concatenated buffer."""
    if out is None:
        return empty(shape, dtype, device)
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != device:
        raise KernelInputError(
            f"out must be {dtype} {list(shape)} on {device}, got {out.dtype} {list(out.shape)} on {out.device}"
        )
    if out.stride(-1) != 1:
        raise KernelInputError(f"out must have unit stride along its last axis, got strides {out.stride()}")
    return out


@functools.cache
def _cuda_multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def multiprocessor_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (132 on H100 SXM / H200); 4 for the CPU interpreter, so
    that tests exercise the multi-program split paths on small shapes."""
    if device.type != "cuda":
        return 4
    return _cuda_multiprocessors(device.index if device.index is not None else torch.cuda.current_device())


def dot_settings(dtype: torch.dtype) -> tuple[object, str]:
    """``(DOT_DTYPE, PRECISION)`` for a kernel's ``tl.dot`` on inputs of ``dtype``: the inputs' own type, and
    IEEE fp32 products for fp32 inputs unless ``torch.backends.cuda.matmul.allow_tf32`` is set (as
    ``torch.matmul``). Under the interpreter bf16 products run on exact fp32 copies (numpy has no bf16 dot)."""
    dot_dtype = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]
    precision = "tf32"  # Triton's default; only read for fp32 operands
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        precision = "ieee"
    if interpreting():
        dot_dtype = tl.float32 if dtype == torch.bfloat16 else dot_dtype
        precision = "ieee"
    return dot_dtype, precision


def dense_map(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """A ``[B, C, H, W]`` map as the map kernels read it in place: ``(x, True)`` when channels-last, else
    ``(x.contiguous(), False)`` (NCHW; a map in neither layout is copied)."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return x, True
    return x.contiguous(), False


def map_strides(x: torch.Tensor) -> tuple[int, int, int]:
    """(batch, channel, pixel) strides of an NCHW or channels-last map from :func:`dense_map`: its pixels lie one
    pixel stride apart in row-major order."""
    return x.stride(0), x.stride(1), x.stride(3) if x.shape[3] > 1 else x.stride(2)
