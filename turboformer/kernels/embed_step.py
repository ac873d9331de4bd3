"""A decoder's input for one incremental step, in one launch: the scaled token embedding plus the position
embedding of the step (fairseq's ``embed_scale * embed_tokens(tokens) + embed_positions``, Vaswani et al. 2017,
Sec. 3.4), and the step's bookkeeping that the graphed decoders keep per row.

For each row b, with ``t`` the step (a 0-d device tensor, so a CUDA graph replays it for every step)::

    x[b]          = round(round(scale * table[tokens[b]]) + positions[t + offset])   (in the table's dtype)
    lengths[b]    = t + 1          (optional: the self-attention's keys after this step)
    rows[b, t]    = b              (optional: the beams' row table; this step's key goes to the row's own row)

Every rounding is PyTorch's (``scale * embedding`` rounds once, the sum once), so the result equals the module's.
Unfused this is six launches (embedding, scale, position index, its gather, the sum, the lengths; seven with the
row table) at ~1-2.5 us each in a graphed step, for a few KB of data.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from turboformer.kernels import utils
from turboformer.kernels.utils import KernelInputError, tl, triton


@triton.jit
def _embed_step_kernel(
    tokens_ptr,  # [B] int64
    table_ptr,  # [V, C] token embeddings (unit stride along C)
    positions_ptr,  # [P, C] position embeddings (read when HAS_POSITIONS)
    step_ptr,  # [] int64
    out_ptr,  # [B, C] out, the table's dtype
    lengths_ptr,  # [B] int64 out (HAS_LENGTHS)
    rows_ptr,  # [B, L] int64 (HAS_ROWS): column t of row b set to b
    C,
    scale,
    offset,
    stride_tv,
    stride_pp,
    stride_ob,
    stride_rb,
    HAS_POSITIONS: tl.constexpr,
    HAS_LENGTHS: tl.constexpr,
    HAS_ROWS: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = cols < C
    t = tl.load(step_ptr)
    token = tl.load(tokens_ptr + b)
    x = (tl.load(table_ptr + token * stride_tv + cols, mask=mask, other=0.0).to(tl.float32) * scale)
    x = x.to(out_ptr.dtype.element_ty)
    if HAS_POSITIONS:
        position = tl.load(positions_ptr + (t + offset) * stride_pp + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + position.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + b * stride_ob + cols, x, mask=mask)
    if tl.program_id(1) == 0:
        if HAS_LENGTHS:
            tl.store(lengths_ptr + b, t + 1)
        if HAS_ROWS:
            tl.store(rows_ptr + b * stride_rb + t, b)


def _check(tokens, table, positions, step, lengths, rows) -> tuple[int, int]:
    utils.check_float("table", table)
    if tokens.dim() != 1 or tokens.dtype != torch.int64 or table.dim() != 2:
        raise KernelInputError(f"tokens must be int64 [B] and table [V, C], got {tokens.dtype} {list(tokens.shape)}, "
                               f"{list(table.shape)}")  # fmt: skip
    B, C = tokens.shape[0], table.shape[1]
    if positions is not None and (positions.dim() != 2 or positions.shape[1] != C or positions.dtype != table.dtype):
        raise KernelInputError(f"positions must be [P, {C}] in {table.dtype}, got {positions.dtype} "
                               f"{list(positions.shape)}")  # fmt: skip
    if step.dim() != 0 or step.dtype != torch.int64:
        raise KernelInputError(f"step must be a 0-d int64 tensor, got {step.dtype} {list(step.shape)}")
    if lengths is not None and (lengths.shape != (B,) or lengths.dtype != torch.int64 or not lengths.is_contiguous()):
        raise KernelInputError(f"lengths must be a contiguous int64 [{B}], got {lengths.dtype} {list(lengths.shape)}")
    if rows is not None and (rows.dim() != 2 or rows.shape[0] != B or rows.dtype != torch.int64 or rows.stride(1) != 1):
        raise KernelInputError(f"rows must be int64 [{B}, L] with unit stride along L, got {rows.dtype} "
                               f"{list(rows.shape)}")  # fmt: skip
    return B, C


def embed_step_triton(tokens, table, scale, positions, step, offset=0, *, lengths=None, rows=None, out=None):
    """:func:`embed_step` with the Triton kernel."""
    B, C = _check(tokens, table, positions, step, lengths, rows)
    utils.check_launchable(*(t for t in (tokens, table, positions, step, lengths, rows) if t is not None))
    if table.stride(1) != 1 or (positions is not None and positions.stride(1) != 1):
        raise KernelInputError("table and positions must have unit stride along C")
    out = utils.output(out, (B, C), table.dtype, table.device)
    block_c = min(utils.next_power_of_2(C), 1024)
    if B > 0:
        _embed_step_kernel[(B, utils.cdiv(C, block_c))](
            tokens, table, positions if positions is not None else table, step, out,
            lengths if lengths is not None else tokens, rows if rows is not None else tokens,
            C, float(scale), offset, table.stride(0), positions.stride(0) if positions is not None else 0,
            out.stride(0), rows.stride(0) if rows is not None else 0,
            HAS_POSITIONS=positions is not None, HAS_LENGTHS=lengths is not None, HAS_ROWS=rows is not None,
            BLOCK_C=block_c, num_warps=4,
        )  # fmt: skip
    return out


def embed_step_ref(tokens, table, scale, positions, step, offset=0, *, lengths=None, rows=None, out=None):
    """PyTorch reference: the module's ops (device ops only, no host sync)."""
    B, C = _check(tokens, table, positions, step, lengths, rows)
    x = scale * F.embedding(tokens, table)
    if positions is not None:
        x = x + positions.index_select(0, step.view(1) + offset)
    if lengths is not None:
        torch.add(step.expand(B), 1, out=lengths)
    if rows is not None:
        rows.index_copy_(1, step.view(1), torch.arange(B, device=rows.device)[:, None])
    return x if out is None else utils.output(out, (B, C), table.dtype, table.device).copy_(x)


def embed_step(
    tokens: torch.Tensor,
    table: torch.Tensor,
    scale: float,
    positions: torch.Tensor | None,
    step: torch.Tensor,
    offset: int = 0,
    *,
    lengths: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decoding step's input ``[B, C]``: ``scale * table[tokens] + positions[step + offset]``.

    Args:
        tokens: ``[B]`` int64 token ids of this step.
        table: ``[V, C]`` token embeddings (fp32/fp16/bf16); the result has its dtype.
        scale: the embedding scale (``sqrt(C)`` in fairseq, 1.0 without).
        positions: ``[P, C]`` position embeddings in the table's dtype (a sinusoidal table or learned ones, with
            fairseq's ``padding_idx + 1`` first position as ``offset``), or None.
        step: 0-d int64 device tensor, the step.
        lengths: optional ``[B]`` int64, set to ``step + 1``.
        rows: optional ``[B, L]`` int64 row table: ``rows[b, step] = b``.
        out: optional ``[B, C]`` destination.

    Triton on CUDA, the reference otherwise.
    """
    options = dict(lengths=lengths, rows=rows, out=out)
    if utils.use_triton_or_interpreter(table):
        return embed_step_triton(tokens, table, scale, positions, step, offset, **options)
    return embed_step_ref(tokens, table, scale, positions, step, offset, **options)
