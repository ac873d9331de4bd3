"""Lite Transformer translation: our engine (fp16, CUDA-graphed decode step with the beam search on the device,
Triton kernels; optional INT8 weight-only row) against our fp32 eager path (the model's modules with every op on
its PyTorch reference + the reference BeamSearch), the baseline of the issue, same random weights and inputs.

For a named size (default ``wmt-en-de``: the paper's WMT'14 En-De model, embed 496, random weights), every batch
size x source length x beam size:
- latency: encoder + beam search to ``max_len = 2 x source length`` target tokens (random weights almost never emit
  </s>, so every hypothesis runs to max_len), ms (median, CUDA events on CUDA);
- target tokens/s: tokens (BPE units, </s> included) of the best hypotheses per second; words/s: the same without
  </s>, each BPE unit counted as one word (random weights have no BPE vocabulary to join: an upper bound on real
  words/s); speedup: baseline latency / ours;
- hypotheses: the fraction of sentences whose best hypothesis is the baseline's, for ours (fp16) and for the
  INT8 engine when ``--int8``.

    turboformer bench lite_transformer [--config wmt-en-de] [--batches 1 16] [--src-lens 8 32] [--beams 1 4] [--int8]
    turboformer bench lite_transformer --device cpu --config tiny      (logic check on CPU: no kernels, no GPU)

Writes benchmarks/results/<gpu>/lite_transformer.{json,md} under ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

from turboformer.benchmark.common import median_ms, write_results
from turboformer.kernels import use_reference
from turboformer.models.lite_transformer.config import (
    BranchSpec,
    LiteTransformerConfig,
    StackConfig,
)
from turboformer.models.lite_transformer.generate import (
    BeamSearch,
    BeamSearchOptions,
    Hypothesis,
    SpecialTokens,
)
from turboformer.models.lite_transformer.engine import EngineOptions, LiteTransformerEngine
from turboformer.models.lite_transformer.model import LiteTransformer, build_model

EOS, PAD, UNK = 2, 1, 3  # fairseq Dictionary ids
LENPEN = 0.6  # the repo's WMT evaluation setting
MAX_LEN_FACTOR = 2  # target tokens decoded per source token


def tiny_config() -> LiteTransformerConfig:
    """A tiny model for CPU checks: every branch kind, centred and causal convolutions, odd channels per head."""
    encoder = StackConfig(16, 16, 2, (BranchSpec("attn", 8, 2), BranchSpec("dynamic", 8, 2)), (3, 5), 2)
    decoder = StackConfig(
        16,
        16,
        2,
        (BranchSpec("attn", 6, 2), BranchSpec("dynamic", 6, 2), BranchSpec("lightweight", 4, 2)),
        (3, 4),
        2,
        max_positions=128,
    )
    return LiteTransformerConfig(src_vocab_size=40, tgt_vocab_size=40, encoder=encoder, decoder=decoder)


def config_for(name: str) -> LiteTransformerConfig:
    return tiny_config() if name == "tiny" else LiteTransformerConfig.from_name(name)


@dataclass(frozen=True)
class Case:
    batch: int
    src_len: int
    beam: int


@dataclass(frozen=True)
class _Decoder:
    """:class:`.generate.IncrementalDecoder` over a model's decoder and its static cache."""

    model: LiteTransformer
    cache: object

    def log_probs(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.log_probs(self.model.decoder.step(tokens[:, -1], self.cache))

    def reorder(self, order: torch.Tensor) -> None:
        self.cache.reorder(order)


@torch.inference_mode()
def translate(model: LiteTransformer, src: torch.Tensor, beam: int) -> list[Hypothesis]:
    """Encoder + beam search for src [B, S] (no padding, rows end with </s>) -> the best hypothesis per row."""
    B, S = src.shape
    max_len = MAX_LEN_FACTOR * S
    encoder_out = model.encoder(src)
    rows = torch.arange(B, device=src.device).repeat_interleave(beam)
    cache = model.decoder.new_cache(encoder_out.index_select(rows), max_len + 1)
    search = BeamSearch(BeamSearchOptions(beam, LENPEN), SpecialTokens(eos=EOS, pad=PAD, unk=UNK, start=EOS))
    return [nbest[0] for nbest in search(_Decoder(model, cache), B, max_len, src.device)]


def timed_ms(fn: Callable[[], object], device: torch.device, repeat: int, warmup: int = 1) -> float:
    return median_ms(fn, repeat, device, warmup)


def sources(case: Case, vocab: int, device: torch.device) -> torch.Tensor:
    """Random source sentences [B, S] of real symbols (ids >= 4) ending with </s>."""
    generator = torch.Generator().manual_seed(case.batch * 1000 + case.src_len)
    src = torch.randint(4, vocab, (case.batch, case.src_len), generator=generator)
    src[:, -1] = EOS
    return src.to(device)


def engine_translate(engine: LiteTransformerEngine, src: torch.Tensor, beam: int) -> list[Hypothesis]:
    hypotheses = engine.generate(src, BeamSearchOptions(beam, LENPEN), MAX_LEN_FACTOR * src.size(1))
    return [nbest[0] for nbest in hypotheses]


def _rates(hypotheses: list[Hypothesis], ms: float) -> tuple[float, float]:
    tokens = sum(len(h.tokens) for h in hypotheses)
    words = sum(len(h.tokens) - (h.tokens[-1] == EOS) for h in hypotheses)
    return tokens / ms * 1e3, words / ms * 1e3


def bench_case(
    case: Case, engines: dict[str, LiteTransformerEngine], base: LiteTransformer, device: torch.device, repeat: int
) -> dict:
    src = sources(case, base.config.src_vocab_size, device)
    with use_reference():
        base_hyps = translate(base, src, case.beam)
        base_ms = timed_ms(lambda: translate(base, src, case.beam), device, repeat)
    row = {"batch": case.batch, "src_len": case.src_len, "beam": case.beam, "baseline_ms": base_ms}
    row["baseline_tokens_per_s"], row["baseline_words_per_s"] = _rates(base_hyps, base_ms)
    for name, engine in engines.items():
        hyps = engine_translate(engine, src, case.beam)  # first call captures the graph
        ms = timed_ms(lambda: engine_translate(engine, src, case.beam), device, repeat)
        row[f"{name}_ms"] = ms
        row[f"{name}_tokens_per_s"], row[f"{name}_words_per_s"] = _rates(hyps, ms)
        row[f"{name}_speedup"] = base_ms / ms
        row[f"{name}_equal"] = sum(a.tokens == b.tokens for a, b in zip(hyps, base_hyps)) / case.batch
    return row


def markdown(results: dict) -> str:
    names = results["engines"]
    header = "| batch | src len | beam | fp32 eager ms |"
    rule = "|---:|---:|---:|---:|"
    for name in names:
        header += f" {name} ms | {name} speedup | {name} tok/s | {name} words/s | {name} same hyp |"
        rule += "---:|---:|---:|---:|---:|"
    lines = [
        f"# Lite Transformer {results['config']} on {results['gpu']}: our engine vs our fp32 eager reference path",
        "",
        (
            f"torch {results['torch']}; random weights; beam search to {MAX_LEN_FACTOR} x source length target "
            f"tokens, lenpen {LENPEN}; latency = encoder + search, median of {results['repeat']}. Engines: "
            f"{', '.join(names)} (CUDA graphs: {results['cuda_graphs']}). tok/s counts BPE units with </s>; words/s "
            "counts each BPE unit without </s> as a word (no BPE vocabulary with random weights)."
        ),
        "",
        header,
        rule,
    ]
    for r in results["rows"]:
        line = f"| {r['batch']} | {r['src_len']} | {r['beam']} | {r['baseline_ms']:.1f} |"
        for name in names:
            line += (
                f" {r[name + '_ms']:.2f} | {r[name + '_speedup']:.1f}x | {r[name + '_tokens_per_s']:.0f} "
                f"| {r[name + '_words_per_s']:.0f} | {r[name + '_equal']:.0%} |"
            )
        lines.append(line)
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="wmt-en-de", help="named size (wmt-en-de, wmt-en-de-408, ...) or 'tiny'")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--src-lens", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--beams", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per case (median)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: logic check only (fp32)")
    parser.add_argument("--out", default="benchmarks/results", help="results folder (a <gpu> folder goes inside)")
    parser.add_argument("--name", default="lite_transformer", help="file name of the results, without extension")
    parser.add_argument("--int8", action="store_true", help="add an INT8 weight-only engine (CUDA only)")
    parser.add_argument("--no-graphs", action="store_true", help="run the engine's step eagerly (no CUDA graphs)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


def run(args) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench lite_transformer: needs a CUDA GPU (or --device cpu --config tiny for a logic check)", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if args.int8 and device.type != "cuda":
        print("bench lite_transformer: --int8 needs --device cuda", file=sys.stderr)
        return 2
    # fp16 on CUDA; on CPU (the logic check) fp32, where fp16 matmuls are slow or missing
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    torch.manual_seed(0)
    base = build_model(config_for(args.config)).eval().to(device)
    special = SpecialTokens(eos=EOS, pad=PAD, unk=UNK, start=EOS)
    graphs = device.type == "cuda" and not args.no_graphs
    buckets = tuple(sorted(set(args.batches)))

    def engine(quantize: str | None) -> LiteTransformerEngine:
        model = build_model(config_for(args.config)).eval()
        model.load_state_dict(base.state_dict())
        options = EngineOptions(dtype=dtype, quantize=quantize, cuda_graphs=graphs, sentence_buckets=buckets)
        return LiteTransformerEngine(model, special, options, device)

    name = str(dtype).removeprefix("torch.")
    engines = {name: engine(None)}
    if args.int8:
        engines["int8"] = engine("int8")
    results = {"gpu": gpu, "config": args.config, "engines": list(engines), "cuda_graphs": graphs,
               "torch": torch.__version__, "repeat": args.repeat, "rows": []}  # fmt: skip
    for batch in args.batches:
        for src_len in args.src_lens:
            for beam in args.beams:
                row = bench_case(Case(batch, src_len, beam), engines, base, device, args.repeat)
                results["rows"].append(row)
                print(markdown({**results, "rows": [row]}).splitlines()[-1], flush=True)
    write_results(results, args.out, args.name, gpu, markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
