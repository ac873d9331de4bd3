"""``turboformer recognize``: WeNet U2/U2++ Conformer speech recognition from the command line.

One output line per input file, in input order: ``path<TAB>text`` (txt) or a JSON object (json: path,
text, tokens, score). A file that cannot be read or decoded gives one ``error:`` line on stderr; the
others are still recognized and the exit status is 1. Bad options or an unloadable model exit with 2.

``--device cuda`` decodes with the GPU engine (``--dtype``, default float16; ``--quantize int8``; CUDA graphs
unless ``--no-cuda-graphs``); ``--dtype float16|bfloat16`` or ``--quantize`` on CPU exit with 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from .recognize import MODES

DTYPES = ("float32", "float16", "bfloat16")


def add_parser(subparsers) -> None:
    """Add the ``recognize`` sub-command to an ``argparse`` sub-parser collection."""
    p = subparsers.add_parser(
        "recognize",
        help="speech recognition with a WeNet U2/U2++ Conformer",
        description="Recognize speech with a WeNet model directory (train.yaml, final.pt, units.txt, "
        "global_cmvn). Files that cannot be read are reported one line each; the others are still "
        "recognized, and the exit status is 1 if any failed.",
    )
    p.add_argument("audio", nargs="+", help="audio files (any format FFmpeg reads; .raw/.pcm = s16le 16 kHz)")
    p.add_argument("--model", required=True, help="WeNet model directory")
    p.add_argument("--mode", choices=MODES, default="attention_rescoring", help="decoding (default: %(default)s)")
    p.add_argument("--beam-size", type=int, default=10, help="beam width (default: %(default)s)")
    p.add_argument("--ctc-weight", type=float, default=0.3, help="CTC weight in rescoring (default: %(default)s)")
    p.add_argument(
        "--reverse-weight",
        type=float,
        default=None,
        help="right-to-left decoder weight in rescoring (default: 0.5 with a bitransformer decoder, else 0)",
    )
    p.add_argument("--chunk-size", type=int, default=-1, help="encoder frames per chunk, -1 = full context")
    p.add_argument("--left-chunks", type=int, default=-1, help="chunks of history, -1 = all")
    p.add_argument("--simulate-streaming", action="store_true", help="chunk-by-chunk with caches (chunk-size > 0)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default=None,
        help="engine precision on cuda (default: float16 on cuda; cpu runs the float32 reference only)",
    )
    p.add_argument("--quantize", choices=("int8",), default=None, help="weight-only INT8 linears (cuda only)")
    p.add_argument("--no-cuda-graphs", action="store_true", help="run the cuda engine eagerly (debugging)")
    p.add_argument("--batch-size", type=int, default=8, help="files encoded together (default: %(default)s)")
    p.add_argument("--output-format", choices=("txt", "json"), default="txt", help="default: %(default)s")
    p.set_defaults(func=main)


def _device(name: str):
    """``torch.device(name)``, or ValueError naming the problem (unknown type, CUDA not available)."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name!r}: CUDA is not available on this machine")
    return device


def main(args: argparse.Namespace) -> int:
    """Run ``recognize`` for parsed ``args``; returns the exit status."""
    import torch

    from turboformer.audio import AudioError

    from .encoder import ConformerInputError
    from .recognize import ConformerRecognizer, RecognizeOptions

    try:
        device = _device(args.device)
        options = RecognizeOptions(
            mode=args.mode,
            beam_size=args.beam_size,
            ctc_weight=args.ctc_weight,
            reverse_weight=args.reverse_weight,
            chunk_size=args.chunk_size,
            left_chunks=args.left_chunks,
            simulate_streaming=args.simulate_streaming,
            batch=args.batch_size,
        )
        recognizer = ConformerRecognizer.from_dir(
            args.model,
            device=device,
            dtype=None if args.dtype is None else getattr(torch, args.dtype),
            quantize=args.quantize,
            cuda_graphs=not args.no_cuda_graphs,
        )
    except ValueError as e:  # device, options, train.yaml, checkpoint
        print(f"error: {e}", file=sys.stderr)
        return 2

    features, paths, failed = [], [], 0
    for path in args.audio:
        try:
            features.append(recognizer.features(path))
            paths.append(path)
        except (AudioError, ConformerInputError) as e:
            print(f"error: {e}", file=sys.stderr)  # the message names the file
            failed += 1
    try:
        results = recognizer.recognize_features(features, options)
    except ValueError as e:  # options that do not fit this model
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path, result in zip(paths, results):
        if args.output_format == "json":
            record = {"path": path, "text": result.text, "tokens": list(result.tokens), "score": result.score}
            print(json.dumps(record, ensure_ascii=False))
        else:
            print(f"{path}\t{result.text}")
    return 1 if failed else 0
