"""Decoding one 30 s window per row: Whisper's prompt layout, timestamp rules and language detection.

Semantics follow openai-whisper's ``decoding.py`` (``DecodingTask``); the tests compare with it token for token.
Unlike the reference, rows of one batch may carry different prompts (and languages): shorter prompts are
left-padded, so every row writes the same cache columns and the padding is masked out of attention. Each row
therefore decodes exactly as it would alone.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from turboformer.decoding import (
    BeamSearchDecoder,
    GreedyDecoder,
    LogitFilter,
    MaximumLikelihoodRanker,
    SuppressTokens,
    TokenDecoder,
)
from turboformer.models.whisper.tokenizer import LANGUAGES, WhisperTokenizer

TASKS = ("transcribe", "translate")


@dataclass(frozen=True)
class DecodingOptions:
    task: str = "transcribe"  # or "translate" (X -> English)
    language: str | None = None  # None: detect (multilingual models); English-only models use "en"
    temperature: float = 0.0
    sample_len: int | None = None  # max tokens to sample; None: n_text_ctx // 2
    best_of: int | None = None  # independent samples when temperature > 0
    beam_size: int | None = None  # beams when temperature == 0; None: greedy
    patience: float | None = None
    length_penalty: float | None = None  # None: divide by length; alpha: ((5 + n) / 6) ** alpha
    prompt: str | Sequence[int] | None = None  # previous text (after <|startofprev|>)
    prefix: str | Sequence[int] | None = None  # forced start of the current text
    suppress_tokens: str | Sequence[int] | None = "-1"  # "-1": the non-speech symbols
    suppress_blank: bool = True
    without_timestamps: bool = False
    max_initial_timestamp: float | None = 1.0  # seconds
    seed: int | None = None  # sampling seed (temperature > 0)

    def validate(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.beam_size is not None and self.best_of is not None and self.temperature == 0:
            raise ValueError("best_of applies to sampling (temperature > 0), beam_size to temperature 0")
        if self.temperature == 0 and self.best_of is not None:
            raise ValueError("best_of with temperature 0 would give the same sample best_of times")
        if self.patience is not None and self.beam_size is None:
            raise ValueError("patience requires beam_size")
        if self.length_penalty is not None and not 0 <= self.length_penalty <= 1:
            raise ValueError("length_penalty (alpha) must be between 0 and 1")
        if self.language is not None and self.language not in LANGUAGES:
            raise ValueError(f"unknown language {self.language!r}")


@dataclass(frozen=True)
class DecodingResult:
    language: str
    tokens: tuple[int, ...]  # sampled tokens, timestamps included, without the prompt and the final eot
    text: str
    avg_logprob: float
    no_speech_prob: float
    temperature: float
    compression_ratio: float
    language_probs: dict[str, float] | None = None


def compression_ratio(text: str) -> float:
    """gzip-style compressibility of the text; repetitive hallucinations compress well (ratio > 2.4)."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


class SuppressBlank(LogitFilter):
    """No blank (or immediate end) as the first sampled token."""

    def __init__(self, tokenizer: WhisperTokenizer, sample_begin: int):
        self.suppress = torch.tensor(tokenizer.encode(" ") + [tokenizer.special.eot], dtype=torch.long)
        self.sample_begin = sample_begin

    def _ids(self, device: torch.device) -> torch.Tensor:
        """The banned ids where the logits are: moved once, then no host-to-device copy per call (so the per-row
        form can run inside a CUDA graph capture)."""
        if self.suppress.device != device:
            self.suppress = self.suppress.to(device)
        return self.suppress

    def apply(self, logits, tokens):
        if tokens.shape[1] == self.sample_begin:
            logits[:, self._ids(logits.device)] = -np.inf

    def apply_rows(self, logits, sampled, counts):
        """Per-row form (continuous batching): rows with no sampled token yet (counts [B] == 0)."""
        ids = self._ids(logits.device)
        first = (counts == 0).to(logits.device)[:, None]
        logits[:, ids] = logits[:, ids].masked_fill(first, -np.inf)


class ApplyTimestampRules(LogitFilter):
    """Timestamps come in pairs (start, end), never decrease, and win when their total mass beats any text token."""

    def __init__(self, tokenizer: WhisperTokenizer, sample_begin: int, max_initial_timestamp_index: int | None):
        self.special = tokenizer.special
        self.sample_begin = sample_begin
        self.max_initial_timestamp_index = max_initial_timestamp_index

    def apply(self, logits, tokens):
        """Vectorised over rows (no host round trip), so it runs where the logits are, GPU included."""
        sampled = tokens[:, self.sample_begin :]
        counts = torch.full((tokens.shape[0],), sampled.shape[1], dtype=torch.long, device=tokens.device)
        self.apply_rows(logits, sampled, counts)

    def apply_rows(self, logits, sampled, counts):
        """The rules for rows that sampled different numbers of tokens (continuous batching).

        sampled [B, n]: each row's sampled tokens, left-aligned; counts [B]: how many of them are real (the rest is
        padding). A row with counts 0 gets the first-token rules, the others the rules on their own history.
        """
        begin, eot = self.special.timestamp_begin, self.special.eot
        device = logits.device
        sampled, counts = sampled.to(device), counts.to(device)
        logits[:, self.special.no_timestamps] = -np.inf
        vocab = torch.arange(logits.shape[1], device=device)[None, :]  # [1, V]
        n = sampled.shape[1]
        if n >= 1:
            position = torch.arange(n, device=device)
            is_stamp = (sampled >= begin) & (position[None, :] < counts[:, None])  # [B, n], padding excluded
            last_was = (counts >= 1) & is_stamp.gather(1, (counts - 1).clamp(min=0)[:, None])[:, 0]
            penultimate = is_stamp.gather(1, (counts - 2).clamp(min=0)[:, None])[:, 0]
            penultimate_was = torch.where(counts >= 2, penultimate, torch.ones_like(penultimate))
            # a pair just closed: text (or eot) next; an opening timestamp: its closing one next
            logits.masked_fill_((last_was & penultimate_was)[:, None] & (vocab >= begin), -np.inf)
            logits.masked_fill_((last_was & ~penultimate_was)[:, None] & (vocab < eot), -np.inf)
            # no going back in time, and every segment has a nonzero length
            last_index = torch.where(is_stamp, position, -1).max(dim=1).values  # [B], -1: no timestamp yet
            last_stamp = sampled.gather(1, last_index.clamp(min=0)[:, None])[:, 0]
            bound = torch.where(last_was & ~penultimate_was, last_stamp, last_stamp + 1)
            banned = (vocab >= begin) & (vocab < bound[:, None]) & (last_index >= 0)[:, None]
            logits.masked_fill_(banned, -np.inf)
        first = (counts == 0)[:, None]  # the first sampled token is a timestamp
        logits.masked_fill_(first & (vocab < begin), -np.inf)
        if self.max_initial_timestamp_index is not None:
            logits.masked_fill_(first & (vocab > begin + self.max_initial_timestamp_index), -np.inf)
        logprobs = F.log_softmax(logits.float(), dim=-1)
        timestamp_logprob = logprobs[:, begin:].logsumexp(dim=-1)
        max_text_logprob = logprobs[:, :begin].max(dim=-1).values
        logits.masked_fill_((timestamp_logprob > max_text_logprob)[:, None] & (vocab < begin), -np.inf)


def suppress_token_ids(tokenizer: WhisperTokenizer, suppress_tokens) -> tuple[int, ...]:
    if isinstance(suppress_tokens, str):
        suppress_tokens = [int(t) for t in suppress_tokens.split(",") if t.strip()]
    ids = [t for t in (suppress_tokens or []) if t >= 0]
    if suppress_tokens and -1 in suppress_tokens:
        ids.extend(tokenizer.non_speech_tokens())
    s = tokenizer.special
    ids.extend([s.transcribe, s.translate, s.sot, s.sot_prev, s.sot_lm, s.no_speech])
    return tuple(sorted(set(ids)))


def _text_tokens(tokenizer: WhisperTokenizer, text: str | Sequence[int]) -> list[int]:
    return tokenizer.encode(" " + text.strip()) if isinstance(text, str) else list(text)


@torch.inference_mode()
def detect_language(engine, tokenizer: WhisperTokenizer, audio_features: torch.Tensor) -> list[dict[str, float]]:
    """Per row, the probability of each language code from the logits after <|startoftranscript|>."""
    if not tokenizer.multilingual:
        return [{"en": 1.0} for _ in range(audio_features.shape[0])]
    n = audio_features.shape[0]
    tokens = torch.full((n, 1), tokenizer.special.sot, dtype=torch.long)
    engine.start(audio_features, 1, torch.zeros(n, dtype=torch.long))
    logits, _ = engine.prefill(tokens, torch.zeros(n, dtype=torch.long))
    logits = logits.cpu()
    language_ids = torch.tensor(tokenizer.special.language_tokens)
    probs = logits[:, language_ids].float().softmax(dim=-1)
    codes = list(LANGUAGES)[: len(language_ids)]
    return [dict(zip(codes, row.tolist())) for row in probs]


class DecodingTask:
    """Decode a batch of windows whose audio features are computed; one options object, per-row prompts."""

    def __init__(self, engine, tokenizer: WhisperTokenizer, options: DecodingOptions):
        options.validate()
        if options.language not in (None, "en") and not tokenizer.multilingual:
            raise ValueError(f"this model is English-only; it cannot decode language {options.language!r}")
        if options.task == "translate" and not tokenizer.multilingual:
            raise ValueError("this model is English-only; it cannot translate")
        self.engine, self.tokenizer, self.options = engine, tokenizer, options
        self.n_ctx = engine.config.n_text_ctx
        self.sample_len = options.sample_len or self.n_ctx // 2
        self.n_group = options.beam_size or options.best_of or 1

    def initial_tokens(self, prompt, language: str) -> list[int]:
        o, tok = self.options, self.tokenizer
        tokens = list(tok.sot_sequence(language if tok.multilingual else None, o.task))
        if o.without_timestamps:
            tokens.append(tok.special.no_timestamps)
        if o.prefix:
            prefix = _text_tokens(tok, o.prefix)
            if o.sample_len is not None:  # leave room for sample_len new tokens in the first half of the context
                prefix = prefix[-(self.n_ctx // 2 - o.sample_len) :]
            tokens += prefix
        if prompt:
            tokens = [tok.special.sot_prev] + _text_tokens(tok, prompt)[-(self.n_ctx // 2 - 1) :] + tokens
        return tokens

    def _decoder(self) -> TokenDecoder:
        o = self.options
        if o.beam_size is not None:
            return BeamSearchDecoder(o.beam_size, self.tokenizer.special.eot, self.engine.reorder, o.patience or 1.0)
        generator = None
        if o.seed is not None:
            generator = torch.Generator().manual_seed(o.seed)
        return GreedyDecoder(o.temperature, self.tokenizer.special.eot, generator)

    def logit_filters(self, sample_begin: int) -> list[LogitFilter]:
        o, filters = self.options, []
        if o.suppress_blank:
            filters.append(SuppressBlank(self.tokenizer, sample_begin))
        if o.suppress_tokens:
            filters.append(SuppressTokens(suppress_token_ids(self.tokenizer, o.suppress_tokens)))
        if not o.without_timestamps:
            max_index = None
            if o.max_initial_timestamp:
                max_index = round(o.max_initial_timestamp / 0.02)  # 20 ms per timestamp token
            filters.append(ApplyTimestampRules(self.tokenizer, sample_begin, max_index))
        return filters

    @torch.inference_mode()
    def run(
        self, audio_features: torch.Tensor, prompts: Sequence | None = None, languages: Sequence[str] | None = None
    ) -> list[DecodingResult]:
        """audio_features [n_audio, 1500, C]; prompts/languages per row override the options' ones."""
        tok, o = self.tokenizer, self.options
        n_audio = audio_features.shape[0]
        prompts = list(prompts) if prompts is not None else [o.prompt] * n_audio
        language_probs = [None] * n_audio
        if languages is None:
            if o.language is None and tok.multilingual:
                language_probs = detect_language(self.engine, tok, audio_features)
                languages = [max(p, key=p.get) for p in language_probs]
            else:
                languages = [o.language or "en"] * n_audio
        rows = [self.initial_tokens(p, lang) for p, lang in zip(prompts, languages)]

        # left-pad to a common length: every row writes the same cache columns
        width = max(len(r) for r in rows)
        pads = [width - len(r) for r in rows]
        tokens = torch.tensor([[tok.special.eot] * p + r for p, r in zip(pads, rows)], dtype=torch.long)
        g = self.n_group
        tokens = tokens.repeat_interleave(g, dim=0)
        pad_rows = torch.tensor(pads).repeat_interleave(g)
        sot_rows = torch.tensor([p + r.index(tok.special.sot) for p, r in zip(pads, rows)]).repeat_interleave(g)
        self.engine.start(audio_features, g, pad_rows)

        decoder = self._decoder()
        decoder.reset()
        filters = self.logit_filters(width)
        logits, at_sot = self.engine.prefill(tokens, sot_rows)
        no_speech_probs = at_sot.float().softmax(dim=-1)[::g, tok.special.no_speech].tolist()
        # the loop runs where the engine's logits are: on a GPU engine no logits cross to the host
        device = logits.device
        tokens, pad_rows = tokens.to(device), pad_rows.to(device)
        sum_logprobs = torch.zeros(tokens.shape[0], device=device)
        for i in range(self.sample_len):
            if i > 0:  # the new token of every row, at its own position (its column minus its padding)
                logits = self.engine.step(tokens[:, -1], tokens.shape[1] - 1 - pad_rows)
            logits = logits.float()
            for f in filters:
                f.apply(logits, tokens)
            tokens, completed = decoder.update(tokens, logits, sum_logprobs)
            if completed or tokens.shape[-1] > self.n_ctx:
                break

        tokens, sum_logprobs = tokens.cpu(), sum_logprobs.cpu()
        candidates, scores = decoder.finalize(tokens.reshape(n_audio, g, -1), sum_logprobs.reshape(n_audio, g))
        eot = tok.special.eot
        candidates = [[t[width : _first(t, eot, width)] for t in group] for group in candidates]
        chosen = MaximumLikelihoodRanker(o.length_penalty).rank(candidates, scores)
        results = []
        for k in range(n_audio):
            best, score = candidates[k][chosen[k]].tolist(), scores[k][chosen[k]]
            probs = language_probs[k]
            results.append(window_result(tok, languages[k], best, score, no_speech_probs[k], o.temperature, probs))
        return results


def window_result(
    tokenizer: WhisperTokenizer, language: str, tokens: list[int], sum_logprob: float, no_speech_prob: float,
    temperature: float, language_probs: dict | None = None,
) -> DecodingResult:  # fmt: skip
    """One window's result: tokens without the final eot; the mean log-probability counts that eot."""
    text = tokenizer.decode(tokens).strip()
    return DecodingResult(
        language=language,
        tokens=tuple(tokens),
        text=text,
        avg_logprob=sum_logprob / (len(tokens) + 1),
        no_speech_prob=no_speech_prob,
        temperature=temperature,
        compression_ratio=compression_ratio(text),
        language_probs=language_probs,
    )


def _first(sequence: torch.Tensor, value: int, start: int) -> int:
    hits = (sequence[start:] == value).nonzero()
    return start + int(hits[0, 0]) if len(hits) else len(sequence)


def decode(engine, tokenizer, audio_features, options: DecodingOptions = DecodingOptions(), **per_row):
    """Decode windows [n_audio, 1500, C] with one set of options."""
    return DecodingTask(engine, tokenizer, options).run(audio_features, **per_row)


def with_temperature(options: DecodingOptions, temperature: float) -> DecodingOptions:
    """The reference's fallback rule: sampling drops beam settings, temperature 0 drops best_of."""
    if temperature > 0:
        return replace(options, temperature=temperature, beam_size=None, patience=None)
    return replace(options, temperature=temperature, best_of=None)
