"""Parity of the Lite Transformer forward passes with the upstream fixture (expected.npz, generated with
mit-han-lab/lite-transformer): every intermediate array, teacher-forced and incremental decoding.

Upstream arrays are time-major [T, B, C]; ours are batch-major. Encoder-side values are compared at non-pad
positions, decoder-side ones where target != pad (as the fixture README prescribes), at atol 1e-4.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from turboformer.models.lite_transformer.model import LiteTransformer, make_positions

ATOL = 1e-4
PAD = 1


def assert_close(actual: np.ndarray, expected: np.ndarray, mask: np.ndarray, name: str, atol: float = ATOL) -> None:
    assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
    err = np.abs(actual - expected)[mask]
    assert err.size and err.max() <= atol, f"{name}: max |diff| {err.max():.3g} > {atol}"


def time_major(t: torch.Tensor) -> np.ndarray:
    return t.transpose(0, 1).detach().numpy()


@pytest.fixture(scope="module")
def activations(loaded, expected) -> dict[str, np.ndarray]:
    """Our intermediate tensors on the fixture batch, named and laid out as in expected.npz."""
    model: LiteTransformer = loaded.model
    src = torch.from_numpy(expected["src_tokens"])
    prev = torch.from_numpy(expected["prev_output_tokens"])
    out: dict[str, np.ndarray] = {}
    hooks = []

    def capture(name: str):
        return lambda module, inputs, output: out.__setitem__(name, time_major(output))

    for i, layer in enumerate(model.encoder.layers):
        hooks.append(layer.register_forward_hook(capture(f"encoder_layer{i}_out")))
        hooks.append(layer.lsra.register_forward_hook(capture(f"encoder_layer{i}_multibranch_out")))
        for j, branch in enumerate(layer.lsra.branches):
            hooks.append(branch.register_forward_hook(capture(f"encoder_layer{i}_branch{j}_out")))
    for i, layer in enumerate(model.decoder.layers):
        hooks.append(layer.register_forward_hook(capture(f"decoder_layer{i}_out")))
    try:
        with torch.no_grad():
            out["encoder_embed_out"] = time_major(model.encoder.embed(src))
            encoder_out = model.encoder(src)
            out["encoder_out"] = time_major(encoder_out.out)
            out["encoder_padding_mask"] = encoder_out.padding_mask.numpy()
            out["decoder_embed_out"] = time_major(model.decoder.embed(prev, make_positions(prev, PAD)))
            logits = model.decoder(prev, encoder_out)
            out["decoder_logits"] = logits.numpy()
            out["decoder_log_probs"] = model.log_probs(logits).numpy()
    finally:
        for hook in hooks:
            hook.remove()
    return out


ENCODER_KEYS = ["encoder_embed_out", "encoder_out"] + [
    f"encoder_layer{i}_{part}" for i in range(3) for part in ("branch0_out", "branch1_out", "multibranch_out", "out")
]


@pytest.mark.parametrize("key", ENCODER_KEYS)
def test_encoder_arrays(activations, expected, key):
    non_pad = ~expected["encoder_padding_mask"].T  # [T, B]
    assert_close(activations[key], expected[key], non_pad, key)


def test_encoder_padding_mask(activations, expected):
    np.testing.assert_array_equal(activations["encoder_padding_mask"], expected["encoder_padding_mask"])


@pytest.mark.parametrize("key", ["decoder_embed_out", "decoder_layer0_out", "decoder_layer1_out"])
def test_decoder_layer_arrays(activations, expected, key):
    assert_close(activations[key], expected[key], (expected["target"] != PAD).T, key)


@pytest.mark.parametrize("key", ["decoder_logits", "decoder_log_probs"])
def test_decoder_outputs(activations, expected, key):
    assert_close(activations[key], expected[key], expected["target"] != PAD, key)


@pytest.mark.parametrize("row", range(4))
def test_single_rows(loaded, expected, row):
    """Each row alone (no padding): results differ from the padded batch, as upstream's do."""
    model = loaded.model
    src = torch.from_numpy(expected[f"single{row}_src_tokens"])
    prev = torch.from_numpy(expected[f"single{row}_prev_output_tokens"])
    with torch.no_grad():
        encoder_out = model.encoder(src)
        log_probs = model.log_probs(model.decoder(prev, encoder_out))
    enc_expected = expected[f"single{row}_encoder_out"]
    assert_close(time_major(encoder_out.out), enc_expected, np.ones(enc_expected.shape, bool), "encoder_out")
    lp_expected = expected[f"single{row}_decoder_log_probs"]
    assert_close(log_probs.numpy(), lp_expected, np.ones(lp_expected.shape, bool), "log_probs")


def _incremental(
    model: LiteTransformer, src: torch.Tensor, prev: torch.Tensor, reorder_at: int | None = None, order=None
):
    """Feed prev[:, t] one step at a time; optionally permute the batch rows (cache + inputs) after step reorder_at."""
    with torch.no_grad():
        cache = model.decoder.new_cache(model.encoder(src), prev.size(1))
        steps = []
        for t in range(prev.size(1)):
            if t == reorder_at:
                cache.reorder(order)
                prev, steps = prev[order], [s[order] for s in steps]
            steps.append(model.log_probs(model.decoder.step(prev[:, t], cache)))
    return torch.stack(steps, dim=1).numpy()


def test_incremental_row0(loaded, expected):
    """Upstream's incremental decoding of row 0 (attention key/value caches, conv input buffers)."""
    got = _incremental(
        loaded.model,
        torch.from_numpy(expected["single0_src_tokens"]),
        torch.from_numpy(expected["incremental_row0_prev_output_tokens"]),
    )
    want = expected["incremental_row0_log_probs"]
    assert_close(got, want, np.ones(want.shape, bool), "incremental_row0_log_probs")


def test_incremental_padded_batch(loaded, expected):
    """Incremental decoding of the left-padded batch equals upstream's teacher-forced log-probs."""
    got = _incremental(
        loaded.model, torch.from_numpy(expected["src_tokens"]), torch.from_numpy(expected["prev_output_tokens"])
    )
    assert_close(got, expected["decoder_log_probs"], expected["target"] != PAD, "incremental batch")


def test_cache_reorder(loaded, expected):
    """Reordering the cache mid-sequence (as beam search does) continues each moved row's own state."""
    order = torch.tensor([2, 0, 3, 1])
    got = _incremental(
        loaded.model,
        torch.from_numpy(expected["src_tokens"]),
        torch.from_numpy(expected["prev_output_tokens"]),
        3,
        order,
    )
    want = expected["decoder_log_probs"][order.numpy()]
    assert_close(got, want, expected["target"][order.numpy()] != PAD, "reordered")


def test_bad_inputs(loaded):
    model = loaded.model
    with pytest.raises(ValueError, match="outside the dictionary"):
        model.encoder(torch.tensor([[5, 88, 2]]))
    with pytest.raises(ValueError, match="int64"):
        model.encoder(torch.tensor([5, 6, 2]))
    with pytest.raises(ValueError, match="more than the model's maximum"):
        model.encoder(torch.full((1, 1025), 5))
    encoder_out = model.encoder(torch.tensor([[5, 2]]))
    with pytest.raises(ValueError, match="max_len"):
        model.decoder.new_cache(encoder_out, 1025)
    cache = model.decoder.new_cache(encoder_out, 1)
    model.decoder.step(torch.tensor([2]), cache)
    with pytest.raises(ValueError, match="all used"):
        model.decoder.step(torch.tensor([5]), cache)


def test_every_fixture_array_is_checked(expected):
    """Guard: each array of expected.npz is compared by some test of this folder (inputs are used as inputs)."""
    inputs = {"src_tokens", "src_lengths", "sample_id", "target", "prev_output_tokens", "encoder_padding_mask"}
    here = set(ENCODER_KEYS) | {"decoder_embed_out", "decoder_layer0_out", "decoder_layer1_out"}
    here |= {"decoder_logits", "decoder_log_probs", "incremental_row0_log_probs", "incremental_row0_prev_output_tokens"}
    here |= {
        f"single{r}_{k}"
        for r in range(4)
        for k in ("src_tokens", "encoder_out", "prev_output_tokens", "decoder_log_probs")
    }
    beam = {f"beam_lenpen{lp}_{k}" for lp in ("06", "10") for k in ("tokens", "scores", "positional_scores")}
    beam |= {
        f"beam_lenpen06_single{r}_{k}" for r in range(4) for k in ("tokens", "scores", "positional_scores")
    }  # generate tests
    assert set(expected) == inputs | here | beam
