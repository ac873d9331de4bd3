"""Load a WeNet model directory: ``train.yaml``, ``final.pt`` (or another ``*.pt``), ``units.txt``, CMVN.

The checkpoint is WeNet's ``model.state_dict()``; :func:`wenet_name_map` lists, for every tensor of our
model, the WeNet key it comes from and how it is converted. Anything missing, left over or mis-shaped is
reported by name in one :class:`CheckpointError` (e.g. a ``train.yaml`` that does not match the weights).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from .config import ConformerConfig, ConformerConfigError, parse_train_yaml
from .encoder import Conv2dSubsampling
from .model import ConformerASR, build_model


class CheckpointError(ValueError):
    """The model directory or checkpoint is missing, unreadable or inconsistent with ``train.yaml``."""


Transform = Callable[[torch.Tensor], torch.Tensor]


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _squeeze_kernel(t: torch.Tensor) -> torch.Tensor:
    """Conv1d kernel-size-1 weight [out, in, 1] -> Linear weight [out, in]."""
    return t.squeeze(-1)


def _squeeze_batch(t: torch.Tensor) -> torch.Tensor:
    """WeNet positional buffer [1, rows, D] -> our table [rows, D]."""
    return t.squeeze(0)


_LINEARS = ("linear_q", "linear_k", "linear_v", "linear_out")
_WEIGHT_BIAS = ("weight", "bias")


def _encoder_layer_map(config: ConformerConfig, i: int) -> dict[str, tuple[str, Transform]]:
    ours, theirs = f"encoder.layers.{i}", f"encoder.encoders.{i}"
    enc = config.encoder
    names: dict[str, tuple[str, Transform]] = {}

    def same(suffix: str) -> None:
        names[f"{ours}.{suffix}"] = (f"{theirs}.{suffix}", _same)

    norms = ["norm_mha", "norm_ff"]
    ffns = ["feed_forward"]
    if enc.macaron_style:
        norms.append("norm_ff_macaron")
        ffns.append("feed_forward_macaron")
    if enc.use_cnn_module:
        norms += ["norm_conv", "norm_final"]
    for module in norms:
        for p in _WEIGHT_BIAS:
            same(f"{module}.{p}")
    for module in ffns:
        for linear in ("w_1", "w_2"):
            for p in _WEIGHT_BIAS:
                same(f"{module}.{linear}.{p}")
    for linear in _LINEARS:
        for p in _WEIGHT_BIAS:
            same(f"self_attn.{linear}.{p}")
    for p in ("self_attn.linear_pos.weight", "self_attn.pos_bias_u", "self_attn.pos_bias_v"):
        same(p)
    if enc.use_cnn_module:
        for conv in ("pointwise_conv1", "pointwise_conv2"):  # Conv1d(k=1) -> Linear
            names[f"{ours}.conv_module.{conv}.weight"] = (f"{theirs}.conv_module.{conv}.weight", _squeeze_kernel)
            same(f"conv_module.{conv}.bias")
        for p in _WEIGHT_BIAS:
            same(f"conv_module.depthwise_conv.{p}")
            same(f"conv_module.norm.{p}")
        if enc.cnn_module_norm == "batch_norm":
            for p in ("running_mean", "running_var", "num_batches_tracked"):
                same(f"conv_module.norm.{p}")
    return names


def _decoder_map(ours: str, theirs: str, num_blocks: int) -> dict[str, tuple[str, Transform]]:
    names: dict[str, tuple[str, Transform]] = {
        f"{ours}.embed.weight": (f"{theirs}.embed.0.weight", _same),
        f"{ours}.pos_table": (f"{theirs}.embed.1.pe", _squeeze_batch),
    }
    for p in _WEIGHT_BIAS:
        names[f"{ours}.after_norm.{p}"] = (f"{theirs}.after_norm.{p}", _same)
        names[f"{ours}.output_layer.{p}"] = (f"{theirs}.output_layer.{p}", _same)
    for i in range(num_blocks):
        suffixes = [f"{n}.{p}" for n in ("norm1", "norm2", "norm3") for p in _WEIGHT_BIAS]
        suffixes += [f"{a}.{lin}.{p}" for a in ("self_attn", "src_attn") for lin in _LINEARS for p in _WEIGHT_BIAS]
        suffixes += [f"feed_forward.{w}.{p}" for w in ("w_1", "w_2") for p in _WEIGHT_BIAS]
        for s in suffixes:
            names[f"{ours}.layers.{i}.{s}"] = (f"{theirs}.decoders.{i}.{s}", _same)
    return names


def wenet_name_map(config: ConformerConfig) -> dict[str, tuple[str, Transform]]:
    """Our state-dict key -> (WeNet state-dict key, conversion), for every tensor of ``build_model(config)``."""
    enc = config.encoder
    names: dict[str, tuple[str, Transform]] = {
        "encoder.global_cmvn.mean": ("encoder.global_cmvn.mean", _same),
        "encoder.global_cmvn.istd": ("encoder.global_cmvn.istd", _same),
        "encoder.pos_table": ("encoder.embed.pos_enc.pe", _squeeze_batch),
        "ctc.ctc_lo.weight": ("ctc.ctc_lo.weight", _same),
        "ctc.ctc_lo.bias": ("ctc.ctc_lo.bias", _same),
    }
    for j in range(len(Conv2dSubsampling.KERNELS[enc.input_layer])):  # WeNet: Sequential(conv, ReLU, conv, ...)
        for p in _WEIGHT_BIAS:
            names[f"encoder.subsampling.convs.{j}.{p}"] = (f"encoder.embed.conv.{2 * j}.{p}", _same)
    for p in _WEIGHT_BIAS:
        names[f"encoder.subsampling.out.{p}"] = (f"encoder.embed.out.0.{p}", _same)
        if enc.final_norm:
            names[f"encoder.after_norm.{p}"] = (f"encoder.after_norm.{p}", _same)
    for i in range(enc.num_blocks):
        names.update(_encoder_layer_map(config, i))
    dec = config.decoder
    if dec.kind == "bitransformer":
        names.update(_decoder_map("decoder.left_decoder", "decoder.left_decoder", dec.num_blocks))
        if dec.r_num_blocks:
            names.update(_decoder_map("decoder.right_decoder", "decoder.right_decoder", dec.r_num_blocks))
    else:  # a WeNet TransformerDecoder is stored directly under "decoder."
        names.update(_decoder_map("decoder.left_decoder", "decoder", dec.num_blocks))
    return names


# Tensors a WeNet checkpoint may lack (older releases did not store the positional tables; CMVN can come
# from the statistics file); when absent they are computed as WeNet computes them.
_OPTIONAL_SUFFIXES = (".pos_table", "global_cmvn.mean", "global_cmvn.istd", ".num_batches_tracked")


def convert_state_dict(
    wenet_state: dict[str, torch.Tensor], config: ConformerConfig, model_state: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Map a WeNet state dict onto ``model_state`` (our model's own state dict, giving names and shapes).

    Optional tensors absent from the checkpoint keep ``model_state``'s values. Raises
    :class:`CheckpointError` listing every missing, unexpected and mis-shaped tensor.
    """
    names = wenet_name_map(config)
    if set(names) != set(model_state):  # our map and our modules must agree: a bug here, not the user's
        raise AssertionError(f"name map out of sync with the model: {sorted(set(names) ^ set(model_state))[:10]}")
    missing, mismatched, out = [], [], {}
    for ours, (theirs, transform) in names.items():
        if theirs not in wenet_state:
            if ours.endswith(_OPTIONAL_SUFFIXES):
                out[ours] = model_state[ours]
            else:
                missing.append(theirs)
            continue
        tensor = transform(wenet_state[theirs])
        if tensor.shape != model_state[ours].shape:
            expected = tuple(model_state[ours].shape)
            mismatched.append(f"{theirs}: checkpoint {tuple(tensor.shape)} vs train.yaml {expected}")
            continue
        out[ours] = tensor
    used = {theirs for theirs, _ in names.values()}
    unexpected = sorted(k for k in wenet_state if k not in used)
    if missing or unexpected or mismatched:
        parts = []
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if items:
                shown = "; ".join(items[:8]) + (f"; ... ({len(items) - 8} more)" if len(items) > 8 else "")
                parts.append(f"{len(items)} {title}: {shown}")
        raise CheckpointError(
            "checkpoint does not match train.yaml (wrong yaml for these weights?): " + " | ".join(parts)
        )
    return out


def load_global_cmvn(path: str | Path, is_json: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean [F], istd [F]) float32 from WeNet JSON statistics or a Kaldi text CMVN matrix.

    JSON: ``{"mean_stat": [F], "var_stat": [F], "frame_num": n}`` (sums and sums of squares). Kaldi text:
    ``[ sum_1 .. sum_F n \\n sumsq_1 .. sumsq_F 0 ]``. As WeNet (float64, then float32):
    mean = sum / n, var = max(sumsq / n - mean^2, 1e-20), istd = 1 / sqrt(var).
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise CheckpointError(f"cannot read CMVN file {path}: {err}") from err
    try:
        if is_json:
            stats = json.loads(text)
            sums, squares, count = stats["mean_stat"], stats["var_stat"], float(stats["frame_num"])
        else:
            fields = text.split()
            if not fields or fields[0] != "[" or fields[-1] != "]":
                raise ValueError("not a Kaldi text matrix '[ ... ]' (binary Kaldi CMVN is not supported)")
            dim = (len(fields) - 4) // 2
            sums = [float(v) for v in fields[1 : dim + 1]]
            count = float(fields[dim + 1])
            squares = [float(v) for v in fields[dim + 2 : 2 * dim + 2]]
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"malformed CMVN file {path}: {err}") from err
    if len(sums) != len(squares) or count <= 0:
        raise CheckpointError(f"malformed CMVN file {path}: {len(sums)} means, {len(squares)} variances, n={count}")
    mean = [s / count for s in sums]
    istd = [1.0 / math.sqrt(max(q / count - m * m, 1e-20)) for q, m in zip(squares, mean)]
    return torch.tensor(mean, dtype=torch.float64).float(), torch.tensor(istd, dtype=torch.float64).float()


@dataclass(frozen=True)
class SymbolTable:
    """``units.txt``: unit string per id, and how to turn ids into text."""

    units: tuple[str, ...]
    word_piece: bool = False  # BPE models: '▁' marks a word start and becomes a space

    @classmethod
    def read(cls, path: str | Path, word_piece: bool = False) -> SymbolTable:
        """Parse ``<unit> <id>`` lines; ids must be exactly 0 .. V-1."""
        table: dict[int, str] = {}
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except OSError as err:
            raise CheckpointError(f"cannot read unit dictionary {path}: {err}") from err
        for number, line in enumerate(lines, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2 or not fields[1].isdigit():
                raise CheckpointError(f"{path}:{number}: expected '<unit> <id>', got {line!r}")
            table[int(fields[1])] = fields[0]
        if sorted(table) != list(range(len(table))):
            raise CheckpointError(f"{path}: unit ids are not 0 .. {len(table) - 1} without gaps")
        return cls(tuple(table[i] for i in range(len(table))), word_piece)

    def __len__(self) -> int:
        return len(self.units)

    def detokenize(self, tokens) -> str:
        """Units joined with no separator (WeNet char tokenizer); BPE: '▁' -> space, stripped."""
        text = "".join(self.units[t] for t in tokens)
        return text.replace("▁", " ").strip() if self.word_piece else text


def _find_checkpoint(model_dir: Path) -> Path:
    for name in ("final.pt", "avg_10.pt", "avg_5.pt"):
        if (model_dir / name).is_file():
            return model_dir / name
    candidates = sorted(model_dir.glob("*.pt"))
    if len(candidates) == 1:
        return candidates[0]
    raise CheckpointError(f"{model_dir}: no final.pt (and not exactly one *.pt: {[c.name for c in candidates]})")


def load_conformer(
    model_dir: str | Path, checkpoint: str | Path | None = None, device: str | torch.device = "cpu"
) -> tuple[ConformerASR, SymbolTable]:
    """Read a WeNet model directory into an eval-mode :class:`ConformerASR` and its :class:`SymbolTable`."""
    model_dir = Path(model_dir)
    yaml_path = model_dir / "train.yaml"
    try:
        raw = yaml.safe_load(yaml_path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise CheckpointError(f"cannot read {yaml_path}: {err}") from err
    if not isinstance(raw, dict):
        raise CheckpointError(f"{yaml_path} is not a YAML mapping")
    config = parse_train_yaml(raw)
    tokenizer = raw.get("tokenizer", "char")
    if tokenizer not in ("char", "bpe"):
        raise ConformerConfigError(f"tokenizer={tokenizer!r} is not supported (char | bpe)")

    # Paths inside train.yaml are relative to the directory WeNet trained in; look for the file here.
    symbol_name = (raw.get("tokenizer_conf") or {}).get("symbol_table_path") or "units.txt"
    symbol_path = model_dir / Path(symbol_name).name
    symbols = SymbolTable.read(symbol_path, word_piece=tokenizer == "bpe")
    if len(symbols) != config.vocab_size:
        raise CheckpointError(f"{symbol_path} has {len(symbols)} units but train.yaml output_dim={config.vocab_size}")

    ckpt_path = Path(checkpoint) if checkpoint is not None else _find_checkpoint(model_dir)
    try:
        wenet_state = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch raises several unrelated types for unreadable files
        raise CheckpointError(f"cannot load checkpoint {ckpt_path}: {err}") from err
    if not isinstance(wenet_state, dict):
        raise CheckpointError(f"{ckpt_path} does not hold a state dict")

    model = build_model(config)
    state = convert_state_dict(wenet_state, config, model.state_dict())
    if config.cmvn_file and "encoder.global_cmvn.mean" not in wenet_state:
        cmvn_path = model_dir / Path(config.cmvn_file).name
        state["encoder.global_cmvn.mean"], state["encoder.global_cmvn.istd"] = load_global_cmvn(
            cmvn_path, config.cmvn_is_json
        )
    elif not config.cmvn_file and "encoder.global_cmvn.mean" in wenet_state:
        raise CheckpointError("checkpoint has global CMVN statistics but train.yaml declares no cmvn")
    model.load_state_dict(state, strict=True)
    return model.eval().to(device), symbols

