"""Error statistics of a tensor against its reference: what every accuracy report prints."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TensorStats:
    """Elementwise |a - b| statistics and per-row relative error ||a - b|| / ||b|| over the last axis."""

    max_abs: float
    mean_abs: float
    median_abs: float
    max_rel: float
    mean_rel: float
    median_rel: float
    count: int  # elements compared
    finite: bool  # no NaN/Inf in the candidate

    def row(self) -> str:
        return (
            f"abs max {self.max_abs:.3g} mean {self.mean_abs:.3g} median {self.median_abs:.3g} | "
            f"rel max {self.max_rel:.3g} mean {self.mean_rel:.3g} median {self.median_rel:.3g}"
        )


def tensor_stats(candidate: torch.Tensor, reference: torch.Tensor) -> TensorStats:
    """Compare two tensors of one shape in float64 (rows = all axes but the last)."""
    if candidate.shape != reference.shape:
        raise ValueError(f"shapes differ: {tuple(candidate.shape)} vs {tuple(reference.shape)}")
    a, b = candidate.detach().double().cpu(), reference.detach().double().cpu()
    diff = (a - b).abs().flatten()
    rows_a, rows_b = a.reshape(-1, a.shape[-1] if a.dim() else 1), b.reshape(-1, b.shape[-1] if b.dim() else 1)
    rel = (rows_a - rows_b).norm(dim=-1) / rows_b.norm(dim=-1).clamp_min(1e-30)
    return TensorStats(
        max_abs=diff.max().item(),
        mean_abs=diff.mean().item(),
        median_abs=diff.median().item(),
        max_rel=rel.max().item(),
        mean_rel=rel.mean().item(),
        median_rel=rel.median().item(),
        count=diff.numel(),
        finite=bool(torch.isfinite(a).all()),
    )
