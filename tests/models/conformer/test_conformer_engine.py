"""The GPU engine's logic on CPU: the batched CTC prefix beam search against the pure-Python reference
(``ctc.ctc_prefix_beam_search``, upstream semantics) and upstream's fixture n-best; batched attention rescoring
against the per-utterance ``attention_rescoring``; the engine (fp32, graphs off) with padded shape buckets
against the unpadded encoder and against upstream's decoding results; options that need CUDA.

Tolerances: n-best tokens and order identical; CTC scores within 1e-9 (both float64, the merges sum in a
different order); rescoring scores within 1e-4 (float32 sums of ~50 log-probabilities in a different order);
padded-bucket encoder output within 1e-5 of the unpadded one on valid frames (fp32 matmul blocking).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from turboformer.kernels.ctc_prefix_search import ctc_prefix_search_triton
from turboformer.models.conformer import (
    ConformerEngine,
    ConformerRecognizer,
    EngineOptions,
    EngineOptionsError,
)
from turboformer.models.conformer.ctc import ctc_prefix_beam_search
from turboformer.models.conformer.prefix_search import (
    PrefixBeams,
    ctc_prefix_beam_search_batched,
    ctc_prefix_beam_search_torch,
)
from turboformer.models.conformer.search import (
    attention_rescoring,
    attention_rescoring_batched,
)

SEARCH_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def search_triton(log_probs, lengths, beam, blank_id=0):
    """The Triton search (interpreter on CPU, the GPU where one exists), as PrefixBeams on the CPU."""
    out = ctc_prefix_search_triton(log_probs.to(SEARCH_DEVICE), lengths.to(SEARCH_DEVICE), beam, blank_id)
    return PrefixBeams(*(x.cpu() for x in out))


# The batched searches under test: tensor ops (any device) and the Triton kernel, each against the reference.
SEARCHES = {"tensor_ops": ctc_prefix_beam_search_torch, "triton": search_triton}


@pytest.fixture(params=sorted(SEARCHES))
def batched_search(request):
    return SEARCHES[request.param]


def assert_same_nbest(actual, expected, atol=1e-9):
    assert len(actual) == len(expected)
    for b, (got, want) in enumerate(zip(actual, expected)):
        assert [t for t, _ in got] == [t for t, _ in want], f"utterance {b}"
        for (_, x), (_, y) in zip(got, want):
            assert x == y or abs(x - y) <= atol, f"utterance {b}: {x} vs {y}"


def random_log_probs(seed: int, batch: int, frames: int, vocab: int, sharpness: float, impossible: float = 0.0):
    """Log-softmax of Gaussian logits; ``sharpness`` peaks them (many blanks / repeats when vocab is small);
    a share ``impossible`` of the non-blank entries is -inf (candidates the reference creates with score -inf)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, frames, vocab, generator=g) * sharpness
    if impossible:
        logits[torch.rand(batch, frames, vocab, generator=g) < impossible] = -math.inf
        logits[..., 0] = torch.randn(batch, frames, generator=g)
    lengths = torch.randint(1, frames + 1, (batch,), generator=g)
    lengths[0] = frames
    return torch.log_softmax(logits, dim=-1), lengths


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("sharpness", [0.5, 3.0])
def test_batched_prefix_search_matches_reference(seed, sharpness, batched_search):
    g = torch.Generator().manual_seed(seed)
    vocab = int(torch.randint(2, 9, (1,), generator=g))
    beam = int(torch.randint(1, vocab + 1, (1,), generator=g))
    batch, frames = int(torch.randint(1, 5, (1,), generator=g)), int(torch.randint(1, 25, (1,), generator=g))
    log_probs, lengths = random_log_probs(seed, batch, frames, vocab, sharpness)
    expected = ctc_prefix_beam_search(log_probs, lengths, beam)
    assert_same_nbest(batched_search(log_probs, lengths, beam).to_lists(), expected)


def test_batched_prefix_search_with_impossible_units(batched_search):
    """-inf log-probabilities: the reference keeps -inf prefixes in the beam (in creation order) when fewer
    finite ones exist; the batched search must rank them the same way."""
    minus_inf = 0
    for seed in range(40):
        vocab = 2 + seed % 4
        log_probs, lengths = random_log_probs(seed, 3, 1 + seed % 7, vocab, 3.0, impossible=0.4)
        expected = ctc_prefix_beam_search(log_probs, lengths, vocab)
        minus_inf += sum(score == -math.inf for nbest in expected for _, score in nbest)
        assert_same_nbest(batched_search(log_probs, lengths, vocab).to_lists(), expected)
    assert minus_inf > 0  # the case was exercised


def test_batched_prefix_search_large_vocab(batched_search):
    """A 4,233-unit vocabulary (AISHELL), beam 10, unequal lengths: long prefixes, hash identity over 60 frames."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 60, 4233, generator=g) * 2
    logits[..., 0] += 5  # mostly blank, as a trained model
    log_probs, lengths = torch.log_softmax(logits, -1), torch.tensor([60, 17, 60, 1])
    expected = ctc_prefix_beam_search(log_probs, lengths, 10)
    assert_same_nbest(batched_search(log_probs, lengths, 10).to_lists(), expected)


@pytest.mark.parametrize("setting, chunk", [("full", -1), ("chunk4", 4)])
@torch.inference_mode()
def test_batched_prefix_search_on_fixture(model, ref, setting, chunk, batched_search):
    feats, lengths = torch.from_numpy(ref.inputs["feats"]), torch.from_numpy(ref.inputs["feats_lengths"])
    encoder_out, out_lengths = model.encode(feats, lengths, chunk, -1)
    log_probs = model.ctc(encoder_out)
    for beam in (ref.BEAM, 10):
        nbests = batched_search(log_probs, out_lengths, beam).to_lists()
        assert_same_nbest(nbests, ctc_prefix_beam_search(log_probs, out_lengths, beam))
    nbests = batched_search(log_probs, out_lengths, ref.BEAM).to_lists()
    key = f"{setting}_ctc_prefix_beam_search"
    for b, nbest in enumerate(nbests):  # and upstream WeNet's own n-best
        assert [t for t, _ in nbest] == ref.nbest(key, b)
        np.testing.assert_allclose([s for _, s in nbest], ref[f"{key}_nbest_scores"][b], atol=ref.SCORE_ATOL)


@pytest.mark.parametrize("ctc_weight, reverse_weight", [(0.3, 0.5), (0.0, 0.0), (0.5, 0.3)])
@torch.inference_mode()
def test_batched_rescoring_matches_per_utterance(model, ref, ctc_weight, reverse_weight):
    feats, lengths = torch.from_numpy(ref.inputs["feats"]), torch.from_numpy(ref.inputs["feats_lengths"])
    encoder_out, out_lengths = model.encode(feats, lengths)
    log_probs, cfg = model.ctc(encoder_out), model.config
    for beam in (ref.BEAM, 10):
        beams = ctc_prefix_beam_search_batched(log_probs, out_lengths, beam)
        expected = [
            attention_rescoring(
                model.decoder, encoder_out[b : b + 1, : int(out_lengths[b])], nbest, ctc_weight, reverse_weight,
                cfg.sos_id, cfg.eos_id,
            )
            for b, nbest in enumerate(ctc_prefix_beam_search(log_probs, out_lengths, beam))
        ]
        for width in (None, 64):  # the longest hypothesis, or a padded bucket
            actual = attention_rescoring_batched(
                model.decoder, encoder_out, out_lengths, beams, ctc_weight, reverse_weight, cfg.sos_id, cfg.eos_id, width
            )
            assert_same_nbest(actual, expected, atol=1e-4)


@pytest.fixture(scope="module")
def engine_recognizer(ref):
    """The engine in fp32 without graphs on CPU, with buckets that force padding of batch and frames."""
    recognizer = ConformerRecognizer.from_dir(ref.dir)
    options = EngineOptions(dtype=torch.float32, batch_buckets=(2, 4), frame_step=48, cuda_graphs=False)
    return ConformerRecognizer(recognizer.model, recognizer.symbols, ConformerEngine(recognizer.model, options, True))


@pytest.mark.parametrize("chunk", [-1, 4])
@torch.inference_mode()
def test_engine_padded_bucket_equals_unpadded(model, ref, engine_recognizer, chunk):
    engine = engine_recognizer.engine
    features = ref.features()
    for group in ([0, 1, 2], [1], [2, 0]):  # 3 rows -> bucket 4; 1 -> 2; frames padded to 48k
        feats = torch.nn.utils.rnn.pad_sequence([features[i] for i in group], batch_first=True)
        lengths = torch.tensor([features[i].size(0) for i in group])
        encoder_out, out_lengths = model.encode(feats, lengths, chunk, -1)
        bucket_out, bucket_lengths, bucket_logp, beams = engine.encode_and_search(feats, lengths, 4, chunk, -1)
        assert bucket_out.size(0) == len(group) and bucket_out.size(1) >= encoder_out.size(1)
        assert bucket_lengths.tolist() == out_lengths.tolist()
        for b, n in enumerate(out_lengths.tolist()):
            torch.testing.assert_close(bucket_out[b, :n], encoder_out[b, :n], atol=1e-5, rtol=0)
            torch.testing.assert_close(bucket_logp[b, :n], model.ctc(encoder_out)[b, :n], atol=1e-5, rtol=0)
        assert_same_nbest(beams.to_lists(), ctc_prefix_beam_search(model.ctc(encoder_out), out_lengths, 4), 1e-4)
    assert len(engine._graphs) >= 2  # distinct buckets were built


@pytest.mark.parametrize("setting", ["full", "single", "chunk4", "chunk4_left2"])
@pytest.mark.parametrize("mode", ["ctc_greedy", "ctc_prefix_beam", "attention_rescoring"])
def test_engine_decoding_matches_upstream(engine_recognizer, ref, setting, mode):
    chunk, left, batch = {"full": (-1, -1, 3), "single": (-1, -1, 1), "chunk4": (4, -1, 3), "chunk4_left2": (4, 2, 3)}[
        setting
    ]
    from turboformer.models.conformer import RecognizeOptions

    options = RecognizeOptions(mode=mode, beam_size=4, ctc_weight=0.3, reverse_weight=0.5, chunk_size=chunk,
                               left_chunks=left, batch=batch)  # fmt: skip
    upstream = {"ctc_greedy": "ctc_greedy_search", "ctc_prefix_beam": "ctc_prefix_beam_search"}.get(mode, mode)
    key = f"{setting}_{upstream}"
    for b, result in enumerate(engine_recognizer.recognize_features(ref.features(), options)):
        assert result.tokens == ref.tokens(key, b), f"utterance {b}"
        if mode == "ctc_prefix_beam":
            assert [h.tokens for h in result.nbest] == ref.nbest(key, b)
        if mode == "attention_rescoring":
            assert result.score == pytest.approx(ref[f"{key}_scores"][b], abs=ref.SCORE_ATOL)


def test_engine_splits_batches_larger_than_its_buckets(engine_recognizer, ref):
    from turboformer.models.conformer import RecognizeOptions

    features = ref.features() * 3  # 9 utterances, largest bucket 4
    results = engine_recognizer.recognize_features(features, RecognizeOptions(beam_size=4, batch=9))
    for b, result in enumerate(results):
        assert result.tokens == ref.tokens("full_attention_rescoring", b % 3)


def test_cuda_only_options_on_cpu(ref, model, capsys):
    with pytest.raises(EngineOptionsError, match="CUDA"):
        ConformerRecognizer.from_dir(ref.dir, "cpu", dtype=torch.float16)
    with pytest.raises(EngineOptionsError, match="CUDA"):
        ConformerRecognizer.from_dir(ref.dir, "cpu", quantize="int8")
    with pytest.raises(EngineOptionsError, match="CUDA"):
        ConformerEngine(model, EngineOptions(dtype=torch.bfloat16), copy_model=True)
    with pytest.raises(EngineOptionsError, match="quantize"):
        EngineOptions(quantize="int4").validate()

    import argparse

    from turboformer.models.conformer.cli import add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    wav = str(ref.dir / "example.wav")
    for extra in (["--dtype", "float16"], ["--quantize", "int8"]):
        args = parser.parse_args(["recognize", wav, "--model", str(ref.dir), *extra])
        assert args.func(args) == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 2 and all("CUDA" in e for e in errors)
    args = parser.parse_args(["recognize", wav, "--model", str(ref.dir), "--dtype", "float32", "--beam-size", "4"])
    assert args.func(args) == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@torch.inference_mode()
def test_precise_half_precision_conversion(ref, model, dtype):
    """``convert_model(precise=True)``: fp32 residual stream and fp32 encoder states, CTC and decoders in fp32 and
    never quantized; closer to the fp32 model than plain half precision on the fixture's utterances (CPU
    half-precision ops: the same roundings as on a GPU, other accumulation orders)."""
    import copy

    from turboformer.kernels import use_reference
    from turboformer.models.conformer.engine import convert_model
    from turboformer.nn.linear import Int8Linear

    features = ref.features()
    feats = torch.nn.utils.rnn.pad_sequence(features, batch_first=True)
    lengths = torch.tensor([f.size(0) for f in features])
    with use_reference():
        fp32_out, out_lengths = model.encode(feats, lengths)
        fp32_logp = model.ctc(fp32_out)
    errors = {}
    for precise in (False, True):
        half = convert_model(copy.deepcopy(model), dtype, None, precise=precise)
        assert all(layer.fp32_residual == precise for layer in half.encoder.layers)
        expected_heads = torch.float32 if precise else dtype
        assert half.ctc.ctc_lo.weight.dtype == expected_heads
        assert half.decoder.left_decoder.output_layer.weight.dtype == expected_heads
        with use_reference():
            out, _ = half.encode(feats, lengths)
            logp = half.ctc(out)
        assert out.dtype == (torch.float32 if precise else dtype)
        valid = torch.cat([(out[b, :n].float() - fp32_out[b, :n]).abs().flatten() for b, n in enumerate(out_lengths)])
        logp_err = torch.cat([(logp[b, :n] - fp32_logp[b, :n]).abs().flatten() for b, n in enumerate(out_lengths)])
        errors[precise] = (valid.mean().item(), logp_err.mean().item())
        # attention rescoring runs through the decoders (fp32 in the precise model) on the half-precision states
        nbest = ctc_prefix_beam_search(logp, out_lengths, ref.BEAM)[0]
        cfg = half.config
        assert attention_rescoring(half.decoder, out[:1, : int(out_lengths[0])], nbest, 0.3, 0.5, cfg.sos_id, cfg.eos_id)
    print(f"{dtype}: plain (encoder, log-probs) mean abs error {errors[False]}, precise {errors[True]}")
    assert errors[True][0] < 0.9 * errors[False][0]
    assert errors[True][1] < 0.9 * errors[False][1]
    quantized = convert_model(copy.deepcopy(model), dtype, "int8", precise=True)
    assert isinstance(quantized.encoder.layers[0].feed_forward.w_1, Int8Linear)
    assert not any(isinstance(m, Int8Linear) for m in [*quantized.decoder.modules(), *quantized.ctc.modules()])
