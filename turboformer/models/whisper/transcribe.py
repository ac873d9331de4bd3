"""Long-form transcription: sequential 30 s windows that seek by the predicted timestamps.

Follows openai-whisper's ``transcribe()`` (Radford et al. 2022, Section 4.5): each window is decoded with a
temperature fallback (compression-ratio and log-probability thresholds, no-speech detection), segments are cut
at consecutive timestamp tokens, and the next window starts at the last complete segment's end. Many files are
transcribed in lockstep: every iteration decodes the current window of each unfinished file as one batch, with
each file's own prompt (left-padded), so a file's result does not depend on its batch mates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from turboformer.audio import (
    HOP_LENGTH,
    N_FRAMES,
    N_SAMPLES,
    SAMPLE_RATE,
    log_mel_spectrogram,
    pad_or_trim,
)
from turboformer.models.whisper.continuous import (
    Window,
    decode_continuous,
    supports_continuous,
)
from turboformer.models.whisper.decoding import (
    DecodingOptions,
    DecodingResult,
    DecodingTask,
    detect_language,
    with_temperature,
)
from turboformer.models.whisper.tokenizer import WhisperTokenizer

INPUT_STRIDE = 2  # mel frames per encoder frame
TIME_PRECISION = INPUT_STRIDE * HOP_LENGTH / SAMPLE_RATE  # 0.02 s per timestamp token


@dataclass(frozen=True)
class TranscribeOptions:
    """Options of ``transcribe``; the defaults are openai-whisper's."""

    task: str = "transcribe"
    language: str | None = None  # None: detected from the first 30 s (multilingual models)
    temperature: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)  # fallback ladder
    compression_ratio_threshold: float | None = 2.4
    logprob_threshold: float | None = -1.0
    no_speech_threshold: float | None = 0.6
    condition_on_previous_text: bool = True
    initial_prompt: str | None = None
    beam_size: int | None = None  # None: greedy
    best_of: int | None = None  # samples at temperature > 0
    patience: float | None = None
    length_penalty: float | None = None
    suppress_tokens: str = "-1"
    suppress_blank: bool = True
    without_timestamps: bool = False
    max_initial_timestamp: float = 1.0
    batch_size: int = 8  # files decoded together (decoder slots when batching continuously)
    # refill a decoder slot the step its window ends (GPU engine, greedy/sampling without best_of); False:
    # lockstep batches of windows that wait for their longest member. Transcripts are the same either way.
    continuous_batching: bool = True
    seed: int | None = 0  # sampling seed for temperature > 0 (None: nondeterministic)

    def decoding(self, language: str | None) -> DecodingOptions:
        return DecodingOptions(
            task=self.task,
            language=language,
            beam_size=self.beam_size,
            best_of=self.best_of,
            patience=self.patience,
            length_penalty=self.length_penalty,
            suppress_tokens=self.suppress_tokens,
            suppress_blank=self.suppress_blank,
            without_timestamps=self.without_timestamps,
            max_initial_timestamp=self.max_initial_timestamp,
            seed=self.seed,
        )


@dataclass(frozen=True)
class Segment:
    id: int
    seek: int  # mel frame where the window started
    start: float  # seconds
    end: float
    text: str
    tokens: tuple[int, ...]
    temperature: float
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float


@dataclass(frozen=True)
class Transcription:
    text: str
    language: str
    segments: tuple[Segment, ...]
    duration: float  # seconds of audio
    source: str = ""  # the file name, where there was one

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _FileState:
    """Where one file's transcription stands between windows."""

    mel: torch.Tensor  # [n_mels, content_frames + 3000]
    content_frames: int
    language: str | None
    language_probs: dict | None = None
    seek: int = 0
    all_tokens: list = field(default_factory=list)
    prompt_tokens: int = 0  # initial-prompt tokens at the start of all_tokens
    prompt_reset_since: int = 0
    segments: list = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.seek >= self.content_frames


def needs_fallback(result: DecodingResult, options: TranscribeOptions) -> bool:
    too_repetitive = (
        options.compression_ratio_threshold is not None
        and result.compression_ratio > options.compression_ratio_threshold
    )
    too_unlikely = options.logprob_threshold is not None and result.avg_logprob < options.logprob_threshold
    silent = (
        options.no_speech_threshold is not None
        and result.no_speech_prob > options.no_speech_threshold
        and too_unlikely
    )
    return (too_repetitive or too_unlikely) and not silent


def decode_with_fallback(engine, tokenizer, mel: torch.Tensor, prompts, languages, options: TranscribeOptions):
    """Decode windows [n, n_mels, 3000]; rows whose result fails the thresholds retry at the next temperature."""
    features = engine.encode(mel)
    results: list[DecodingResult | None] = [None] * len(prompts)
    pending = list(range(len(prompts)))
    for temperature in options.temperature:
        decoding = with_temperature(options.decoding(None), temperature)
        task = DecodingTask(engine, tokenizer, decoding)
        batch = task.run(features[pending], [prompts[i] for i in pending], [languages[i] for i in pending])
        still = []
        for i, result in zip(pending, batch):
            results[i] = result
            if needs_fallback(result, options):
                still.append(i)
        pending = still
        if not pending:
            break
    return results


def _segments_of_window(state: _FileState, result: DecodingResult, tokenizer, segment_frames: int) -> list[dict]:
    """Cut the window's tokens into segments at consecutive timestamps; advance ``state.seek``."""
    begin = tokenizer.special.timestamp_begin
    tokens = torch.tensor(result.tokens, dtype=torch.long)
    time_offset = state.seek * HOP_LENGTH / SAMPLE_RATE
    segments = []

    def segment(start, end, seg_tokens):
        seg_tokens = seg_tokens.tolist()
        text = tokenizer.decode([t for t in seg_tokens if t < tokenizer.special.eot])
        return dict(seek=state.seek, start=start, end=end, text=text, tokens=seg_tokens)

    is_timestamp = tokens.ge(begin)
    single_timestamp_ending = is_timestamp[-2:].tolist() == [False, True]
    consecutive = (torch.where(is_timestamp[:-1] & is_timestamp[1:])[0] + 1).tolist()
    if consecutive:
        slices = consecutive + ([len(tokens)] if single_timestamp_ending else [])
        last = 0
        for current in slices:
            piece = tokens[last:current]
            start = time_offset + (piece[0].item() - begin) * TIME_PRECISION
            end = time_offset + (piece[-1].item() - begin) * TIME_PRECISION
            segments.append(segment(start, end, piece))
            last = current
        if single_timestamp_ending:
            advance = segment_frames  # no speech left in the window
        else:
            advance = (tokens[last - 1].item() - begin) * INPUT_STRIDE  # restart at the last segment's end
    else:
        duration = segment_frames * HOP_LENGTH / SAMPLE_RATE
        stamps = tokens[is_timestamp]
        if len(stamps) > 0 and stamps[-1].item() != begin:
            duration = (stamps[-1].item() - begin) * TIME_PRECISION
        segments.append(segment(time_offset, time_offset + duration, tokens))
        advance = segment_frames
    for s in segments:  # an instantaneous or empty segment keeps its place but no text
        if s["start"] == s["end"] or not s["text"].strip():
            s["text"], s["tokens"] = "", []
    state.seek += advance
    return segments


def transcribe_batch(
    engine,
    tokenizer: WhisperTokenizer,
    audios: Sequence[np.ndarray],
    options: TranscribeOptions = TranscribeOptions(),
    names: Sequence[str] | None = None,
    progress: bool = False,
) -> list[Transcription]:
    """Transcribe 16 kHz mono float32 signals of any length, in lockstep batches of windows."""
    if options.language is not None and not tokenizer.multilingual and options.language != "en":
        raise ValueError(f"this model is English-only; it cannot transcribe language {options.language!r}")
    n_mels = engine.config.n_mels
    states = []
    for audio in audios:
        # computed where the engine runs (on the H200 the CPU's STFT was a quarter of a 32-file transcription's
        # time), kept on the host: a spectrogram is 115 MB per hour of audio; only the current window moves
        mel = log_mel_spectrogram(audio, n_mels, padding=N_SAMPLES, device=engine.device).cpu()
        state = _FileState(mel, mel.shape[-1] - N_FRAMES, options.language if tokenizer.multilingual else "en")
        if options.initial_prompt:
            state.all_tokens = tokenizer.encode(" " + options.initial_prompt.strip())
            state.prompt_tokens = len(state.all_tokens)
        states.append(state)

    # files per iteration: the batch size, within the engine's largest batch bucket (rows = files x beams)
    group = max(options.beam_size or 1, options.best_of or 1)
    capacity = getattr(engine, "max_rows", None)
    per_step = options.batch_size if capacity is None else max(1, min(options.batch_size, capacity // group))
    if capacity is not None and group > capacity:
        raise ValueError(f"{group} beams/samples per file exceed the engine's largest batch bucket ({capacity})")
    total_frames = sum(s.content_frames for s in states)
    bar = tqdm(total=total_frames, unit="frames", disable=not progress, desc="transcribe", leave=False)
    # languages from each file's first window, batched
    unknown = [s for s in states if s.language is None]
    for i in range(0, len(unknown), per_step):
        first_windows = unknown[i : i + per_step]
        mel = torch.stack([pad_or_trim(s.mel, N_FRAMES) for s in first_windows])
        for state, probs in zip(first_windows, detect_language(engine, tokenizer, engine.encode(mel))):
            state.language, state.language_probs = max(probs, key=probs.get), probs

    def record(state: _FileState, result: DecodingResult, size: int) -> None:
        before = state.seek
        _apply_window(state, result, size, tokenizer, options)
        bar.update(min(state.content_frames, state.seek) - before)

    single_row = options.beam_size is None and options.best_of is None
    if options.continuous_batching and single_row and supports_continuous(engine):
        _transcribe_continuous(engine, tokenizer, states, options, per_step, record)
    while True:  # lockstep (everything left when batching continuously: nothing)
        active = [s for s in states if not s.done][:per_step]
        if not active:
            break
        sizes = [_window_size(s) for s in active]
        mel = torch.stack([_window_mel(s, n) for s, n in zip(active, sizes)])
        prompts = [s.all_tokens[s.prompt_reset_since :] for s in active]
        results = decode_with_fallback(engine, tokenizer, mel, prompts, [s.language for s in active], options)
        for state, result, size in zip(active, results, sizes):
            record(state, result, size)
    bar.close()

    names = list(names) if names is not None else [""] * len(states)
    return [
        Transcription(
            text=tokenizer.decode(s.all_tokens[s.prompt_tokens :]),
            language=s.language,
            segments=tuple(s.segments),
            duration=s.content_frames * HOP_LENGTH / SAMPLE_RATE,
            source=name,
        )
        for s, name in zip(states, names)
    ]


def _window_size(state: _FileState) -> int:
    """Mel frames of content in the file's current window (its seek moves only when the window's result lands)."""
    return min(N_FRAMES, state.content_frames - state.seek)


def _window_mel(state: _FileState, size: int) -> torch.Tensor:
    return pad_or_trim(state.mel[:, state.seek : state.seek + size], N_FRAMES)


def _apply_window(state: _FileState, result: DecodingResult, size: int, tokenizer, options: TranscribeOptions) -> None:
    """A window's final result into its file: segments and tokens, the next seek, the prompt reset."""
    if _is_silence(result, options):
        state.seek += size
        return
    for s in _segments_of_window(state, result, tokenizer, size):
        state.segments.append(
            Segment(
                id=len(state.segments),
                temperature=result.temperature,
                avg_logprob=result.avg_logprob,
                compression_ratio=result.compression_ratio,
                no_speech_prob=result.no_speech_prob,
                **{**s, "tokens": tuple(s["tokens"])},
            )
        )
        state.all_tokens.extend(s["tokens"])
    if not options.condition_on_previous_text or result.temperature > 0.5:
        state.prompt_reset_since = len(state.all_tokens)


def _transcribe_continuous(engine, tokenizer, states: list[_FileState], options: TranscribeOptions, slots: int, record):
    """Every file's windows through ``decode_continuous``: a file's next window waits for its previous one
    (its seek and prompt come from that result); among the files ready, the one with most audio left goes
    first, so the longest file does not start last."""
    ready = [s for s in states if not s.done]

    def take(k: int) -> list[Window]:
        ready.sort(key=lambda s: s.content_frames - s.seek, reverse=True)
        chosen, ready[:] = ready[:k], ready[k:]
        return [
            Window(_window_mel(s, _window_size(s)), s.all_tokens[s.prompt_reset_since :], s.language, owner=s)
            for s in chosen
        ]

    def finish(window: Window, result: DecodingResult) -> None:
        state = window.owner
        record(state, result, _window_size(state))
        if not state.done:
            ready.append(state)

    decoding = options.decoding(None)  # temperature 0 here; each window's row carries its own temperature
    def needs(result: DecodingResult) -> bool:
        return needs_fallback(result, options)

    decode_continuous(engine, tokenizer, decoding, options.temperature, slots, take, finish, needs)


def _is_silence(result: DecodingResult, options: TranscribeOptions) -> bool:
    """The reference skips a window judged silent unless the text is likely enough."""
    if options.no_speech_threshold is None:
        return False
    silent = result.no_speech_prob > options.no_speech_threshold
    if options.logprob_threshold is not None and result.avg_logprob > options.logprob_threshold:
        silent = False
    return silent

