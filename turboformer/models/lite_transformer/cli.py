"""``turboformer translate``: translate sentences with a Lite Transformer model directory.

Sentences come from the command line, or one per line from stdin when none is given. With ``--nbest 1`` each
input gives one output line (its best translation); with ``--nbest N`` each gives N lines
``<input index>\\t<score>\\t<translation>``, best first.
"""

from __future__ import annotations

import argparse
import sys

import torch

from turboformer.models.lite_transformer.translate import LiteTransformerTranslator, TranslateOptions

_DEFAULTS = TranslateOptions()
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``translate`` sub-command; its handler is ``args.func`` (= :func:`main`)."""
    parser = subparsers.add_parser(
        "translate",
        help="translate text with a Lite Transformer (fairseq) model",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "sentences", nargs="*", metavar="SENTENCE", help="sentences to translate (default: stdin lines)"
    )
    parser.add_argument(
        "--model",
        required=True,
        metavar="DIR",
        help="directory with checkpoint.pt, dict.<src>.txt, dict.<tgt>.txt (and bpecodes or sentencepiece.bpe.model)",
    )
    parser.add_argument("--beam", type=int, default=_DEFAULTS.beam)
    parser.add_argument("--lenpen", type=float, default=_DEFAULTS.lenpen, help="length penalty: score / len ** lenpen")
    parser.add_argument(
        "--max-len-a", type=float, default=_DEFAULTS.max_len_a, help="max length = a * source length + b"
    )
    parser.add_argument("--max-len-b", type=int, default=_DEFAULTS.max_len_b)
    parser.add_argument("--nbest", type=int, default=_DEFAULTS.nbest, help="hypotheses printed per sentence")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=_DEFAULTS.batch_size,
        help="sentences per batch (padding slightly changes results, as upstream; 1 keeps sentences independent)",
    )
    parser.add_argument("--tokenizer", choices=["none", "moses"], default="none", help="Moses (de)tokenisation")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument(
        "--dtype",
        choices=["auto", *DTYPES],
        default="auto",
        help="model dtype on CUDA (auto: float16 on CUDA, float32 on CPU, the only CPU choice)",
    )
    parser.add_argument(
        "--quantize", choices=["none", "int8"], default="none", help="CUDA only: weight-only int8 decoder linears"
    )
    parser.set_defaults(func=main)
    return parser


def main(args: argparse.Namespace) -> int:
    """Translate ``args.sentences`` (or stdin lines) and print the results; returns the exit status (2 for bad
    options, inputs or model files, with the reason on stderr)."""
    try:
        options = TranslateOptions(
            beam=args.beam,
            lenpen=args.lenpen,
            max_len_a=args.max_len_a,
            max_len_b=args.max_len_b,
            nbest=args.nbest,
            batch_size=args.batch_size,
        )
        device = torch.device(args.device)
        if args.dtype == "auto":
            dtype = torch.float16 if device.type == "cuda" else torch.float32
        else:
            dtype = DTYPES[args.dtype]
        quantize = None if args.quantize == "none" else args.quantize
        if device.type != "cuda" and (dtype != torch.float32 or quantize is not None):
            raise ValueError(f"--dtype {args.dtype} and --quantize {args.quantize} need --device cuda (CPU: float32)")
        sentences = args.sentences or [line.rstrip("\r\n") for line in sys.stdin]
        translator = LiteTransformerTranslator.from_dir(
            args.model,
            device=device,
            dtype=dtype,
            tokenizer=None if args.tokenizer == "none" else args.tokenizer,
            quantize=quantize,
        )
        translations = translator.translate(sentences, options)
    except ValueError as error:  # our CheckpointError, ConfigError, TranslateError, ... are ValueErrors
        print(f"turboformer translate: error: {error}", file=sys.stderr)
        return 2
    for index, translation in enumerate(translations):
        if options.nbest == 1:
            print(translation.text)
        else:
            for hypothesis in translation.nbest:
                print(f"{index}\t{hypothesis.score:.4f}\t{hypothesis.text}")
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="turboformer")
    add_parser(_parser.add_subparsers(dest="command", required=True))
    _args = _parser.parse_args()
    sys.exit(_args.func(_args))
