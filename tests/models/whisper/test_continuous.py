"""Continuous batching (``continuous.py``): decoder slots refilled the step their window ends.

On CPU the graph engine runs without graphs (the kernels' PyTorch references). The references are independent
of the slot scheduler: the eager engine's lockstep transcripts (equal to openai-whisper's, test_transcribe.py)
and openai-whisper's own logit filters, applied one row at a time.
"""

from __future__ import annotations

import copy

import pytest
import torch
from whisper_references import long_form

from turboformer.models.whisper.continuous import Window, decode_continuous
from turboformer.models.whisper.decoding import (
    ApplyTimestampRules,
    DecodingOptions,
    SuppressBlank,
)
from turboformer.models.whisper.graph_engine import EngineOptions, GraphEngine
from turboformer.models.whisper.transcribe import TranscribeOptions, transcribe_batch


def _engine(model, device="cpu", **options):
    options = {"dtype": torch.float32, "cuda_graphs": False, "buckets": (1, 2, 4)} | options
    return GraphEngine(copy.deepcopy(model.model).float(), EngineOptions(**options), device)


def _segments(results):
    return [[(s.tokens, s.start, s.end, s.temperature) for s in r.segments] for r in results]


class _Counting:
    """Wraps an engine and counts its calls (and the rows of each)."""

    def __init__(self, engine):
        self.engine, self.calls = engine, {}

    def __getattr__(self, name):
        attribute = getattr(self.engine, name)
        if name not in ("encode", "start", "prefill", "step", "start_slots", "prefill_slots", "step_slots"):
            return attribute

        def counted(*args, **kwargs):
            rows = args[0] if isinstance(args[0], int) else len(args[0])
            calls, total = self.calls.get(name, (0, 0))
            self.calls[name] = (calls + 1, total + rows)
            return attribute(*args, **kwargs)

        return counted


def test_row_filters_equal_openai_row_by_row(tiny_en):
    """apply_rows on rows that sampled 0..9 tokens == openai-whisper's filters on each row alone."""
    import whisper.decoding  # here, not at the top: the GPU machine has no openai-whisper for the CUDA tests
    import whisper.tokenizer

    reference_tokenizer = whisper.tokenizer.get_tokenizer(multilingual=False)
    special = tiny_en.tokenizer.special
    assert (reference_tokenizer.timestamp_begin, reference_tokenizer.eot) == (special.timestamp_begin, special.eot)
    generator = torch.Generator().manual_seed(0)
    counts = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 9, 9, 2, 1])
    n_vocab, width, sample_begin = tiny_en.config.n_vocab, int(counts.max()), 3
    # histories mixing text and (mostly increasing) timestamps, padded with junk past each row's count
    text = torch.randint(0, special.eot, (len(counts), width), generator=generator)
    stamps = special.timestamp_begin + torch.randint(0, 40, (len(counts), width), generator=generator).cummax(1)[0]
    sampled = torch.where(torch.rand(len(counts), width, generator=generator) < 0.5, stamps, text)
    logits = torch.randn(len(counts), n_vocab, generator=generator) * 3
    logits[:, special.timestamp_begin :] += 4  # so the "timestamps win" rule fires on some rows
    banned = {}
    for name, ours, reference in (
        ("timestamps", ApplyTimestampRules(tiny_en.tokenizer, sample_begin, 50),
         whisper.decoding.ApplyTimestampRules(reference_tokenizer, sample_begin, 50)),
        ("blank", SuppressBlank(tiny_en.tokenizer, sample_begin),
         whisper.decoding.SuppressBlank(reference_tokenizer, sample_begin)),
    ):  # fmt: skip
        rows = logits.clone()
        ours.apply_rows(rows, sampled, counts)
        for r, n in enumerate(counts.tolist()):
            alone = logits[r : r + 1].clone()
            prompt = torch.full((1, sample_begin), special.sot)
            reference.apply(alone, torch.cat([prompt, sampled[r : r + 1, :n]], dim=1))
            torch.testing.assert_close(rows[r : r + 1], alone, rtol=0, atol=0)
        banned[name] = torch.isinf(rows).sum(dim=1).tolist()
    assert len(set(banned["timestamps"])) >= 5  # the rows took different rules
    assert [b > 0 for b in banned["blank"]] == [n == 0 for n in counts.tolist()]


def test_continuous_equals_lockstep_on_real_speech(tiny_en, librivox, cards):
    """10 clips and a 40 s file (two windows, seeking past silence) through 3 slots: the eager engine's lockstep
    segments, timestamps included, in fewer decode steps than lockstep batches of 3 files need."""
    clips = [a for _, a, _ in librivox + cards] + [long_form([a for _, a, _ in librivox], repeats=1)]
    options = TranscribeOptions(batch_size=3)
    expected = transcribe_batch(tiny_en.engine, tiny_en.tokenizer, clips, options)
    continuous = _Counting(_engine(tiny_en))
    got = transcribe_batch(continuous, tiny_en.tokenizer, clips, options)
    assert _segments(got) == _segments(expected)
    assert [r.text for r in got] == [r.text for r in expected]
    assert sum(len(r.segments) for r in got[-1:]) >= 5 and got[-1].segments[-1].start > 30  # two windows
    lockstep = _Counting(_engine(tiny_en))
    off = TranscribeOptions(batch_size=3, continuous_batching=False)
    again = transcribe_batch(lockstep, tiny_en.tokenizer, clips, off)
    assert _segments(again) == _segments(expected)
    assert "step" not in continuous.calls and "step_slots" not in lockstep.calls
    steps, rows = continuous.calls["step_slots"], lockstep.calls["step"]
    print(f"\ndecode steps: continuous {steps[0]}, lockstep {rows[0]}")
    assert steps[0] < rows[0]


def test_fallback_retries_stay_in_their_slot(tiny_en, librivox):
    """A window that fails the thresholds is prefilled again at the next temperature without being re-encoded;
    the last temperature's result is kept when every one fails."""
    clips = [a for _, a, _ in librivox[:3]]
    engine = _Counting(_engine(tiny_en))
    options = TranscribeOptions(batch_size=2, temperature=(0.0, 0.4, 0.8), logprob_threshold=0.0, seed=0)
    results = transcribe_batch(engine, tiny_en.tokenizer, clips, options)
    assert engine.calls["start_slots"][1] == 3  # three windows encoded once each
    assert engine.calls["prefill_slots"][1] == 9  # and decoded at the three temperatures
    assert all(s.temperature == 0.8 for r in results for s in r.segments)
    assert all(r.text.strip() for r in results)


def test_beams_and_the_off_switch_decode_in_lockstep(tiny_en, librivox):
    clips = [a for _, a, _ in librivox[:2]]
    for options in (TranscribeOptions(temperature=(0.0,), beam_size=2), TranscribeOptions(continuous_batching=False)):
        engine = _Counting(_engine(tiny_en))
        transcribe_batch(engine, tiny_en.tokenizer, clips, options)
        assert "step_slots" not in engine.calls and engine.calls["step"][0] > 0


def test_decode_continuous_rejects_what_it_cannot_do(tiny_en):
    engine = _engine(tiny_en, buckets=(2,))
    args = (lambda k: [], lambda w, r: None, lambda r: False)
    with pytest.raises(ValueError, match="no beam_size or best_of"):
        decode_continuous(engine, tiny_en.tokenizer, DecodingOptions(beam_size=2), (0.0,), 2, *args)
    with pytest.raises(ValueError, match="slots must be in 1..2"):
        decode_continuous(engine, tiny_en.tokenizer, DecodingOptions(), (0.0,), 3, *args)
    with pytest.raises(ValueError, match="slots"):
        engine.start_slots(torch.zeros(1, 1500, 384), [2])
    assert decode_continuous(engine, tiny_en.tokenizer, DecodingOptions(), (0.0,), 2, *args) == 0  # nothing to do
    # a row that ended at the context's last column stays there while its slot idles inside a bucket
    last = tiny_en.config.n_text_ctx - 1
    engine.pos[:2] = torch.tensor([last, 5])
    engine.feed_slots(torch.tensor([0, 1]), torch.tensor([7, 8]))
    assert engine.pos[:2].tolist() == [last, 6] and engine.tokens[:2].tolist() == [7, 8]


def test_windows_carry_their_own_prompt_and_language(tiny_en, librivox):
    """decode_continuous directly: one window with a previous-text prompt, one without, in two slots; each
    result equals lockstep decoding of that window alone with the same prompt."""
    from turboformer.audio import log_mel_spectrogram, pad_or_trim
    from turboformer.models.whisper.decoding import decode

    mels = [pad_or_trim(log_mel_spectrogram(a, 80), 3000) for _, a, _ in librivox[:2]]
    prompt = tiny_en.tokenizer.encode(" Sense and Sensibility, by Jane Austen.")
    windows = [Window(mels[0], prompt, "en", owner=0), Window(mels[1], [], "en", owner=1)]
    results = {}
    decode_continuous(
        _engine(tiny_en), tiny_en.tokenizer, DecodingOptions(), (0.0,), 2,
        lambda k: [windows.pop(0) for _ in range(min(k, len(windows)))],
        lambda w, r: results.__setitem__(w.owner, r), lambda r: False,
    )  # fmt: skip
    for i, p in enumerate((prompt, None)):
        features = tiny_en.engine.encode(mels[i][None])
        alone = decode(tiny_en.engine, tiny_en.tokenizer, features, DecodingOptions(prompt=p))
        assert results[i].tokens == alone[0].tokens
        assert results[i].avg_logprob == pytest.approx(alone[0].avg_logprob, abs=1e-4)
        assert results[i].no_speech_prob == pytest.approx(alone[0].no_speech_prob, abs=1e-4)


@pytest.mark.cuda
@pytest.mark.parametrize("quantize", [None, "int8"])
def test_gpu_continuous_equals_lockstep(quantize, tiny_en, librivox, cards, capsys):
    """fp16 (and INT8) graphs on the GPU: continuous batching through 4 slots against lockstep batches of 4 on
    the same engine; the buckets differ as slots empty, so allow one near-tie among the 11 files."""
    clips = [a for _, a, _ in librivox + cards] + [long_form([a for _, a, _ in librivox], repeats=1)]
    engine = _engine(tiny_en, "cuda", dtype=torch.float16, quantize=quantize, cuda_graphs=True, buckets=(1, 2, 4))
    texts = {}
    for continuous in (True, False):
        options = TranscribeOptions(batch_size=4, continuous_batching=continuous)
        texts[continuous] = [r.text for r in transcribe_batch(engine, tiny_en.tokenizer, clips, options)]
    same = sum(a == b for a, b in zip(texts[True], texts[False]))
    with capsys.disabled():
        print(f"\ncontinuous vs lockstep ({quantize or 'fp16'}): {same}/{len(clips)} transcripts equal")
    assert same >= len(clips) - 1


def test_multilingual_model_detects_then_decodes_continuously(base, librivox):
    """The multilingual base model: language detection (a lockstep prefill over the same cache rows) runs first,
    then the windows decode through 2 slots with the detected language: the eager engine's segments."""
    clips = [librivox[1][1], librivox[4][1]]
    engine = _Counting(_engine(base, buckets=(1, 2)))
    options = TranscribeOptions(batch_size=2, temperature=(0.0,))
    expected = transcribe_batch(base.engine, base.tokenizer, clips, options)
    got = transcribe_batch(engine, base.tokenizer, clips, options)
    assert _segments(got) == _segments(expected)
    assert [r.language for r in got] == [r.language for r in expected] == ["en", "en"]
    assert engine.calls["prefill"][0] == 1 and engine.calls["step_slots"][0] > 0  # detection, then slots
