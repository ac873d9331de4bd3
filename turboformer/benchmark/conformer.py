"""WeNet U2++ Conformer: turboformer's CUDA path against our fp32 eager path and PyTorch eager fp16.

Three systems on the same random weights (the real dimensions of a named size) and the same features:

- ``ours``: the model in fp16 (CMVN, softmax and log-softmax in fp32), the Triton depthwise-conv kernel in
  every convolution module; eager (the encoder is not yet captured as a CUDA graph per (batch, length) bucket);
- ``fp32_eager``: our verified fp32 path with every kernel forced to its PyTorch reference (the issue's
  baseline);
- ``torch_fp16_eager``: the same fp16 model with the kernels forced to the PyTorch reference (plain PyTorch).

Per batch size and audio length: encoder ms (CUDA events, median), attention-rescoring ms (CTC log-softmax,
CTC prefix beam search, bidirectional decoder rescoring of the n-best; median), RTFx (seconds of audio per
second of encoder + rescoring), speedups of ``ours`` over both, and the share of utterances whose best
hypothesis equals the fp32 baseline's. The CTC blank logit is biased (``BLANK_BIAS``) so that random weights
emit a few tokens per second, as a trained model does, instead of one per encoder frame.

    turboformer bench conformer [--config aishell-u2pp-conformer] [--batches 1 4 8 16] [--seconds 5 15]

Writes benchmarks/results/<gpu>/conformer.{json,md} under the current directory. ``--device cpu --config tiny``
dry-runs the logic without a GPU (timings meaningless, for tests).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys
from dataclasses import asdict

import torch

from turboformer.benchmark.common import median_ms, write_results
from turboformer.kernels import use_reference, utils
from turboformer.models.conformer import build_model
from turboformer.models.conformer.config import (
    CONFORMER_CONFIGS,
    ConformerConfig,
    DecoderConfig,
    EncoderConfig,
)
from turboformer.models.conformer.ctc import ctc_prefix_beam_search
from turboformer.models.conformer.search import attention_rescoring

SAMPLE_RATE = 16000
WINDOW, HOP = 400, 160  # 25 ms / 10 ms Kaldi fbank frames at 16 kHz
BLANK_BIAS = 3.0  # added to the CTC blank logit of the random model (see the module docstring)
CTC_WEIGHT, REVERSE_WEIGHT = 0.3, 0.5  # AISHELL U2++ decoding values

# "tiny" exists for the CPU dry run only: the real sizes are CONFORMER_CONFIGS.
BENCH_CONFIGS: dict[str, ConformerConfig] = {
    **CONFORMER_CONFIGS,
    "tiny": ConformerConfig(
        encoder=EncoderConfig(
            output_size=32,
            attention_heads=2,
            linear_units=48,
            num_blocks=2,
            cnn_module_kernel=5,
            causal=True,
            cnn_module_norm="layer_norm",
            use_dynamic_chunk=True,
        ),
        decoder=DecoderConfig(attention_heads=2, linear_units=48, num_blocks=1, r_num_blocks=1),
        vocab_size=20,
        sos_id=19,
        eos_id=19,
    ),
}
SYSTEMS = ("ours", "fp32_eager", "torch_fp16_eager")


def feature_frames(seconds: float) -> int:
    """Kaldi fbank frames of ``seconds`` of 16 kHz audio (snip edges): 1 + (samples - 400) // 160."""
    return 1 + (int(seconds * SAMPLE_RATE) - WINDOW) // HOP


def timed_ms(fn, repeat: int, device: torch.device, warmup: int = 1) -> float:
    return median_ms(fn, repeat, device, warmup)


def random_model(config: ConformerConfig, device: torch.device, seed: int = 0) -> torch.nn.Module:
    """fp32 eval model with PyTorch's default initialisation, non-trivial BatchNorm statistics (if any) and a
    blank-biased CTC head."""
    torch.manual_seed(seed)
    model = build_model(config).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm1d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
        model.ctc.ctc_lo.bias[config.blank_id] += BLANK_BIAS
    return model.to(device)


def decode(model, config: ConformerConfig, feats, lengths, beam: int):
    """Encoder, then attention rescoring; returns (encoder_out, lengths, best token tuple per utterance)."""
    encoder_out, out_lengths = model.encode(feats, lengths)
    return encoder_out, out_lengths, rescore(model, config, encoder_out, out_lengths, beam)


def rescore(model, config: ConformerConfig, encoder_out, out_lengths, beam: int) -> list[tuple[int, ...]]:
    """CTC prefix beam search n-best, rescored by the (bidirectional) decoder: the best tokens per utterance."""
    nbests = ctc_prefix_beam_search(model.ctc(encoder_out), out_lengths, beam, config.blank_id)
    reverse = REVERSE_WEIGHT if model.decoder.right_decoder is not None else 0.0
    best = []
    for b, nbest in enumerate(nbests):
        rescored = attention_rescoring(
            model.decoder, encoder_out[b : b + 1, : int(out_lengths[b])], nbest, CTC_WEIGHT, reverse,
            config.sos_id, config.eos_id,
        )  # fmt: skip
        best.append(rescored[0][0] if rescored else ())
    return best


def bench_system(model, config, feats, lengths, seconds: float, args, device, reference: bool) -> tuple[dict, list]:
    """Time one system on one (batch, length) input; returns its row and its best hypotheses."""
    with torch.inference_mode(), use_reference() if reference else contextlib.nullcontext():
        encoder_ms = timed_ms(lambda: model.encode(feats, lengths), args.repeat, device)
        encoder_out, out_lengths, hyps = decode(model, config, feats, lengths, args.beam)
        rescoring_ms = timed_ms(
            lambda: rescore(model, config, encoder_out, out_lengths, args.beam), args.repeat, device
        )
    audio_s = feats.size(0) * seconds
    row = {
        "encoder_ms": encoder_ms,
        "rescoring_ms": rescoring_ms,
        "rtfx": audio_s / ((encoder_ms + rescoring_ms) / 1e3),
        "mean_tokens": statistics.mean(len(h) for h in hyps),
    }
    return row, hyps


def markdown(results: dict) -> str:
    lines = [
        f"# WeNet Conformer ({results['config']}) on {results['gpu']}",
        "",
        (
            f"Random weights of the real sizes, beam {results['beam']}, attention rescoring (ctc {CTC_WEIGHT}, "
            f"reverse {REVERSE_WEIGHT}). ours: fp16 + Triton depthwise conv, eager. Baselines: our fp32 eager path, "
            "PyTorch eager fp16 (same model, kernels forced to the PyTorch reference). Times: median ms per batch."
        ),
        "",
        (
            "| batch | audio s | encoder ms: ours / fp32 / torch fp16 | rescoring ms: ours / fp32 / torch fp16 "
            "| RTFx: ours / fp32 / torch fp16 | speedup vs fp32 | vs torch fp16 | identical hyps (ours, torch fp16) |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        o, f, t = (row[s] for s in SYSTEMS)
        lines.append(
            f"| {row['batch']} | {row['seconds']:g} "
            f"| {o['encoder_ms']:.2f} / {f['encoder_ms']:.2f} / {t['encoder_ms']:.2f} "
            f"| {o['rescoring_ms']:.1f} / {f['rescoring_ms']:.1f} / {t['rescoring_ms']:.1f} "
            f"| {o['rtfx']:.0f} / {f['rtfx']:.0f} / {t['rtfx']:.0f} | {row['speedup_vs_fp32']:.2f}x "
            f"| {row['speedup_vs_torch_fp16']:.2f}x | {row['identical_hypotheses']:.0%}, "
            f"{row['identical_hypotheses_torch_fp16']:.0%} |"
        )
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="aishell-u2pp-conformer", choices=sorted(BENCH_CONFIGS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4, 8, 16])
    parser.add_argument("--seconds", nargs="+", type=float, default=[5.0, 15.0], help="audio per utterance")
    parser.add_argument("--beam", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per measurement (median)")
    parser.add_argument("--out", default="benchmarks/results", help="results folder (a <gpu> folder goes inside)")
    parser.add_argument("--name", default="conformer", help="stem of the JSON/Markdown files written")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                        help="cpu: dry run of the logic (use --config tiny); timings are meaningless")  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


def run(args) -> int:
    # the benchmark measures our kernels: turn on the ones not yet verified on a GPU (kernels/utils.py)
    os.environ.setdefault(utils.UNVERIFIED_ENV_VAR, "1")
    if min(args.batches) < 1 or min(args.seconds) <= 0.1 or args.repeat < 1 or args.beam < 1:
        print("error: batches, repeat and beam must be >= 1 and seconds > 0.1", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench conformer needs a CUDA GPU (use --device cpu --config tiny for a dry run)", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    config = BENCH_CONFIGS[args.config]
    fp32 = random_model(config, device)
    fp16 = copy.deepcopy(fp32).half()  # CMVN, softmax and log-softmax stay fp32 inside the model
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    results = {"gpu": gpu, "torch": torch.__version__, "config": args.config, "beam": args.beam,
               "dims": asdict(config.encoder), "rows": []}  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    for seconds in args.seconds:
        frames = feature_frames(seconds)
        for batch in args.batches:
            feats = (torch.randn(batch, frames, config.encoder.input_dim, generator=generator) * 3 + 10).to(device)
            lengths = torch.full((batch,), frames, dtype=torch.long, device=device)
            row = {"batch": batch, "seconds": seconds, "frames": frames}
            ours, ours_hyps = bench_system(fp16, config, feats, lengths, seconds, args, device, reference=False)
            base, base_hyps = bench_system(fp32, config, feats, lengths, seconds, args, device, reference=True)
            torch16, torch_hyps = bench_system(fp16, config, feats, lengths, seconds, args, device, reference=True)
            row.update({"ours": ours, "fp32_eager": base, "torch_fp16_eager": torch16})
            total = {name: r["encoder_ms"] + r["rescoring_ms"] for name, r in zip(SYSTEMS, (ours, base, torch16))}
            row["speedup_vs_fp32"] = total["fp32_eager"] / total["ours"]
            row["speedup_vs_torch_fp16"] = total["torch_fp16_eager"] / total["ours"]
            row["identical_hypotheses"] = sum(a == b for a, b in zip(ours_hyps, base_hyps)) / batch
            row["identical_hypotheses_torch_fp16"] = sum(a == b for a, b in zip(torch_hyps, base_hyps)) / batch
            results["rows"].append(row)
            print(markdown({**results, "rows": [row]}).splitlines()[-1], flush=True)
    write_results(results, args.out, args.name, gpu, markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
