"""Benchmark flash-decoding attention at Whisper large-v3 shapes (20 heads of 64).

Cases: self-attention over a 448-slot cache (all 448 keys valid: the last, longest step) and cross-attention
over 1500 encoder frames, fp16/bf16 and int8 KV, batch 1/16/64. Variants: ``triton`` (ours), ``ref`` (the
PyTorch reference, fp32 math) and ``sdpa`` (the obvious alternative: ``F.scaled_dot_product_attention``
with one query row, on the fp16/bf16 cache even in the int8 case, which is what int8 replaces). Bytes model:
K and V read once at their storage width (int8: 1 byte + fp32 scales), q read and out written once; SDPA's
GB/s counts the fp16/bf16 cache it reads.

Run on a CUDA machine: ``python benchmarks/kernels/bench_decode_attention.py``.
"""

import torch
import torch.nn.functional as F

from bench_common import check, require_cuda, row, time_us, write_results

HEADS, HEAD_DIM = 20, 64
SELF_KV, CROSS_KV = 448, 1500


def main() -> None:
    require_cuda("bench_decode_attention.py")
    from turboformer.kernels.decode_attention import decode_attention_ref, decode_attention_triton, quantize_kv

    rows = []
    for dtype in (torch.float16, torch.bfloat16):
        for batch in (1, 16, 64):
            for kind, seq in (("self", SELF_KV), ("cross", CROSS_KV), ("cross-int8", CROSS_KV)):
                lengths = torch.full((batch,), seq, dtype=torch.int32, device="cuda") if kind == "self" else None
                mask = None if lengths is None else (torch.arange(seq, device="cuda") < lengths[:, None])[:, None, None]

                def make_inputs():
                    """(q, k, v, k_scale, v_scale, k_fp, v_fp): the cache as the op reads it, plus its fp form."""
                    q = torch.randn(batch, HEADS, HEAD_DIM, device="cuda", dtype=dtype)
                    k, v = (torch.randn(batch, HEADS, seq, HEAD_DIM, device="cuda", dtype=dtype) for _ in range(2))
                    if kind != "cross-int8":
                        return q, k, v, None, None, k, v
                    (k8, k_scale), (v8, v_scale) = quantize_kv(k), quantize_kv(v)
                    return q, k8, v8, k_scale, v_scale, k, v

                q, k, v, k_scale, v_scale, k_fp, _ = make_inputs()
                out = decode_attention_triton(q, k, v, lengths, k_scale=k_scale, v_scale=v_scale)
                ref = decode_attention_ref(q, k, v, lengths, k_scale=k_scale, v_scale=v_scale)
                check(f"decode_attention {kind}", out, ref, 1e-2, 1e-2)
                kv_bytes = 2 * k.numel() * k.element_size() + (0 if k_scale is None else 2 * 4 * k_scale.numel())
                nbytes = kv_bytes + 2 * q.numel() * q.element_size()
                sdpa_bytes = 2 * (k_fp.numel() + q.numel()) * q.element_size()  # the fp16/bf16 cache
                # Each variant takes one make_inputs() set: (q, k, v, k_scale, v_scale, k_fp, v_fp).
                variants = {
                    "triton": lambda q, k, v, ks, vs, _kf, _vf: decode_attention_triton(
                        q, k, v, lengths, k_scale=ks, v_scale=vs
                    ),
                    "ref": lambda q, k, v, ks, vs, _kf, _vf: decode_attention_ref(
                        q, k, v, lengths, k_scale=ks, v_scale=vs
                    ),
                    "sdpa": lambda q, _k, _v, _ks, _vs, kf, vf: F.scaled_dot_product_attention(
                        q[:, :, None], kf, vf, attn_mask=mask
                    ),
                }
                times = {name: time_us(fn, make_inputs, nbytes) for name, fn in variants.items()}
                case = {"kind": kind, "dtype": str(dtype).removeprefix("torch."), "B": batch, "H": HEADS, "S": seq}
                rows.append(row(case, nbytes, times, {"sdpa": sdpa_bytes}))
    write_results(
        "decode_attention",
        rows,
        "sdpa = F.scaled_dot_product_attention on the fp16/bf16 cache, also for int8 rows; its GB/s counts that cache.",
    )


if __name__ == "__main__":
    main()
