"""WeNet U2++ Conformer: turboformer's GPU engine against our fp32 eager path and PyTorch eager fp16.

Systems on the same random weights (the real dimensions of a named size) and the same features, all decoding
with attention rescoring (CTC prefix beam search n-best, rescored by both decoders):

- ``ours``: :class:`ConformerEngine` -- fp16 weights (CMVN, softmax, log-softmax, LayerNorm statistics in fp32),
  encoder + CTC + batched prefix beam search captured as one CUDA graph per (batch, length) bucket, all n-best
  hypotheses of the batch rescored in one left and one right decoder forward; ``--int8`` adds ``ours_int8``
  (weight-only INT8 linears; CTC and decoder output projections fp16);
- ``fp32_eager``: our verified fp32 path with every kernel forced to its PyTorch reference, the pure-Python
  prefix beam search and per-utterance rescoring: the upstream-faithful path (the issue's baseline);
- ``torch_fp16_eager``: the same path with the model in fp16 (plain PyTorch, kernels forced to the reference).

Per batch size and audio length: encoder ms (encoder + CTC log-softmax), search + rescoring ms, total ms
(CUDA events, median), RTFx (seconds of audio per second of total), speedups of ``ours`` over both baselines,
and the share of utterances whose best hypothesis equals the fp32 baseline's. The engine's graphs are captured
during the warm-up runs, before anything is timed.

The random model is made *confident* the way a trained one is (:func:`random_model`): its CMVN statistics
match the synthetic features; the CTC projection is re-centred and scaled on the encoder outputs of a
calibration batch (``CTC_SCALE``: logits ~N(0, CTC_SCALE^2) per frame instead of ~N(0, 0.3) around one
input-independent direction) with the blank bias set so that blank wins ``BLANK_SHARE`` of calibration frames
(a few tokens per second); the decoders' output projections are scaled by ``DECODER_SCALE``. With PyTorch's
default initialisation every posterior is near-uniform and every n-best a near-tie. The confident model emits
10-30 tokens per 5 s with peaked frames (median top log-prob -0.01), but its Gaussian logits still leave
n-best members ~0.03 nats apart, below fp16's own noise (measured on CPU: plain fp16 keeps 1 of 4 best
hypotheses at 4 x 5 s): read the identical-hypotheses column of ``ours`` against plain ``torch fp16``'s, the
share that the dtype itself keeps.

    turboformer bench conformer [--config aishell-u2pp-conformer] [--batches 1 4 8 16] [--seconds 5 15] [--int8]

Writes benchmarks/results/<gpu>/conformer.{json,md} under the current directory. ``--device cpu --config tiny``
dry-runs the logic without a GPU (ours in fp32 without graphs; timings meaningless, for tests).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from dataclasses import asdict

import torch

from turboformer.benchmark.common import median_ms, write_results
from turboformer.kernels import use_reference
from turboformer.models.conformer import build_model
from turboformer.models.conformer.config import (
    CONFORMER_CONFIGS,
    ConformerConfig,
    DecoderConfig,
    EncoderConfig,
)
from turboformer.models.conformer.ctc import ctc_prefix_beam_search
from turboformer.models.conformer.engine import (
    ConformerEngine,
    EngineOptions,
    convert_model,
    fp32_convolutions,
)
from turboformer.models.conformer.search import attention_rescoring

SAMPLE_RATE = 16000
WINDOW, HOP = 400, 160  # 25 ms / 10 ms Kaldi fbank frames at 16 kHz
FEATURE_MEAN, FEATURE_STD = 10.0, 3.0  # synthetic log-fbank features ~N(10, 3^2); the CMVN undoes this
CTC_SCALE = 6.0  # std of the confident random model's CTC logits per frame (nats)
BLANK_SHARE = 0.8  # share of calibration frames where blank wins (~5 tokens/s at 40 ms frames)
DECODER_SCALE = 8.0  # output projections of the decoders: logits ~N(0, (8 * 0.3)^2) instead of ~N(0, 0.3^2)
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
SYSTEMS = ("ours", "fp32_eager", "torch_fp16_eager")  # (+ "ours_int8" with --int8)


def feature_frames(seconds: float) -> int:
    """Kaldi fbank frames of ``seconds`` of 16 kHz audio (snip edges): 1 + (samples - 400) // 160."""
    return 1 + (int(seconds * SAMPLE_RATE) - WINDOW) // HOP


def synthetic_features(batch: int, frames: int, config: ConformerConfig, generator: torch.Generator) -> torch.Tensor:
    """Random raw fbank [B, T, F] ~N(FEATURE_MEAN, FEATURE_STD^2) (the random model's CMVN normalises it)."""
    return torch.randn(batch, frames, config.encoder.input_dim, generator=generator) * FEATURE_STD + FEATURE_MEAN


@torch.no_grad()
def random_model(config: ConformerConfig, device: torch.device, seed: int = 0) -> torch.nn.Module:
    """fp32 eval model with PyTorch's default initialisation and non-trivial BatchNorm statistics (if any), made
    confident like a trained model (see the module docstring):

    * CMVN statistics of the synthetic features (mean FEATURE_MEAN, 1 / FEATURE_STD);
    * CTC projection ``logits_u = c_u * w_u . ((x - mu) / sigma)``: mu, sigma the per-dimension mean and std of
      the encoder outputs on a calibration batch (a randomly initialised encoder's outputs are dominated by one
      input-independent direction), c_u chosen so each unit's logit has std CTC_SCALE there; the blank bias is
      then raised to the BLANK_SHARE quantile of (best other logit - blank logit);
    * decoder output projections (weight and bias) times DECODER_SCALE.
    """
    torch.manual_seed(seed)
    model = build_model(config).eval()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm1d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    model.encoder.global_cmvn.mean.fill_(FEATURE_MEAN)
    model.encoder.global_cmvn.istd.fill_(1.0 / FEATURE_STD)
    model = model.to(device)
    # Calibration: encoder outputs of 2 x 2 s of synthetic features (another seed than the benchmark's inputs).
    frames = feature_frames(2.0)
    feats = synthetic_features(2, frames, config, torch.Generator().manual_seed(seed + 1000)).to(device)
    with use_reference():
        encoder_out, _ = model.encode(feats, torch.full((2,), frames, device=device))
    x = encoder_out.reshape(-1, encoder_out.size(-1))  # [frames, D]
    mu, sigma = x.mean(0), x.std(0).clamp_min(1e-6)
    ctc = model.ctc.ctc_lo
    # logits = W (x - mu) / sigma, rows of W rescaled so each unit's logit has std CTC_SCALE on the calibration
    # frames: the input-independent direction mu (which dominates a randomly initialised encoder) is removed.
    w = ctc.weight / sigma  # [V, D]
    w = w * (CTC_SCALE / (((x - mu) @ w.t()).std(0).clamp_min(1e-6))).unsqueeze(1)
    ctc.weight.copy_(w)
    ctc.bias.copy_(-(w @ mu))
    logits = ctc(x)  # [frames, V]
    blank = config.blank_id
    others = torch.cat([logits[:, :blank], logits[:, blank + 1 :]], dim=1).max(dim=1).values
    ctc.bias[blank] += torch.quantile(others - logits[:, blank], BLANK_SHARE)
    for decoder in (model.decoder.left_decoder, model.decoder.right_decoder):
        if decoder is not None:
            decoder.output_layer.weight.mul_(DECODER_SCALE)
            decoder.output_layer.bias.mul_(DECODER_SCALE)
    return model


def rescore(model, config: ConformerConfig, encoder_out, out_lengths, beam: int) -> list[tuple[int, ...]]:
    """The reference second pass: pure-Python CTC prefix beam search, per-utterance rescoring; best tokens."""
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


def bench_eager(model, config, feats, lengths, seconds: float, args, device) -> tuple[dict, list]:
    """Time a reference-path system (kernels forced to PyTorch) on one (batch, length) input. cuDNN runs the
    convolutions without TF32 (PyTorch's default allows it), so the fp32 baseline is fp32 throughout."""
    with torch.inference_mode(), use_reference(), fp32_convolutions():
        encoder_ms = median_ms(lambda: model.encode(feats, lengths), args.repeat, device)
        encoder_out, out_lengths = model.encode(feats, lengths)
        hyps = rescore(model, config, encoder_out, out_lengths, args.beam)
        rescoring_ms = median_ms(lambda: rescore(model, config, encoder_out, out_lengths, args.beam), args.repeat, device)
    return _row(encoder_ms, rescoring_ms, feats.size(0) * seconds, hyps), hyps


def bench_engine(engine: ConformerEngine, config, feats, lengths, seconds: float, args, device) -> tuple[dict, list]:
    """Time the engine: encoder (+ CTC) alone, and the whole attention-rescoring decode."""
    reverse = REVERSE_WEIGHT if config.decoder.r_num_blocks > 0 else 0.0

    def decode():
        return engine.decode(feats, lengths, "attention_rescoring", args.beam, CTC_WEIGHT, reverse)

    with torch.inference_mode():
        encoder_ms = median_ms(lambda: engine.encode_and_search(feats, lengths, 0), args.repeat, device, warmup=2)
        total_ms = median_ms(decode, args.repeat, device, warmup=2)  # the warm-ups capture the graphs
        hyps = [nbest[0][0] if nbest else () for nbest in decode()]
    return _row(encoder_ms, max(total_ms - encoder_ms, 0.0), feats.size(0) * seconds, hyps), hyps


def _row(encoder_ms: float, rescoring_ms: float, audio_s: float, hyps) -> dict:
    total = encoder_ms + rescoring_ms
    return {
        "encoder_ms": encoder_ms,
        "rescoring_ms": rescoring_ms,  # CTC prefix beam search + attention rescoring
        "total_ms": total,
        "rtfx": audio_s / (total / 1e3),
        "mean_tokens": statistics.mean(len(h) for h in hyps),
    }


def _joined(cells: list[dict], key: str, spec: str) -> str:
    return " / ".join(format(cell[key], spec) for cell in cells)


def markdown(results: dict) -> str:
    systems = results["systems"]
    names = " / ".join(name.replace("_eager", "").replace("torch_", "torch ") for name in systems)
    lines = [
        f"# WeNet Conformer ({results['config']}) on {results['gpu']}",
        "",
        (
            f"Random weights of the real sizes made confident (CTC scale {CTC_SCALE}, blank share {BLANK_SHARE}, "
            f"decoder scale {DECODER_SCALE}), beam {results['beam']}, attention rescoring (ctc {CTC_WEIGHT}, reverse "
            f"{REVERSE_WEIGHT}). ours: fp16 engine, CUDA graphs of encoder + CTC + batched prefix beam search, "
            "batched rescoring. fp32: our fp32 eager path with the pure-Python search and per-utterance rescoring "
            "(upstream-faithful). torch fp16: the same path with the model in fp16. Times: median ms per batch; "
            "rescoring = prefix beam search + attention rescoring."
        ),
        "",
        (
            f"| batch | audio s | encoder ms: {names} | rescoring ms: {names} | RTFx: {names} "
            "| ours vs fp32 | ours vs torch fp16 | identical hyps vs fp32: " + ", ".join(
                name for name in systems if name != "fp32_eager") + " | tokens/utt | engines vs fp32: "
            + ", ".join(name for name in systems if name.startswith("ours")) + " |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        cells = [row[name] for name in systems]
        identical = ", ".join(f"{row['identical_hypotheses'][name]:.0%}" for name in systems if name != "fp32_eager")
        lines.append(
            f"| {row['batch']} | {row['seconds']:g} | {_joined(cells, 'encoder_ms', '.2f')} "
            f"| {_joined(cells, 'rescoring_ms', '.1f')} | {_joined(cells, 'rtfx', '.0f')} "
            f"| {row['speedup_vs_fp32']:.1f}x | {row['speedup_vs_torch_fp16']:.1f}x | {identical} "
            f"| {row['fp32_eager']['mean_tokens']:.1f} "
            f"| {', '.join(f'{v:.1f}x' for v in row.get('speedup_vs_fp32_by_engine', {}).values())} |"
        )
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="aishell-u2pp-conformer", choices=sorted(BENCH_CONFIGS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4, 8, 16])
    parser.add_argument("--seconds", nargs="+", type=float, default=[5.0, 15.0], help="audio per utterance")
    parser.add_argument("--beam", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per measurement (median)")
    parser.add_argument("--int8", action="store_true", help="also time the engine with weight-only INT8 linears")
    parser.add_argument("--fp32-engine", action="store_true",
                        help="also time the engine in fp32 (graphs + batched search and rescoring, fp32 results)")
    parser.add_argument("--out", default="benchmarks/results", help="results folder (a <gpu> folder goes inside)")
    parser.add_argument("--name", default="conformer", help="stem of the JSON/Markdown files written")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                        help="cpu: dry run of the logic (use --config tiny); timings are meaningless")  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


def run(args) -> int:
    if min(args.batches) < 1 or min(args.seconds) <= 0.1 or args.repeat < 1 or args.beam < 1:
        print("error: batches, repeat and beam must be >= 1 and seconds > 0.1", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench conformer needs a CUDA GPU (use --device cpu --config tiny for a dry run)", file=sys.stderr)
        return 2
    if args.int8 and args.device != "cuda":
        print("error: --int8 needs --device cuda (the INT8 engine runs on the GPU)", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    config = BENCH_CONFIGS[args.config]
    fp32 = random_model(config, device)
    fp16 = convert_model(copy.deepcopy(fp32), torch.float16, None, precise=False)  # plain PyTorch fp16 (CMVN fp32)
    # ours: fp16 + graphs on the GPU; the CPU dry run checks the same engine logic in fp32, eagerly.
    engine_dtype = torch.float16 if cuda else torch.float32
    buckets = tuple(sorted(set(EngineOptions().batch_buckets) | set(args.batches)))
    engines = {"ours": ConformerEngine(fp32, EngineOptions(engine_dtype, None, batch_buckets=buckets, cuda_graphs=cuda), True)}
    if args.int8:
        engines["ours_int8"] = ConformerEngine(fp32, EngineOptions(engine_dtype, "int8", batch_buckets=buckets, cuda_graphs=cuda), True)
    if args.fp32_engine and cuda:  # the same engine in fp32: the speed of batching and graphs alone, fp32 results
        engines["ours_fp32"] = ConformerEngine(fp32, EngineOptions(torch.float32, None, batch_buckets=buckets), True)
    systems = (*engines, "fp32_eager", "torch_fp16_eager")
    gpu = torch.cuda.get_device_name() if cuda else "cpu"
    results = {"gpu": gpu, "torch": torch.__version__, "config": args.config, "beam": args.beam,
               "systems": systems, "dims": asdict(config.encoder), "rows": []}  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    for seconds in args.seconds:
        frames = feature_frames(seconds)
        for batch in args.batches:
            feats = synthetic_features(batch, frames, config, generator).to(device)
            lengths = torch.full((batch,), frames, dtype=torch.long, device=device)
            row, hyps = {"batch": batch, "seconds": seconds, "frames": frames}, {}
            for name, engine in engines.items():
                row[name], hyps[name] = bench_engine(engine, config, feats, lengths, seconds, args, device)
            row["fp32_eager"], hyps["fp32_eager"] = bench_eager(fp32, config, feats, lengths, seconds, args, device)
            row["torch_fp16_eager"], hyps["torch_fp16_eager"] = bench_eager(
                fp16, config, feats, lengths, seconds, args, device
            )
            total = {name: row[name]["total_ms"] for name in systems}
            row["speedup_vs_fp32"] = total["fp32_eager"] / total["ours"]
            row["speedup_vs_torch_fp16"] = total["torch_fp16_eager"] / total["ours"]
            row["speedup_vs_fp32_by_engine"] = {name: total["fp32_eager"] / total[name] for name in engines}
            row["identical_hypotheses"] = {
                name: sum(a == b for a, b in zip(hyps[name], hyps["fp32_eager"])) / batch for name in systems
            }
            results["rows"].append(row)
            print(markdown({**results, "rows": [row]}).splitlines()[-1], flush=True)
    write_results(results, args.out, args.name, gpu, markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
