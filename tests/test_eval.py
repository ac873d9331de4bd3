"""Accuracy reports: the statistics against numpy, and the Whisper report on the CPU graph engine."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from turboformer.cli import main
from turboformer.eval.tensor_stats import tensor_stats


def test_tensor_stats_against_numpy():
    rng = np.random.default_rng(0)
    b = rng.standard_normal((7, 33))
    a = b + rng.standard_normal((7, 33)) * 1e-3
    stats = tensor_stats(torch.from_numpy(a).float(), torch.from_numpy(b).float())
    diff = np.abs(a.astype(np.float32).astype(np.float64) - b.astype(np.float32).astype(np.float64))
    rel = np.linalg.norm(a.astype(np.float32) - b.astype(np.float32), axis=1) / np.linalg.norm(b.astype(np.float32), axis=1)
    assert stats.max_abs == pytest.approx(diff.max()) and stats.mean_abs == pytest.approx(diff.mean())
    assert stats.median_abs == pytest.approx(np.sort(diff.ravel())[(diff.size - 1) // 2])  # torch: lower median
    assert stats.max_rel == pytest.approx(rel.max(), rel=1e-5) and stats.count == 7 * 33 and stats.finite
    assert not tensor_stats(torch.tensor([[float("nan"), 1.0]]), torch.ones(1, 2)).finite
    with pytest.raises(ValueError, match="shapes differ"):
        tensor_stats(torch.ones(2, 3), torch.ones(3, 2))


def test_whisper_report_on_cpu_engines(tiny_en_model, librivox_clips):
    from turboformer.eval.whisper import candidate_engine, evaluate

    exact = evaluate(tiny_en_model, candidate_engine(tiny_en_model, "cpu", torch.float32, None), librivox_clips[:2])
    assert exact.logits.max_abs < 1e-3 and exact.argmax_agreement == 1.0 and exact.transcripts_equal == 1.0
    int8 = evaluate(tiny_en_model, candidate_engine(tiny_en_model, "cpu", torch.float32, "int8"), librivox_clips[:2])
    assert int8.logits.finite and 1e-3 < int8.logits.max_abs < 5 and int8.argmax_agreement > 0.9
    assert "decoder logits vs fp32 CPU" in int8.text()


def test_eval_and_bench_commands(capsys):
    wav = "/usr/share/pocketsphinx/test/data/librivox/sense_and_sensibility_01_austen_64kb-0880.wav"
    assert main(["eval", "whisper", wav, "--device", "cpu", "--quantize", "int8"]) == 0
    out = capsys.readouterr().out
    assert "argmax agreement" in out and "encoder output vs fp32 CPU" in out
    assert main(["eval", "whisper", "/nonexistent.wav", "--device", "cpu"]) == 2
    if not torch.cuda.is_available():
        assert main(["bench", "whisper", "--models", "tiny", "--batches", "1"]) == 2
        assert "needs a CUDA GPU" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_en_model():
    from turboformer.models.whisper.pipeline import WhisperModel

    return WhisperModel.from_pretrained("tiny.en", device="cpu")


@pytest.fixture(scope="module")
def librivox_clips():
    from pathlib import Path

    from turboformer.audio import load_audio

    data = Path("/usr/share/pocketsphinx/test/data/librivox")
    if not data.is_dir():
        pytest.fail(f"{data} missing: apt-get install pocketsphinx-testdata (CI installs it)")
    return [load_audio(p) for p in sorted(data.glob("*.wav"))]


def test_translation_report_scores_bleu_against_upstream_outputs(tmp_path, capsys):
    """BLEU of our fp32 translations against fairseq's own outputs for the fixture is 100 (they are identical)."""
    import json
    from pathlib import Path

    from turboformer.eval.translation import corpus_bleu, evaluate_translation
    from turboformer.models.lite_transformer.translate import TranslateOptions

    fixture = Path(__file__).resolve().parents[2] / "shared" / "reference" / "lite_transformer"
    if not fixture.is_dir():
        pytest.fail(f"{fixture} missing: the upstream fixtures live in ../shared/reference")
    sources = (fixture / "test.src").read_text().splitlines()
    generated = json.loads((fixture / "expected_generate.json").read_text())["beam_lenpen0.6"]["batch"]
    upstream = {row["id"]: (row["hypos"][0]["text"] + " ").replace("@@ ", "").rstrip() for row in generated}  # BPE off
    references = [upstream[i] for i in range(len(sources))]
    options = TranslateOptions(beam=4, lenpen=0.6, max_len_b=10)  # the fixture's generate.py settings
    report = evaluate_translation(str(fixture), sources, references, "cpu", torch.bfloat16, options)
    assert report.bleu[0] == pytest.approx(100.0) and report.sentences == 4
    assert 0 <= report.hypotheses_equal <= 1 and 0 <= report.bleu[1] <= 100
    assert corpus_bleu(["a b c d e"], ["x y z w v"]) == 0.0
    (tmp_path / "refs.txt").write_text("\n".join(references) + "\n")
    assert main(["eval", "lite-transformer", "--model", str(fixture), "--input", str(fixture / "test.src"),
                 "--references", str(tmp_path / "refs.txt"), "--device", "cpu", "--max-len-b", "10"]) == 0
    assert "BLEU against the references: fp32 100.00, candidate 100.00" in capsys.readouterr().out
    (tmp_path / "short.txt").write_text("one line\n")
    assert main(["eval", "lite-transformer", "--model", str(fixture), "--input", str(fixture / "test.src"),
                 "--references", str(tmp_path / "short.txt"), "--device", "cpu"]) == 2


@pytest.mark.parametrize("unit", ["word", "char"])
def test_error_rates_equal_jiwer(unit):
    import jiwer

    from turboformer.eval.metrics import error_rate

    rng = np.random.default_rng(1)
    words = ["a", "the", "dog", "cat", "ran", "sat", "on", "mat", "x"]
    refs = [" ".join(rng.choice(words, rng.integers(1, 9))) for _ in range(30)]
    hyps = [" ".join(rng.choice(words, rng.integers(0, 9))) for _ in range(30)]
    expected = jiwer.wer(refs, [h or "" for h in hyps]) if unit == "word" else jiwer.cer(
        [r.replace(" ", "") for r in refs], [h.replace(" ", "") for h in hyps])
    assert error_rate(refs, hyps, unit) == pytest.approx(expected)
    with pytest.raises(ValueError, match="references for"):
        error_rate(["a"], [], unit)


def test_conformer_report_on_the_wenet_fixture(capsys):
    from pathlib import Path

    fixture = Path(__file__).resolve().parents[2] / "shared" / "reference" / "wenet"
    if not fixture.is_dir():
        pytest.fail(f"{fixture} missing: the upstream fixtures live in ../shared/reference")
    wav = str(fixture / "example.wav")
    assert main(["eval", "conformer", wav, wav, "--model", str(fixture), "--device", "cpu", "--dtype", "bfloat16",
                 "--beam-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "2 inputs; best hypotheses equal to fp32 CPU" in out and "CER against the fp32 texts" in out
    from turboformer.eval.conformer import evaluate_recognition
    from turboformer.models.conformer import RecognizeOptions

    exact = evaluate_recognition(str(fixture), [wav], "cpu", torch.float32, RecognizeOptions(beam_size=4))
    assert exact.hypotheses_equal == 1.0 and exact.cer_vs_fp32 == 0.0 and exact.max_score_diff == 0.0
    # --quantize int8 reaches the model (weight-only INT8 linears: scores move, the report says int8)
    assert main(["eval", "conformer", wav, "--model", str(fixture), "--device", "cpu", "--dtype", "float32",
                 "--quantize", "int8", "--beam-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "float32, int8" in out
    int8 = evaluate_recognition(str(fixture), [wav], "cpu", torch.float32, RecognizeOptions(beam_size=4), quantize="int8")
    assert 0.0 < int8.max_score_diff < 1.0 or int8.hypotheses_equal < 1.0
