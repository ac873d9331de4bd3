"""``turboformer bench sam``: its logic on the CPU (a tiny config through every variant, JSON and Markdown
written, the FLOP count of the encoder), and the decoder timed where upstream is not importable."""

import importlib.util
import sys

import pytest
import torch


def test_sam_benchmark_logic_on_cpu(tmp_path, capsys):
    """``turboformer bench sam --device cpu``: the tiny config runs every variant and writes JSON + Markdown;
    without CUDA the GPU run exits 2 with a message."""
    import argparse
    import json

    from turboformer.benchmark import sam as bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--device", "cpu", "--batches", "2", "--repeat", "1", "--out", str(tmp_path)])
    assert bench.run(args) == 0
    results = json.loads((tmp_path / "cpu" / "sam.json").read_text())
    row = results["models"]["cpu_tiny"]["rows"]["2"]
    upstream = ("upstream_fp32", "upstream_bf16") if "upstream_fp32" in row else ()  # when segment_anything imports
    if "segment_anything" in sys.modules or importlib.util.find_spec("segment_anything") is not None:
        assert upstream, "segment_anything is installed but the benchmark did not run it"
    for variant in ("ours_bf16", "ours_sdpa_bf16", "ours_int8", "ours_fp32", *upstream):
        assert row[variant]["images_per_s"] > 0  # (peak_GiB is NaN on the CPU: no allocator statistics)
        assert row[variant]["TFLOPs"] == pytest.approx(row["GFLOP"] / row[variant]["encoder_ms"], rel=1e-6)
    assert row["ours_bf16"]["prompt_ms"] > 0 and row["ours_fp32"]["prompt_ms"] > 0
    decoder = results["models"]["cpu_tiny"]["decoder"]
    for prompts in ("1", "64"):
        times = decoder[prompts]
        assert times["ours_ms"] > 0 and times["ours_eager_ms"] > 0
        if upstream:
            assert times["speedup"] == pytest.approx(times["upstream_fp32_ms"] / times["ours_ms"])
    assert set(row["attention_bf16"]) == {"window", "global"}
    assert "| cpu_tiny | 2 |" in (tmp_path / "cpu" / "sam.md").read_text()
    # 2 blocks of a 16 x 16 grid at width 64 (one in 14 x 14 windows: 256 real queries over 196 keys; one
    # global), 2 images
    c, t = 64, 256
    blocks = 2 * (8 * t * c * c + 4 * t * c * 128) + 4 * t * 196 * c + 4 * t * 14 * c + 4 * t * t * c + 4 * t * 16 * c
    expected = 2 * (blocks + 2 * t * c * 768 + 2 * t * c * 256 + 2 * t * 256 * 256 * 9)
    assert row["GFLOP"] == pytest.approx(expected / 1e9)
    if not torch.cuda.is_available():
        assert bench.run(parser.parse_args(["--out", str(tmp_path)])) == 2
        assert "needs a CUDA GPU" in capsys.readouterr().err


def test_sam_benchmark_times_our_decoder_without_upstream(tmp_path, monkeypatch):
    """Where segment_anything is not importable (the GPU machine without its wheel), the decoder is still timed,
    ours alone (it used to be skipped, leaving the decoder table empty)."""
    import argparse
    import json

    from turboformer.benchmark import sam as bench

    monkeypatch.setattr(bench, "import_upstream_modeling", lambda: None)
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--device", "cpu", "--batches", "1", "--repeat", "1", "--out", str(tmp_path)])
    assert bench.run(args) == 0
    results = json.loads((tmp_path / "cpu" / "sam.json").read_text())
    assert not results["upstream"]
    decoder = results["models"]["cpu_tiny"]["decoder"]
    assert set(decoder) == {"1", "64"}
    assert all(d["ours_ms"] > 0 and "upstream_fp32_ms" not in d for d in decoder.values())
