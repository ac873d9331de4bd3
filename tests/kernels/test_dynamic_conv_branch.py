"""The convolution branch's decoding step in one launch (GLU, kernel prediction, softmax, causal convolution over
the beams' input history) against an independent fp64 formulation: explicit beam paths (random parents), each
step's input ``x = a * sigmoid(g)`` and logits ``W x`` in fp64, the convolution as a loop over the taps of the
beam's own path.

On CPU the Triton launcher runs in the Triton interpreter (small shapes); the ``cuda``-marked test adds the Lite
Transformer WMT shape (64 rows, 248 channels in 4 heads, K = 3 and 31).

Tolerances (``kernel_tolerance.assert_close_to_gold``): fp32 within atol = rtol = 1e-5 of the fp64 result;
fp16/bf16: the kernel's max error against it at most twice that of the PyTorch reference (``F.glu``, the linear,
``dynamic_conv_step_rows_ref``) run in that dtype (under the interpreter bf16 also gets one bf16 ulp of max
|result| for each of the three intermediate roundings it truncates: the GLU output, the logits, the taps). The
history it writes holds the step's input: the reference's within one ulp of the dtype (the kernel's sigmoid and
PyTorch's may round the GLU apart by one).
"""

import pytest
import torch
from kernel_tolerance import assert_close_to_gold

from turboformer.kernels import KernelInputError, poison_buffers
from turboformer.kernels.dynamic_conv_branch import (
    dynamic_conv_branch_step,
    dynamic_conv_branch_step_ref,
    dynamic_conv_branch_step_triton,
)
from turboformer.kernels.utils import launch_on_cpu

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def branch_paths(B, T, C, H, K, dtype, glu, with_rows, seed=0, softmax=True):
    """T steps of B beams: linear1 outputs us [T, B, 2C|C] (a column slice of a wider buffer), weight_linear
    [H*K, C], the beams' parents per step, and the fp64 gold of every step over each beam's own path."""
    g = torch.Generator().manual_seed(seed)
    width = 2 * C if glu else C
    us = torch.randn(T, B, width + 5, generator=g)[..., 3 : 3 + width].to(DEVICE, dtype)
    weight = (torch.randn(H * K, C, generator=g) / C**0.5).to(DEVICE, dtype)
    parents = torch.randint(0, B, (T, B), generator=g) if with_rows else torch.arange(B).repeat(T, 1)
    ud, wd = us.double().cpu(), weight.double().cpu()
    xs = ud[..., :C] * torch.sigmoid(ud[..., C:]) if glu else ud  # [T, B, C]
    taps = (xs @ wd.T).view(T, B, H, K)
    taps = (torch.softmax(taps, dim=-1) if softmax else taps).repeat_interleave(C // H, dim=2)  # [T, B, C, K]
    paths = [[] for _ in range(B)]
    gold = torch.zeros(T, B, C, dtype=torch.float64)
    for t in range(T):
        for b in range(B):
            paths[b] = paths[b] + [xs[t, b]]
            for k in range(K):
                src = len(paths[b]) - K + k
                if src >= 0:
                    gold[t, b] += taps[t, b, :, k] * paths[b][src]
        paths = [paths[int(p)] for p in parents[t]]
    return us, weight, parents.to(DEVICE), gold.to(DEVICE), xs


def run(step_fn, us, weight, parents, H, glu, with_rows, out_offset=0, softmax=True, **launch):
    """The engine's use: the row table gets column t = own row before the step and follows the parents after;
    the output goes to columns [out_offset, out_offset + C) of a wider buffer."""
    T, B, _ = us.shape
    C = weight.shape[1]
    history = torch.zeros(B, T + 2, C, device=DEVICE, dtype=us.dtype)
    table = torch.arange(B, device=DEVICE)[:, None].repeat(1, T + 2)
    outs = []
    for t in range(T):
        table[:, t] = torch.arange(B, device=DEVICE)
        wide = torch.zeros(B, C + out_offset + 2, device=DEVICE, dtype=us.dtype)
        out = step_fn(us[t], weight, history, torch.tensor(t, device=DEVICE), table if with_rows else None,
                      heads=H, glu=glu, softmax=softmax, out=wide[:, out_offset : out_offset + C],
                      **launch)  # fmt: skip
        assert out.data_ptr() == wide[:, out_offset:].data_ptr()
        assert not wide[:, :out_offset].any() and not wide[:, out_offset + C :].any()
        outs.append(out.clone())
        table = table[parents[t]]
    return torch.stack(outs), history


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "glu, softmax, launch",
    [
        (True, True, {}),
        (False, True, {"prefetch": True}),
        (True, False, {"prefetch": True}),
        (True, True, {"overlap": True}),
    ],
)
@pytest.mark.parametrize("with_rows", [True, False])
@pytest.mark.parametrize("B, C, H, K", [(4, 12, 3, 4), (3, 10, 2, 1), (5, 36, 4, 7), (2, 300, 3, 7)])
def test_branch_step_against_paths(B, C, H, K, with_rows, glu, softmax, launch, dtype):
    T = 8
    us, weight, parents, gold, xs = branch_paths(B, T, C, H, K, dtype, glu, with_rows, softmax=softmax)
    torch_lowp, ref_history = run(dynamic_conv_branch_step_ref, us, weight, parents, H, glu, with_rows,
                                  softmax=softmax)  # fmt: skip
    with poison_buffers():
        out, history = run(dynamic_conv_branch_step_triton, us, weight, parents, H, glu, with_rows, out_offset=3,
                           softmax=softmax, **launch)  # fmt: skip
    assert out.dtype == dtype
    assert_close_to_gold(out, gold, torch_lowp, bf16_truncations=3)  # the GLU output, the logits, the taps
    if dtype == torch.float32:
        assert_close_to_gold(torch_lowp, gold, torch_lowp)
    # column t of row b holds step t's input of row b (the GLU's output)
    written = history[:, :T].transpose(0, 1)  # [T, B, C]
    assert_close_to_gold(written, xs.to(DEVICE), xs.to(DEVICE, dtype))
    ulp = torch.finfo(dtype).eps
    torch.testing.assert_close(history, ref_history, atol=0, rtol=ulp if dtype != torch.float32 else 1e-6)
    assert not history[:, T:].any()


def test_too_large_for_the_kernel_runs_the_reference():
    """1000 channels x 17 taps per head exceed one program's registers: the launcher refuses, the dispatcher runs
    the reference."""
    us, weight, parents, _, _ = branch_paths(2, 3, 1000, 4, 17, torch.float32, False, True)
    with pytest.raises(KernelInputError, match="exceed"):
        run(dynamic_conv_branch_step_triton, us, weight, parents, 4, False, True)
    with launch_on_cpu():
        via_dispatcher, _ = run(dynamic_conv_branch_step, us, weight, parents, 4, False, True)
    want, _ = run(dynamic_conv_branch_step_ref, us, weight, parents, 4, False, True)
    torch.testing.assert_close(via_dispatcher, want, atol=0, rtol=0)


def test_dispatcher_runs_the_kernel_on_cpu_only_when_asked():
    us, weight, parents, _, _ = branch_paths(3, 2, 12, 3, 4, torch.float32, True, True)
    ref, _ = run(dynamic_conv_branch_step_ref, us, weight, parents, 3, True, True)
    plain, _ = run(dynamic_conv_branch_step, us, weight, parents, 3, True, True)
    if DEVICE == "cpu":  # CPU without launch_on_cpu: the reference itself
        torch.testing.assert_close(plain, ref, atol=0, rtol=0)
    else:  # CUDA: the kernel
        torch.testing.assert_close(plain, ref, atol=1e-5, rtol=1e-5)
    with launch_on_cpu():
        kernel, _ = run(dynamic_conv_branch_step, us, weight, parents, 3, True, True)
    torch.testing.assert_close(kernel, ref, atol=1e-5, rtol=1e-5)


def test_errors():
    B, C, H, K = 2, 8, 2, 3
    u = torch.zeros(B, 2 * C, device=DEVICE)
    weight = torch.zeros(H * K, C, device=DEVICE)
    history = torch.zeros(B, 5, C, device=DEVICE)
    step = torch.tensor(1, device=DEVICE)
    cases = [
        ((u[:, :C], weight, history, step), {"heads": H}, "2 x 8 features"),
        ((u, weight, history, step), {"heads": H, "glu": False}, "must have 8 features"),
        ((u, weight[:, :4], history, step), {"heads": H}, "weight must be"),
        ((u, weight[:5], history, step), {"heads": H}, "weight must be"),
        ((u, weight.half(), history, step), {"heads": H}, "weight dtype"),
        ((u, weight, history, step.float()), {"heads": H}, "0-d integer"),
        ((u, weight, history, step, torch.zeros(B, 4, dtype=torch.long, device=DEVICE)), {"heads": H}, "rows must"),
        ((u, weight, history, step), {"heads": H, "out": torch.zeros(B, C + 1, device=DEVICE)}, "out must be"),
    ]
    for args, kwargs, message in cases:
        for fn in (dynamic_conv_branch_step_triton, dynamic_conv_branch_step_ref):
            with pytest.raises(KernelInputError, match=message):
                fn(*args, **kwargs)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("K", [3, 31])
def test_wmt_shape(K, dtype):
    """64 beam rows of the WMT En-De decoder's dynamic branch (248 channels, 4 heads), 40 steps."""
    us, weight, parents, gold, _ = branch_paths(64, 40, 248, 4, K, dtype, True, True)
    torch_lowp, ref_history = run(dynamic_conv_branch_step_ref, us, weight, parents, 4, True, True)
    with poison_buffers():
        out, history = run(dynamic_conv_branch_step_triton, us, weight, parents, 4, True, True, out_offset=248,
                           prefetch=True)  # fmt: skip
    assert_close_to_gold(out, gold, torch_lowp)
    torch.testing.assert_close(history, ref_history, atol=0, rtol=torch.finfo(dtype).eps)
