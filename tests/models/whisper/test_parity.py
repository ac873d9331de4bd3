"""Encoder outputs and decoder logits against openai-whisper and Hugging Face transformers (fp32, CPU).

Random weights of small configs exercise each checkpoint format's loader (the reference saves the file, our
loader reads it); the real tiny.en and base weights exercise the CTranslate2 loader.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from whisper_references import hf_model, openai_model, openai_state_dict, random_state

from turboformer.audio import log_mel_spectrogram, pad_or_trim
from turboformer.models.whisper.config import WHISPER_CONFIGS, tiny_test_config
from turboformer.models.whisper.load import read_checkpoint
from turboformer.models.whisper.pipeline import WhisperModel

ATOL = 1e-4  # fp32 logits and encoder outputs

SMALL_CONFIGS = {
    "english-80": tiny_test_config(51864, 80),
    "multilingual-80": tiny_test_config(51865, 80, n_text_layer=3),
    "v3-128": tiny_test_config(51866, 128, n_audio_layer=3),
}


def _mel(config, seed=0):
    """A log-mel of noise with a tone: a realistic dynamic range without needing a file."""
    rng = np.random.default_rng(seed)
    t = np.arange(16000 * 7) / 16000
    audio = (0.1 * np.sin(2 * np.pi * 440 * t) + 0.02 * rng.standard_normal(t.shape)).astype(np.float32)
    return pad_or_trim(log_mel_spectrogram(audio, config.n_mels), 3000)[None]


def _prompt(model: WhisperModel) -> torch.Tensor:
    tok = model.tokenizer
    seq = list(tok.sot_sequence("en" if tok.multilingual else None, "transcribe"))
    return torch.tensor([seq + tok.encode(" The quick brown fox")])


def _our_logits(model: WhisperModel, mel, tokens):
    """Teacher-forced logits [1, L, V] of our decoder over a fresh static cache."""
    features = model.engine.encode(mel)
    cache = model.model.new_cache(1)
    with torch.no_grad():
        model.model.decoder.fill_cross_cache(features, cache)
        return features, model.model.decoder(tokens, torch.arange(tokens.shape[1])[None], cache, 0)


def _check(features, logits, ref_features, ref_logits):
    assert (features - ref_features).abs().max().item() < ATOL
    assert (logits - ref_logits).abs().max().item() < ATOL
    assert torch.equal(logits.argmax(-1), ref_logits.argmax(-1))


@pytest.mark.parametrize("name", SMALL_CONFIGS)
def test_huggingface_directory_matches_transformers(name, tmp_path, tiny_en_checkpoint):
    config = SMALL_CONFIGS[name]
    reference = hf_model(config, random_state(config, seed=1))
    reference.save_pretrained(tmp_path)  # safetensors + config.json, as users hold them
    if config.n_vocab == 51864:  # with a tokenizer.json beside it; the others fall back to openai's vocabularies
        shutil.copy(tiny_en_checkpoint.tokenizer_dir / "tokenizer.json", tmp_path)
    ours = WhisperModel.from_checkpoint(read_checkpoint(tmp_path), "cpu")
    assert ours.config == config
    mel, tokens = _mel(config), _prompt(ours)
    features, logits = _our_logits(ours, mel, tokens)
    with torch.no_grad():
        ref = reference(input_features=mel, decoder_input_ids=tokens)
        ref_features = reference.model.encoder(mel).last_hidden_state
    _check(features, logits, ref_features, ref.logits)


@pytest.mark.parametrize("name", SMALL_CONFIGS)
def test_openai_checkpoint_matches_openai_whisper(name, tmp_path):
    config = SMALL_CONFIGS[name]
    state = random_state(config, seed=2)
    torch.save(openai_state_dict(config, state), tmp_path / "model.pt")
    reference = openai_model(config, state)
    ours = WhisperModel.from_checkpoint(read_checkpoint(tmp_path / "model.pt"), "cpu")
    mel, tokens = _mel(config), _prompt(ours)
    features, logits = _our_logits(ours, mel, tokens)
    with torch.no_grad():
        ref_features = reference.encoder(mel)
        ref_logits = reference.logits(tokens, ref_features)
    _check(features, logits, ref_features, ref_logits)


def test_greedy_tokens_match_transformers_on_random_weights(tmp_path):
    """Step-by-step decoding over our static cache equals full recomputation in transformers."""
    config = SMALL_CONFIGS["english-80"]
    reference = hf_model(config, random_state(config, seed=3))
    reference.save_pretrained(tmp_path)
    ours = WhisperModel.from_checkpoint(read_checkpoint(tmp_path), "cpu")
    mel, tokens = _mel(config, seed=4), _prompt(ours)
    ours.engine.start(ours.engine.encode(mel), 1, torch.zeros(1, dtype=torch.long))
    ref_tokens, our_tokens = tokens.clone(), tokens.clone()
    logits, _ = ours.engine.prefill(tokens, torch.zeros(1, dtype=torch.long))
    for i in range(12):
        if i > 0:
            logits = ours.engine.step(our_tokens[:, -1], torch.tensor([our_tokens.shape[1] - 1]))
        our_tokens = torch.cat([our_tokens, logits.argmax(-1, keepdim=True)], dim=1)
        with torch.no_grad():
            ref_logits = reference(input_features=mel, decoder_input_ids=ref_tokens).logits[:, -1]
        assert (logits - ref_logits).abs().max().item() < ATOL
        ref_tokens = torch.cat([ref_tokens, ref_logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(our_tokens, ref_tokens)


@pytest.mark.parametrize("which", ["tiny_en", "base"])
def test_real_weights_match_both_references(which, request, librivox):
    model = request.getfixturevalue(which)
    checkpoint = request.getfixturevalue(f"{which}_checkpoint")
    openai_ref = request.getfixturevalue(f"openai_{which}")
    hf_ref = hf_model(checkpoint.config, checkpoint.state_dict)
    mel = pad_or_trim(log_mel_spectrogram(librivox[1][1], model.config.n_mels), 3000)[None]
    tokens = _prompt(model)
    features, logits = _our_logits(model, mel, tokens)
    with torch.no_grad():
        openai_features = openai_ref.encoder(mel)
        _check(features, logits, openai_features, openai_ref.logits(tokens, openai_features))
        _check(features, logits, hf_ref.model.encoder(mel).last_hidden_state,
               hf_ref(input_features=mel, decoder_input_ids=tokens).logits)


# Sizes the Whisper paper and model card publish (millions of parameters, rounded).
PUBLISHED_MILLIONS = {"tiny": 39, "base": 74, "small": 244, "medium": 769, "large-v1": 1550, "large-v2": 1550,
                      "large-v3": 1550, "large-v3-turbo": 809}


@pytest.mark.parametrize("name", sorted(WHISPER_CONFIGS))
def test_named_configs_have_the_published_sizes(name):
    from turboformer.models.whisper.model import Whisper

    config = WHISPER_CONFIGS[name]
    with torch.device("meta"):
        count = sum(p.numel() for p in Whisper(config).parameters()) / 1e6
    published = PUBLISHED_MILLIONS[{"large": "large-v3", "turbo": "large-v3-turbo"}.get(name, name.removesuffix(".en"))]
    assert abs(count - published) / published < 0.05
    assert config.multilingual == (not name.endswith(".en"))
    assert config.n_mels == (128 if name in ("large-v3", "large", "large-v3-turbo", "turbo") else 80)


def test_unknown_size_is_a_clear_error():
    from turboformer.models.whisper.config import config_from_name

    assert config_from_name("turbo") == WHISPER_CONFIGS["large-v3-turbo"]
    with pytest.raises(ValueError, match="unknown Whisper size 'huge'; known sizes: base, base.en"):
        config_from_name("huge")


def test_real_checkpoints_have_the_named_configs(tiny_en_checkpoint, base_checkpoint):
    assert tiny_en_checkpoint.config == WHISPER_CONFIGS["tiny.en"]
    assert base_checkpoint.config == WHISPER_CONFIGS["base"]
