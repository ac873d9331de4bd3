"""Transcript writers: txt, srt, vtt, json, tsv (the formats and timestamp styles of openai-whisper)."""

from __future__ import annotations

import json
from pathlib import Path

from turboformer.models.whisper.transcribe import Transcription

FORMATS = ("txt", "srt", "vtt", "json", "tsv")


def format_timestamp(seconds: float, always_include_hours: bool = False, decimal_marker: str = ".") -> str:
    """12.345 -> '00:12.345' (vtt) or '00:00:12,345' (srt, with hours and a comma)."""
    if seconds < 0:
        raise ValueError(f"negative timestamp {seconds}")
    milliseconds = round(seconds * 1000.0)
    hours, milliseconds = divmod(milliseconds, 3_600_000)
    minutes, milliseconds = divmod(milliseconds, 60_000)
    secs, milliseconds = divmod(milliseconds, 1_000)
    hours_marker = f"{hours:02d}:" if always_include_hours or hours > 0 else ""
    return f"{hours_marker}{minutes:02d}:{secs:02d}{decimal_marker}{milliseconds:03d}"


def _spoken(result: Transcription):
    return [s for s in result.segments if s.text.strip()]


def to_txt(result: Transcription) -> str:
    return "".join(s.text.strip() + "\n" for s in _spoken(result))


def to_srt(result: Transcription) -> str:
    blocks = []
    for i, s in enumerate(_spoken(result), start=1):
        start = format_timestamp(s.start, always_include_hours=True, decimal_marker=",")
        end = format_timestamp(s.end, always_include_hours=True, decimal_marker=",")
        blocks.append(f"{i}\n{start} --> {end}\n{s.text.strip().replace('-->', '->')}\n\n")
    return "".join(blocks)


def to_vtt(result: Transcription) -> str:
    lines = ["WEBVTT\n\n"]
    for s in _spoken(result):
        text = s.text.strip().replace("-->", "->")
        lines.append(f"{format_timestamp(s.start)} --> {format_timestamp(s.end)}\n{text}\n\n")
    return "".join(lines)


def to_tsv(result: Transcription) -> str:
    """start and end in integer milliseconds, as openai-whisper writes them."""
    rows = ["start\tend\ttext"]
    rows += [f"{round(1000 * s.start)}\t{round(1000 * s.end)}\t{s.text.strip().replace(chr(9), ' ')}" for s in _spoken(result)]
    return "\n".join(rows) + "\n"


def to_json(result: Transcription) -> str:
    return json.dumps(result.to_dict(), ensure_ascii=False, indent=1)


WRITERS = {"txt": to_txt, "srt": to_srt, "vtt": to_vtt, "json": to_json, "tsv": to_tsv}


def write_result(result: Transcription, output_dir: str | Path, stem: str, formats: list[str]) -> list[Path]:
    """Write ``stem.<fmt>`` for each format into output_dir; return the paths written."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in formats:
        path = output_dir / f"{stem}.{fmt}"
        path.write_text(WRITERS[fmt](result), encoding="utf-8")
        written.append(path)
    return written
