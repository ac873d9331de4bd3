"""The Conformer GPU path on CPU: the convolution module with the Triton depthwise-conv launcher forced and the
self-attention with the Triton rel-pos flash-attention launcher forced (both run in the Triton interpreter
here), against upstream WeNet's fixture outputs and the module's unfused maths; and a dry run of the
benchmark's logic on a tiny config.

Tolerances: ``encoder_out`` within 1e-4 of upstream (the fixture's fp32 tolerance, ``ref.ATOL``); one
convolution module within 1e-5 of its unfused nn.Conv1d -> BatchNorm/LayerNorm -> SiLU computation (fp32).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from turboformer.kernels import depthwise_conv as dwconv
from turboformer.kernels import poison_buffers
from turboformer.kernels import pos_bias_attention as pba
from turboformer.models.conformer.encoder import ConvolutionModule

PREFIXES = {"": (-1, -1), "chunk4_": (4, -1)}  # fixture prefix -> (chunk, left chunks)


@pytest.fixture
def forced_triton(monkeypatch):
    """Route the encoder's depthwise-conv dispatcher to the Triton launcher (interpreter on CPU); count calls."""
    calls = []

    def launcher(*args, **kwargs):
        calls.append(args[0].shape)
        with poison_buffers():
            return dwconv.depthwise_conv1d_triton(*args, **kwargs)

    monkeypatch.setattr(dwconv, "depthwise_conv1d", launcher)
    return calls


@pytest.mark.parametrize("prefix", list(PREFIXES))
@torch.inference_mode()
def test_fixture_encoder_with_triton_conv(model, ref, forced_triton, prefix):
    feats, lengths = torch.from_numpy(ref.inputs["feats"]), torch.from_numpy(ref.inputs["feats_lengths"])
    encoder_out, out_lengths = model.encode(feats, lengths, *PREFIXES[prefix])
    assert len(forced_triton) == model.config.encoder.num_blocks  # every conv module went through the kernel
    valid = ref["encoder_out_lens"].tolist()
    assert out_lengths.tolist() == valid
    ref.assert_close_valid(encoder_out, f"{prefix}encoder_out", valid, atol=1e-4)


@torch.inference_mode()
def test_fixture_streaming_with_triton_conv(model, ref, forced_triton):
    """The cached chunk-by-chunk path (conv caches carry the causal history) through the kernel."""
    out = model.encoder.forward_chunk_by_chunk(ref.features()[0][None], 4)
    assert len(forced_triton) == model.config.encoder.num_blocks * int(ref["stream_num_chunks"])
    np.testing.assert_allclose(out.numpy(), ref["stream_out"], atol=1e-4, rtol=0)


@pytest.fixture
def forced_triton_attention(monkeypatch):
    """Route the encoder's rel-pos attention dispatcher to the Triton launcher (interpreter on CPU); count calls."""
    calls = []

    def launcher(*args, **kwargs):
        calls.append(args[1].shape)  # k [B, H, S, d_k]
        with poison_buffers():
            return pba.pos_bias_attention_triton(*args, **kwargs)

    monkeypatch.setattr(pba, "pos_bias_attention", launcher)
    return calls


@pytest.mark.parametrize("prefix", list(PREFIXES))
@torch.inference_mode()
def test_fixture_encoder_with_triton_attention(model, ref, forced_triton_attention, prefix):
    """Key-padding masks [B, 1, S] (full context) and chunk masks [B, T, S] (``chunk4_``) through the kernel."""
    feats, lengths = torch.from_numpy(ref.inputs["feats"]), torch.from_numpy(ref.inputs["feats_lengths"])
    encoder_out, _ = model.encode(feats, lengths, *PREFIXES[prefix])
    assert len(forced_triton_attention) == model.config.encoder.num_blocks
    valid = ref["encoder_out_lens"].tolist()
    ref.assert_close_valid(encoder_out, f"{prefix}encoder_out", valid, atol=1e-4)


@torch.inference_mode()
def test_fixture_streaming_with_triton_attention(model, ref, forced_triton_attention):
    """The cached chunk-by-chunk path: keys = cached history + chunk (S = Tc + T), no mask."""
    out = model.encoder.forward_chunk_by_chunk(ref.features()[0][None], 4)
    assert len(forced_triton_attention) == model.config.encoder.num_blocks * int(ref["stream_num_chunks"])
    assert any(k[2] > 4 for k in forced_triton_attention)  # later chunks attend over cached keys too
    np.testing.assert_allclose(out.numpy(), ref["stream_out"], atol=1e-4, rtol=0)


def unfused(module: ConvolutionModule, x, pad_mask, cache=None):
    """The convolution module with nn.Conv1d, the norm module and SiLU as separate steps (Fig. 2 as written)."""
    if pad_mask is not None:
        x = x.masked_fill(~pad_mask.unsqueeze(-1), 0.0)
    if module.lorder:
        x = torch.cat(
            [cache.transpose(1, 2) if cache is not None else x.new_zeros(x.size(0), module.lorder, x.size(2)), x], 1
        )
    x = F.glu(module.pointwise_conv1(x), dim=-1)
    if pad_mask is not None and not module.lorder:
        x = x.masked_fill(~pad_mask.unsqueeze(-1), 0.0)
    y = module.depthwise_conv(x.transpose(1, 2))  # [B, D, T]
    y = (
        module.norm(y).transpose(1, 2)
        if isinstance(module.norm, torch.nn.BatchNorm1d)
        else module.norm(y.transpose(1, 2))
    )
    y = module.pointwise_conv2(F.silu(y))
    return y.masked_fill(~pad_mask.unsqueeze(-1), 0.0) if pad_mask is not None else y


def _random_module(kernel, causal, norm):
    torch.manual_seed(0)
    module = ConvolutionModule(20, kernel, causal, norm, 1e-5).eval()
    with torch.no_grad():
        for p in module.parameters():
            p.uniform_(-0.5, 0.5)
        if norm == "batch_norm":
            module.norm.running_mean.uniform_(-0.5, 0.5)
            module.norm.running_var.uniform_(0.5, 2.0)
    return module


@pytest.mark.parametrize(
    "kernel,causal,norm", [(5, False, "batch_norm"), (4, True, "batch_norm"), (7, True, "layer_norm")]
)
@torch.inference_mode()
def test_module_with_triton_conv_matches_unfused(forced_triton, kernel, causal, norm):
    module = _random_module(kernel, causal, norm)
    x = torch.randn(3, 9, 20)
    pad_mask = torch.arange(9)[None] < torch.tensor([9, 4, 2])[:, None]
    out, _ = module(x, pad_mask)
    torch.testing.assert_close(out, unfused(module, x, pad_mask), atol=1e-5, rtol=0)
    if causal:  # streaming: the conv cache is the history
        cache = torch.randn(1, 20, kernel - 1)
        out, new_cache = module(x[:1], None, cache)
        torch.testing.assert_close(out, unfused(module, x[:1], None, cache), atol=1e-5, rtol=0)
        torch.testing.assert_close(new_cache, x[:1, -(kernel - 1) :].transpose(1, 2))
    assert len(forced_triton) == 1 + causal


def test_folded_weights_follow_in_place_updates_and_dtype():
    module = _random_module(5, False, "batch_norm")
    w0, _ = module.conv_weights()
    assert module.conv_weights()[0] is w0  # cached
    with torch.no_grad():
        module.norm.running_var.mul_(4.0)  # scale 1/sqrt(4 var) = half
    torch.testing.assert_close(module.conv_weights()[0], w0 / 2)
    module.half()
    assert module.conv_weights()[0].dtype == torch.float16


def test_benchmark_dry_run_on_cpu(tmp_path):
    from turboformer.benchmark import conformer as bench

    parser = __import__("argparse").ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--device", "cpu", "--config", "tiny", "--batches", "1", "2", "--seconds", "1",
                              "--repeat", "1", "--out", str(tmp_path)])  # fmt: skip
    assert bench.run(args) == 0
    (folder,) = tmp_path.iterdir()
    results = json.loads((folder / "conformer.json").read_text())
    rows = results["rows"]
    assert len(rows) == 2 and {r["batch"] for r in rows} == {1, 2}
    for row in rows:
        for system in ("ours", "fp32_eager", "torch_fp16_eager"):
            assert row[system]["encoder_ms"] > 0 and row[system]["rescoring_ms"] > 0 and row[system]["rtfx"] > 0
        assert row["fp32_eager"]["mean_tokens"] > 0  # the confident random model emits tokens
        assert row["identical_hypotheses"]["fp32_eager"] == 1.0
        assert row["identical_hypotheses"]["ours"] == 1.0  # the CPU dry run's engine is fp32: same hypotheses
        assert 0.0 <= row["identical_hypotheses"]["torch_fp16_eager"] <= 1.0
    assert "| batch |" in (folder / "conformer.md").read_text()


def test_benchmark_needs_cuda_without_escape_hatch(capsys):
    from turboformer.benchmark import conformer as bench

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")  # the exit-2 path exists only without a GPU
    parser = __import__("argparse").ArgumentParser()
    bench.add_arguments(parser)
    assert bench.run(parser.parse_args([])) == 2
    assert "CUDA" in capsys.readouterr().err
