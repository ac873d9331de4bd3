"""Checkpoint formats: detection, the CTranslate2 variants (float16, float32, int8 with scales), and errors."""

from __future__ import annotations

import json
import shutil
import struct

import numpy as np
import pytest
import torch
from whisper_references import openai_state_dict, random_state

from turboformer.models.whisper.config import tiny_test_config
from turboformer.models.whisper.load import CheckpointError, detect_format, read_checkpoint
from turboformer.models.whisper.pipeline import WhisperModel, resolve_checkpoint

# An independent writer of the CTranslate2 layout (the format facts in DESIGN.md), for variants no package ships.
CT2_DTYPE_IDS = {np.dtype(np.float32): 0, np.dtype(np.int8): 1, np.dtype(np.int16): 2, np.dtype(np.float16): 4}


def _string(s: str) -> bytes:
    raw = s.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def read_ct2_raw(path) -> tuple[list[tuple[str, np.ndarray]], list[tuple[str, str]]]:
    data, pos = path.read_bytes(), 0

    def take(fmt):
        nonlocal pos
        values = struct.unpack_from("<" + fmt, data, pos)
        pos += struct.calcsize("<" + fmt)
        return values

    def string():
        nonlocal pos
        (n,) = take("H")
        s = data[pos : pos + n - 1].decode()
        pos += n
        return s

    dtypes = {v: k for k, v in CT2_DTYPE_IDS.items()}
    take("I"), string(), take("I")
    variables = []
    for _ in range(take("I")[0]):
        name = string()
        (rank,) = take("B")
        dims = take("I" * rank)
        dtype_id, nbytes = take("BI")
        variables.append((name, np.frombuffer(data[pos : pos + nbytes], dtypes[dtype_id]).reshape(dims)))
        pos += nbytes
    aliases = [(string(), string()) for _ in range(take("I")[0])]
    return variables, aliases


def write_ct2(path, variables, aliases) -> None:
    out = [struct.pack("<I", 6), _string("WhisperSpec"), struct.pack("<I", 3), struct.pack("<I", len(variables))]
    for name, array in variables:
        array = np.ascontiguousarray(array)
        out += [_string(name), struct.pack("<B", array.ndim), struct.pack("<" + "I" * array.ndim, *array.shape)]
        out += [struct.pack("<BI", CT2_DTYPE_IDS[array.dtype], array.nbytes), array.tobytes()]
    out.append(struct.pack("<I", len(aliases)))
    for alias, target in aliases:
        out += [_string(alias), _string(target)]
    path.write_bytes(b"".join(out))


def _copy_model_dir(checkpoint, tmp_path, convert):
    """tiny.en's directory with model.bin rewritten: convert(name, array) -> [(name, array), ...]."""
    directory = tmp_path / "model"
    directory.mkdir()
    for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
        shutil.copy(checkpoint.tokenizer_dir / name, directory)
    variables, aliases = read_ct2_raw(checkpoint.tokenizer_dir / "model.bin")
    converted = [pair for name, array in variables for pair in convert(name, array)]
    write_ct2(directory / "model.bin", converted, aliases)
    return directory


def _int8(name, array):
    """CTranslate2's int8 quantization: per-row scale = 127 / max|row|, weight ~ int8 / scale."""
    if array.dtype == np.float16 and array.ndim == 2 and name.endswith("weight") and "embeddings" not in name:
        w = array.astype(np.float32)
        scale = 127.0 / np.maximum(np.abs(w).max(axis=1), 1e-8)
        return [(name, np.round(w * scale[:, None]).astype(np.int8)), (f"{name}_scale", scale.astype(np.float32))]
    return [(name, array)]


def test_float32_ctranslate2_equals_float16_one(tiny_en_checkpoint, tmp_path):
    to_f32 = lambda name, a: [(name, a.astype(np.float32) if a.dtype == np.float16 else a)]  # noqa: E731
    converted = read_checkpoint(_copy_model_dir(tiny_en_checkpoint, tmp_path, to_f32))
    for name, tensor in tiny_en_checkpoint.state_dict.items():
        assert torch.equal(converted.state_dict[name], tensor), name


def test_int8_ctranslate2_dequantizes_and_still_transcribes(tiny_en_checkpoint, tmp_path, librivox):
    directory = _copy_model_dir(tiny_en_checkpoint, tmp_path, _int8)
    converted = read_checkpoint(directory)
    name = "decoder.blocks.0.mlp.0.weight"
    error = (converted.state_dict[name] - tiny_en_checkpoint.state_dict[name]).abs()
    row_max = tiny_en_checkpoint.state_dict[name].abs().amax(dim=1, keepdim=True)
    assert (error <= row_max / 127 * 0.5 + 1e-6).all()  # at most half a quantization step per row
    model = WhisperModel.from_checkpoint(converted, "cpu")
    text = model.transcribe(librivox[1][1]).text.lower()
    assert "he was not an" in text and "young man" in text


def test_detects_each_format(tiny_en_checkpoint, tmp_path):
    assert detect_format(tiny_en_checkpoint.tokenizer_dir) == "ctranslate2"
    assert detect_format(tiny_en_checkpoint.tokenizer_dir / "model.bin") == "ctranslate2"
    config = tiny_test_config()
    torch.save(openai_state_dict(config, random_state(config)), tmp_path / "tiny.pt")
    assert detect_format(tmp_path / "tiny.pt") == "openai"
    assert detect_format(tmp_path) == "openai"  # a directory holding one .pt
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert detect_format(tmp_path) == "huggingface"


def test_bundled_names_resolve(tiny_en_checkpoint):
    assert resolve_checkpoint("tiny.en").config == tiny_en_checkpoint.config
    with pytest.raises(CheckpointError, match="no weights for 'large-v3' are bundled"):
        resolve_checkpoint("large-v3")


def _damaged_cases(tmp_path, source_bin):
    data = source_bin.read_bytes()
    cases = {}
    (tmp_path / "missing").mkdir()
    cases["no such file"] = tmp_path / "nothing-here"
    cases["no Whisper checkpoint found"] = tmp_path / "missing"
    (tmp_path / "empty.bin").write_bytes(b"")
    cases["too short"] = tmp_path / "empty.bin"
    (tmp_path / "notes.pt").write_text("these are my meeting notes, not a model\n")
    cases["unrecognised checkpoint file"] = tmp_path / "notes.pt"
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "model.bin").write_bytes(data[: len(data) // 3])
    cases["truncated CTranslate2 model"] = truncated
    other = tmp_path / "other"
    other.mkdir()
    (other / "model.bin").write_bytes(struct.pack("<I", 6) + _string("TransformerSpec") + data[4 + 2 + 12 :])
    cases["not a Whisper model"] = other
    return cases


def test_damaged_or_wrong_checkpoints_name_the_cause(tiny_en_checkpoint, tmp_path):
    for message, path in _damaged_cases(tmp_path, tiny_en_checkpoint.tokenizer_dir / "model.bin").items():
        with pytest.raises(CheckpointError, match=message) as info:
            read_checkpoint(path)
        assert str(path) in str(info.value)


def test_openai_checkpoint_with_wrong_shapes_or_missing_weights(tmp_path):
    config = tiny_test_config()
    content = openai_state_dict(config, random_state(config))
    content["dims"]["n_text_state"] = 96  # dims that do not match the weights
    content["dims"]["n_audio_state"] = 96
    torch.save(content, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="has shape"):
        read_checkpoint(tmp_path / "bad.pt")
    content = openai_state_dict(config, random_state(config))
    del content["model_state_dict"]["decoder.blocks.1.mlp.0.weight"]
    torch.save(content, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="missing weights decoder.blocks.1.mlp.0.weight"):
        read_checkpoint(tmp_path / "missing.pt")
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not an openai-whisper checkpoint"):
        read_checkpoint(tmp_path / "other.pt")


def test_huggingface_directory_of_another_model(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="describes a 'bert' model, not Whisper"):
        read_checkpoint(tmp_path)
