"""Whisper checkpoint loaders: CTranslate2 (faster-whisper), Hugging Face and openai-whisper, one name map each.

Every loader returns a ``Checkpoint``: the model sizes and a state dict in this engine's names (see
``model.py``: fused ``qkv`` for self-attention, fused ``kv`` for cross-attention). The format is detected from
what the path holds; anything missing, damaged or of the wrong shape raises ``CheckpointError`` naming the file
and what is wrong.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from turboformer.models.whisper.config import WhisperConfig
from turboformer.models.whisper.model import Whisper


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: the message names the file and the cause."""


@dataclass(frozen=True)
class Checkpoint:
    config: WhisperConfig
    state_dict: dict[str, torch.Tensor]
    format: str  # "ctranslate2" | "huggingface" | "openai"
    path: Path  # the file or directory that was read
    tokenizer_dir: Path | None  # where tokenizer.json / vocabulary.txt live, if anywhere
    extra: dict = field(default_factory=dict)  # format-specific metadata (alignment heads, suppress ids, ...)


# ----------------------------------------------------------------------------------------------------------
# Our names, per layer. Self-attention: qkv, out. Cross-attention: q, kv, out. MLP: mlp.0 (fc1), mlp.2 (fc2).
# Each map below gives, for one of our names, the source name(s); several sources are concatenated along
# rows (q; k; v). ``None`` as a source means "zeros" (Whisper's key projection has no bias).
# ----------------------------------------------------------------------------------------------------------


def _layer_norm(ours: str, theirs: str, weight="weight", bias="bias", sep=".") -> dict:
    return {f"{ours}.weight": [f"{theirs}{sep}{weight}"], f"{ours}.bias": [f"{theirs}{sep}{bias}"]}


def _linear(ours: str, *theirs: str | None, bias: tuple | None = None) -> dict:
    """One linear layer of ours from one or several of theirs (row-concatenated)."""
    biases = bias if bias is not None else tuple(None if t is None else f"{t}.bias" for t in theirs)
    return {f"{ours}.weight": [f"{t}.weight" for t in theirs], f"{ours}.bias": list(biases)}


def openai_name_map(config: WhisperConfig) -> dict[str, list[str | None]]:
    """openai-whisper ``model_state_dict`` names (``whisper/model.py``)."""
    names = {
        "encoder.conv1.weight": ["encoder.conv1.weight"],
        "encoder.conv1.bias": ["encoder.conv1.bias"],
        "encoder.conv2.weight": ["encoder.conv2.weight"],
        "encoder.conv2.bias": ["encoder.conv2.bias"],
        "encoder.positional_embedding": ["encoder.positional_embedding"],
        **_layer_norm("encoder.ln_post", "encoder.ln_post"),
        "decoder.token_embedding.weight": ["decoder.token_embedding.weight"],
        "decoder.positional_embedding": ["decoder.positional_embedding"],
        **_layer_norm("decoder.ln", "decoder.ln"),
    }
    for side, layers in (("encoder", config.n_audio_layer), ("decoder", config.n_text_layer)):
        for i in range(layers):
            p = f"{side}.blocks.{i}"
            attn = (f"{p}.attn.query", f"{p}.attn.key", f"{p}.attn.value")
            names |= _linear(f"{p}.attn.qkv", *attn, bias=(f"{attn[0]}.bias", None, f"{attn[2]}.bias"))
            names |= _linear(f"{p}.attn.out", f"{p}.attn.out")
            names |= _layer_norm(f"{p}.attn_ln", f"{p}.attn_ln")
            names |= _linear(f"{p}.mlp.0", f"{p}.mlp.0") | _linear(f"{p}.mlp.2", f"{p}.mlp.2")
            names |= _layer_norm(f"{p}.mlp_ln", f"{p}.mlp_ln")
            if side == "decoder":
                names |= _linear(f"{p}.cross_attn.q", f"{p}.cross_attn.query")
                names |= _linear(
                    f"{p}.cross_attn.kv",
                    f"{p}.cross_attn.key",
                    f"{p}.cross_attn.value",
                    bias=(None, f"{p}.cross_attn.value.bias"),
                )
                names |= _linear(f"{p}.cross_attn.out", f"{p}.cross_attn.out")
                names |= _layer_norm(f"{p}.cross_attn_ln", f"{p}.cross_attn_ln")
    return names


def huggingface_name_map(config: WhisperConfig) -> dict[str, list[str | None]]:
    """Hugging Face ``WhisperForConditionalGeneration`` names (the ``model.`` prefix is stripped first)."""
    names = {
        "encoder.conv1.weight": ["encoder.conv1.weight"],
        "encoder.conv1.bias": ["encoder.conv1.bias"],
        "encoder.conv2.weight": ["encoder.conv2.weight"],
        "encoder.conv2.bias": ["encoder.conv2.bias"],
        "encoder.positional_embedding": ["encoder.embed_positions.weight"],
        **_layer_norm("encoder.ln_post", "encoder.layer_norm"),
        "decoder.token_embedding.weight": ["decoder.embed_tokens.weight"],
        "decoder.positional_embedding": ["decoder.embed_positions.weight"],
        **_layer_norm("decoder.ln", "decoder.layer_norm"),
    }
    for side, layers in (("encoder", config.n_audio_layer), ("decoder", config.n_text_layer)):
        for i in range(layers):
            ours, theirs = f"{side}.blocks.{i}", f"{side}.layers.{i}"
            attn = tuple(f"{theirs}.self_attn.{n}_proj" for n in "qkv")
            names |= _linear(f"{ours}.attn.qkv", *attn, bias=(f"{attn[0]}.bias", None, f"{attn[2]}.bias"))
            names |= _linear(f"{ours}.attn.out", f"{theirs}.self_attn.out_proj")
            names |= _layer_norm(f"{ours}.attn_ln", f"{theirs}.self_attn_layer_norm")
            names |= _linear(f"{ours}.mlp.0", f"{theirs}.fc1") | _linear(f"{ours}.mlp.2", f"{theirs}.fc2")
            names |= _layer_norm(f"{ours}.mlp_ln", f"{theirs}.final_layer_norm")
            if side == "decoder":
                cross = f"{theirs}.encoder_attn"
                names |= _linear(f"{ours}.cross_attn.q", f"{cross}.q_proj")
                names |= _linear(
                    f"{ours}.cross_attn.kv", f"{cross}.k_proj", f"{cross}.v_proj", bias=(None, f"{cross}.v_proj.bias")
                )
                names |= _linear(f"{ours}.cross_attn.out", f"{cross}.out_proj")
                names |= _layer_norm(f"{ours}.cross_attn_ln", f"{theirs}.encoder_attn_layer_norm")
    return names


def ctranslate2_name_map(config: WhisperConfig) -> dict[str, list[str | None]]:
    """CTranslate2 ``WhisperSpec`` variable names (q/k/v are already fused as ``linear_0``)."""
    names = {
        "encoder.conv1.weight": ["encoder/conv1/weight"],
        "encoder.conv1.bias": ["encoder/conv1/bias"],
        "encoder.conv2.weight": ["encoder/conv2/weight"],
        "encoder.conv2.bias": ["encoder/conv2/bias"],
        "encoder.positional_embedding": ["encoder/position_encodings/encodings"],
        **_layer_norm("encoder.ln_post", "encoder/layer_norm", "gamma", "beta", "/"),
        "decoder.token_embedding.weight": ["decoder/embeddings/weight"],
        "decoder.positional_embedding": ["decoder/position_encodings/encodings"],
        **_layer_norm("decoder.ln", "decoder/layer_norm", "gamma", "beta", "/"),
    }

    def linear(ours, theirs):
        return {f"{ours}.weight": [f"{theirs}/weight"], f"{ours}.bias": [f"{theirs}/bias"]}

    for side, layers in (("encoder", config.n_audio_layer), ("decoder", config.n_text_layer)):
        for i in range(layers):
            ours, theirs = f"{side}.blocks.{i}", f"{side}/layer_{i}"
            names |= linear(f"{ours}.attn.qkv", f"{theirs}/self_attention/linear_0")
            names |= linear(f"{ours}.attn.out", f"{theirs}/self_attention/linear_1")
            names |= _layer_norm(f"{ours}.attn_ln", f"{theirs}/self_attention/layer_norm", "gamma", "beta", "/")
            names |= linear(f"{ours}.mlp.0", f"{theirs}/ffn/linear_0") | linear(f"{ours}.mlp.2", f"{theirs}/ffn/linear_1")
            names |= _layer_norm(f"{ours}.mlp_ln", f"{theirs}/ffn/layer_norm", "gamma", "beta", "/")
            if side == "decoder":
                names |= linear(f"{ours}.cross_attn.q", f"{theirs}/attention/linear_0")
                names |= linear(f"{ours}.cross_attn.kv", f"{theirs}/attention/linear_1")
                names |= linear(f"{ours}.cross_attn.out", f"{theirs}/attention/linear_2")
                names |= _layer_norm(f"{ours}.cross_attn_ln", f"{theirs}/attention/layer_norm", "gamma", "beta", "/")
    return names


def apply_name_map(
    source: dict[str, torch.Tensor], name_map: dict[str, list[str | None]], config: WhisperConfig, path: Path
) -> dict[str, torch.Tensor]:
    """Build our state dict from ``source``; check that every tensor exists and has the expected shape."""
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in Whisper(config).state_dict().items()}
    missing = sorted({s for sources in name_map.values() for s in sources if s is not None and s not in source})
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"{path}: missing weights {shown}")
    state = {}
    for ours, sources in name_map.items():
        present = [source[s] for s in sources if s is not None]
        rows = expected[ours][0] // len(sources) if len(sources) > 1 else None
        parts = [source[s] if s is not None else torch.zeros(rows, dtype=present[0].dtype) for s in sources]
        tensor = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        if tuple(tensor.shape) != expected[ours]:
            raise CheckpointError(
                f"{path}: weight for {ours} ({', '.join(str(s) for s in sources)}) has shape {tuple(tensor.shape)}, "
                f"expected {expected[ours]} for this model size"
            )
        state[ours] = tensor
    return state


def export_state_dict(state: dict[str, torch.Tensor], name_map: dict[str, list[str | None]]) -> dict[str, torch.Tensor]:
    """The inverse of ``apply_name_map``: split our fused tensors back into another format's names."""
    out = {}
    for ours, sources in name_map.items():
        parts = state[ours].chunk(len(sources), dim=0) if len(sources) > 1 else [state[ours]]
        for source, part in zip(sources, parts):
            if source is not None:
                out[source] = part.clone()
    return out


# ------------------------------------------------------------------ CTranslate2 model.bin ------------------

CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: None}  # 5: bfloat16


class _Reader:
    """Sequential little-endian reader over a buffer, with errors that name the file."""

    def __init__(self, buffer, path: Path):
        self.buffer, self.pos, self.path = buffer, 0, path

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.buffer):
            raise CheckpointError(f"{self.path}: truncated CTranslate2 model (needs {self.pos + n} bytes, has {len(self.buffer)})")
        view = memoryview(self.buffer)[self.pos : self.pos + n]
        self.pos += n
        return view

    def unpack(self, fmt: str):
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt)))

    def string(self) -> str:
        (length,) = self.unpack("H")
        raw = bytes(self.take(length))
        if not raw.endswith(b"\0"):
            raise CheckpointError(f"{self.path}: damaged CTranslate2 model (a name is not NUL-terminated)")
        return raw[:-1].decode("utf-8", errors="replace")


def read_ctranslate2(paths: list[Path]) -> tuple[dict[str, torch.Tensor], str]:
    """Parse a CTranslate2 ``model.bin`` (or its parts, concatenated in order) into float32 tensors."""
    path = paths[0]
    if len(paths) == 1:
        with open(path, "rb") as f:
            try:
                buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except ValueError:  # empty file
                raise CheckpointError(f"{path}: empty file, not a CTranslate2 model") from None
    else:
        buffer = b"".join(p.read_bytes() for p in paths)
    reader = _Reader(buffer, path)
    (version,) = reader.unpack("I")
    if not 5 <= version <= 6:
        raise CheckpointError(f"{path}: not a CTranslate2 model of a supported version (binary version {version})")
    spec = reader.string()
    if spec != "WhisperSpec":
        raise CheckpointError(f"{path}: a CTranslate2 {spec!r} model, not a Whisper model")
    reader.unpack("I")  # spec revision
    (count,) = reader.unpack("I")
    raw: dict[str, np.ndarray] = {}
    for _ in range(count):
        name = reader.string()
        (rank,) = reader.unpack("B")
        dims = reader.unpack("I" * rank)
        dtype_id, num_bytes = reader.unpack("BI")
        data = reader.take(num_bytes)
        if dtype_id not in CT2_DTYPES:
            raise CheckpointError(f"{path}: variable {name} has unknown dtype id {dtype_id}")
        if dtype_id == 5:  # bfloat16: widen the 16 bits into the top half of float32
            array = (np.frombuffer(data, np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            array = np.frombuffer(data, CT2_DTYPES[dtype_id])
        if array.size != int(np.prod(dims)):
            raise CheckpointError(f"{path}: variable {name} holds {array.size} values for shape {tuple(dims)}")
        raw[name] = array.reshape(dims)
    (aliases,) = reader.unpack("I")
    for _ in range(aliases):
        alias, target = reader.string(), reader.string()
        raw[alias] = raw[target]
    tensors = {}
    for name, array in raw.items():
        if name.endswith("_scale"):
            continue
        if array.dtype == np.int8 and f"{name}_scale" in raw:  # int8 weight: w ~ q / scale, per row
            scale = raw[f"{name}_scale"].astype(np.float32).reshape(-1, *([1] * (array.ndim - 1)))
            tensors[name] = torch.from_numpy(array.astype(np.float32) / scale)
        else:
            tensors[name] = torch.from_numpy(np.array(array, dtype=np.float32 if array.dtype.kind == "f" else array.dtype))
    del raw
    return tensors, spec


def _ct2_config(tensors: dict[str, torch.Tensor], path: Path) -> WhisperConfig:
    try:
        conv1 = tensors["encoder/conv1/weight"]
        embeddings = tensors["decoder/embeddings/weight"]
        n_audio_layer = sum(1 for n in tensors if n.startswith("encoder/layer_") and n.endswith("self_attention/linear_0/weight"))
        n_text_layer = sum(1 for n in tensors if n.startswith("decoder/layer_") and n.endswith("self_attention/linear_0/weight"))
        return WhisperConfig(
            n_mels=conv1.shape[1],
            n_audio_ctx=tensors["encoder/position_encodings/encodings"].shape[0],
            n_audio_state=conv1.shape[0],
            n_audio_head=int(tensors["encoder/num_heads"]),
            n_audio_layer=n_audio_layer,
            n_vocab=embeddings.shape[0],
            n_text_ctx=tensors["decoder/position_encodings/encodings"].shape[0],
            n_text_state=embeddings.shape[1],
            n_text_head=int(tensors["decoder/num_heads"]),
            n_text_layer=n_text_layer,
        )
    except KeyError as e:
        raise CheckpointError(f"{path}: CTranslate2 Whisper model lacks {e.args[0]}") from None


def load_ctranslate2(directory: Path, parts: list[Path] | None = None) -> Checkpoint:
    paths = parts or [directory / "model.bin"]
    tensors, _ = read_ctranslate2(paths)
    config = _ct2_config(tensors, paths[0])
    _validate(config, paths[0])
    state = apply_name_map(tensors, ctranslate2_name_map(config), config, paths[0])
    extra = {}
    config_json = directory / "config.json"
    if config_json.exists():
        extra = json.loads(config_json.read_text())
    return Checkpoint(config, state, "ctranslate2", directory, directory, extra)


# ------------------------------------------------------------------ Hugging Face ---------------------------


def _read_hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    for index_name, loader in (
        ("model.safetensors.index.json", load_file),
        ("pytorch_model.bin.index.json", lambda p: torch.load(p, map_location="cpu", weights_only=True)),
    ):
        index = directory / index_name
        if index.exists():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            tensors = {}
            for shard in shards:
                tensors |= loader(str(directory / shard))
            return tensors
    if (directory / "model.safetensors").exists():
        return load_file(str(directory / "model.safetensors"))
    if (directory / "pytorch_model.bin").exists():
        return torch.load(directory / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise CheckpointError(f"{directory}: Hugging Face directory without model.safetensors or pytorch_model.bin")


def load_huggingface(directory: Path) -> Checkpoint:
    cfg = json.loads((directory / "config.json").read_text())
    if cfg.get("model_type") not in (None, "whisper"):
        raise CheckpointError(f"{directory}: config.json describes a {cfg.get('model_type')!r} model, not Whisper")
    try:
        config = WhisperConfig(
            n_mels=cfg["num_mel_bins"],
            n_audio_ctx=cfg["max_source_positions"],
            n_audio_state=cfg["d_model"],
            n_audio_head=cfg["encoder_attention_heads"],
            n_audio_layer=cfg["encoder_layers"],
            n_vocab=cfg["vocab_size"],
            n_text_ctx=cfg["max_target_positions"],
            n_text_state=cfg["d_model"],
            n_text_head=cfg["decoder_attention_heads"],
            n_text_layer=cfg["decoder_layers"],
        )
    except KeyError as e:
        raise CheckpointError(f"{directory / 'config.json'}: missing {e.args[0]!r}") from None
    _validate(config, directory / "config.json")
    tensors = {name.removeprefix("model."): t.float() for name, t in _read_hf_weights(directory).items()}
    state = apply_name_map(tensors, huggingface_name_map(config), config, directory)
    extra = {}
    generation = directory / "generation_config.json"
    if generation.exists():
        extra = json.loads(generation.read_text())
    return Checkpoint(config, state, "huggingface", directory, directory, extra)


# ------------------------------------------------------------------ openai-whisper .pt ---------------------


def load_openai(path: Path) -> Checkpoint:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, zip errors, truncated files
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(checkpoint, dict) or "dims" not in checkpoint or "model_state_dict" not in checkpoint:
        raise CheckpointError(f"{path}: not an openai-whisper checkpoint (expected 'dims' and 'model_state_dict')")
    try:
        config = WhisperConfig(**checkpoint["dims"])
    except TypeError as e:
        raise CheckpointError(f"{path}: bad 'dims' ({e})") from None
    _validate(config, path)
    tensors = {name: t.float() for name, t in checkpoint["model_state_dict"].items()}
    state = apply_name_map(tensors, openai_name_map(config), config, path)
    return Checkpoint(config, state, "openai", path, path.parent, {})


# ------------------------------------------------------------------ detection ------------------------------


def _validate(config: WhisperConfig, path: Path) -> None:
    try:
        config.validate()
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None


def detect_format(path: Path) -> str:
    """'ctranslate2', 'huggingface' or 'openai' from what ``path`` holds; CheckpointError otherwise."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_dir():
        if (path / "model.bin").exists():
            return "ctranslate2"
        if (path / "config.json").exists() and any(
            (path / n).exists()
            for n in ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")
        ):
            return "huggingface"
        pts = sorted(path.glob("*.pt"))
        if len(pts) == 1:
            return "openai"
        raise CheckpointError(
            f"{path}: no Whisper checkpoint found (expected model.bin (CTranslate2), config.json with "
            "model.safetensors or pytorch_model.bin (Hugging Face), or one openai-whisper .pt file)"
        )
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 8:
        raise CheckpointError(f"{path}: file too short to be a checkpoint ({len(head)} bytes)")
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # zip (torch.save) or legacy pickle
        return "openai"
    if struct.unpack("<I", head[:4])[0] in (5, 6) and path.name.endswith(".bin"):
        return "ctranslate2"
    raise CheckpointError(f"{path}: unrecognised checkpoint file (neither a CTranslate2 model.bin nor a PyTorch .pt)")


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read any supported Whisper checkpoint from a file or directory."""
    path = Path(path).expanduser()
    kind = detect_format(path)
    if kind == "ctranslate2":
        return load_ctranslate2(path if path.is_dir() else path.parent, None if path.is_dir() else [path])
    if kind == "huggingface":
        return load_huggingface(path)
    pt = path if path.is_file() else sorted(path.glob("*.pt"))[0]
    return load_openai(pt)
