"""Where the time of a graphed step goes: the GPU kernels of one Lite Transformer beam-search step and of one SAM
prompt-batch decode, from ``torch.profiler`` over the same step run eagerly (kernels and their GPU times are the
graph's; launches are not), next to the graph replay's wall time per step (CUDA events).

    python benchmarks/profile_engines.py [--lite] [--sam] [--sam-encoder vit_h] [--out DIR]

Prints, per engine, the top kernels (calls per step, mean and total GPU microseconds per step) and the sum of
kernel time against the replay time (the rest is the gaps between kernels: launch latency inside the graph).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile


def kernel_table(fn, steps: int, top: int = 25, ops: int = 0) -> tuple[str, float]:
    """Profile ``steps`` calls of ``fn``; returns (table of the top kernels per step, total kernel us per step).
    ``ops`` > 0 appends the top PyTorch ops by their kernels' time, with input shapes (which add is which)."""
    fn()
    torch.cuda.synchronize()
    activities = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if ops else [])
    with profile(activities=activities, record_shapes=bool(ops)) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    rows = {}
    for event in prof.key_averages():
        cuda_us = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
        if cuda_us <= 0 or event.key.startswith(("cuda", "Memcpy HtoD", "Activity")):
            continue
        rows[event.key] = (event.count / steps, cuda_us / steps)
    total = sum(us for _, us in rows.values())
    lines = [f"{'kernel':<90} {'calls':>6} {'us/call':>8} {'us/step':>8}"]
    for name, (calls, us) in sorted(rows.items(), key=lambda r: -r[1][1])[:top]:
        lines.append(f"{name[:90]:<90} {calls:6.1f} {us / max(calls, 1e-9):8.2f} {us:8.1f}")
    lines.append(f"{'total kernel time per step':<90} {sum(c for c, _ in rows.values()):6.0f} {'':>8} {total:8.1f}")
    if ops:
        lines.append(f"\n{'op [input shapes]':<110} {'calls':>6} {'us/step':>8}")
        averages = [e for e in prof.key_averages(group_by_input_shape=True) if e.key.startswith("aten::")]
        device_us = [(getattr(e, "device_time_total", 0) or getattr(e, "cuda_time_total", 0), e) for e in averages]
        for us, event in sorted(device_us, key=lambda r: -r[0])[:ops]:
            label = f"{event.key} {event.input_shapes}"
            lines.append(f"{label[:110]:<110} {event.count / steps:6.1f} {us / steps:8.1f}")
    return "\n".join(lines), total


def replay_us(fn, steps: int) -> float:
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(steps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / steps


def profile_lite(batch: int = 16, src_len: int = 32, beam: int = 4) -> str:
    from turboformer.benchmark.lite_transformer import (
        EOS,
        LENPEN,
        PAD,
        UNK,
        Case,
        config_for,
        sources,
    )
    from turboformer.models.lite_transformer.engine import (
        EngineOptions,
        LiteTransformerEngine,
    )
    from turboformer.models.lite_transformer.generate import (
        BeamSearchOptions,
        SpecialTokens,
    )
    from turboformer.models.lite_transformer.model import build_model

    torch.manual_seed(0)
    model = build_model(config_for("wmt-en-de")).eval()
    special = SpecialTokens(eos=EOS, pad=PAD, unk=UNK, start=EOS)
    engine = LiteTransformerEngine(model, special, EngineOptions(sentence_buckets=(batch,)), "cuda")
    src = sources(Case(batch, src_len, beam), model.config.src_vocab_size, torch.device("cuda"))
    options, max_len = BeamSearchOptions(beam, LENPEN), 2 * src_len
    engine.generate(src, options, max_len)  # captures the slot's graph
    slot = next(iter(engine.slots.values()))
    with torch.inference_mode():
        engine._reset(slot, max_len)
        table, kernel_us = kernel_table(lambda: engine._step(slot), steps=8)
        engine._reset(slot, max_len)
        graph_us = replay_us(slot.graph.replay, steps=32)
        encode_us = replay_us(lambda: engine.encode(src, slot), steps=8)
        tokens = slot.extra["sources"][src.shape[1]].tokens  # the static sources the encoder graph reads
        encoder_table, _ = kernel_table(lambda: engine._encode_step(slot, tokens), steps=4, top=20, ops=12)
    return (f"## Lite Transformer wmt-en-de step: batch {batch}, source {src_len}, beam {beam}, fp16\n{table}\n"
            f"graph replay {graph_us:.1f} us/step; kernels {kernel_us:.1f} us/step; "
            f"encoder + cross K/V {encode_us:.0f} us\n"
            f"\n## Its encoder + cross K/V (eager kernels; graph replay {encode_us:.0f} us)\n{encoder_table}\n")


def profile_sam(prompts: int = 64) -> str:
    from turboformer.models.sam import SAM_CONFIGS, build_sam
    from turboformer.models.sam.engine import PromptDecoderEngine, prepare_sam

    torch.manual_seed(0)
    model = prepare_sam(build_sam(SAM_CONFIGS["vit_b"]), torch.device("cuda"), torch.bfloat16, None)
    cfg = model.config
    embedding = torch.randn(1, cfg.prompt_embed_dim, 64, 64, device="cuda").to(model.dtype)
    coords = torch.rand(prompts, 1, 2, device="cuda") * cfg.image_size
    labels = torch.ones(prompts, 1, dtype=torch.int32, device="cuda")
    eager = PromptDecoderEngine(model, buckets=(prompts,), cuda_graphs=False)
    graphed = PromptDecoderEngine(model, buckets=(prompts,))
    with torch.inference_mode():
        table, kernel_us = kernel_table(lambda: eager.decode(embedding, coords, labels, None, None), steps=4, ops=30)
        graph_us = replay_us(lambda: graphed.decode(embedding, coords, labels, None, None), steps=16)
    return (f"## SAM prompt encoder + mask decoder, {prompts} one-point prompts, decoder dtype {model.dtype}\n{table}\n"
            f"graphed decode {graph_us:.1f} us; kernels {kernel_us:.1f} us\n")


def profile_sam_encoder(size: str = "vit_h", batch: int = 8) -> str:
    """The bf16 image encoder's kernels for one batch (eager: the encoder is not graphed), with the achieved
    TFLOP/s of the whole forward (FLOPs counted as in ``turboformer bench sam``)."""
    from turboformer.benchmark.sam import encoder_flops
    from turboformer.models.sam import SAM_CONFIGS, build_sam
    from turboformer.models.sam.engine import prepare_sam

    torch.manual_seed(0)
    model = prepare_sam(build_sam(SAM_CONFIGS[size]), torch.device("cuda"), torch.bfloat16, None)
    images = torch.randn(batch, 3, 1024, 1024, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        table, kernel_us = kernel_table(lambda: model.image_encoder(images), steps=2, top=30, ops=30)
        wall_us = replay_us(lambda: model.image_encoder(images), steps=3)
    tflops = encoder_flops(model.config, batch) / (wall_us * 1e-6) / 1e12
    return (f"## SAM {size} image encoder, batch {batch}, bf16\n{table}\n"
            f"forward {wall_us / 1e3:.2f} ms ({tflops:.0f} TFLOP/s); kernels {kernel_us / 1e3:.2f} ms\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lite", action="store_true")
    parser.add_argument("--sam", action="store_true", help="the SAM prompt decoder at 64 prompts")
    parser.add_argument("--sam-encoder", default=None, metavar="SIZE", help="the SAM image encoder (vit_b, vit_h)")
    parser.add_argument("--out", default=None, help="also write the report to DIR/profile_engines.txt")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_engines: needs a CUDA GPU", file=sys.stderr)
        return 2
    parts = []
    everything = not (args.lite or args.sam or args.sam_encoder)
    if args.lite or everything:
        parts.append(profile_lite())
    if args.sam or everything:
        parts.append(profile_sam())
    if args.sam_encoder:
        parts.append(profile_sam_encoder(args.sam_encoder))
    report = f"# {torch.cuda.get_device_name()}, torch {torch.__version__}\n\n" + "\n".join(parts)
    print(report)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "profile_engines.txt").write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
