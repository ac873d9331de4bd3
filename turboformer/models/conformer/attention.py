"""Multi-head attention blocks of the WeNet Conformer (wenet/transformer/attention.py).

Two variants, each a small class:

* :class:`RelPositionAttention` -- the encoder's self-attention with relative positional encoding,
  Transformer-XL style (Dai et al., arXiv 1901.02860, Section 3.3): learned biases ``u`` (content) and
  ``v`` (position) are added to the query. WeNet's ``rel_pos`` feeds the positional rows of the *keys'*
  absolute positions, so score matrices (a)+(c) and (b)+(d) have the same shape and no ``rel_shift`` is
  applied (WeNet ``RelPositionMultiHeadedAttention``). Scores, masked softmax and the weighted sum run in
  :func:`turboformer.kernels.pos_bias_attention.pos_bias_attention`: one fused Triton flash-attention kernel
  on CUDA, WeNet's own two matmuls + fp32 softmax (the reference) elsewhere.
* :class:`MultiHeadedAttention` -- plain scaled dot-product attention for the decoder (self and cross).

Masks are boolean with ``True`` = may attend, shaped ``[B, 1, S]`` (key padding) or ``[B, T, S]``
(chunk / causal). Softmax runs in float32 whatever the activation dtype (fp16/bf16 engines).
"""

from __future__ import annotations

import math

import torch
from torch import nn

# Called as pba.pos_bias_attention (module attribute), so a test can route it to the Triton launcher on CPU.
from turboformer.kernels import pos_bias_attention as pba


def masked_softmax_attend(scores: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``softmax(scores) @ value`` with masked keys; float32 softmax.

    Args:
        scores: [B, H, T, S] attention logits (already scaled).
        value: [B, H, S, d_k].
        mask: [B, 1 | T, S] bool, True = attend; None attends everywhere.
    Returns:
        [B, H, T, d_k]. Fully masked query rows give zeros, as upstream (masked_fill after softmax).
    """
    scores = scores.float()
    if mask is not None:
        blocked = ~mask.unsqueeze(1)  # [B, 1, 1|T, S]
        weights = torch.softmax(scores.masked_fill(blocked, -math.inf), dim=-1).masked_fill(blocked, 0.0)
    else:
        weights = torch.softmax(scores, dim=-1)
    return torch.matmul(weights.to(value.dtype), value)


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, T, H * d_k] -> [B, H, T, d_k]."""
    batch, time, _ = x.shape
    return x.view(batch, time, heads, -1).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, T, d_k] -> [B, T, H * d_k]."""
    batch, heads, time, d_k = x.shape
    return x.transpose(1, 2).reshape(batch, time, heads * d_k)


class MultiHeadedAttention(nn.Module):
    """Scaled dot-product attention (Vaswani et al., arXiv 1706.03762, Section 3.2.2)."""

    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.heads = heads
        self.d_k = d_model // heads
        self.linear_q = nn.Linear(d_model, d_model)
        self.linear_k = nn.Linear(d_model, d_model)
        self.linear_v = nn.Linear(d_model, d_model)
        self.linear_out = nn.Linear(d_model, d_model)

    def project_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of ``x`` [B, S, D]: two [B, H, S, d_k] tensors (cacheable)."""
        return _split_heads(self.linear_k(x), self.heads), _split_heads(self.linear_v(x), self.heads)

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Attend ``query`` [B, T, D] to projected ``key``/``value`` [B, H, S, d_k]; returns [B, T, D]."""
        q = _split_heads(self.linear_q(query), self.heads)  # [B, H, T, d_k]
        scores = torch.matmul(q, key.transpose(-2, -1)) / math.sqrt(self.d_k)  # [B, H, T, S]
        return self.linear_out(_merge_heads(masked_softmax_attend(scores, value, mask)))


class RelPositionAttention(nn.Module):
    """Self-attention with relative positional encoding and a streaming key/value cache.

    score(i, j) = (q_i + u)·k_j + (q_i + v)·p_j, scaled by 1/sqrt(d_k), with p_j = W_pos · pe[j]
    (arXiv 1901.02860 Eq. (a)-(d); WeNet keeps terms (a)+(c) and (b)+(d) in two matmuls).
    """

    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.heads = heads
        self.d_k = d_model // heads
        self.linear_q = nn.Linear(d_model, d_model)
        self.linear_k = nn.Linear(d_model, d_model)
        self.linear_v = nn.Linear(d_model, d_model)
        self.linear_out = nn.Linear(d_model, d_model)
        self.linear_pos = nn.Linear(d_model, d_model, bias=False)
        self.pos_bias_u = nn.Parameter(torch.zeros(heads, self.d_k))  # [H, d_k]
        self.pos_bias_v = nn.Parameter(torch.zeros(heads, self.d_k))  # [H, d_k]

    def forward(
        self,
        x: torch.Tensor,
        pos_emb: torch.Tensor,
        mask: torch.Tensor | None,
        kv_cache: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Self-attention over ``x``, optionally preceded by cached keys/values.

        Args:
            x: [B, T, D] queries (and new keys/values).
            pos_emb: [1, S, D] positional rows of the S = Tc + T keys.
            mask: [B, 1 | T, S] bool (True = attend) or None.
            kv_cache: [B, H, Tc, 2 * d_k] (keys ‖ values, WeNet's layout) or None: no history and no
                cache returned.
        Returns:
            ([B, T, D], the updated cache [B, H, S, 2 * d_k] when ``kv_cache`` was given, else None).
        """
        q = self.linear_q(x).view(x.size(0), x.size(1), self.heads, self.d_k)  # [B, T, H, d_k]
        k = _split_heads(self.linear_k(x), self.heads)  # [B, H, T, d_k]
        v = _split_heads(self.linear_v(x), self.heads)
        new_cache = None
        if kv_cache is not None:
            if kv_cache.size(2) > 0:
                k_cached, v_cached = kv_cache.split(self.d_k, dim=-1)
                k = torch.cat([k_cached, k], dim=2)  # [B, H, S, d_k]
                v = torch.cat([v_cached, v], dim=2)
            new_cache = torch.cat([k, v], dim=-1)  # [B, H, S, 2 * d_k]
        p = _split_heads(self.linear_pos(pos_emb), self.heads)  # [1, H, S, d_k]
        # scores ((q + u)·k + (q + v)·p) / sqrt(d_k), masked fp32 softmax, weights @ v: fused flash attention on
        # CUDA, WeNet's two matmuls + softmax (the reference) elsewhere. [B, T, H, d_k], heads already merged.
        out = pba.pos_bias_attention(q, k, v, p, self.pos_bias_u, self.pos_bias_v, mask)
        return self.linear_out(out.view(x.size(0), x.size(1), self.heads * self.d_k)), new_cache
