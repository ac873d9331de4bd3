"""Load a mit-han-lab/lite-transformer (fairseq 0.8) translation checkpoint without fairseq.

A model directory holds ``checkpoint.pt`` (a pickled dict with ``args``, an ``argparse.Namespace``, and ``model``,
the state dict) and the dictionaries ``dict.<source_lang>.txt`` / ``dict.<target_lang>.txt``. The checkpoint is read
with ``torch.load(weights_only=True)``: ``argparse.Namespace`` is allowed, and objects of fairseq's own classes
(training meters, an ``ffn_init`` function in ``args``) are replaced by an inert placeholder, since inference
never uses them; any other pickled global is refused with an error naming it.

Weights move into our modules through an explicit name map (:func:`checkpoint_name_map`): our parameter name ->
upstream key. Upstream quirks handled here: old checkpoints spell ``branches`` as ``branchs`` (the repo's trainer
renames them too); lightweight kernels are ``[H, 1, K]`` (CPU module) or ``[H, K]`` (CUDA module); sinusoidal
position placeholders and ``version`` buffers carry no weights; a final LayerNorm exists only in pre-norm models
whose ``version`` buffer says so (fairseq's ``upgrade_state_dict_named``).
"""

from __future__ import annotations

import argparse
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from turboformer.models.lite_transformer.config import LiteTransformerConfig
from turboformer.models.lite_transformer.dictionary import Dictionary
from turboformer.models.lite_transformer.model import LiteTransformer, build_model

CHECKPOINT_NAME = "checkpoint.pt"

# upstream keys that hold no weights: version buffers, sinusoidal placeholders and old saved sinusoid tables
_NO_WEIGHTS = re.compile(r"^(encoder|decoder)\.(version|embed_positions\._float_tensor|embed_positions\.weights)$")

_LIGHTWEIGHT_KERNEL = re.compile(r"\.lsra\.branches\.\d+\.weight$")  # the only bare "weight" of a branch

_ATTENTION = [f"{proj}.{p}" for proj in ("q_proj", "k_proj", "v_proj", "out_proj") for p in ("weight", "bias")]
_LINEARS = ["linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias"]

# layer sub-modules: ours -> upstream (parameter names below them are the same)
_ENCODER_LAYER = {
    "lsra_norm": "self_attn_layer_norm",
    "ffn.fc1": "fc1",
    "ffn.fc2": "fc2",
    "ffn_norm": "final_layer_norm",
}
_DECODER_LAYER = {**_ENCODER_LAYER, "cross_attn_norm": "encoder_attn_layer_norm"}


class CheckpointError(ValueError):
    """The checkpoint cannot be read, or its weights do not fit the model its args describe."""


@dataclass(frozen=True)
class LoadedModel:
    model: LiteTransformer  # eval mode, float32, on CPU
    src_dict: Dictionary
    tgt_dict: Dictionary
    args: argparse.Namespace  # the training arguments (source_lang, target_lang, ...)


class _FairseqPlaceholder:
    """Stands in for pickled fairseq objects (meters, init functions) that inference never touches."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __setstate__(self, state) -> None:
        pass


def read_checkpoint(path: str | Path) -> tuple[argparse.Namespace, dict[str, Tensor]]:
    """``checkpoint.pt`` -> (args, upstream state dict), read with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except (ValueError, RuntimeError, pickle.UnpicklingError, EOFError) as error:
        raise CheckpointError(f"{path} is not a torch checkpoint ({error})") from None
    refused = [name for name in unsafe if name != "argparse.Namespace" and not name.startswith("fairseq.")]
    if refused:
        raise CheckpointError(
            f"{path} pickles objects that are not allowed with weights_only=True: {', '.join(refused)}. "
            "Re-save it with only 'args' (an argparse.Namespace) and 'model' (a dict of tensors)."
        )
    allowed = [argparse.Namespace] + [(_FairseqPlaceholder, name) for name in unsafe if name.startswith("fairseq.")]
    try:
        with torch.serialization.safe_globals(allowed):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError) as error:
        raise CheckpointError(f"{path} cannot be loaded with weights_only=True: {error}") from None
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "args" not in checkpoint:
        keys = list(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointError(
            f"{path} is not a fairseq checkpoint: expected a dict with 'args' and 'model', got {keys}"
        )
    args, state = checkpoint["args"], checkpoint["model"]
    if not isinstance(args, argparse.Namespace):
        raise CheckpointError(f"{path}: 'args' is a {type(args).__name__}, expected an argparse.Namespace")
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: 'model' must map parameter names to tensors")
    return args, dict(state)


def checkpoint_name_map(config: LiteTransformerConfig) -> dict[str, str]:
    """Every parameter of ``build_model(config)`` -> its key in an upstream state dict."""
    names: dict[str, str] = {}
    for side, stack, layer_map in (
        ("encoder", config.encoder, _ENCODER_LAYER),
        ("decoder", config.decoder, _DECODER_LAYER),
    ):
        names[f"{side}.embed_tokens.weight"] = f"{side}.embed_tokens.weight"
        if config.positional_embeddings and stack.learned_pos:
            names[f"{side}.embed_positions.weight"] = f"{side}.embed_positions.weight"
        for i in range(stack.layers):
            layer = f"{side}.layers.{i}"
            for j, branch in enumerate(stack.branches):
                params = {
                    "attn": _ATTENTION,
                    "dynamic": ["weight_linear.weight"] + (_LINEARS if config.conv_linear else []),
                    "lightweight": ["weight"] + (_LINEARS if config.conv_linear else []),
                }[branch.kind]
                for p in params:
                    names[f"{layer}.lsra.branches.{j}.{p}"] = f"{layer}.self_attn.branches.{j}.{p}"
            for ours, theirs in layer_map.items():
                for p in ("weight", "bias"):
                    names[f"{layer}.{ours}.{p}"] = f"{layer}.{theirs}.{p}"
            if side == "decoder":
                for p in _ATTENTION:
                    names[f"{layer}.cross_attn.{p}"] = f"{layer}.encoder_attn.{p}"
        if stack.final_norm:
            for p in ("weight", "bias"):
                names[f"{side}.final_norm.{p}"] = f"{side}.layer_norm.{p}"
    if not config.share_decoder_input_output_embed:
        names["decoder.output_projection.weight"] = "decoder.embed_out"
    return names


def _upgrade(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename ``branchs`` -> ``branches`` (old checkpoints)."""
    return {re.sub(r"\.branchs\.", ".branches.", key): value for key, value in state.items()}


def _final_norms_from_versions(config: LiteTransformerConfig, state: Mapping[str, Tensor]) -> LiteTransformerConfig:
    """fairseq drops the final encoder LayerNorm when ``encoder.version`` < 2 and the decoder's when
    ``decoder.version`` <= 2 (a missing version counts as 1)."""

    def version(side: str) -> float:
        value = state.get(f"{side}.version")
        return 1.0 if value is None else float(value.flatten()[0])

    encoder_norm = config.encoder.final_norm and version("encoder") >= 2
    decoder_norm = config.decoder.final_norm and version("decoder") > 2
    return replace(
        config,
        encoder=replace(config.encoder, final_norm=encoder_norm),
        decoder=replace(config.decoder, final_norm=decoder_norm),
    )


def load_weights(model: LiteTransformer, state: Mapping[str, Tensor]) -> None:
    """Copy an upstream state dict into ``model``; every mismatch is reported in one CheckpointError."""
    state = _upgrade(state)
    expected = model.state_dict()
    names = checkpoint_name_map(model.config)
    converted: dict[str, Tensor] = {}
    missing, mismatched = [], []
    for ours, theirs in names.items():
        if theirs not in state:
            missing.append(theirs)
            continue
        tensor, shape = state[theirs], tuple(expected[ours].shape)
        if _LIGHTWEIGHT_KERNEL.search(ours) and tensor.dim() == 3 and tensor.size(1) == 1:
            tensor = tensor.squeeze(1)  # fairseq's CPU module stores [H, 1, K], its CUDA module [H, K]
        if tuple(tensor.shape) != shape:
            mismatched.append(f"{theirs}: checkpoint {tuple(tensor.shape)}, model {shape}")
            continue
        converted[ours] = tensor
    unexpected = sorted(set(state) - set(names.values()) - {k for k in state if _NO_WEIGHTS.match(k)})
    problems = (
        [f"missing: {k}" for k in missing]
        + [f"shape mismatch: {m}" for m in mismatched]
        + [f"unexpected: {k}" for k in unexpected]
    )
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise CheckpointError(f"the checkpoint does not fit the model its args describe:\n  {shown}")
    if model.config.share_all_embeddings and not torch.equal(
        state["encoder.embed_tokens.weight"], state["decoder.embed_tokens.weight"]
    ):
        raise CheckpointError("share_all_embeddings is set but the encoder and decoder embeddings differ")
    model.load_state_dict(converted, strict=True)


def load_model(
    args: argparse.Namespace, state: Mapping[str, Tensor], src_vocab_size: int, tgt_vocab_size: int
) -> LiteTransformer:
    """Build the model ``args`` describe and load ``state`` into it (eval mode, float32, CPU)."""
    config = LiteTransformerConfig.from_args(args, src_vocab_size, tgt_vocab_size)
    model = build_model(_final_norms_from_versions(config, _upgrade(state)))
    load_weights(model, state)
    return model.eval()


def load_model_dir(model_dir: str | Path, checkpoint: str = CHECKPOINT_NAME) -> LoadedModel:
    """Model directory -> model and dictionaries (``dict.<source_lang>.txt``, ``dict.<target_lang>.txt``)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"model directory not found: {model_dir}")
    args, state = read_checkpoint(model_dir / checkpoint)
    dicts = []
    for attr in ("source_lang", "target_lang"):
        lang = getattr(args, attr, None)
        if not lang:
            raise CheckpointError(f"args has no {attr}: cannot tell which dict.<lang>.txt to read")
        path = model_dir / f"dict.{lang}.txt"
        if not path.is_file():
            raise CheckpointError(f"dictionary not found: {path}")
        dicts.append(Dictionary.load(path))
    src_dict, tgt_dict = dicts
    return LoadedModel(load_model(args, state, len(src_dict), len(tgt_dict)), src_dict, tgt_dict, args)
