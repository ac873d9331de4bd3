"""Whisper: turboformer's GPU engine against Hugging Face transformers, side by side, same weights and inputs.

For each model size (random weights of the real dimensions) and batch size:
- encoder: one 30 s window per row, ms (CUDA events, median);
- decode: 100 greedy tokens after a 4-token prompt with end-of-text suppressed, ms per token;
- RTFx: seconds of audio (30 s per row) per second of encoder + 100-token decode;
- hardware units: decode GB/s against the bytes a step must read (weights + cross-attention K/V + self K/V),
  encoder TFLOP/s against the encoder's FLOPs, each with its floor from the measured copy/matmul peaks.
The reference is transformers' WhisperForConditionalGeneration in fp16 with SDPA attention, decoding through
``generate`` with its KV cache (the encoder output passed in, so the decode time excludes the encoder); with
``--hf-compile``, also with its static cache and ``torch.compile(mode="reduce-overhead")``.

    turboformer bench whisper [--models tiny base small large-v3 large-v3-turbo] [--batches 1 16 64] [--int8]
    python benchmarks/bench_whisper.py ...        (the same, from a checkout)

Writes benchmarks/results/<gpu>/whisper.{json,md} under the current directory (plot: benchmarks/plot_results.py).
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
import time
from dataclasses import replace

import torch

from turboformer.benchmark.common import median_ms, write_results
from turboformer.models.whisper.config import WHISPER_CONFIGS
from turboformer.models.whisper.convert import (
    random_model,
    random_state,
    to_huggingface,
)
from turboformer.models.whisper.graph_engine import EngineOptions, GraphEngine

PROMPT_TOKENS = 4
NEW_TOKENS = 100


def cuda_ms(fn, repeat: int, warmup: int = 1) -> float:
    """Median milliseconds of fn() over `repeat` runs, timed with CUDA events."""
    return median_ms(fn, repeat, "cuda", warmup)


def measure_peaks() -> dict:
    """Device copy bandwidth (bytes read + written) and bf16 matmul rate, measured once."""
    a = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    copy_ms = cuda_ms(lambda: b.copy_(a), 10, 3)
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm_ms = cuda_ms(lambda: x @ y, 10, 3)
    return {"copy_GBps": 2 * 2**30 / copy_ms / 1e6, "matmul_TFLOPs": 2 * 8192**3 / mm_ms / 1e9}


def encoder_flops(config, batch: int) -> float:
    """Matmul FLOPs of the encoder per batch of 30 s windows (convs, projections, attention)."""
    t, c, layers = config.n_audio_ctx, config.n_audio_state, config.n_audio_layer
    conv = 2 * (2 * t) * 3 * config.n_mels * c + 2 * t * 3 * c * c
    per_layer = 2 * t * 12 * c * c + 4 * t * t * c  # qkv/out/mlp (12 C^2 per frame) + QK^T and PV
    return batch * (conv + layers * per_layer)


def decode_step_bytes(engine: GraphEngine, rows: int, mean_length: float) -> float:
    """Bytes one decode step must read: weights once, each row's cross K/V and its self K/V so far."""
    cfg = engine.config
    elem = engine.cross_k.element_size()
    cross = rows * cfg.n_text_layer * 2 * cfg.n_audio_ctx * cfg.n_text_state * elem
    self_kv = rows * cfg.n_text_layer * 2 * mean_length * cfg.n_text_state * engine.self_k.element_size()
    return engine.weight_bytes() + cross + self_kv


def prompt_for(config) -> list[int]:
    eot = 50257 if config.multilingual else 50256
    return [eot + 1, eot + 2, eot + 102, eot + 106][:PROMPT_TOKENS]  # sot, en, transcribe, no-timestamps


def bench_ours(model, config, batches, mel, options) -> tuple[dict, GraphEngine]:
    torch.cuda.synchronize()
    started = time.perf_counter()
    engine = GraphEngine(model, options, "cuda")
    torch.cuda.synchronize()
    build_s = time.perf_counter() - started
    eot = 50257 if config.multilingual else 50256
    suppress = torch.zeros(config.n_vocab, device=engine.device)  # where the engine's logits are
    suppress[eot] = -math.inf
    rows = {}
    for batch in batches:
        x = mel[:batch]
        started = time.perf_counter()
        engine.encode(x)  # the first call per bucket captures the encoder's graph
        torch.cuda.synchronize()
        capture_s = time.perf_counter() - started
        encode_ms = cuda_ms(lambda: engine.encode(x), 5)
        features = engine.encode(x)
        prompt = torch.tensor([prompt_for(config)] * batch)

        def decode():
            engine.start(features, 1, torch.zeros(batch, dtype=torch.long))
            logits, _ = engine.prefill(prompt, torch.zeros(batch, dtype=torch.long))
            return engine.greedy((logits + suppress).argmax(-1), NEW_TOKENS, suppress)

        tokens = decode()
        assert tokens.shape == (batch, NEW_TOKENS) and not (tokens == eot).any()
        total_ms = cuda_ms(decode, 3)
        # the prefill and start are outside the per-token figure: time them alone and subtract
        def head():
            engine.start(features, 1, torch.zeros(batch, dtype=torch.long))
            engine.prefill(prompt, torch.zeros(batch, dtype=torch.long))

        head_ms = cuda_ms(head, 3)
        per_token = (total_ms - head_ms) / (NEW_TOKENS - 1)
        step_bytes = decode_step_bytes(engine, batch, PROMPT_TOKENS + NEW_TOKENS / 2)
        rows[batch] = {
            "encoder_ms": encode_ms,
            "encoder_capture_s": capture_s,
            "decode_ms": total_ms,
            "ms_per_token": per_token,
            "tokens_per_s": batch / per_token * 1e3,
            "rtfx": 30 * batch / ((encode_ms + total_ms) / 1e3),
            "decode_GBps": step_bytes / per_token / 1e6,
            "step_bytes": step_bytes,
            "encoder_TFLOPs": encoder_flops(config, batch) / encode_ms / 1e9,
        }
    return {"build_s": build_s, "rows": rows}, engine


def bench_hf(config, state, batches, mel, compiled: bool = False) -> dict:
    """transformers' decode; ``compiled``: with its static KV cache and ``torch.compile(mode="reduce-overhead")``
    on the forward (CUDA graphs), the recipe of transformers' "optimizing inference" guide. A failure to run
    (compile errors, unsupported cache) is recorded as the row's ``error`` instead of a time."""
    from transformers import GenerationConfig, GenerationMixin

    model = to_huggingface(config, state, attn_implementation="sdpa").half()
    if compiled:
        model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=False)
    eot = 50257 if config.multilingual else 50256
    rows = {}
    for batch in batches:
        x = mel[:batch].half()

        def encode():
            with torch.inference_mode():  # parameters require grad: without this autograd keeps activations
                return model.model.encoder(x)

        encode_ms = cuda_ms(encode, 3)
        encoded = encode()
        prompt = torch.tensor([prompt_for(config)] * batch, device=x.device)

        generation = GenerationConfig(
            max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, num_beams=1, use_cache=True,
            eos_token_id=eot, pad_token_id=eot, decoder_start_token_id=eot + 1,
            cache_implementation="static" if compiled else None,
        )  # fmt: skip

        def decode():  # transformers' generic generate loop: Whisper's override adds long-form logic we skip
            with torch.inference_mode():
                return GenerationMixin.generate(
                    model, encoder_outputs=encoded, decoder_input_ids=prompt, generation_config=generation
                )

        try:
            started = time.perf_counter()
            out = decode()  # compiles, when compiled
            compile_s = time.perf_counter() - started
            assert out.shape[1] == PROMPT_TOKENS + NEW_TOKENS
            decode_ms = cuda_ms(decode, 2, warmup=1 if compiled else 0)
        except Exception as error:  # the row records why the reference could not run
            if not compiled:
                raise
            rows[batch] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
            print(f"HF static cache + torch.compile, batch {batch}: {rows[batch]['error']}", file=sys.stderr)
            continue
        rows[batch] = {
            "encoder_ms": encode_ms,
            "decode_ms": decode_ms,
            "ms_per_token": decode_ms / NEW_TOKENS,
            "tokens_per_s": batch * NEW_TOKENS / decode_ms * 1e3,
            "rtfx": 30 * batch / ((encode_ms + decode_ms) / 1e3),
            "encoder_TFLOPs": encoder_flops(config, batch) / encode_ms / 1e9,
        }
        if compiled:
            rows[batch]["first_call_s"] = compile_s
    return {"rows": rows}  # the model goes with this frame


def markdown(results: dict) -> str:
    gpu, peaks = results["gpu"], results["peaks"]
    lines = [
        f"# Whisper on {gpu}: turboformer vs Hugging Face transformers {results['transformers']}",
        "",
        f"Measured peaks: {peaks['copy_GBps']:.0f} GB/s device copy, {peaks['matmul_TFLOPs']:.0f} TFLOP/s bf16 matmul. "
        f"Random weights of the real sizes; {PROMPT_TOKENS}-token prompt, {NEW_TOKENS} greedy tokens, end-of-text "
        "suppressed; fp16; reference: transformers SDPA + generate (KV cache). Decode time includes the prompt "
        "pass (ours: the per-token figure excludes it).",
        "",
        "| model | batch | build s + encoder graph s | encoder ms (HF) | enc TFLOP/s (% peak) | ms/token (HF) | speedup/token "
        "| decode GB/s (% copy) | RTFx (HF) | RTFx ratio | INT8 ms/token | HF compiled ms/token |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in results["models"].items():
        for batch, ours in entry["ours"]["rows"].items():
            hf = entry["hf"]["rows"][batch]
            lines.append(
                f"| {name} | {batch} | {entry['ours']['build_s']:.1f} + {ours.get('encoder_capture_s', 0.0):.1f} | {ours['encoder_ms']:.2f} ({hf['encoder_ms']:.2f}) "
                f"| {ours['encoder_TFLOPs']:.0f} ({100 * ours['encoder_TFLOPs'] / peaks['matmul_TFLOPs']:.0f}%) "
                f"| {ours['ms_per_token']:.3f} ({hf['ms_per_token']:.2f}) | {hf['ms_per_token'] / ours['ms_per_token']:.1f}x "
                f"| {ours['decode_GBps']:.0f} ({100 * ours['decode_GBps'] / peaks['copy_GBps']:.0f}%) "
                f"| {ours['rtfx']:.0f} ({hf['rtfx']:.0f}) | {ours['rtfx'] / hf['rtfx']:.1f}x "
                f"| {entry['ours'].get('int8_rows', {}).get(batch, {}).get('ms_per_token', float('nan')):.3f} "
                f"| {_compiled_cell(entry, batch)} |"
            )
    return "\n".join(lines) + "\n"


def bench_mel(config, rows: int) -> torch.Tensor:
    """The benchmark's input: [rows, n_mels, 3000] seeded noise on the GPU (the same in a child process)."""
    generator = torch.Generator("cuda").manual_seed(0)
    return torch.randn(rows, config.n_mels, 3000, device="cuda", generator=generator) * 0.5


def hf_compiled_in_child(name: str, batches: list[int], rows: int, timeout_s: float = 900) -> dict:
    """transformers with static cache + torch.compile, in a child process: compiling can crash the process
    (torch 2.11 + transformers 5.17 on the H200: a segmentation fault after "skipping cudagraphs due to mutated
    inputs"), which must not take the rest of the benchmark with it. Same weights (seeded) and inputs."""
    import json
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        out = f"{folder}/hf_compiled.json"
        code = (
            "import json, sys, torch\n"
            "from turboformer.benchmark.whisper import bench_hf, bench_mel\n"
            "from turboformer.models.whisper.config import WHISPER_CONFIGS\n"
            "from turboformer.models.whisper.convert import random_state\n"
            f"config = WHISPER_CONFIGS[{name!r}]\n"
            "state = random_state(config, seed=0, device='cuda', dtype=torch.float16)\n"
            f"result = bench_hf(config, state, {batches!r}, bench_mel(config, {rows}), compiled=True)\n"
            f"json.dump(result, open({out!r}, 'w'))\n"
        )
        try:
            done = subprocess.run(
                [sys.executable, "-c", code], timeout=timeout_s, capture_output=True, text=True, check=False
            )
        except subprocess.TimeoutExpired:
            return {"rows": {b: {"error": f"timed out after {timeout_s:.0f} s"} for b in batches}}
        if done.returncode != 0:
            tail = done.stderr.strip().splitlines()[-1:] or [""]
            error = f"child exited with {done.returncode}: {tail[0][:200]}"
            print(f"HF static cache + torch.compile ({name}): {error}", file=sys.stderr)
            return {"rows": {b: {"error": error} for b in batches}}
        with open(out) as f:
            return {"rows": {int(b): row for b, row in json.load(f)["rows"].items()}}


def _compiled_cell(entry: dict, batch) -> str:
    row = entry.get("hf_compiled", {}).get("rows", {}).get(batch)
    if row is None:
        return "-"
    return "did not run" if "error" in row else f"{row['ms_per_token']:.3f}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", default=["tiny", "base", "small", "large-v3", "large-v3-turbo"],
                        choices=sorted(WHISPER_CONFIGS), metavar="SIZE")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16, 64])
    parser.add_argument("--out", default="benchmarks/results", help="results folder (a <gpu> folder goes inside)")
    parser.add_argument("--name", default="whisper", help="stem of the JSON/Markdown files written")
    parser.add_argument("--int8", action="store_true", help="also time the INT8 engine (weights + cross-KV)")
    parser.add_argument("--hf-compile", nargs="*", type=int, metavar="BATCH", default=None,
                        help="also time transformers with its static cache + torch.compile at these batches "
                             "(no value: all; compiling takes minutes per model and batch)")  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


def run(args) -> int:
    if max(args.batches) > 64 or min(args.batches) < 1:
        print("error: batches must be between 1 and 64 rows", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("bench_whisper needs a CUDA GPU", file=sys.stderr)
        return 2
    import transformers

    gpu = torch.cuda.get_device_name()
    results = {"gpu": gpu, "torch": torch.__version__, "transformers": transformers.__version__,
               "peaks": measure_peaks(), "models": {}}
    for name in args.models:
        config = WHISPER_CONFIGS[name]
        mel = bench_mel(config, max(args.batches))
        state = random_state(config, seed=0, device="cuda", dtype=torch.float16)
        model = random_model(config, seed=0, device="cuda", dtype=torch.float16)
        options = EngineOptions(dtype=torch.float16, buckets=tuple(sorted({1, 2, 4, 8, 16, 32, 64} | set(args.batches))))
        ours, engine = bench_ours(model, config, args.batches, mel, options)
        del engine
        gc.collect()  # the engine's graphs reference it through bound methods: collect the cycle
        torch.cuda.empty_cache()
        if args.int8:
            int8, engine = bench_ours(model, config, args.batches, mel, replace(options, quantize="int8"))
            ours["int8_rows"] = int8["rows"]
            del engine
            gc.collect()
            torch.cuda.empty_cache()
        del model
        hf = bench_hf(config, state, args.batches, mel)
        gc.collect()
        torch.cuda.empty_cache()
        results["models"][name] = {"ours": ours, "hf": hf}
        del state
        if args.hf_compile is not None:
            batches = [b for b in args.batches if not args.hf_compile or b in args.hf_compile]
            results["models"][name]["hf_compiled"] = hf_compiled_in_child(name, batches, max(args.batches))
        print("\n".join(markdown({**results, "models": {name: results["models"][name]}}).splitlines()[-len(args.batches):]), flush=True)
    write_results(results, args.out, args.name, gpu, markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
