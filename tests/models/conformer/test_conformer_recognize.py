"""End to end on the fixture's real speech clip (``example.wav``): fbank front-end, all decoding modes from
files and arrays, bad inputs and options, and the ``recognize`` command line."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from turboformer.audio import AudioError
from turboformer.models.conformer import (
    ConformerInputError,
    RecognizeOptions,
    RecognizeOptionsError,
)
from turboformer.models.conformer.cli import add_parser, main

UPSTREAM_MODE = {
    "ctc_greedy": "ctc_greedy_search",
    "ctc_prefix_beam": "ctc_prefix_beam_search",
    "attention": "attention",
    "attention_rescoring": "attention_rescoring",
}


def _options(mode: str) -> RecognizeOptions:
    return RecognizeOptions(mode=mode, beam_size=4, ctc_weight=0.3, reverse_weight=0.5)


def _check_wav_result(ref, result, mode: str) -> None:
    key = f"wav_{UPSTREAM_MODE[mode]}"
    assert result.tokens == ref.tokens(key, 0)
    if mode == "ctc_prefix_beam":
        assert [h.tokens for h in result.nbest] == ref.nbest(key, 0)
        scores = [h.score for h in result.nbest]
        np.testing.assert_allclose(scores, ref[f"{key}_nbest_scores"][0], atol=ref.SCORE_ATOL, rtol=0)
    if mode == "attention_rescoring":
        assert result.score == pytest.approx(ref[f"{key}_scores"][0], abs=ref.SCORE_ATOL)


def test_fbank_front_end(recognizer, ref):
    """Our features of example.wav vs WeNet's (torchaudio Kaldi fbank); 1e-2 as the fixture README advises."""
    feats = recognizer.features(ref.dir / "example.wav")
    assert feats.shape == ref["wav_fbank"].shape == (231, 80)
    np.testing.assert_allclose(feats.numpy(), ref["wav_fbank"], atol=1e-2, rtol=0)


@torch.inference_mode()
def test_wav_encoder_from_reference_features(model, ref):
    feats = torch.from_numpy(ref["wav_fbank"])[None]
    out, lengths = model.encode(feats, torch.tensor([feats.size(1)]))
    assert lengths.tolist() == [57]
    np.testing.assert_allclose(out.numpy(), ref["wav_encoder_out"], atol=ref.ATOL, rtol=0)
    np.testing.assert_allclose(model.ctc(out).numpy(), ref["wav_ctc_log_probs"], atol=ref.ATOL, rtol=0)


@pytest.mark.parametrize("mode", list(UPSTREAM_MODE))
def test_wav_decodings(recognizer, ref, mode):
    """Every mode, from WeNet's own features and from the file through our front-end."""
    from_features = recognizer.recognize_features([torch.from_numpy(ref["wav_fbank"])], _options(mode))[0]
    _check_wav_result(ref, from_features, mode)
    from_file = recognizer.recognize([ref.dir / "example.wav"], _options(mode))[0]
    _check_wav_result(ref, from_file, mode)
    assert from_file.text == recognizer.symbols.detokenize(from_file.tokens)


def test_array_inputs_equal_file(recognizer, ref):
    pcm = ref["wav_samples_int16"]
    options = _options("attention_rescoring")
    from_file, from_int16, from_float = recognizer.recognize(
        [str(ref.dir / "example.wav"), pcm, pcm.astype(np.float32) / 32768.0], options
    )
    assert from_int16.tokens == from_float.tokens == from_file.tokens == ref.tokens("wav_attention_rescoring", 0)
    assert from_int16.score == pytest.approx(from_file.score, abs=1e-5)
    single = recognizer.recognize(torch.from_numpy(pcm), options)  # one input, not a list
    assert len(single) == 1 and single[0].tokens == from_file.tokens


@pytest.mark.parametrize(
    "audio, kwargs, message",
    [
        (np.zeros(16000, np.float32), {"sample_rate": 8000}, "8000 Hz but this model expects 16000 Hz"),
        (np.zeros(0, np.float32), {}, "empty"),
        (np.zeros(800, np.float32), {}, "too short: 50 ms gives 3 fbank frames"),
        (np.zeros((2, 16000), np.float32), {}, "mono"),
        (np.zeros(16000, np.int32), {}, "int16 PCM"),
        (np.full(16000, np.nan, np.float32), {}, "NaN"),
    ],
)
def test_bad_audio_arrays(recognizer, audio, kwargs, message):
    with pytest.raises(ConformerInputError, match=message):
        recognizer.recognize([audio], _options("ctc_greedy"), **kwargs)


def test_bad_audio_files(recognizer, ref, tmp_path):
    with pytest.raises(AudioError, match="no such file"):
        recognizer.recognize([tmp_path / "missing.wav"])
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(AudioError, match="empty"):
        recognizer.recognize([tmp_path / "empty.wav"])
    with pytest.raises(ConformerInputError, match="arrays only"):
        recognizer.recognize([ref.dir / "example.wav"], sample_rate=16000)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mode": "greedy"}, "mode='greedy'"),
        ({"beam_size": 0}, "beam_size"),
        ({"batch": 0}, "batch"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"simulate_streaming": True}, "simulate_streaming needs chunk_size > 0"),
        ({"reverse_weight": 1.5}, "reverse_weight"),
        ({"ctc_weight": -1.0}, "ctc_weight"),
    ],
)
def test_bad_options(kwargs, message):
    with pytest.raises(RecognizeOptionsError, match=message):
        RecognizeOptions(**kwargs)


def test_options_that_do_not_fit_the_model(recognizer, ref):
    features = [torch.from_numpy(ref["wav_fbank"])]
    with pytest.raises(RecognizeOptionsError, match="exceeds the 67-unit vocabulary"):
        recognizer.recognize_features(features, RecognizeOptions(beam_size=68))
    with pytest.raises(ConformerInputError, match=r"features 1 must be \[frames, 80\], got \(100, 40\)"):
        recognizer.recognize_features([features[0], torch.zeros(100, 40)], RecognizeOptions())
    assert recognizer.recognize_features([], RecognizeOptions()) == []


# -- command line ---------------------------------------------------------------------------------------------


def _run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="turboformer")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["recognize", *argv])
    assert args.func is main
    return args.func(args)


def test_cli_json_with_one_bad_file(ref, tmp_path, capsys):
    wav = str(ref.dir / "example.wav")
    missing = str(tmp_path / "missing.wav")
    argv = [wav, missing, wav, "--model", str(ref.dir), "--beam-size", "4", "--output-format", "json"]
    assert _run_cli(argv + ["--ctc-weight", "0.3", "--reverse-weight", "0.5", "--batch-size", "2"]) == 1
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert len(lines) == 2
    for line in lines:
        record = json.loads(line)
        assert record["path"] == wav
        assert tuple(record["tokens"]) == ref.tokens("wav_attention_rescoring", 0)
        assert record["score"] == pytest.approx(ref["wav_attention_rescoring_scores"][0], abs=ref.SCORE_ATOL)
    errors = err.splitlines()
    assert len(errors) == 1 and errors[0].startswith("error: ") and "missing.wav" in errors[0]


def test_cli_txt_streaming(ref, capsys):
    wav = str(ref.dir / "example.wav")
    argv = [wav, "--model", str(ref.dir), "--mode", "ctc_greedy", "--chunk-size", "4", "--simulate-streaming"]
    assert _run_cli(argv) == 0
    out, err = capsys.readouterr()
    path, text = out.rstrip("\n").split("\t")
    assert path == wav and text and not err


def test_cli_bad_model_and_options(ref, tmp_path, capsys):
    wav = str(ref.dir / "example.wav")
    assert _run_cli([wav, "--model", str(tmp_path)]) == 2
    assert _run_cli([wav, "--model", str(ref.dir), "--beam-size", "0"]) == 2
    assert _run_cli([wav, "--model", str(ref.dir), "--device", "gpu0"]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 3 and "train.yaml" in errors[0] and "beam_size" in errors[1] and "gpu0" in errors[2]
