"""Output writers against openai-whisper's writers on the same result."""

from __future__ import annotations

import json

import pytest
from whisper.utils import format_timestamp as openai_format_timestamp
from whisper.utils import get_writer

from turboformer.models.whisper.transcribe import Segment, Transcription
from turboformer.writers import FORMATS, format_timestamp, write_result

SEGMENTS = (
    Segment(0, 0, 0.0, 3.52, " Hello there.", (1, 2), 0.0, -0.2, 1.1, 0.01),
    Segment(1, 0, 3.52, 3.52, "", (), 0.0, -0.2, 1.1, 0.01),  # emptied instantaneous segment
    Segment(2, 0, 61.0, 3725.5, " A long --> one,\tsaid she.", (3,), 0.2, -0.4, 1.3, 0.02),
)
RESULT = Transcription(" Hello there. A long --> one,\tsaid she.", "en", SEGMENTS, 3726.0, "talk.wav")
OPTIONS = {"highlight_words": False, "max_line_count": None, "max_line_width": None, "max_words_per_line": None}


@pytest.mark.parametrize("seconds", [0.0, 0.0004, 0.0006, 1.5, 59.9996, 61.0, 3599.999, 3725.5, 86400.25])
@pytest.mark.parametrize("hours, marker", [(False, "."), (True, ",")])
def test_format_timestamp_equals_openai(seconds, hours, marker):
    assert format_timestamp(seconds, hours, marker) == openai_format_timestamp(seconds, hours, marker)


@pytest.mark.parametrize("fmt", ["txt", "srt", "vtt", "tsv"])
def test_writers_equal_openai(fmt, tmp_path):
    ours = write_result(RESULT, tmp_path / "ours", "talk", [fmt])[0].read_text()
    reference_dir = tmp_path / "ref"
    reference_dir.mkdir()
    as_dict = {"text": RESULT.text, "language": "en", "segments": [s.__dict__ | {} for s in SEGMENTS if s.text]}
    get_writer(fmt, str(reference_dir))(as_dict, "talk.wav", OPTIONS)
    assert ours == (reference_dir / f"talk.{fmt}").read_text()


def test_json_round_trips_every_field(tmp_path):
    path = write_result(RESULT, tmp_path, "talk", ["json"])[0]
    data = json.loads(path.read_text())
    assert data["language"] == "en" and data["source"] == "talk.wav"
    assert [s["start"] for s in data["segments"]] == [0.0, 3.52, 61.0]
    assert data["segments"][2]["tokens"] == [3] and data["segments"][0]["no_speech_prob"] == 0.01


def test_all_formats_written(tmp_path):
    written = write_result(RESULT, tmp_path / "nested", "talk", list(FORMATS))
    assert sorted(p.name for p in written) == sorted(f"talk.{f}" for f in FORMATS)
