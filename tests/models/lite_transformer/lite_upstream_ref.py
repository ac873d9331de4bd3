"""Test reference: a functional transcription of mit-han-lab/lite-transformer's forward pass (fairseq 0.8
``transformer_multibranch_v2``, CPU modules), written from the upstream code and independent of turboformer.

It works like upstream: time-major [T, B, C], directly on an *upstream* state dict (upstream key names), attention
through ``F.multi_head_attention_forward`` (the function upstream's MultiheadAttention calls), convolutions through
upstream's band-matrix (``_forward_expanded``) construction, ``maybe_layer_norm`` for pre-/post-norm.

``test_lite_variants.py`` first checks it against the upstream fixture, then uses it as the reference for the
architecture options the fixture does not exercise (pre-norm, lightweight convolutions, learned positions, ...).
``random_upstream_state`` builds an upstream-format state dict for given args (shapes as upstream allocates them).
"""

from __future__ import annotations

import math
from argparse import Namespace
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

PAD = 1


def _branches(args: Namespace, side: str) -> list[tuple[str, int, int, str]]:
    """[(type, dim, heads, kernel)] from 'type:kernel:dim:heads' specs."""
    out = []
    for spec in getattr(args, f"{side}_branch_type"):
        kind, kernel, dim, heads = spec.split(":")
        out.append((kind, int(dim), int(heads), kernel))
    return out


def _kernel(args: Namespace, side: str, layer: int, kernel: str) -> int:
    return getattr(args, f"{side}_kernel_size_list")[layer] if kernel == "default" else int(kernel)


def sinusoid(num: int, dim: int) -> Tensor:
    """fairseq SinusoidalPositionalEmbedding.get_embedding."""
    half = dim // 2
    emb = math.log(10000) / (half - 1)
    emb = torch.exp(torch.arange(half, dtype=torch.float) * -emb)
    emb = torch.arange(num, dtype=torch.float).unsqueeze(1) * emb.unsqueeze(0)
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1).view(num, -1)
    if dim % 2 == 1:
        emb = torch.cat([emb, torch.zeros(num, 1)], dim=1)
    emb[PAD, :] = 0
    return emb


def _positions(tokens: Tensor) -> Tensor:
    mask = tokens.ne(PAD).int()
    return (torch.cumsum(mask, dim=1).type_as(mask) * mask).long() + PAD


def _embed(sd: dict, args: Namespace, side: str, tokens: Tensor) -> Tensor:
    dim = getattr(args, f"{side}_embed_dim")
    x = math.sqrt(dim) * F.embedding(tokens, sd[f"{side}.embed_tokens.weight"])
    if not getattr(args, "no_token_positional_embeddings", False):
        pos = _positions(tokens)
        if getattr(args, f"{side}_learned_pos"):
            x = x + F.embedding(pos, sd[f"{side}.embed_positions.weight"])
        else:
            table = sinusoid(int(pos.max()) + 1, dim).to(x.device)
            x = x + F.embedding(pos, table).to(x.dtype)  # upstream: x += positions
    return x.transpose(0, 1)  # T x B x C


def _band_conv(x: Tensor, weight: Tensor, padding_l: int) -> Tensor:
    """upstream _forward_expanded: x T x B x C, weight (T*B*H) x K (normalised)."""
    T, B, C = x.size()
    K = weight.size(1)
    H = weight.size(0) // (T * B)
    R = C // H
    weight = weight.view(T, B * H, K).transpose(0, 1)
    x = x.view(T, B * H, R).transpose(0, 1)
    P = padding_l
    if K > T and P == K - 1:
        weight = weight.narrow(2, K - T, T)
        K, P = T, T - 1
    weight_expanded = weight.new_zeros(B * H, T, T + K - 1)
    weight_expanded.as_strided((B * H, T, K), (T * (T + K - 1), T + K, 1)).copy_(weight)
    weight_expanded = weight_expanded.narrow(2, P, T)
    return torch.bmm(weight_expanded, x).transpose(0, 1).contiguous().view(T, B, C)


def _conv_branch(
    sd: dict, p: str, args: Namespace, kind: str, heads: int, K: int, padding_l: int, glu: bool, x: Tensor
) -> Tensor:
    T, B, _ = x.size()
    if args.conv_linear:
        x = F.linear(x, sd[p + "linear1.weight"], sd[p + "linear1.bias"])
        if kind == "dynamic" and glu:
            x = F.glu(x, dim=-1)
    if kind == "dynamic":
        weight = F.linear(x, sd[p + "weight_linear.weight"]).view(T * B * heads, -1)
    else:
        weight = (
            sd[p + "weight"]
            .view(heads, K)
            .view(1, heads, K)
            .expand(T * B, heads, K)
            .contiguous()
            .view(T * B * heads, K)
        )
    if args.weight_softmax:
        weight = F.softmax(weight, dim=1)
    out = _band_conv(x, weight, padding_l)
    if args.conv_linear:
        out = F.linear(out, sd[p + "linear2.weight"], sd[p + "linear2.bias"])
    return out


def _mha(sd: dict, p: str, heads: int, q: Tensor, kv: Tensor, key_padding_mask=None, attn_mask=None) -> Tensor:
    out, _ = F.multi_head_attention_forward(
        q, kv, kv, q.size(-1), heads,
        None, torch.cat((sd[p + "q_proj.bias"], sd[p + "k_proj.bias"], sd[p + "v_proj.bias"])),
        None, None, False, 0.0,
        sd[p + "out_proj.weight"], sd[p + "out_proj.bias"],
        training=False, key_padding_mask=key_padding_mask, need_weights=False, attn_mask=attn_mask,
        use_separate_proj_weight=True,
        q_proj_weight=sd[p + "q_proj.weight"], k_proj_weight=sd[p + "k_proj.weight"],
        v_proj_weight=sd[p + "v_proj.weight"],
    )  # fmt: skip
    return out


def _multibranch(sd, p, args, side, layer, x, key_padding_mask=None, attn_mask=None) -> Tensor:
    outs, start = [], 0
    for j, (kind, dim, heads, kernel) in enumerate(_branches(args, side)):
        q = x[..., start : start + dim]
        start += dim
        bp = f"{p}self_attn.branches.{j}."
        if kind == "attn":
            outs.append(_mha(sd, bp, heads, q, q, key_padding_mask, attn_mask))
        else:
            if key_padding_mask is not None:
                q = q.masked_fill(key_padding_mask.transpose(0, 1).unsqueeze(2), 0)
            K = _kernel(args, side, layer, kernel)
            padding_l = K // 2 if side == "encoder" else K - 1
            outs.append(
                _conv_branch(sd, bp, args, kind, heads, K, padding_l, getattr(args, f"{side}_glu"), q.contiguous())
            )
    return torch.cat(outs, dim=-1)


def _ln(sd: dict, p: str, x: Tensor) -> Tensor:
    return F.layer_norm(x, (x.size(-1),), sd[p + "weight"], sd[p + "bias"], 1e-5)


def _ffn(sd: dict, p: str, args: Namespace, x: Tensor) -> Tensor:
    act = {"relu": F.relu, "gelu": F.gelu}[args.activation_fn]
    return F.linear(
        act(F.linear(x, sd[p + "fc1.weight"], sd[p + "fc1.bias"])), sd[p + "fc2.weight"], sd[p + "fc2.bias"]
    )


def _sublayer(sd: dict, norm: str, pre: bool, x: Tensor, f) -> Tensor:
    """upstream: residual = x; maybe_layer_norm(before); f; residual + x; maybe_layer_norm(after)."""
    residual = x
    x = _ln(sd, norm, x) if pre else x
    x = residual + f(x)
    return x if pre else _ln(sd, norm, x)


def encode(sd: dict, args: Namespace, src_tokens: Tensor) -> tuple[Tensor, Tensor | None]:
    """-> encoder_out T x B x C, encoder_padding_mask B x T (None without padding)."""
    x = _embed(sd, args, "encoder", src_tokens)
    mask = src_tokens.eq(PAD)
    mask = mask if mask.any() else None
    pre = args.encoder_normalize_before
    for i in range(args.encoder_layers):
        p = f"encoder.layers.{i}."
        x = _sublayer(
            sd,
            p + "self_attn_layer_norm.",
            pre,
            x,
            partial(_multibranch, sd, p, args, "encoder", i, key_padding_mask=mask),
        )
        x = _sublayer(sd, p + "final_layer_norm.", pre, x, partial(_ffn, sd, p, args))
    if pre:
        x = _ln(sd, "encoder.layer_norm.", x)
    return x, mask


def decode(sd: dict, args: Namespace, prev_output_tokens: Tensor, encoder_out: Tensor, encoder_mask) -> Tensor:
    """Teacher-forced logits B x T x V."""
    x = _embed(sd, args, "decoder", prev_output_tokens)
    T = x.size(0)
    future = torch.triu(torch.full((T, T), float("-inf"), device=x.device), 1).to(x.dtype)
    pre = args.decoder_normalize_before
    heads = args.decoder_attention_heads
    for i in range(args.decoder_layers):
        p = f"decoder.layers.{i}."
        x = _sublayer(
            sd, p + "self_attn_layer_norm.", pre, x, partial(_multibranch, sd, p, args, "decoder", i, attn_mask=future)
        )
        cross = partial(_mha, sd, p + "encoder_attn.", heads, kv=encoder_out, key_padding_mask=encoder_mask)
        x = _sublayer(sd, p + "encoder_attn_layer_norm.", pre, x, cross)
        x = _sublayer(sd, p + "final_layer_norm.", pre, x, partial(_ffn, sd, p, args))
    if pre:
        x = _ln(sd, "decoder.layer_norm.", x)
    x = x.transpose(0, 1)
    shared = args.share_all_embeddings or args.share_decoder_input_output_embed
    return F.linear(x, sd["decoder.embed_tokens.weight"] if shared else sd["decoder.embed_out"])


def random_upstream_state(args: Namespace, vocab: int, seed: int = 0, std: float = 0.3) -> dict[str, Tensor]:
    """An upstream-format state dict for ``args`` with random weights (LayerNorm gains near 1)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g) * std

    sd: dict[str, Tensor] = {}

    def linear(p: str, n_out: int, n_in: int, bias: bool = True) -> None:
        sd[p + "weight"] = rand(n_out, n_in)
        if bias:
            sd[p + "bias"] = rand(n_out)

    def norm(p: str, dim: int) -> None:
        sd[p + "weight"] = 1 + rand(dim)
        sd[p + "bias"] = rand(dim)

    for side in ("encoder", "decoder"):
        dim = getattr(args, f"{side}_embed_dim")
        sd[f"{side}.version"] = torch.tensor([3.0])
        if side == "decoder" and args.share_all_embeddings:
            sd["decoder.embed_tokens.weight"] = sd["encoder.embed_tokens.weight"]
        else:
            table = torch.randn(vocab, dim, generator=g) * dim**-0.5
            table[PAD] = 0
            sd[f"{side}.embed_tokens.weight"] = table
        if getattr(args, f"{side}_learned_pos"):
            positions = rand(
                getattr(args, f"max_{'source' if side == 'encoder' else 'target'}_positions") + PAD + 1, dim
            )
            positions[PAD] = 0
            sd[f"{side}.embed_positions.weight"] = positions
        else:
            sd[f"{side}.embed_positions._float_tensor"] = torch.zeros(1)
        for i in range(getattr(args, f"{side}_layers")):
            p = f"{side}.layers.{i}."
            for j, (kind, bdim, heads, kernel) in enumerate(_branches(args, side)):
                bp = f"{p}self_attn.branches.{j}."
                if kind == "attn":
                    for proj in ("q_proj.", "k_proj.", "v_proj.", "out_proj."):
                        linear(bp + proj, bdim, bdim)
                    continue
                K = _kernel(args, side, i, kernel)
                if kind == "dynamic":
                    sd[bp + "weight_linear.weight"] = rand(heads * K, bdim)
                else:
                    sd[bp + "weight"] = rand(heads, 1, K)  # LightweightConv1dTBC allocates (H, 1, K)
                if args.conv_linear:
                    glu = kind == "dynamic" and getattr(args, f"{side}_glu")
                    linear(bp + "linear1.", 2 * bdim if glu else bdim, bdim)
                    linear(bp + "linear2.", bdim, bdim)
            norm(p + "self_attn_layer_norm.", dim)
            if side == "decoder":
                for proj in ("q_proj.", "k_proj.", "v_proj.", "out_proj."):
                    linear(
                        p + "encoder_attn." + proj,
                        dim,
                        args.encoder_embed_dim if proj in ("k_proj.", "v_proj.") else dim,
                    )
                norm(p + "encoder_attn_layer_norm.", dim)
            ffn = getattr(args, f"{side}_ffn_embed_dim")
            linear(p + "fc1.", ffn, dim)
            linear(p + "fc2.", dim, ffn)
            norm(p + "final_layer_norm.", dim)
        if getattr(args, f"{side}_normalize_before"):
            norm(f"{side}.layer_norm.", dim)
    if not (args.share_all_embeddings or args.share_decoder_input_output_embed):
        sd["decoder.embed_out"] = rand(vocab, args.decoder_embed_dim)
    return sd
