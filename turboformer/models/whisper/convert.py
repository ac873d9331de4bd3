"""Our weights in the upstream layouts (Hugging Face transformers, openai-whisper), and random weights.

Used to run the references side by side with this engine on the same weights (tests, ``bench``, ``eval``), and
by users who want a checkpoint in another format. transformers and openai-whisper are imported only here, only
when asked for.
"""

from __future__ import annotations

import math

import torch

from turboformer.models.whisper.config import WhisperConfig
from turboformer.models.whisper.load import export_state_dict, huggingface_name_map, openai_name_map
from turboformer.models.whisper.model import Whisper, sinusoids


def _special_ids(config: WhisperConfig) -> dict[str, int]:
    eot = 50256 if not config.multilingual else 50257
    return dict(decoder_start_token_id=eot + 1, pad_token_id=eot, bos_token_id=eot, eos_token_id=eot)


def huggingface_config(config: WhisperConfig, attn_implementation: str | None = None):
    from transformers import WhisperConfig as HFWhisperConfig

    hf = HFWhisperConfig(
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
        **_special_ids(config),
    )
    if attn_implementation is not None:  # "sdpa" or "eager"
        hf._attn_implementation = attn_implementation
    return hf


def to_huggingface(config: WhisperConfig, state: dict[str, torch.Tensor], attn_implementation: str | None = None):
    """A ``WhisperForConditionalGeneration`` holding our weights (its device and dtype: those of ``state``)."""
    from transformers import WhisperForConditionalGeneration

    with torch.device("meta"):
        model = WhisperForConditionalGeneration(huggingface_config(config, attn_implementation))
    hf_state = {f"model.{k}": v for k, v in export_state_dict(state, huggingface_name_map(config)).items()}
    hf_state["proj_out.weight"] = hf_state["model.decoder.embed_tokens.weight"]
    any_tensor = next(iter(state.values()))
    missing, unexpected = model.load_state_dict(hf_state, strict=False, assign=True)
    if unexpected or missing:
        raise ValueError(f"weights do not fit transformers' Whisper: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model.to(any_tensor.device).eval()


def openai_checkpoint(config: WhisperConfig, state: dict[str, torch.Tensor]) -> dict:
    """The content of an openai-whisper ``.pt`` file (``torch.save`` it)."""
    dims = {f: getattr(config, f) for f in config.__dataclass_fields__}
    return {"dims": dims, "model_state_dict": export_state_dict(state, openai_name_map(config))}


def to_openai(config: WhisperConfig, state: dict[str, torch.Tensor]):
    """An openai-whisper ``Whisper`` module holding our weights."""
    import whisper.model

    dims = whisper.model.ModelDimensions(**{f: getattr(config, f) for f in config.__dataclass_fields__})
    model = whisper.model.Whisper(dims)
    missing, unexpected = model.load_state_dict(openai_checkpoint(config, state)["model_state_dict"], strict=False)
    if unexpected or any(m != "alignment_heads" for m in missing):
        raise ValueError(f"weights do not fit openai-whisper: missing {missing}, unexpected {unexpected}")
    return model.eval()


def random_state(config: WhisperConfig, seed: int = 0, device="cpu", dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Random weights in our names, scaled like a trained model's (unit-variance activations, peaked logits)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.device("meta"):
        shapes = {name: t.shape for name, t in Whisper(config).state_dict().items()}
    state = {}
    for name, shape in shapes.items():
        if name == "encoder.positional_embedding":
            state[name] = sinusoids(*shape).to(device, dtype)
            continue
        noise = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
        if len(shape) >= 2:
            fan_in = math.prod(shape[1:]) if name.startswith("encoder.conv") else shape[-1]
            tensor = noise / math.sqrt(fan_in)
        elif name.endswith(".weight"):  # LayerNorm gains
            tensor = 1.0 + 0.1 * noise
        else:
            tensor = 0.05 * noise
        if name.endswith("attn.qkv.bias"):  # no key bias in Whisper
            tensor[shape[0] // 3 : 2 * shape[0] // 3] = 0
        if name.endswith("cross_attn.kv.bias"):
            tensor[: shape[0] // 2] = 0
        state[name] = tensor.to(dtype)
    return state


def random_model(config: WhisperConfig, seed: int = 0, device="cpu", dtype=torch.float32) -> Whisper:
    with torch.device("meta"):
        model = Whisper(config)
    model.load_state_dict(random_state(config, seed, device, dtype), assign=True)
    return model.eval()
