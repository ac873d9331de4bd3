"""Dynamic / lightweight convolution kernels (full sequence and one causal step) against an independent fp64
formulation: explicit loops over the taps, ``out[:, t] += w[:, t, h, k] * x[:, t - P + k]`` with the softmax in fp64.

On CPU the Triton launchers run in the Triton interpreter (small shapes); the ``cuda``-marked tests add Lite
Transformer WMT shapes (C = 248 channels, 4 heads, K up to 31).

Tolerances (``kernel_tolerance.assert_close_to_gold``): fp32 within atol = rtol = 1e-5 of the fp64 result.
fp16/bf16: the kernel's max error against the fp64 result is at most twice the error of the PyTorch reference
(``dynamic_conv_ref``, the module's own unfold + matmul) run in that dtype; under the interpreter bf16 also gets one
bf16 ulp of max |result|. The ring buffer written by the step kernel must equal the reference's bit for bit (a copy).
Whole model (interpreter vs reference path, fp32): atol = rtol = 1e-5.
"""

import pytest
import torch
from kernel_tolerance import assert_close_to_gold

from turboformer.benchmark.lite_transformer import tiny_config
from turboformer.kernels import KernelInputError, poison_buffers, use_reference
from turboformer.kernels.dynamic_conv import (
    dynamic_conv_ref,
    dynamic_conv_step_ref,
    dynamic_conv_step_rows_ref,
    dynamic_conv_step_rows_triton,
    dynamic_conv_step_triton,
    dynamic_conv_triton,
)
from turboformer.kernels.utils import launch_on_cpu
from turboformer.models.lite_transformer.model import build_model

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny shapes: one intra-op thread is fastest on a busy 2-core machine (restored after the module)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def loop_gold(x, weight, padding_l, softmax):
    """fp64 explicit-loop convolution: x [B, T, C], weight [B|1, T|1, H, K] -> [B, T, C]."""
    B, T, C = x.shape
    H, K = weight.shape[-2:]
    w = weight.double().expand(B, T, H, K)
    if softmax:
        w = torch.softmax(w, dim=-1)
    w = w.repeat_interleave(C // H, dim=2)  # [B, T, C, K]: each channel's taps
    xd = x.double()
    out = torch.zeros(B, T, C, dtype=torch.float64, device=x.device)
    for t in range(T):
        for k in range(K):
            src = t - padding_l + k
            if 0 <= src < T:
                out[:, t] += w[:, t, :, k] * xd[:, src]
    return out


def make_inputs(B, T, C, H, K, dtype, shared=False, strided=False):
    if strided:  # a channel slice of a wider buffer (the GLU's output half, say): row stride > C
        x = torch.randn(B, T, 2 * C + 3, device=DEVICE).to(dtype)[..., 3 : 3 + C]
    else:
        x = torch.randn(B, T, C, device=DEVICE).to(dtype)
    weight = torch.randn(1 if shared else B, 1 if shared else T, H, K, device=DEVICE).to(dtype)
    return x, weight


# (B, T, C, H, K, padding_l): centred and causal padding, K = 1, K > T, odd channels per head, C > BLOCK_C.
SHAPES = [
    (2, 5, 12, 3, 3, 1),
    (1, 7, 10, 2, 7, 6),  # causal, 5 channels per head
    (2, 3, 9, 3, 7, 3),  # K > T, 3 channels per head
    (3, 4, 6, 2, 1, 0),  # K = 1
    (1, 3, 260, 4, 5, 4),  # two channel blocks, 65 channels per head: heads straddle the block boundary
]


def check_full(x, weight, padding_l, softmax):
    gold = loop_gold(x, weight, padding_l, softmax)
    torch_lowp = dynamic_conv_ref(x, weight, padding_l, softmax)
    with poison_buffers():
        out = dynamic_conv_triton(x, weight, padding_l, softmax)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert_close_to_gold(out, gold, torch_lowp)
    if x.dtype == torch.float32:
        assert_close_to_gold(torch_lowp, gold, torch_lowp)  # the reference itself against the loops


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("softmax", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_dynamic_conv(shape, softmax, dtype):
    B, T, C, H, K, P = shape
    check_full(*make_inputs(B, T, C, H, K, dtype), P, softmax)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dynamic_conv_lightweight_strided(dtype):
    """Lightweight kernels [1, 1, H, K] broadcast over batch and time, x a strided channel slice."""
    x, weight = make_inputs(2, 6, 12, 4, 5, dtype, shared=True, strided=True)
    check_full(x, weight, 2, True)


def run_steps(step_fn, x, weight, softmax):
    """Feed x [B, T, C] one step at a time through a zeroed ring buffer; weight [B|1, T|1, H, K]."""
    B, T, C = x.shape
    K = weight.shape[-1]
    buffer = torch.zeros(B, K, C, dtype=x.dtype, device=x.device)
    outs = [step_fn(x[:, t], buffer, weight[:, min(t, weight.shape[1] - 1)], t, softmax) for t in range(T)]
    return torch.stack(outs, dim=1), buffer


STEP_SHAPES = [(2, 5, 12, 3, 3), (1, 6, 10, 2, 4), (3, 3, 6, 2, 1), (1, 3, 9, 3, 7), (1, 2, 260, 4, 3)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("softmax", [True, False])
@pytest.mark.parametrize("shape", STEP_SHAPES)
def test_dynamic_conv_step(shape, softmax, dtype):
    """T causal steps (the ring buffer wraps when T > K) equal the causal full-sequence convolution."""
    B, T, C, H, K = shape
    x, weight = make_inputs(B, T, C, H, K, dtype, shared=(K == 4))
    gold = loop_gold(x, weight, K - 1, softmax)
    torch_lowp, ref_buffer = run_steps(dynamic_conv_step_ref, x, weight, softmax)
    with poison_buffers():
        out, buffer = run_steps(dynamic_conv_step_triton, x, weight, softmax)
    assert out.dtype == x.dtype
    assert_close_to_gold(out, gold, torch_lowp)
    assert torch.equal(buffer, ref_buffer)


def beam_paths(B, T, C, H, K, dtype, with_rows, seed=0):
    """Inputs of T steps of B beams and, per step, the rows the beams continue (random parents with repeats when
    ``with_rows``, the rows themselves otherwise); and the fp64 gold of each step: the taps over the last K inputs
    of each beam's own path (zeros before its first step)."""
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(T, B, C, generator=g).to(DEVICE, dtype)
    ws = torch.randn(T, B, H, K, generator=g).to(DEVICE, dtype)
    parents = torch.randint(0, B, (T, B), generator=g) if with_rows else torch.arange(B).repeat(T, 1)
    paths = [[] for _ in range(B)]
    gold = torch.zeros(T, B, C, dtype=torch.float64)
    for t in range(T):
        for b in range(B):
            paths[b] = paths[b] + [xs[t, b].double().cpu()]
            taps = torch.softmax(ws[t, b].double().cpu(), dim=-1).repeat_interleave(C // H, dim=0)  # [C, K]
            for k in range(K):
                src = len(paths[b]) - K + k
                if src >= 0:
                    gold[t, b] += taps[:, k] * paths[b][src]
        paths = [paths[int(p)] for p in parents[t]]
    return xs, ws, parents.to(DEVICE), gold.to(DEVICE)


def run_rows(step_fn, xs, ws, parents, with_rows):
    """The engine's use: the row table gets column t = own row before the step and follows the parents after."""
    T, B, C = xs.shape
    history = torch.zeros(B, T + 2, C, device=DEVICE, dtype=xs.dtype)
    table = torch.arange(B, device=DEVICE)[:, None].repeat(1, T + 2)
    outs = []
    for t in range(T):
        table[:, t] = torch.arange(B, device=DEVICE)
        step = torch.tensor(t, device=DEVICE)
        outs.append(step_fn(xs[t], history, ws[t], step, table if with_rows else None, True))
        table = table[parents[t]]
    return torch.stack(outs), history


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_rows", [True, False])
@pytest.mark.parametrize("B, C, H, K", [(4, 12, 3, 4), (3, 10, 2, 1), (5, 260, 4, 7)])
def test_dynamic_conv_step_rows(B, C, H, K, with_rows, dtype):
    """Beams that read their own path's inputs through the row table (no window copies) get the convolution of
    their path: the kernel and the reference against fp64 loops over explicit paths."""
    T = 9
    xs, ws, parents, gold = beam_paths(B, T, C, H, K, dtype, with_rows)
    torch_lowp, ref_history = run_rows(dynamic_conv_step_rows_ref, xs, ws, parents, with_rows)
    with poison_buffers():
        out, history = run_rows(dynamic_conv_step_rows_triton, xs, ws, parents, with_rows)
    assert out.dtype == dtype
    assert_close_to_gold(out, gold, torch_lowp)
    if dtype == torch.float32:
        assert_close_to_gold(torch_lowp, gold, torch_lowp)
    assert torch.equal(history, ref_history)


def test_errors():
    x = torch.zeros(1, 4, 6, device=DEVICE)
    with pytest.raises(KernelInputError, match="padding_l"):
        dynamic_conv_triton(x, torch.zeros(1, 4, 2, 3, device=DEVICE), 3)
    with pytest.raises(KernelInputError, match="heads"):
        dynamic_conv_triton(x, torch.zeros(1, 4, 4, 3, device=DEVICE), 1)
    with pytest.raises(KernelInputError, match="broadcast"):
        dynamic_conv_triton(x, torch.zeros(2, 4, 2, 3, device=DEVICE), 1)
    with pytest.raises(KernelInputError, match="buffer"):
        dynamic_conv_step_triton(x[:, 0], torch.zeros(1, 2, 6, device=DEVICE), torch.zeros(1, 2, 3, device=DEVICE), 0)
    with pytest.raises(KernelInputError, match="dtype"):
        buffer = torch.zeros(1, 3, 6, device=DEVICE, dtype=torch.float16)
        dynamic_conv_step_triton(x[:, 0], buffer, torch.zeros(1, 2, 3, device=DEVICE), 0)
    step, taps, history = torch.tensor(1, device=DEVICE), torch.zeros(1, 2, 3, device=DEVICE), torch.zeros(1, 5, 6)
    with pytest.raises(KernelInputError, match="history must be"):
        dynamic_conv_step_rows_triton(x[:, 0], history[:, :, :4].to(DEVICE), taps, step)
    with pytest.raises(KernelInputError, match="0-d integer"):
        dynamic_conv_step_rows_triton(x[:, 0], history.to(DEVICE), taps, step.float())
    with pytest.raises(KernelInputError, match="rows must be"):
        dynamic_conv_step_rows_triton(x[:, 0], history.to(DEVICE), taps, step, torch.zeros(1, 4, device=DEVICE).long())


def test_model_through_kernels_matches_reference():
    """The tiny Lite Transformer (dynamic and lightweight branches, centred and causal, odd channels per head):
    teacher-forced forward and incremental decoding through the launchers equal the reference path (fp32)."""
    torch.manual_seed(0)
    model = build_model(tiny_config()).eval().to(DEVICE)
    src = torch.tensor([[1, 1, 5, 9, 7, 2], [4, 8, 6, 11, 3, 2]], device=DEVICE)  # left-padded, ends with </s>
    prev = torch.tensor([[2, 5, 6, 7, 8], [2, 9, 10, 4, 3]], device=DEVICE)

    def run():
        with torch.inference_mode():
            logits = model(src, prev)
            cache = model.decoder.new_cache(model.encoder(src), 4)
            steps = torch.stack([model.decoder.step(prev[:, t], cache) for t in range(3)], dim=1)
        return logits, steps

    with use_reference():
        want = run()
    with launch_on_cpu(), poison_buffers():
        got = run()
    for g, w in zip(got, want):
        assert not g.isnan().any()
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    # and the steps agree with the teacher-forced logits (the decoder's own consistency)
    torch.testing.assert_close(got[1], got[0][:, :3], atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- real shapes


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,K,P", [(16, 32, 31, 15), (16, 33, 31, 30), (1, 8, 3, 1), (64, 100, 15, 14)])
def test_dynamic_conv_wmt_shapes(B, T, K, P, dtype):
    x, weight = make_inputs(B, T, 248, 4, K, dtype, strided=True)
    check_full(x, weight, P, True)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,K", [(64, 31), (4, 7), (1, 3)])
def test_dynamic_conv_step_wmt_shapes(B, K, dtype):
    x, weight = make_inputs(B, 40, 248, 4, K, dtype)
    gold = loop_gold(x, weight, K - 1, True)
    torch_lowp, ref_buffer = run_steps(dynamic_conv_step_ref, x, weight, True)
    with poison_buffers():
        out, buffer = run_steps(dynamic_conv_step_triton, x, weight, True)
    assert_close_to_gold(out, gold, torch_lowp)
    assert torch.equal(buffer, ref_buffer)


# ---------------------------------------------------------------------------------------------- benchmark


def test_benchmark_logic_on_cpu(tmp_path, capsys):
    """The benchmark's loop, checks and output files on the tiny config on CPU (no GPU figures)."""
    import argparse
    import json

    from turboformer.benchmark import lite_transformer as bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(
        ["--device", "cpu", "--config", "tiny", "--batches", "2", "--src-lens", "3", "--beams", "1", "2",
         "--repeat", "1", "--out", str(tmp_path)]
    )  # fmt: skip
    assert bench.run(args) == 0
    results = json.loads((tmp_path / "cpu" / "lite_transformer.json").read_text())
    assert [(r["batch"], r["src_len"], r["beam"]) for r in results["rows"]] == [(2, 3, 1), (2, 3, 2)]
    for row in results["rows"]:
        # on CPU the engine runs in fp32 (eagerly, kernels on their references)
        assert results["engines"] == ["float32"]
        assert row["float32_ms"] > 0 and row["baseline_ms"] > 0 and row["float32_tokens_per_s"] > 0
        assert row["float32_speedup"] == pytest.approx(row["baseline_ms"] / row["float32_ms"])
        assert row["float32_equal"] == 1.0  # the fp32 engine's hypotheses are the reference's
    assert "| 2 | 3 | 2 |" in (tmp_path / "cpu" / "lite_transformer.md").read_text()


def test_benchmark_needs_cuda_or_cpu_flag(tmp_path, capsys):
    import argparse

    from turboformer.benchmark import lite_transformer as bench

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the refusal path is for machines without it")
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    assert bench.run(parser.parse_args(["--out", str(tmp_path)])) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
