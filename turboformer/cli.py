"""The ``turboformer`` command: transcribe | recognize | translate | segment | bench | eval."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

FAMILY_COMMANDS = (  # modules that add their own sub-command with add_parser(subparsers)
    "turboformer.models.conformer.cli",
    "turboformer.models.lite_transformer.cli",
    "turboformer.models.sam.cli",
)

DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}


def _formats(value: str) -> list[str]:
    from turboformer.writers import FORMATS

    formats = list(FORMATS) if value == "all" else [f.strip() for f in value.split(",") if f.strip()]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise argparse.ArgumentTypeError(f"unknown output format(s) {unknown}; choose from {', '.join(FORMATS)} or all")
    return formats


def _optional_float(value: str) -> float | None:
    return None if value.lower() == "none" else float(value)


def _bool(value: str) -> bool:
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def add_transcribe_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "transcribe",
        help="transcribe speech with Whisper",
        description="Transcribe audio or video files with Whisper. Files that cannot be read are reported "
        "one line each; the others are still transcribed, and the exit status is 1 if any failed.",
    )
    p.add_argument("audio", nargs="+", help="audio or video files (any format FFmpeg reads; .raw/.pcm = s16le)")
    p.add_argument("--model", default="tiny.en", help="bundled name (tiny.en, base) or checkpoint path: "
                   "CTranslate2 dir, Hugging Face dir or openai-whisper .pt (default: tiny.en)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default: float16 on cuda, float32 on cpu")
    p.add_argument("--quantize", choices=("int8",), default=None,
                   help="int8: weight-only int8 decoder linears and int8 cross-attention K/V (cuda)")
    p.add_argument("--output-format", "-f", type=_formats, default=["txt"], help="txt,srt,vtt,json,tsv or all")
    p.add_argument("--output-dir", "-o", default=".", help="where to write the transcripts (default: .)")
    p.add_argument("--language", default=None, help="language code; default: detect (multilingual models)")
    p.add_argument("--task", choices=("transcribe", "translate"), default="transcribe")
    p.add_argument("--temperature", type=float, default=0.0, help="first sampling temperature")
    p.add_argument("--temperature-increment-on-fallback", type=_optional_float, default=0.2,
                   help="step of the fallback ladder up to 1.0 (none: no fallback)")
    p.add_argument("--beam-size", type=int, default=None, help="beam search width (default: greedy)")
    p.add_argument("--best-of", type=int, default=None, help="samples per fallback temperature > 0")
    p.add_argument("--patience", type=float, default=None)
    p.add_argument("--length-penalty", type=float, default=None)
    p.add_argument("--initial-prompt", default=None)
    p.add_argument("--condition-on-previous-text", type=_bool, default=True)
    p.add_argument("--no-speech-threshold", type=_optional_float, default=0.6)
    p.add_argument("--logprob-threshold", type=_optional_float, default=-1.0)
    p.add_argument("--compression-ratio-threshold", type=_optional_float, default=2.4)
    p.add_argument("--without-timestamps", action="store_true", help="decode text only (one segment per window)")
    p.add_argument("--batch-size", type=int, default=8, help="files decoded together (default: 8)")
    p.add_argument("--continuous-batching", type=_bool, default=True,
                   help="GPU, greedy: refill a decoder slot as soon as its window ends instead of waiting for the "
                        "batch's longest window (default: True; same transcripts)")  # fmt: skip
    p.add_argument("--raw-sample-rate", type=int, default=None, help="sample rate of headerless s16le input")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    p.set_defaults(func=run_transcribe)


def _temperatures(args) -> tuple[float, ...]:
    if args.temperature_increment_on_fallback is None:
        return (args.temperature,)
    steps, t = [], args.temperature
    while t <= 1.0 + 1e-6:
        steps.append(round(t, 6))
        t += args.temperature_increment_on_fallback
    return tuple(steps) or (args.temperature,)


def run_transcribe(args) -> int:
    import torch

    from turboformer.audio import AudioError, load_audio
    from turboformer.models.whisper.load import CheckpointError
    from turboformer.models.whisper.pipeline import WhisperModel
    from turboformer.models.whisper.tokenizer import TokenizerError
    from turboformer.models.whisper.transcribe import (
        TranscribeOptions,
        transcribe_batch,
    )
    from turboformer.writers import write_result

    if args.batch_size < 1:
        print("error: --batch-size must be at least 1", file=sys.stderr)
        return 2
    try:
        options = TranscribeOptions(
            task=args.task,
            language=args.language,
            temperature=_temperatures(args),
            compression_ratio_threshold=args.compression_ratio_threshold,
            logprob_threshold=args.logprob_threshold,
            no_speech_threshold=args.no_speech_threshold,
            condition_on_previous_text=args.condition_on_previous_text,
            initial_prompt=args.initial_prompt,
            beam_size=args.beam_size,
            best_of=args.best_of,
            patience=args.patience,
            length_penalty=args.length_penalty,
            without_timestamps=args.without_timestamps,
            batch_size=args.batch_size,
            continuous_batching=args.continuous_batching,
        )
        options.decoding(args.language).validate()
        dtype = getattr(torch, args.dtype) if args.dtype else None
        model = WhisperModel.from_pretrained(args.model, device=args.device, dtype=dtype, quantize=args.quantize)
    except (CheckpointError, TokenizerError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    failed = 0
    arrays, names = [], []
    for path in args.audio:
        try:
            audio = load_audio(path, raw_sample_rate=args.raw_sample_rate)
        except AudioError as e:
            print(f"error: {e}", file=sys.stderr)
            failed += 1
            continue
        arrays.append(audio)
        names.append(path)
    try:
        results = transcribe_batch(model.engine, model.tokenizer, arrays, options, names, progress=not args.quiet)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for result in results:
        write_result(result, args.output_dir, Path(result.source).stem, args.output_format)
        if not args.quiet:
            print(f"{result.source}: {result.text.strip()}")
    return 1 if failed else 0


def add_bench_parser(subparsers) -> None:
    from turboformer.benchmark import whisper as bench_whisper

    p = subparsers.add_parser("bench", help="benchmark against the reference implementation (CUDA)",
                              description="Benchmarks run ours and the reference side by side on the same weights.")
    families = p.add_subparsers(dest="family", metavar="FAMILY", required=True)
    w = families.add_parser("whisper", help="Whisper GPU engine vs Hugging Face transformers",
                            description=bench_whisper.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_whisper.add_arguments(w)
    w.set_defaults(func=bench_whisper.run)
    for name, module, help_text in (
        ("conformer", "turboformer.benchmark.conformer", "WeNet U2++ Conformer: ours vs our fp32 eager and PyTorch fp16"),
        ("lite-transformer", "turboformer.benchmark.lite_transformer", "Lite Transformer: ours vs our fp32 eager"),
        ("sam", "turboformer.benchmark.sam", "SAM image encoder and mask decoder: ours vs eager and upstream"),
    ):
        bench = importlib.import_module(module)
        b = families.add_parser(name, help=help_text, description=bench.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
        bench.add_arguments(b)
        b.set_defaults(func=bench.run)


def add_eval_parser(subparsers) -> None:
    p = subparsers.add_parser("eval", help="accuracy report of an engine against the fp32 CPU reference")
    families = p.add_subparsers(dest="family", metavar="FAMILY", required=True)
    w = families.add_parser(
        "whisper",
        help="Whisper: logits/encoder error statistics, transcripts and WER vs fp32 CPU",
        description="Transcribe with the fp32 CPU reference and with the engine under test (same weights); "
        "teacher-force the engine through the reference tokens and report max/mean/median abs and relative "
        "error of the logits and encoder output, argmax agreement, equal transcripts and WER.",
    )
    w.add_argument("audio", nargs="+", help="audio files")
    w.add_argument("--model", default="tiny.en")
    w.add_argument("--device", default=None, help="device of the engine under test (default: cuda if available)")
    w.add_argument("--dtype", choices=DTYPES, default=None, help="default: float16 on cuda, float32 on cpu")
    w.add_argument("--quantize", choices=("int8",), default=None)
    w.add_argument("--references", default=None, help="text file: one ground-truth transcript per audio file")
    w.set_defaults(func=run_eval_whisper)
    t = families.add_parser(
        "lite-transformer",
        help="Lite Transformer: hypotheses and scores vs fp32 CPU, BLEU against references",
        description="Translate with the fp32 CPU reference and with the engine under test (same weights); report "
        "equal best hypotheses, score differences and corpus BLEU (sacrebleu) against the references.",
    )
    t.add_argument("--model", required=True, metavar="DIR", help="Lite Transformer (fairseq) model directory")
    t.add_argument("--input", required=True, help="source sentences, one per line")
    t.add_argument("--references", default=None, help="reference translations, one per line")
    t.add_argument("--device", default=None, help="device of the engine under test (default: cuda if available)")
    t.add_argument("--dtype", choices=DTYPES, default=None, help="default: float16 on cuda, float32 on cpu")
    t.add_argument("--quantize", choices=("int8",), default=None, help="weight-only INT8 linears (cuda)")
    t.add_argument("--beam", type=int, default=4)
    t.add_argument("--lenpen", type=float, default=0.6)
    t.add_argument("--max-len-a", type=float, default=0.0, help="max length = a * source length + b")
    t.add_argument("--max-len-b", type=int, default=200)
    t.set_defaults(func=run_eval_translation)
    c = families.add_parser(
        "conformer",
        help="WeNet Conformer: hypotheses, scores and CER vs fp32 CPU (and vs references)",
        description="Recognize with the fp32 CPU reference and with the engine under test (same weights); report "
        "equal best hypotheses, score differences and character error rates.",
    )
    c.add_argument("audio", nargs="+", help="audio files")
    c.add_argument("--model", required=True, metavar="DIR", help="WeNet model directory")
    c.add_argument("--mode", default="attention_rescoring",
                   choices=("ctc_greedy", "ctc_prefix_beam", "attention", "attention_rescoring"))
    c.add_argument("--beam-size", type=int, default=10)
    c.add_argument("--references", default=None, help="text file: one ground-truth transcript per audio file")
    c.add_argument("--device", default=None, help="device of the engine under test (default: cuda if available)")
    c.add_argument("--dtype", choices=DTYPES, default=None, help="default: float16 on cuda, float32 on cpu")
    c.add_argument("--quantize", choices=("int8",), default=None, help="weight-only INT8 linears (cuda)")
    c.set_defaults(func=run_eval_conformer)
    m = families.add_parser(
        "sam",
        help="Segment Anything: mask IoU and logits error vs fp32 CPU over a grid of point prompts",
        description="Predict masks for a grid of point prompts with the fp32 CPU reference and with the engine "
        "under test (same weights); report mask IoU, low-res logits error statistics and predicted-IoU differences.",
    )
    m.add_argument("image", help="an image file")
    m.add_argument("--model", required=True, help="SAM checkpoint (sam_vit_b/l/h_*.pth)")
    m.add_argument("--points-per-side", type=int, default=4)
    m.add_argument("--device", default=None, help="device of the engine under test (default: cuda if available)")
    m.add_argument("--dtype", choices=DTYPES, default=None, help="default: bfloat16 on cuda, float32 on cpu")
    m.add_argument("--quantize", choices=("int8",), default=None, help="weight-only INT8 linears (cuda)")
    m.set_defaults(func=run_eval_sam)


def _candidate_device_dtype(args, cuda_dtype: str = "float16"):
    """The engine under test of an ``eval`` command: --device (default cuda when available) and --dtype
    (default ``cuda_dtype`` on cuda, float32 on cpu)."""
    import torch

    from turboformer.models.whisper.pipeline import default_device

    device = args.device or default_device()
    name = args.dtype or (cuda_dtype if device.startswith("cuda") else "float32")
    return device, getattr(torch, name)


def _aligned_lines(path: str, expected: int, what: str, of: str, skip_blank: bool) -> list[str]:
    """One entry per line of ``path`` (stripped), which must pair up with ``expected`` inputs."""
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() if skip_blank else line.rstrip("\n") for line in f]
    if skip_blank:
        lines = [line for line in lines if line]
    if len(lines) != expected:
        raise ValueError(f"{path} has {len(lines)} {what} for {expected} {of}")
    return lines


def run_eval_whisper(args) -> int:
    import torch

    from turboformer.audio import AudioError, load_audio
    from turboformer.eval.whisper import candidate_engine, evaluate
    from turboformer.models.whisper.load import CheckpointError
    from turboformer.models.whisper.pipeline import WhisperModel

    device, dtype = _candidate_device_dtype(args)
    try:
        audios = [load_audio(path) for path in args.audio]
        truths = None
        if args.references:
            truths = _aligned_lines(args.references, len(audios), "transcripts", "audio files", skip_blank=True)
        reference = WhisperModel.from_pretrained(args.model, device="cpu", dtype=torch.float32)
        engine = candidate_engine(reference, device, dtype, args.quantize)
    except (AudioError, CheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    label = f"{args.model} on {device}, {str(dtype).removeprefix('torch.')}" + (f", {args.quantize}" if args.quantize else "")
    print(evaluate(reference, engine, audios, truths, label).text())
    return 0


def run_eval_translation(args) -> int:

    from turboformer.eval.translation import evaluate_translation
    from turboformer.models.lite_transformer.translate import TranslateOptions

    device, dtype = _candidate_device_dtype(args)
    try:
        with open(args.input, encoding="utf-8") as f:
            sentences = [line.rstrip("\n") for line in f]
        references = None
        if args.references:
            references = _aligned_lines(args.references, len(sentences), "lines", "source lines", skip_blank=False)
        options = TranslateOptions(beam=args.beam, lenpen=args.lenpen, max_len_a=args.max_len_a, max_len_b=args.max_len_b)
        report = evaluate_translation(args.model, sentences, references, device, dtype, options, args.quantize)
    except (OSError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.text())
    return 0


def run_eval_conformer(args) -> int:

    from turboformer.eval.conformer import evaluate_recognition
    from turboformer.models.conformer import RecognizeOptions

    device, dtype = _candidate_device_dtype(args)
    try:
        truths = None
        if args.references:
            truths = _aligned_lines(args.references, len(args.audio), "transcripts", "audio files", skip_blank=True)
        options = RecognizeOptions(mode=args.mode, beam_size=args.beam_size)
        report = evaluate_recognition(args.model, list(args.audio), device, dtype, options, truths, args.quantize)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.text())
    return 0


def run_eval_sam(args) -> int:
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    from turboformer.eval.segmentation import evaluate_segmentation

    device, dtype = _candidate_device_dtype(args, cuda_dtype="bfloat16")
    try:
        if args.points_per_side < 1:
            raise ValueError("--points-per-side must be at least 1")
        image = np.asarray(Image.open(args.image).convert("RGB"))
        report = evaluate_segmentation(args.model, image, device, dtype, args.points_per_side, args.quantize)
    except (OSError, ValueError, UnidentifiedImageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.text())
    return 0


def build_parser() -> argparse.ArgumentParser:
    from turboformer import __version__

    parser = argparse.ArgumentParser(
        prog="turboformer",
        description="Fast, faithful inference for Whisper, WeNet Conformer, Lite Transformer and Segment Anything.",
    )
    parser.add_argument("--version", action="version", version=f"turboformer {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_transcribe_parser(subparsers)
    add_bench_parser(subparsers)
    add_eval_parser(subparsers)
    for module in FAMILY_COMMANDS:
        try:
            family = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name and module.startswith(e.name):  # family not part of this build
                continue
            raise
        family.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
