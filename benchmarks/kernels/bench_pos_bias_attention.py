"""Benchmark the Conformer rel-pos flash attention at AISHELL Conformer shapes (batch 16, 4 heads of 64).

Cases: self-attention over T = S = 125, 375 and 1000 encoder frames (5, 15 and 40 s of audio after 4x
subsampling), fp16, with a ``[B, 1, S]`` key-padding mask (utterance lengths between S/2 and S, the first
full: an offline batch). Variants:

* ``triton``: ours, :func:`pos_bias_attention_triton` (one kernel).
* ``eager``: the reference, WeNet's own maths as the model ran it before (``(q+u) k^T`` and ``(q+w) p^T``
  as two matmuls, sum and scale, masked fp32 softmax, ``masked_fill``, fp16 weights @ v, transpose).
* ``sdpa``: the obvious alternative, ``F.scaled_dot_product_attention`` on the concatenated form
  ``[q+u, q+w] . [k, p]`` (head dim 2 x 64 for the scores) with the boolean mask; the time includes
  building the concatenated queries and keys, as a model would have to.

FLOP model: ``2 B H T S D`` each for ``(q+u) k^T``, ``(q+w) p^T`` and ``prob @ v`` (``6 B H T S D``; masked
keys are counted, softmax and adds are not); every variant's TFLOP/s uses this same count of useful work.

Run on a CUDA machine: ``python benchmarks/kernels/bench_pos_bias_attention.py``; results go to
``benchmarks/results/<gpu>/kernels_pos_bias_attention.{json,md}``.
"""

import torch
import torch.nn.functional as F
from bench_common import check, require_cuda, time_us, write_results

BATCH, HEADS, HEAD_DIM = 16, 4, 64
LENGTHS = (125, 375, 1000)


def sdpa_concatenated(q, k, v, p, u, w, mask):
    """``[q+u, q+w] . [k, p]`` through SDPA with the boolean key mask; returns [B, T, H, D] like the others."""
    queries = torch.cat([q + u, q + w], dim=-1).transpose(1, 2)  # [B, H, T, 2D]
    keys = torch.cat([k, p.expand(k.shape[0], -1, -1, -1)], dim=-1)  # [B, H, S, 2D]
    out = F.scaled_dot_product_attention(queries, keys, v, attn_mask=mask.unsqueeze(1), scale=q.shape[-1] ** -0.5)
    return out.transpose(1, 2)


def main() -> None:
    require_cuda("bench_pos_bias_attention.py")
    from turboformer.kernels.pos_bias_attention import (
        pos_bias_attention_ref,
        pos_bias_attention_triton,
    )

    dtype = torch.float16
    rows = []
    for seq in LENGTHS:

        def make_inputs(seq=seq):
            """(q [B, T, H, D], k, v [B, H, S, D], p [1, H, S, D], u, w [H, D], mask [B, 1, S])."""
            q = torch.randn(BATCH, seq, HEADS, HEAD_DIM, device="cuda", dtype=dtype)
            k, v = (torch.randn(BATCH, HEADS, seq, HEAD_DIM, device="cuda", dtype=dtype) for _ in range(2))
            p = torch.randn(1, HEADS, seq, HEAD_DIM, device="cuda", dtype=dtype)
            u, w = (0.5 * torch.randn(HEADS, HEAD_DIM, device="cuda", dtype=dtype) for _ in range(2))
            lengths = torch.randint(seq // 2, seq + 1, (BATCH,), device="cuda")
            lengths[0] = seq
            mask = (torch.arange(seq, device="cuda") < lengths[:, None])[:, None, :]
            return q, k, v, p, u, w, mask

        inputs = make_inputs()
        expected = pos_bias_attention_ref(*(t.float() for t in inputs[:6]), inputs[6])  # fp32 maths
        check("pos_bias_attention", pos_bias_attention_triton(*inputs), expected, atol=2e-2, rtol=1e-2)
        check("sdpa (concatenated)", sdpa_concatenated(*inputs), expected, atol=2e-2, rtol=1e-2)
        check("eager", pos_bias_attention_ref(*inputs), expected, atol=2e-2, rtol=1e-2)

        variants = {"triton": pos_bias_attention_triton, "eager": pos_bias_attention_ref, "sdpa": sdpa_concatenated}
        q, k, v, p, _, _, mask = inputs  # bytes: each input read once, out (like q) written once
        nbytes = sum(t.numel() * t.element_size() for t in (q, k, v, p, mask, q))
        times_ms = {name: time_us(fn, make_inputs, nbytes) / 1e3 for name, fn in variants.items()}
        flops = 6 * BATCH * HEADS * seq * seq * HEAD_DIM
        row = {"dtype": "float16", "B": BATCH, "H": HEADS, "D": HEAD_DIM, "T": seq, "S": seq,
               "GFLOP": round(flops / 1e9, 3)}  # fmt: skip
        for name, t in times_ms.items():
            row[f"{name}_ms"] = round(t, 4)
        for name, t in times_ms.items():
            row[f"{name}_TFLOPs"] = round(flops / t / 1e9, 1)
        for name, t in times_ms.items():
            if name != "triton":
                row[f"speedup_vs_{name}"] = round(t / times_ms["triton"], 2)
        rows.append(row)
    write_results(
        "pos_bias_attention",
        rows,
        "AISHELL Conformer self-attention, [B, 1, S] key-padding mask; eager = two matmuls + masked fp32 softmax "
        "+ matmul (the reference); sdpa = F.scaled_dot_product_attention on [q+u, q+w] . [k, p] with the bool "
        "mask, including the concatenation. TFLOP/s from 6 B H T S D for every variant.",
    )


if __name__ == "__main__":
    main()
