"""Golden end-to-end transcription on real speech with the real tiny.en and base weights.

References: openai-whisper's ``transcribe``/``decode`` (the semantics we follow for timestamps, long-form
seeking, fallback and beam search) and Hugging Face ``generate`` (greedy, no timestamps), on the same weights.
"""

from __future__ import annotations

import jiwer
import numpy as np
import pytest
import torch
import whisper
from whisper.normalizers import EnglishTextNormalizer
from whisper_references import hf_model, long_form

from turboformer.audio import log_mel_spectrogram, pad_or_trim
from turboformer.models.whisper.decoding import DecodingOptions, decode, detect_language
from turboformer.models.whisper.transcribe import TranscribeOptions, needs_fallback

GREEDY = dict(temperature=(0.0,))  # no sampling, so the reference is deterministic too


def _segments_equal(ours, reference: dict):
    assert ours.text == reference["text"]
    assert len(ours.segments) == len(reference["segments"])
    for a, b in zip(ours.segments, reference["segments"]):
        assert a.tokens == tuple(b["tokens"]) and a.text == b["text"]
        assert a.start == pytest.approx(b["start"], abs=1e-6) and a.end == pytest.approx(b["end"], abs=1e-6)
        assert a.avg_logprob == pytest.approx(b["avg_logprob"], abs=1e-3)
        assert a.no_speech_prob == pytest.approx(b["no_speech_prob"], abs=1e-3)


def test_tiny_en_wer_on_librivox(tiny_en, librivox):
    results = tiny_en.transcribe([audio for _, audio, _ in librivox])
    normalize = EnglishTextNormalizer()
    hyps = [normalize(r.text) for r in results]
    refs = [normalize(ref) for _, _, ref in librivox]
    wer = jiwer.wer(refs, hyps)
    assert wer <= 0.05, (wer, hyps)


def test_transcripts_equal_hugging_face_generate(tiny_en, tiny_en_checkpoint, librivox, cards, goforward):
    """Greedy text-only decoding equals transformers' generate() with the model's suppression lists."""
    from transformers import GenerationConfig

    tok, special, extra = tiny_en.tokenizer, tiny_en.tokenizer.special, tiny_en_checkpoint.extra
    reference = hf_model(tiny_en_checkpoint.config, tiny_en_checkpoint.state_dict)
    reference.generation_config = GenerationConfig(
        decoder_start_token_id=special.sot, eos_token_id=special.eot, pad_token_id=special.eot,
        bos_token_id=special.eot, suppress_tokens=list(extra["suppress_ids"]),
        begin_suppress_tokens=list(extra["suppress_ids_begin"]), no_timestamps_token_id=special.no_timestamps,
        max_length=448, is_multilingual=False,
    )
    clips = [audio for _, audio, _ in librivox + cards] + [goforward]
    mel = torch.stack([pad_or_trim(log_mel_spectrogram(a, 80), 3000) for a in clips])
    with torch.no_grad():
        generated = reference.generate(mel, return_timestamps=False)
    ours = tiny_en.transcribe(clips, without_timestamps=True, **GREEDY)
    for row, result in zip(generated, ours):
        assert result.text == tok.decode(row.tolist())


def test_long_form_equals_openai_transcribe(tiny_en, openai_tiny_en, librivox):
    audio = long_form([a for _, a, _ in librivox])  # ~79 s: three windows with seeking
    assert len(audio) / 16000 > 60
    ours = tiny_en.transcribe(audio, **GREEDY)
    reference = whisper.transcribe(openai_tiny_en, audio, temperature=0.0, fp16=False)
    _segments_equal(ours, reference)
    starts = [s.start for s in ours.segments]
    assert starts == sorted(starts) and all(s.end > s.start for s in ours.segments)
    assert ours.segments[-1].end <= len(audio) / 16000 + 0.02
    assert ours.segments[0].end <= 7.5 and ours.segments[1].start >= 9.5  # the first clip is 7.1 s, then 3 s of silence


def test_beam_search_with_patience_equals_openai(tiny_en, openai_tiny_en, librivox):
    audio = long_form([a for _, a, _ in librivox[:2]], repeats=1)
    ours = tiny_en.transcribe(audio, beam_size=4, patience=1.5, **GREEDY)
    reference = whisper.transcribe(openai_tiny_en, audio, temperature=0.0, beam_size=4, patience=1.5, fp16=False)
    _segments_equal(ours, reference)


@pytest.mark.parametrize(
    "options",
    [
        dict(beam_size=3, length_penalty=0.6, without_timestamps=True),
        dict(prompt="Mr. Dashwood, Marianne and Elinor.", prefix="And Mr."),
        dict(suppress_blank=False, suppress_tokens="", max_initial_timestamp=None),
    ],
    ids=["beam-lenpen", "prompt-prefix", "no-suppression"],
)
def test_decode_options_equal_openai(options, tiny_en, openai_tiny_en, librivox):
    mel = pad_or_trim(log_mel_spectrogram(librivox[0][1], 80), 3000)[None]
    ours = decode(tiny_en.engine, tiny_en.tokenizer, tiny_en.engine.encode(mel), DecodingOptions(**options))[0]
    reference = whisper.decode(openai_tiny_en, mel, whisper.DecodingOptions(fp16=False, language="en", **options))[0]
    assert ours.tokens == tuple(reference.tokens) and ours.text == reference.text
    assert ours.avg_logprob == pytest.approx(reference.avg_logprob, abs=1e-4)


def test_multilingual_base_detects_language_and_equals_openai(base, openai_base, librivox):
    audio = long_form([a for _, a, _ in librivox[3:]], repeats=1)
    ours = base.transcribe(audio, **GREEDY)
    reference = whisper.transcribe(openai_base, audio, temperature=0.0, fp16=False)
    assert ours.language == reference["language"] == "en"
    _segments_equal(ours, reference)
    mel = pad_or_trim(log_mel_spectrogram(audio, 80), 3000)[None]
    _, probs = openai_base.detect_language(mel)
    ours_probs = detect_language(base.engine, base.tokenizer, base.engine.encode(mel))[0]
    assert max(abs(ours_probs[k] - probs[0][k]) for k in probs[0]) < 1e-4


def test_translate_task_equals_openai(base, openai_base, librivox):
    mel = pad_or_trim(log_mel_spectrogram(librivox[2][1], 80), 3000)[None]
    options = dict(task="translate", language="fr")  # a forced source language makes translation do work
    ours = decode(base.engine, base.tokenizer, base.engine.encode(mel), DecodingOptions(**options))[0]
    reference = whisper.decode(openai_base, mel, whisper.DecodingOptions(fp16=False, **options))[0]
    assert ours.tokens == tuple(reference.tokens)


def test_batched_equals_one_by_one(tiny_en, librivox, cards, goforward):
    clips = [a for _, a, _ in librivox[:3] + cards[:2]] + [goforward, long_form([librivox[3][1]] * 3, 1)]
    options = TranscribeOptions(batch_size=4, initial_prompt="Sense and Sensibility.", **GREEDY)
    together = tiny_en.transcribe(clips, options)
    for clip, result in zip(clips, together):
        alone = tiny_en.transcribe(clip, options)
        assert [s.tokens for s in result.segments] == [s.tokens for s in alone.segments]
        assert [(s.start, s.end) for s in result.segments] == [(s.start, s.end) for s in alone.segments]


def test_goforward_raw_and_silence(tiny_en, goforward):
    normalize = EnglishTextNormalizer()  # "ten" and "10" normalize alike
    assert normalize(tiny_en.transcribe(goforward).text) == normalize("go forward ten meters")
    silent = tiny_en.transcribe(np.zeros(16000 * 12, np.float32))
    assert silent.text == "" and all(not s.text for s in silent.segments)


def test_fallback_rules():
    from turboformer.models.whisper.decoding import DecodingResult

    def result(ratio=1.5, logprob=-0.2, no_speech=0.1):
        return DecodingResult("en", (1,), "x", logprob, no_speech, 0.0, ratio)

    options = TranscribeOptions()
    assert not needs_fallback(result(), options)
    assert needs_fallback(result(ratio=3.0), options)  # repetitive
    assert needs_fallback(result(logprob=-1.5), options)  # unlikely
    assert not needs_fallback(result(logprob=-1.5, no_speech=0.9), options)  # silence: no retry


def test_temperature_fallback_reaches_sampling(tiny_en, librivox):
    """With a log-prob threshold no decode can meet, every temperature of the ladder is tried."""
    audio = librivox[1][1]
    result = tiny_en.transcribe(audio, temperature=(0.0, 0.5, 1.0), logprob_threshold=0.0, no_speech_threshold=None,
                                best_of=2, seed=3)
    assert {s.temperature for s in result.segments} == {1.0}
    again = tiny_en.transcribe(audio, temperature=(0.0, 0.5, 1.0), logprob_threshold=0.0, no_speech_threshold=None,
                               best_of=2, seed=3)
    assert again.text == result.text  # seeded sampling is reproducible
