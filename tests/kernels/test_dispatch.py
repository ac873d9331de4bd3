"""The dispatchers' choice between the Triton launchers and the PyTorch references, the switch that forces
the reference, the package without Triton, and (on CUDA) capture of every launcher in a CUDA graph."""

import subprocess
import sys
import types

import pytest
import torch

from turboformer.kernels import (
    KernelInputError,
    TritonUnavailableError,
    bias_gelu,
    decode_attention,
    int8_linear,
    layer_norm,
    reference_forced,
    triton_available,
    use_reference,
    utils,
)


def layer_norm_args(device):
    x = torch.randn(3, 40, device=device, dtype=torch.float16)
    return x, torch.randn(40, device=device), torch.randn(40, device=device), 1e-5


def add_layer_norm_args(device):
    x, weight, bias, eps = layer_norm_args(device)
    return x, torch.randn_like(x), weight, bias, eps


def bias_gelu_args(device):
    return torch.randn(3, 40, device=device, dtype=torch.float16), torch.randn(40, device=device)


def decode_attention_args(device):
    q = torch.randn(2, 3, 64, device=device, dtype=torch.float16)
    k, v = (torch.randn(2, 3, 300, 64, device=device, dtype=torch.float16) for _ in range(2))
    return q, k, v, torch.tensor([5, 300], dtype=torch.int32, device=device)


def int8_decode_attention_args(device):
    q, k, v, lengths = decode_attention_args(device)
    (k8, k_scale), (v8, v_scale) = decode_attention.quantize_kv(k), decode_attention.quantize_kv(v)
    return q, k8, v8, lengths, None, k_scale, v_scale


def int8_linear_args(device):
    w_int8, scale = int8_linear.quantize_weight(torch.randn(96, 80, device=device))
    return torch.randn(2, 80, device=device, dtype=torch.float16), w_int8, scale, torch.randn(96, device=device)


# (module, dispatcher name, argument factory); the launcher is `<dispatcher>_triton`, the reference `<...>_ref`.
OPS = [
    (layer_norm, "layer_norm", layer_norm_args),
    (layer_norm, "add_layer_norm", add_layer_norm_args),
    (bias_gelu, "bias_gelu", bias_gelu_args),
    (decode_attention, "decode_attention", decode_attention_args),
    (decode_attention, "decode_attention", int8_decode_attention_args),
    (int8_linear, "int8_linear", int8_linear_args),
]
OP_IDS = ["layer_norm", "add_layer_norm", "bias_gelu", "decode_attention", "decode_attention_int8", "int8_linear"]


def call(fn, args):
    """Call an op with the factory's positional args (decode attention's int8 scales are keyword-only)."""
    if fn.__name__.startswith("decode_attention") and len(args) == 7:
        return fn(*args[:5], k_scale=args[5], v_scale=args[6])
    return fn(*args)


def assert_same(a, b):
    for x, y in zip(a, b) if isinstance(a, tuple) else [(a, b)]:
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def spy_on_launcher(monkeypatch, module, name):
    """Replace ``<name>_triton`` in its module by a wrapper that counts calls."""
    calls = []
    launcher = getattr(module, f"{name}_triton")

    def spy(*args, **kwargs):
        calls.append(name)
        return launcher(*args, **kwargs)

    monkeypatch.setattr(module, f"{name}_triton", spy)
    return calls


def test_triton_is_available_here():
    assert triton_available()  # the test environment installs triton (interpreter on CPU)


def test_switch_on_a_cuda_device(monkeypatch):
    monkeypatch.delenv("TURBOFORMER_KERNELS", raising=False)
    on_cuda = types.SimpleNamespace(device=torch.device("cuda", 0))  # the decision reads only .device
    assert utils.use_triton(on_cuda) and not reference_forced()
    with use_reference():
        with use_reference():
            assert not utils.use_triton(on_cuda)
        assert not utils.use_triton(on_cuda), "leaving a nested block must keep the outer one in force"
    assert utils.use_triton(on_cuda)
    monkeypatch.setenv("TURBOFORMER_KERNELS", "reference")
    assert reference_forced() and not utils.use_triton(on_cuda)
    monkeypatch.setenv("TURBOFORMER_KERNELS", "fast")
    with pytest.raises(KernelInputError, match="TURBOFORMER_KERNELS"):
        utils.use_triton(on_cuda)
    assert not utils.use_triton(types.SimpleNamespace(device=torch.device("cpu")))


@pytest.mark.parametrize("module,name,make_args", OPS, ids=OP_IDS)
def test_cpu_tensors_take_the_reference(module, name, make_args, monkeypatch):
    args = make_args("cpu")
    expected = call(getattr(module, f"{name}_ref"), args)
    calls = spy_on_launcher(monkeypatch, module, name)
    assert_same(call(getattr(module, name), args), expected)
    assert calls == []


def test_launcher_on_cpu_without_the_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(TritonUnavailableError, match="need CUDA tensors"):
        bias_gelu.bias_gelu_triton(*bias_gelu_args("cpu"))


def test_package_works_without_triton():
    """Hide triton from a fresh interpreter: the package imports, dispatchers run the reference, launchers
    say why they cannot run."""
    script = """
import sys
sys.modules["triton"] = None  # `import triton` now raises ImportError
import torch
from turboformer.kernels import triton_available, TritonUnavailableError
from turboformer.kernels.bias_gelu import bias_gelu, bias_gelu_ref, bias_gelu_triton
from turboformer.kernels.decode_attention import decode_attention, quantize_kv
from turboformer.kernels.int8_linear import int8_linear, quantize_weight
from turboformer.kernels.layer_norm import layer_norm, add_layer_norm
assert not triton_available()
x, b = torch.randn(2, 8), torch.randn(8)
assert torch.equal(bias_gelu(x, b), bias_gelu_ref(x, b))
layer_norm(x, b, b)
add_layer_norm(x, x, b, b)
w8, s = quantize_weight(torch.randn(4, 8))
assert int8_linear(x, w8, s).shape == (2, 4)
kv = x[None, None].expand(1, 2, 2, 8)  # [B=1, H=2, S=2, D=8]
assert decode_attention(torch.randn(1, 2, 8), kv, kv).shape == (1, 2, 8)
try:
    bias_gelu_triton(x, b)
    raise SystemExit("the launcher ran without triton")
except TritonUnavailableError:
    print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("module,name,make_args", OPS, ids=OP_IDS)
def test_cuda_tensors_take_triton_unless_forced(module, name, make_args, monkeypatch):
    monkeypatch.delenv("TURBOFORMER_KERNELS", raising=False)
    args = make_args("cuda")
    calls = spy_on_launcher(monkeypatch, module, name)
    call(getattr(module, name), args)
    assert calls == [name]
    with use_reference():
        assert_same(call(getattr(module, name), args), call(getattr(module, f"{name}_ref"), args))
    monkeypatch.setenv("TURBOFORMER_KERNELS", "reference")
    call(getattr(module, name), args)
    assert calls == [name]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("module,name,make_args", OPS, ids=OP_IDS)
def test_launchers_capture_in_a_cuda_graph(module, name, make_args):
    """Capture a launcher once, then replay it on new inputs copied into the captured buffers: the replay
    must equal an eager launch (no host syncs, no value-dependent host branching, buffers on the device)."""
    launcher = getattr(module, f"{name}_triton")
    static_args = make_args("cuda")
    call(launcher, static_args)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = call(launcher, static_args)
    for _ in range(2):
        fresh = make_args("cuda")
        for static, new in zip(static_args, fresh):
            if isinstance(static, torch.Tensor):
                static.copy_(new)
        graph.replay()
        assert_same(static_out, call(launcher, static_args))


