"""``turboformer translate`` on the fixture: test.src on stdin -> the best hypotheses of expected_generate.json
(BPE joins removed as fairseq's --remove-bpe does), one line per input line, in input order."""

from __future__ import annotations

import argparse
import io

import pytest

from turboformer.models.lite_transformer.cli import add_parser


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="turboformer")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def remove_bpe(text: str) -> str:
    return (text + " ").replace("@@ ", "").rstrip()


FIXTURE_FLAGS = ["--beam", "4", "--lenpen", "0.6", "--max-len-a", "0", "--max-len-b", "10"]


def test_stdin_to_stdout(reference_dir, expected_generate, monkeypatch, capsys):
    source = (reference_dir / "test.src").read_text()
    monkeypatch.setattr("sys.stdin", io.StringIO(source))
    assert run(["translate", "--model", str(reference_dir), "--batch-size", "4", *FIXTURE_FLAGS]) == 0
    lines = capsys.readouterr().out.splitlines()
    best = {r["id"]: remove_bpe(r["hypos"][0]["text"]) for r in expected_generate["beam_lenpen0.6"]["batch"]}
    assert lines == [best[i] for i in range(len(source.splitlines()))]


def test_sentences_and_nbest(reference_dir, expected_generate, capsys):
    sentences = (reference_dir / "test.src").read_text().splitlines()[:2]
    assert (
        run(
            [
                "translate",
                *sentences,
                "--model",
                str(reference_dir),
                "--batch-size",
                "1",
                "--nbest",
                "2",
                *FIXTURE_FLAGS,
            ]
        )
        == 0
    )
    lines = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    single = {r["id"]: r["hypos"] for r in expected_generate["beam_lenpen0.6_single"]}
    want = [(str(i), single[i][k]) for i in range(2) for k in range(2)]
    assert [(index, text) for index, _, text in lines] == [(i, remove_bpe(h["text"])) for i, h in want]
    assert [float(score) for _, score, _ in lines] == pytest.approx([h["score"] for _, h in want], abs=1e-4)


def test_errors_go_to_stderr(reference_dir, tmp_path, capsys):
    assert run(["translate", "the of", "--model", str(reference_dir), "--beam", "2", "--nbest", "3"]) == 2
    assert "nbest must be in [1, beam_size=2]" in capsys.readouterr().err
    assert run(["translate", "the of", "--model", str(tmp_path)]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
