"""Encoder parity with upstream WeNet: CMVN, subsampling, every Conformer block, chunk masks, CTC log-probs."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from turboformer.models.conformer import ConformerInputError

PREFIXES = {"": (-1, -1), "chunk4_": (4, -1), "chunk4_left2_": (4, 2)}  # fixture prefix -> (chunk, left chunks)


@pytest.fixture(scope="module")
def padded(ref):
    return torch.from_numpy(ref.inputs["feats"]), torch.from_numpy(ref.inputs["feats_lengths"])


def _pad(features):
    return torch.nn.utils.rnn.pad_sequence(features, batch_first=True), torch.tensor([f.size(0) for f in features])


@torch.inference_mode()
def test_front_end(model, padded, ref):
    feats, lengths = padded
    encoder = model.encoder
    np.testing.assert_allclose(encoder.global_cmvn(feats).numpy(), ref["cmvn_out"], atol=1e-5, rtol=0)
    out_lengths = encoder.subsampling.output_lengths(lengths)
    assert out_lengths.tolist() == ref["encoder_out_lens"].tolist()
    valid = torch.arange(ref["embed_mask"].shape[-1]) < out_lengths[:, None]
    assert np.array_equal(valid.unsqueeze(1).numpy(), ref["embed_mask"])
    ref.assert_close_valid(encoder.embed(feats), "embed_out", out_lengths.tolist())
    positions = encoder.positions(0, ref["embed_pos_emb"].shape[1])
    assert np.array_equal(positions.numpy(), ref["embed_pos_emb"])


@torch.inference_mode()
def test_every_block_full_context(model, padded, ref):
    feats, lengths = padded
    captured = []
    hooks = [layer.register_forward_hook(lambda m, i, out: captured.append(out[0])) for layer in model.encoder.layers]
    try:
        encoder_out, out_lengths = model.encode(feats, lengths)
    finally:
        for hook in hooks:
            hook.remove()
    valid = ref["encoder_out_lens"].tolist()
    assert out_lengths.tolist() == valid
    assert len(captured) == 3
    for i, block_out in enumerate(captured):
        ref.assert_close_valid(block_out, f"encoder_layer{i}_out", valid)
    ref.assert_close_valid(encoder_out, "encoder_out", valid)


@pytest.mark.parametrize("prefix", list(PREFIXES))
@torch.inference_mode()
def test_encoder_and_ctc(model, padded, ref, prefix):
    feats, lengths = padded
    chunk, left = PREFIXES[prefix]
    encoder_out, out_lengths = model.encode(feats, lengths, chunk, left)
    valid = ref["encoder_out_lens"].tolist()
    ref.assert_close_valid(encoder_out, f"{prefix}encoder_out", valid)
    ref.assert_close_valid(model.ctc(encoder_out), f"{prefix}ctc_log_probs", valid)
    if prefix:
        mask = torch.arange(encoder_out.size(1)) < out_lengths[:, None]
        assert np.array_equal(mask.unsqueeze(1).numpy(), ref[f"{prefix}encoder_mask"])


@torch.inference_mode()
def test_single_utterances_equal_batch(model, ref):
    features = ref.features()
    batched, _ = model.encode(*_pad(features))
    for b, feats in enumerate(features):
        single, length = model.encode(feats[None], torch.tensor([feats.size(0)]))
        n = int(length)
        assert n == ref[f"single{b}_encoder_out"].shape[1]
        np.testing.assert_allclose(single[0].numpy(), ref[f"single{b}_encoder_out"][0], atol=ref.ATOL, rtol=0)
        log_probs = model.ctc(single)[0].numpy()
        np.testing.assert_allclose(log_probs, ref[f"single{b}_ctc_log_probs"][0], atol=ref.ATOL, rtol=0)
        # Nothing from padded frames reaches valid frames (causal conv, masked attention, unpadded subsampling).
        torch.testing.assert_close(single[0], batched[b, :n], atol=1e-5, rtol=0)


# Reduced precision against the upstream fp32 outputs. Tolerances are ~2x the errors measured on this fixture
# (bf16: 0.048 encoder / 0.19 log-probs; fp16: 0.0073 / 0.023): 8 and 11 mantissa bits over three blocks.
@pytest.mark.parametrize("dtype, encoder_atol, ctc_atol", [(torch.bfloat16, 0.1, 0.4), (torch.float16, 0.015, 0.05)])
@torch.inference_mode()
def test_reduced_precision_by_to_dtype(model, padded, ref, dtype, encoder_atol, ctc_atol):
    """``.to(dtype)`` runs with float32 CMVN, softmax and log-softmax and stays near the fp32 reference."""
    feats, lengths = padded
    low = copy.deepcopy(model).to(dtype)
    encoder_out, _ = low.encode(feats, lengths)
    log_probs = low.ctc(encoder_out)
    assert encoder_out.dtype == dtype and log_probs.dtype == torch.float32
    valid = ref["encoder_out_lens"].tolist()
    ref.assert_close_valid(encoder_out, "encoder_out", valid, atol=encoder_atol)
    ref.assert_close_valid(log_probs, "ctc_log_probs", valid, atol=ctc_atol)


def test_too_short_and_bad_shapes_rejected(model):
    with pytest.raises(ConformerInputError, match="at least 7"):
        model.encode(torch.zeros(1, 6, 80), torch.tensor([6]))
    with pytest.raises(ConformerInputError, match=r"\[batch, frames, 80\]"):
        model.encode(torch.zeros(1, 20, 40), torch.tensor([20]))
    with pytest.raises(ConformerInputError, match="exceeds"):
        model.encode(torch.zeros(1, 20, 80), torch.tensor([21]))
    with pytest.raises(ConformerInputError, match="chunk_size"):
        model.encode(torch.zeros(1, 20, 80), torch.tensor([20]), chunk_size=0)
    with pytest.raises(ConformerInputError, match="positional table"):
        model.encoder.positions(4990, 20)
