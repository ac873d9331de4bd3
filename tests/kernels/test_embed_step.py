"""One decoding step's input (scaled token embedding + the step's position embedding) and its bookkeeping, in one
launch, against an fp64 formulation (``scale * table[token] + positions[step + offset]`` per row) and the module's
PyTorch ops (the reference).

Tolerances: within half an ulp per rounding of the fp64 result (the scale to fp32, scale * embedding, the sum);
equal to the reference bit for bit in fp16/bf16 on the GPU and in fp32/fp16 under the interpreter (bf16 there: one
ulp of scale * embedding, as the interpreter truncates fp32 -> bf16 where the GPU rounds to nearest even; fp32 on
the GPU: half an ulp of it and one of the result, as the compiled kernel fuses the product and the sum into one
FMA). The lengths and the row table are
integers: exact.
"""

import pytest
import torch

from turboformer.kernels import KernelInputError, poison_buffers
from turboformer.kernels.embed_step import embed_step, embed_step_ref, embed_step_triton
from turboformer.kernels.utils import interpreting, launch_on_cpu

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def inputs(B, V, C, P, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (B,), generator=g).to(DEVICE)
    table = torch.randn(V, C, generator=g).to(DEVICE, dtype)
    positions = torch.randn(P, C, generator=g).to(DEVICE, dtype)
    return tokens, table, positions


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_positions", [True, False])
@pytest.mark.parametrize("B, V, C, step", [(5, 37, 12, 0), (3, 11, 1100, 4), (8, 50, 496, 9)])
def test_embed_step(B, V, C, step, with_positions, dtype):
    tokens, table, positions = inputs(B, V, C, 20, dtype)
    positions = positions if with_positions else None
    scale, offset = C**0.5, 2
    t = torch.tensor(step, device=DEVICE)
    L = step + 3
    gold = scaled = scale * table.double()[tokens]
    if with_positions:
        gold = gold + positions.double()[step + offset]
    results = {}
    for name, fn in (("ref", embed_step_ref), ("kernel", embed_step_triton)):
        lengths = torch.zeros(B, dtype=torch.long, device=DEVICE)
        rows = torch.full((B, L + 2), -1, dtype=torch.long, device=DEVICE)[:, 1 : L + 1]  # a strided view
        wide = torch.zeros(B, C + 4, dtype=dtype, device=DEVICE)
        with poison_buffers():
            x = fn(tokens, table, scale, positions, t, offset, lengths=lengths, rows=rows, out=wide[:, 2 : 2 + C])
        assert x.data_ptr() == wide[:, 2:].data_ptr() and not wide[:, :2].any() and not wide[:, 2 + C :].any()
        assert torch.equal(lengths, torch.full_like(lengths, step + 1))
        want_rows = torch.full((B, L), -1, dtype=torch.long, device=DEVICE)
        want_rows[:, step] = torch.arange(B, device=DEVICE)
        assert torch.equal(rows, want_rows)  # column `step` only
        # half an ulp for each rounding: of the scale (a Python float) to fp32, of scale * embedding, of the sum
        bound = torch.finfo(dtype).eps * (scaled.abs() + gold.abs()) * (1 + 1e-6)
        if dtype == torch.bfloat16 and interpreting():
            bound = 2 * bound  # truncated, not rounded
        assert ((x.double() - gold).abs() <= bound).all()
        results[name] = x
    kernel, ref = results["kernel"].double(), results["ref"].double()
    if dtype == torch.bfloat16 and interpreting():  # the truncated scale * embedding: one ulp of it, then the sum's
        assert ((kernel - ref).abs() <= torch.finfo(dtype).eps * (scaled.abs() + ref.abs())).all()
    elif dtype == torch.float32 and not interpreting() and with_positions:  # compiled, fp32 scale * e + position
        # contracts into one FMA: the product's rounding is skipped, so the sum's may round the other way
        assert ((kernel - ref).abs() <= torch.finfo(dtype).eps * (scaled.abs() + ref.abs())).all()
    else:
        assert torch.equal(kernel, ref)


def test_without_bookkeeping_and_dispatch():
    tokens, table, positions = inputs(4, 9, 20, 8, torch.float32)
    step = torch.tensor(3, device=DEVICE)
    ref = embed_step_ref(tokens, table, 2.0, positions, step, 1)
    torch.testing.assert_close(embed_step_triton(tokens, table, 2.0, positions, step, 1), ref, atol=0, rtol=0)
    with launch_on_cpu():
        torch.testing.assert_close(embed_step(tokens, table, 2.0, positions, step, 1), ref, atol=0, rtol=0)


def test_errors():
    tokens, table, positions = inputs(2, 9, 8, 6, torch.float32)
    step = torch.tensor(1, device=DEVICE)
    cases = [
        ((tokens.int(), table, 1.0, positions, step), {}, "tokens must be int64"),
        ((tokens, table, 1.0, positions[:, :4], step), {}, "positions must be"),
        ((tokens, table, 1.0, positions.half(), step), {}, "positions must be"),
        ((tokens, table, 1.0, positions, step.view(1)), {}, "0-d int64"),
        ((tokens, table, 1.0, positions, step), {"lengths": torch.zeros(3, dtype=torch.long, device=DEVICE)},
         "lengths must be"),
        ((tokens, table, 1.0, positions, step), {"rows": torch.zeros(2, 5, device=DEVICE)}, "rows must be"),
        ((tokens, table, 1.0, positions, step), {"out": torch.zeros(2, 9, device=DEVICE)}, "out must be"),
    ]
    for args, kwargs, message in cases:
        for fn in (embed_step_triton, embed_step_ref):
            with pytest.raises(KernelInputError, match=message):
                fn(*args, **kwargs)
