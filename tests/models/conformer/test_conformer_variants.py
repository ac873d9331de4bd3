"""Configurations the fixture does not cover (conv2d6/conv2d8, batch-norm or non-causal conv module, no macaron,
no conv module, plain transformer decoder): structural checks and padding invariance on random weights.

There is no upstream output for these; what is checked is WeNet's own definition of the subsampled lengths
(its mask slicing), that the checkpoint name map covers exactly the model's tensors, and that padding a
batch changes nothing for valid frames.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from turboformer.models.conformer import build_model
from turboformer.models.conformer.config import (
    ConformerConfig,
    DecoderConfig,
    EncoderConfig,
)
from turboformer.models.conformer.load import wenet_name_map

TINY = ConformerConfig(
    encoder=EncoderConfig(
        input_dim=80, output_size=32, attention_heads=2, linear_units=48, num_blocks=2, cnn_module_kernel=5,
        use_dynamic_chunk=True,
    ),
    decoder=DecoderConfig(attention_heads=2, linear_units=48, num_blocks=1, r_num_blocks=1),
    vocab_size=20, sos_id=19, eos_id=19,
)  # fmt: skip

VARIANTS = {
    "conv2d6 batch_norm non-causal": {"input_layer": "conv2d6", "cnn_module_norm": "batch_norm"},
    "conv2d8 causal layer_norm": {"input_layer": "conv2d8", "causal": True, "cnn_module_norm": "layer_norm"},
    "no macaron": {"macaron_style": False},
    "no conv module": {"use_cnn_module": False},
    "no final norm": {"final_norm": False},
}

# WeNet subsampling masks: x_mask[:, :, 2::2][:, :, 2::2] (conv2d), [2::2][4::3] (conv2d6), [2::2][2::2][2::2] (conv2d8)
WENET_MASK_SLICES = {"conv2d": ((2, 2), (2, 2)), "conv2d6": ((2, 2), (4, 3)), "conv2d8": ((2, 2), (2, 2), (2, 2))}


def _variant(changes: dict) -> ConformerConfig:
    return replace(TINY, encoder=replace(TINY.encoder, **changes))


def _randomized(config: ConformerConfig) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(config).eval()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm1d):  # non-trivial running statistics
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return model


@pytest.mark.parametrize("kind", list(WENET_MASK_SLICES))
def test_subsampled_lengths_follow_wenet_masks(kind):
    model = _randomized(_variant({"input_layer": kind}))
    for frames in (15, 16, 17, 18, 19, 40, 41, 100):
        mask = torch.ones(frames)
        for start, step in WENET_MASK_SLICES[kind]:
            mask = mask[start::step]
        computed = model.encoder.subsampling.output_lengths(torch.tensor([frames]))
        produced = model.encoder.subsampling(torch.zeros(1, frames, 80)).size(1)
        assert int(computed) == produced == mask.numel(), (kind, frames)
    assert model.config.encoder.right_context + 1 == min(
        t for t in range(1, 30) if model.encoder.subsampling.output_lengths(torch.tensor([t])) > 0
    )


@pytest.mark.parametrize("name", list(VARIANTS))
def test_name_map_covers_every_tensor(name):
    config = _variant(VARIANTS[name])
    assert set(wenet_name_map(config)) == set(build_model(config).state_dict())


def test_name_map_transformer_decoder():
    config = replace(TINY, decoder=replace(TINY.decoder, kind="transformer", r_num_blocks=0))
    names = wenet_name_map(config)
    assert set(names) == set(build_model(config).state_dict())
    assert names["decoder.left_decoder.layers.0.norm1.weight"][0] == "decoder.decoders.0.norm1.weight"


@pytest.mark.parametrize("name", list(VARIANTS))
@torch.inference_mode()
def test_padding_does_not_reach_valid_frames(name):
    model = _randomized(_variant(VARIANTS[name]))
    torch.manual_seed(1)
    features = [torch.randn(n, 80) * 3 + 10 for n in (61, 97, 40)]
    padded = torch.nn.utils.rnn.pad_sequence(features, batch_first=True)
    batched, lengths = model.encode(padded, torch.tensor([f.size(0) for f in features]))
    for b, feats in enumerate(features):
        single, length = model.encode(feats[None], torch.tensor([feats.size(0)]))
        assert int(length) == int(lengths[b]) == single.size(1)
        torch.testing.assert_close(batched[b, : int(length)], single[0], atol=1e-5, rtol=0)
