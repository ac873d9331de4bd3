"""The graphed, fused audio encoder against openai-whisper's encoder on the same real weights.

On CPU the engine runs eagerly through the kernels' PyTorch references (fp32): its arithmetic (fused residual +
LayerNorm, bias + GELU after a bias-less matmul, the strided q/k/v views) must give openai-whisper's
``AudioEncoder`` output. The kernels themselves are tested in tests/kernels under the Triton interpreter. On
CUDA the same comparison runs in fp16/bf16 with the Triton kernels and CUDA graphs, batches split over buckets.
"""

from __future__ import annotations

import copy

import pytest
import torch

from turboformer.audio import log_mel_spectrogram, pad_or_trim
from turboformer.models.whisper.encoder_engine import EncoderEngine, split_into_buckets
from turboformer.models.whisper.graph_engine import EngineOptions, GraphEngine


def _mels(clips, n_mels):
    return torch.stack([pad_or_trim(log_mel_spectrogram(a, n_mels), 3000) for a in clips])


@pytest.fixture(scope="module")
def clips(librivox, cards):
    return [a for _, a, _ in librivox][:2] + [a for _, a, _ in cards][:1]


def _openai_features(openai_model, mel):
    with torch.no_grad():
        return openai_model.encoder(mel.float())


def test_split_into_buckets():
    assert split_into_buckets(13, (1, 2, 4, 8)) == [8, 4, 1]
    assert split_into_buckets(16, (1, 2, 4, 8, 16)) == [16]
    assert split_into_buckets(70, (1, 2, 4, 8, 16, 32, 64)) == [64, 4, 2]
    assert split_into_buckets(3, (1, 4)) == [1, 1, 1]
    assert split_into_buckets(0, (1, 4)) == []
    with pytest.raises(ValueError, match="include 1"):
        split_into_buckets(3, (2, 4))


def test_cpu_encoder_engine_equals_openai_whisper(tiny_en, openai_tiny_en, clips):
    model = copy.deepcopy(tiny_en.model).float()
    engine = EncoderEngine(model.encoder, torch.float32, (1, 2), torch.device("cpu"))
    assert engine.buckets == (1, 2) and engine.graphs is None
    mel = _mels(clips, tiny_en.config.n_mels)
    ours = engine(mel)
    expected = _openai_features(openai_tiny_en, mel)
    assert ours.shape == expected.shape == (3, 1500, 384) and ours.dtype == torch.float32
    assert (ours - expected).abs().max().item() < 1e-4
    # the first clip alone gives the same rows (no state leaks across calls or rows)
    assert (engine(mel[:1]) - ours[:1]).abs().max().item() < 1e-5
    assert engine(mel[:0]).shape == (0, 1500, 384)


def test_cpu_graph_engine_encodes_through_the_encoder_engine(tiny_en, openai_tiny_en, clips):
    model = copy.deepcopy(tiny_en.model).float()
    engine = GraphEngine(model, EngineOptions(dtype=torch.float32, buckets=(1, 4)), "cpu")
    assert isinstance(engine.encoder, EncoderEngine) and engine.encoder.buckets == (1, 4)
    mel = _mels(clips, tiny_en.config.n_mels)
    assert (engine.encode(mel) - _openai_features(openai_tiny_en, mel)).abs().max().item() < 1e-4


def test_encoder_engine_rejects_bad_mel(tiny_en):
    engine = EncoderEngine(tiny_en.model.encoder, torch.float32, (1,), torch.device("cpu"))
    with pytest.raises(ValueError, match=r"log-mel \[n, 80, 3000\]"):
        engine(torch.zeros(1, 80, 2999))
    with pytest.raises(ValueError, match="30 s windows"):
        engine(torch.zeros(80, 3000))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_gpu_encoder_engine_close_to_fp32(tiny_en, clips, dtype, capsys):
    """fp16/bf16 graphed encoder vs the fp32 CPU module (equal to openai-whisper's encoder within 1e-4: the CPU
    test above and test_parity.py; openai-whisper is not installed on the GPU machine); 3 windows through
    buckets (2, 1) and the same windows one at a time: the graphs of different buckets give the same rows."""
    model = copy.deepcopy(tiny_en.model).to("cuda", dtype)
    engine = EncoderEngine(model.encoder, dtype, (1, 2), torch.device("cuda"))
    mel = _mels(clips, tiny_en.config.n_mels)
    ours = engine(mel)
    assert sorted(engine.graphs.keys()) == [1, 2]
    expected = tiny_en.engine.encode(mel)
    error = (ours.float().cpu() - expected).abs()
    assert torch.isfinite(ours).all()
    scale = expected.abs().mean().item()
    # fp16 keeps ~11 bits, bf16 ~8: mean error relative to the mean magnitude
    assert error.mean().item() / scale < (2e-3 if dtype == torch.float16 else 1.5e-2), error.mean().item() / scale
    # the module (eager, same dtype) rounds each block's branches to fp16/bf16 before adding them to the fp32
    # residual stream; the engine adds them in fp32: never further from fp32 than the module
    with torch.no_grad():
        module_error = (model.encoder(mel.to("cuda", dtype)).float().cpu() - expected).abs().mean().item()
    with capsys.disabled():
        print(f"\n{dtype} encoder mean |error| vs fp32: engine {error.mean().item():.2e}, module {module_error:.2e}")
    assert error.mean().item() <= 1.05 * module_error
    single = torch.cat([engine(mel[i : i + 1]) for i in range(3)])
    assert torch.equal(single[2], ours[2])  # bucket 1 for the third window either way
    assert (single.float() - ours.float()).abs().max().item() < 0.1
