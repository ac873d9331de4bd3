"""Whisper model dimensions and the named sizes of every official checkpoint.

Radford et al., "Robust Speech Recognition via Large-Scale Weak Supervision" (arXiv 2212.04356), Table 1.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

N_AUDIO_CTX = 1500  # encoder frames per 30 s window: 3000 mel frames, halved by the stride-2 conv
N_TEXT_CTX = 448  # decoder positions


@dataclass(frozen=True)
class WhisperConfig:
    """The sizes that define a Whisper checkpoint (openai-whisper's ``ModelDimensions``)."""

    n_mels: int
    n_audio_ctx: int
    n_audio_state: int
    n_audio_head: int
    n_audio_layer: int
    n_vocab: int
    n_text_ctx: int
    n_text_state: int
    n_text_head: int
    n_text_layer: int

    @property
    def multilingual(self) -> bool:
        # English-only vocabularies have 51864 entries; multilingual ones 51865 (99 languages) or 51866 (100).
        return self.n_vocab >= 51865

    @property
    def num_languages(self) -> int:
        return self.n_vocab - 51765 - int(self.multilingual)

    def validate(self) -> None:
        """Raise ValueError when the sizes cannot describe a Whisper model."""
        for name in ("n_audio_state", "n_text_state"):
            state, heads = getattr(self, name), getattr(self, name.replace("state", "head"))
            if heads <= 0 or state % heads:
                raise ValueError(f"{name}={state} is not divisible by its {heads} attention heads")
        if self.n_vocab < 51864 or self.n_vocab > 51866:
            raise ValueError(
                f"n_vocab={self.n_vocab}: Whisper vocabularies have 51864 (English-only), 51865 or 51866 tokens"
            )
        if self.n_mels not in (80, 128):
            raise ValueError(f"n_mels={self.n_mels}: Whisper uses 80 or 128 mel bins")


def _config(n_mels, state, heads, layers, n_vocab, text_layers=None) -> WhisperConfig:
    return WhisperConfig(
        n_mels=n_mels,
        n_audio_ctx=N_AUDIO_CTX,
        n_audio_state=state,
        n_audio_head=heads,
        n_audio_layer=layers,
        n_vocab=n_vocab,
        n_text_ctx=N_TEXT_CTX,
        n_text_state=state,
        n_text_head=heads,
        n_text_layer=layers if text_layers is None else text_layers,
    )


EN, MULTI, V3 = 51864, 51865, 51866
WHISPER_CONFIGS: dict[str, WhisperConfig] = {
    "tiny.en": _config(80, 384, 6, 4, EN),
    "tiny": _config(80, 384, 6, 4, MULTI),
    "base.en": _config(80, 512, 8, 6, EN),
    "base": _config(80, 512, 8, 6, MULTI),
    "small.en": _config(80, 768, 12, 12, EN),
    "small": _config(80, 768, 12, 12, MULTI),
    "medium.en": _config(80, 1024, 16, 24, EN),
    "medium": _config(80, 1024, 16, 24, MULTI),
    "large-v1": _config(80, 1280, 20, 32, MULTI),
    "large-v2": _config(80, 1280, 20, 32, MULTI),
    "large-v3": _config(128, 1280, 20, 32, V3),
    "large-v3-turbo": _config(128, 1280, 20, 32, V3, text_layers=4),
}
WHISPER_CONFIGS["large"] = WHISPER_CONFIGS["large-v3"]
WHISPER_CONFIGS["turbo"] = WHISPER_CONFIGS["large-v3-turbo"]


def config_from_name(name: str) -> WhisperConfig:
    try:
        return WHISPER_CONFIGS[name]
    except KeyError:
        known = ", ".join(sorted(WHISPER_CONFIGS))
        raise ValueError(f"unknown Whisper size {name!r}; known sizes: {known}") from None


def tiny_test_config(n_vocab: int = EN, n_mels: int = 80, **overrides) -> WhisperConfig:
    """A very small configuration for random-weight tests (real vocabulary, so real tokenizers apply)."""
    base = WhisperConfig(n_mels, N_AUDIO_CTX, 64, 4, 2, n_vocab, N_TEXT_CTX, 64, 4, 2)
    return replace(base, **overrides)
