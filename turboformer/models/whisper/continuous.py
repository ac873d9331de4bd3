"""Continuous batching: decoder slots that are refilled the step their window ends.

Lockstep decoding (``DecodingTask``) decodes one window of each of B files together and waits for the longest
of them: a batch of one 3-token window and one 200-token window costs 200 steps of B rows. Here the engine's
cache rows are B *slots*. Each holds one window (a file's current 30 s window at one fallback temperature) at
its own position; after every decode step the slots whose sequence ended (end of text, ``sample_len`` tokens or
the end of the context) are finalized and refilled at once with the next waiting window, whose encoder output
and cross-attention K/V are computed as it enters (a window retried at the next fallback temperature keeps the
cross K/V already in its slot and is only prefilled again).

Every row decodes exactly as it would alone: its prompt sits at cache columns 0..L-1, its step writes column
``pos`` and attends to columns 0..pos of its own row, and the logit filters see its own history
(``LogitFilter.apply_rows``). At temperature 0 the transcripts therefore equal lockstep's. Beam search and
best-of sampling (groups of rows per window) run in lockstep; this path decodes one row per window.

Per step the host replays two CUDA graphs and reads back one token per slot (the only sync): the engine's decode
step, then the token pick over every slot of the bucket (the logit filters, argmax, log-probability sum,
history, and the next input fed back to the engine), captured once per bucket and option set (``_Picker``); on
the CPU the same code runs eagerly. Rows sampling at a fallback temperature are redrawn on the host from the
filtered logits the pick leaves behind.

Engine calls (the graph engine implements them): ``encode(mel)``, ``start_slots(features, slots)``,
``prefill_slots(prompts, slots, sot_index) -> (logits at the last prompt token, logits at <|sot|>)``,
``feed_slots(rows, tokens)`` (each row's next input), ``step_slots(top) -> bucket`` (the decode step of the
smallest bucket holding rows [:top], logits left in ``engine.logits``), ``graph_cache``, ``max_rows``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from turboformer.decoding import sample_tokens
from turboformer.models.whisper.decoding import (
    DecodingOptions,
    DecodingResult,
    DecodingTask,
    window_result,
)
from turboformer.models.whisper.tokenizer import WhisperTokenizer
from turboformer.runtime.cuda_graphs import GraphedStep, bucket_for


@dataclass
class Window:
    """One 30 s window waiting for (or holding) a slot; ``owner`` is the caller's handle (its file)."""

    mel: torch.Tensor  # [n_mels, 3000]
    prompt: list[int]  # previous-text tokens (after <|startofprev|>), may be empty
    language: str
    owner: object = None
    temperature_index: int = 0


@dataclass
class _Row:
    window: Window
    width: int  # prompt length: the first sampled token goes to cache column ``width``
    no_speech_prob: float
    sampled: list[int] = field(default_factory=list)


def supports_continuous(engine) -> bool:
    names = ("start_slots", "prefill_slots", "feed_slots", "step_slots", "graph_cache", "max_rows")
    return all(hasattr(engine, name) for name in names)


class _Picker:
    """Per-slot decoding state on the device and the token pick over it, one CUDA graph per bucket.

    history [rows, sample_len + 1]: each slot's sampled tokens (what the filters read); counts [rows]: how
    many; sum_logprobs [rows]: their fp32 log-probability sum, accumulated in the order lockstep does (rows: the
    bucket that holds every slot; the rows past the slots only ever hold an idle slot's garbage).
    """

    def __init__(self, engine, filters, sample_len: int, slots: int):
        self.engine, self.filters, device = engine, filters, engine.device
        top = bucket_for(slots, engine.options.buckets)  # the largest bucket a step of these slots runs
        buckets = [b for b in engine.options.buckets if b <= top]
        self.history = torch.zeros(top, sample_len + 1, dtype=torch.long, device=device)
        self.counts = torch.zeros(top, dtype=torch.long, device=device)
        self.sum_logprobs = torch.zeros(top, dtype=torch.float32, device=device)
        self.next_tokens = torch.zeros(top, dtype=torch.long, device=device)
        graphs = engine.options.cuda_graphs and device.type == "cuda"
        # captured now; what warm-up and capture write is reset for each row as it enters a slot
        self.graph = GraphedStep(self._pick_bucket, buckets, graphs)

    def choose(self, logits: torch.Tensor, rows) -> torch.Tensor:
        """Filter logits [n, V] (fp32, in place) of rows (a slice or an index tensor), take the argmax, record
        it and feed it to the engine. Returns the tokens [n]."""
        sampled, counts = self.history[rows], self.counts[rows]
        for f in self.filters:
            f.apply_rows(logits, sampled, counts)
        tokens = logits.argmax(dim=-1)
        logprobs = F.log_softmax(logits, dim=-1)
        self.sum_logprobs[rows] += logprobs.gather(1, tokens[:, None])[:, 0]
        last = counts.clamp(max=self.history.shape[1] - 1)[:, None]  # idle slots in a bucket stay in bounds
        self.history[rows] = sampled.scatter(1, last, tokens[:, None])
        self.counts[rows] = counts + 1
        self.engine.feed_slots(rows, tokens)
        return tokens

    def redraw(self, logits: torch.Tensor, index: torch.Tensor, temperatures: list[float], generator) -> torch.Tensor:
        """Rows at a temperature > 0: replace the argmax ``choose`` recorded by a sample of softmax(logits / t)
        (logits [h, V] as filtered, index [h] their slots)."""
        drawn = sample_tokens(logits, torch.tensor(temperatures, device=logits.device)[:, None], generator)
        logprobs = F.log_softmax(logits, dim=-1)
        at = torch.arange(len(index), device=logits.device)
        last = self.counts[index] - 1
        self.sum_logprobs[index] += logprobs[at, drawn] - logprobs[at, self.history[index, last]]
        self.history[index, last] = drawn
        self.engine.tokens[index] = drawn  # pos already moved on in choose
        return drawn

    def _pick_bucket(self, b: int) -> None:
        self.next_tokens[:b] = self.choose(self.engine.logits[:b], slice(0, b))


def _picker(engine, task: DecodingTask, slots: int) -> _Picker:
    """One picker (and its graphs) per engine, slot count and filter options, kept in the engine's graph cache."""
    o = task.options
    key = ("continuous-pick", slots, task.sample_len, o.suppress_blank, str(o.suppress_tokens),
           o.without_timestamps, o.max_initial_timestamp)  # fmt: skip
    if key not in engine.graph_cache:
        engine.graph_cache[key] = _Picker(engine, task.logit_filters(0), task.sample_len, slots)
    return engine.graph_cache[key]


@torch.inference_mode()
def decode_continuous(
    engine,
    tokenizer: WhisperTokenizer,
    decoding: DecodingOptions,
    temperatures: tuple[float, ...],
    slots: int,
    take: Callable[[int], list[Window]],
    finish: Callable[[Window, DecodingResult], None],
    needs_fallback: Callable[[DecodingResult], bool],
) -> int:
    """Decode every window that ``take(k)`` hands out (at most k per call, any time slots are free; it may hand
    out more after ``finish`` reports a result) until it has none left and no slot is busy.

    ``finish(window, result)`` gets each window's final result: the first temperature whose result does not
    ``needs_fallback``, else the last one. decoding: the options at temperature 0 (no beams, no best_of).
    Returns the number of decode steps run.
    """
    if decoding.beam_size is not None or decoding.best_of is not None:
        raise ValueError("continuous batching decodes one row per window: no beam_size or best_of")
    if not 1 <= slots <= engine.max_rows:
        raise ValueError(f"slots must be in 1..{engine.max_rows} (the engine's cache rows), got {slots}")
    task = DecodingTask(engine, tokenizer, decoding)
    eot, sot, no_speech = tokenizer.special.eot, tokenizer.special.sot, tokenizer.special.no_speech
    device = engine.device
    picker = _picker(engine, task, slots)
    generator = torch.Generator().manual_seed(decoding.seed) if decoding.seed is not None else None
    rows: dict[int, _Row] = {}
    retries: list[tuple[int, Window]] = []
    steps = 0

    def temperature(slot: int) -> float:
        return temperatures[rows[slot].window.temperature_index]

    def enter(entering: list[tuple[int, Window]], fresh: list[tuple[int, Window]]) -> None:
        """Encode the fresh windows into their slots, prefill every entering one, pick its first token."""
        if fresh:
            features = engine.encode(torch.stack([w.mel for _, w in fresh]))
            engine.start_slots(features, [s for s, _ in fresh])
        prompts = [task.initial_tokens(w.prompt, w.language) for _, w in entering]
        slot_ids = [s for s, _ in entering]
        last, at_sot = engine.prefill_slots(prompts, slot_ids, [p.index(sot) for p in prompts])
        no_speech_probs = at_sot.float().softmax(dim=-1)[:, no_speech].tolist()
        index = torch.tensor(slot_ids, device=device)
        picker.counts[index], picker.sum_logprobs[index] = 0, 0.0
        for (slot, window), prompt, p in zip(entering, prompts, no_speech_probs):
            rows[slot] = _Row(window, len(prompt), p)
        logits = last.float()
        tokens = picker.choose(logits, index)
        hot = [i for i, s in enumerate(slot_ids) if temperature(s) > 0]
        if hot:
            at = torch.tensor(hot, device=device)
            tokens[at] = picker.redraw(logits[at], index[at], [temperature(slot_ids[i]) for i in hot], generator)
        record(slot_ids, tokens.tolist())

    def step(slot_ids: list[int]) -> None:
        """One decode step and pick for the bucket holding every running slot."""
        bucket = engine.step_slots(slot_ids[-1] + 1)
        picker.graph.run(bucket)
        hot = [s for s in slot_ids if temperature(s) > 0]
        if hot:
            index = torch.tensor(hot, device=device)
            picker.next_tokens[index] = picker.redraw(
                engine.logits[index], index, [temperature(s) for s in hot], generator
            )
        tokens = picker.next_tokens[:bucket].tolist()  # the step's one host sync
        record(slot_ids, [tokens[s] for s in slot_ids])

    def record(slot_ids: list[int], tokens: list[int]) -> None:
        for slot, token in zip(slot_ids, tokens):
            row = rows[slot]
            row.sampled.append(token)
            n = len(row.sampled)
            if token == eot or n >= task.sample_len or row.width + n > task.n_ctx:
                close(slot)

    def close(slot: int) -> None:
        row = rows.pop(slot)
        window = row.window
        tokens = row.sampled[:-1] if row.sampled[-1] == eot else row.sampled
        result = window_result(
            tokenizer, window.language, tokens, float(picker.sum_logprobs[slot]), row.no_speech_prob,
            temperatures[window.temperature_index],
        )  # fmt: skip
        if needs_fallback(result) and window.temperature_index + 1 < len(temperatures):
            window.temperature_index += 1
            retries.append((slot, window))  # same slot: its cross K/V hold this window already
        else:
            finish(window, result)

    while True:
        busy = set(rows) | {s for s, _ in retries}
        free = [s for s in range(slots) if s not in busy]
        fresh = list(zip(free, take(len(free)))) if free else []
        entering, retries = retries + fresh, []
        if entering:
            enter(entering, fresh)
            continue  # rows that ended on their first token free their slot before anything steps
        if not rows:
            return steps
        step(sorted(rows))
        steps += 1
