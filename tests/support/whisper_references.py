"""Build the upstream reference models (openai-whisper, Hugging Face) holding the same weights as ours.

The weights go back to each upstream layout by splitting our fused matrices along rows; a wrong name map
would put a weight where the reference does not expect it and the comparisons would fail.
"""

from __future__ import annotations

import numpy as np
import torch

from turboformer.models.whisper.config import WhisperConfig
from turboformer.models.whisper.load import huggingface_name_map, openai_name_map


def _unfuse(state: dict[str, torch.Tensor], name_map) -> dict[str, torch.Tensor]:
    out = {}
    for ours, sources in name_map.items():
        parts = state[ours].chunk(len(sources), dim=0) if len(sources) > 1 else [state[ours]]
        for source, part in zip(sources, parts):
            if source is not None:
                out[source] = part.clone()
    return out


def openai_model(config: WhisperConfig, state: dict[str, torch.Tensor]):
    """An openai-whisper ``Whisper`` (fp32, CPU) with our weights."""
    import whisper.model

    dims = whisper.model.ModelDimensions(**{f: getattr(config, f) for f in config.__dataclass_fields__})
    model = whisper.model.Whisper(dims)
    missing, unexpected = model.load_state_dict(_unfuse(state, openai_name_map(config)), strict=False)
    assert not unexpected and all(m == "alignment_heads" for m in missing), (missing, unexpected)
    return model.eval()


def openai_state_dict(config: WhisperConfig, state: dict[str, torch.Tensor]) -> dict:
    """The content of an openai-whisper .pt checkpoint file."""
    return {"dims": {f: getattr(config, f) for f in config.__dataclass_fields__},
            "model_state_dict": _unfuse(state, openai_name_map(config))}


def hf_config(config: WhisperConfig):
    from transformers import WhisperConfig as HFConfig

    return HFConfig(
        vocab_size=config.n_vocab,
        num_mel_bins=config.n_mels,
        d_model=config.n_audio_state,
        encoder_layers=config.n_audio_layer,
        encoder_attention_heads=config.n_audio_head,
        decoder_layers=config.n_text_layer,
        decoder_attention_heads=config.n_text_head,
        encoder_ffn_dim=4 * config.n_audio_state,
        decoder_ffn_dim=4 * config.n_text_state,
        max_source_positions=config.n_audio_ctx,
        max_target_positions=config.n_text_ctx,
        decoder_start_token_id=50257 if config.n_vocab == 51864 else 50258,
        pad_token_id=50256 if config.n_vocab == 51864 else 50257,
        bos_token_id=50256 if config.n_vocab == 51864 else 50257,
        eos_token_id=50256 if config.n_vocab == 51864 else 50257,
    )


def hf_model(config: WhisperConfig, state: dict[str, torch.Tensor]):
    """A Hugging Face ``WhisperForConditionalGeneration`` (fp32, eager attention) with our weights."""
    from transformers import WhisperForConditionalGeneration

    model = WhisperForConditionalGeneration(hf_config(config)).eval()
    hf_state = {f"model.{k}": v for k, v in _unfuse(state, huggingface_name_map(config)).items()}
    hf_state["proj_out.weight"] = hf_state["model.decoder.embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(hf_state, strict=False)
    assert not unexpected and not [m for m in missing if not m.endswith("k_proj.bias")], (missing, unexpected)
    return model


def random_state(config: WhisperConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights for our model, scaled so that activations and logits stay in a realistic range."""
    from turboformer.models.whisper.model import Whisper

    torch.manual_seed(seed)
    model = Whisper(config)
    state = {}
    for name, t in model.state_dict().items():
        if name.endswith("positional_embedding") and name.startswith("encoder"):
            state[name] = t.clone()
        elif t.ndim >= 2:
            state[name] = torch.randn_like(t) * (1.0 / np.sqrt(t.shape[-1]))
        elif name.endswith(".weight"):  # layer-norm gains
            state[name] = 1.0 + 0.1 * torch.randn_like(t)
        else:
            state[name] = 0.05 * torch.randn_like(t)
    for name in state:  # Whisper's key projections have no bias
        if name.endswith("attn.qkv.bias"):
            n = state[name].shape[0] // 3
            state[name][n : 2 * n] = 0
        if name.endswith("cross_attn.kv.bias"):
            state[name][: state[name].shape[0] // 2] = 0
    return state
