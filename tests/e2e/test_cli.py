"""The ``turboformer`` command on real files: exit codes, files written, one error line per bad file."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from turboformer.cli import main

SPEECH = Path("/usr/share/pocketsphinx/test/data")


@pytest.fixture(scope="module")
def clips():
    if not SPEECH.is_dir():
        pytest.fail(f"{SPEECH} missing: apt-get install pocketsphinx-testdata (CI installs it)")
    return sorted((SPEECH / "librivox").glob("*.wav"))[:2]


def test_transcribe_writes_every_format(clips, tmp_path, capsys):
    code = main(["transcribe", *map(str, clips), "--model", "tiny.en", "--device", "cpu", "-f", "all",
                 "-o", str(tmp_path), "--quiet"])
    assert code == 0
    for clip in clips:
        for fmt in ("txt", "srt", "vtt", "json", "tsv"):
            assert (tmp_path / f"{clip.stem}.{fmt}").stat().st_size > 0
    text = (tmp_path / f"{clips[1].stem}.txt").read_text().lower()
    assert "he was not an" in text and "young man" in text
    srt = (tmp_path / f"{clips[1].stem}.srt").read_text()
    assert srt.startswith("1\n00:00:00,000 --> 00:00:0")
    assert json.loads((tmp_path / f"{clips[0].stem}.json").read_text())["language"] == "en"
    assert capsys.readouterr().out == ""  # --quiet


def test_bad_files_are_reported_and_the_rest_transcribed(clips, tmp_path, capsys):
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    notes = tmp_path / "notes.mp3"
    notes.write_text("not audio at all\n" * 50)
    truncated = tmp_path / "cut.wav"
    truncated.write_bytes(clips[0].read_bytes()[:20000])
    missing = tmp_path / "nowhere.flac"
    code = main(["transcribe", str(empty), str(clips[1]), str(notes), str(truncated), str(missing),
                 "--device", "cpu", "-o", str(tmp_path / "out")])
    assert code == 1
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 4
    for bad in (empty, notes, truncated, missing):
        assert sum(str(bad) in line for line in errors) == 1
    assert "young man" in captured.out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"{clips[1].stem}.txt"]


def test_raw_input_and_bad_model(tmp_path, capsys):
    raw = SPEECH / "goforward.raw"
    assert main(["transcribe", str(raw), "--device", "cpu", "-o", str(tmp_path), "--raw-sample-rate", "16000"]) == 0
    assert "forward" in (tmp_path / "goforward.txt").read_text().lower()
    assert main(["transcribe", str(raw), "--model", str(tmp_path / "no-model"), "-o", str(tmp_path)]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    assert main(["transcribe", str(raw), "--language", "fr", "--device", "cpu", "-o", str(tmp_path)]) == 2
    assert "English-only" in capsys.readouterr().err


def test_console_script_help():
    exe = shutil.which("turboformer")
    command = [exe] if exe else [sys.executable, "-m", "turboformer.cli"]
    out = subprocess.run([*command, "transcribe", "--help"], capture_output=True, text=True, check=True).stdout
    assert "--output-format" in out and "--model" in out


@pytest.mark.parametrize("flag, expected", [([], True), (["--continuous-batching", "false"], False)])
def test_continuous_batching_flag_reaches_the_options(clips, tmp_path, monkeypatch, flag, expected):
    import turboformer.models.whisper.transcribe as transcribe

    seen = []
    real = transcribe.transcribe_batch
    monkeypatch.setattr(transcribe, "transcribe_batch", lambda *a, **k: seen.append(a[3]) or real(*a, **k))
    code = main(["transcribe", str(clips[0]), "--device", "cpu", "-o", str(tmp_path), "--quiet", *flag])
    assert code == 0 and [o.continuous_batching for o in seen] == [expected]
