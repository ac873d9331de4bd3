"""Architecture options the fixture does not exercise, checked against ``lite_upstream_ref.py`` (the
``upstream_ref`` fixture: a functional transcription of the upstream forward pass on upstream-format state dicts).

The transcription is first validated on the upstream fixture itself; then each variant gets random upstream-format
weights, is saved as a fairseq-style model directory, loaded with our loader and compared: encoder output,
teacher-forced logits and incremental log-probs (atol 1e-4, float32).
"""

from __future__ import annotations

import copy
import shutil
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch

from turboformer.models.lite_transformer.load import load_model_dir, read_checkpoint

ATOL = 1e-4
PAD = 1


def _max_err(actual: torch.Tensor, expected: torch.Tensor | np.ndarray, mask: np.ndarray) -> float:
    return float(np.abs(actual.detach().float().numpy() - np.asarray(expected))[mask].max())


def test_reference_matches_fixture(upstream_ref, reference_dir, expected):
    args, sd = read_checkpoint(reference_dir / "checkpoint.pt")
    with torch.no_grad():
        encoder_out, mask = upstream_ref.encode(sd, args, torch.from_numpy(expected["src_tokens"]))
        logits = upstream_ref.decode(sd, args, torch.from_numpy(expected["prev_output_tokens"]), encoder_out, mask)
    assert _max_err(encoder_out, expected["encoder_out"], ~expected["encoder_padding_mask"].T) < ATOL
    assert _max_err(logits, expected["decoder_logits"], expected["target"] != PAD) < ATOL


_SMALL = dict(
    encoder_embed_dim=32, decoder_embed_dim=32, decoder_input_dim=32, encoder_ffn_embed_dim=48,
    decoder_ffn_embed_dim=48, encoder_layers=2, decoder_layers=2, encoder_kernel_size_list=[3, 5],
    decoder_kernel_size_list=[3, 5], decoder_attention_heads=4, encoder_attention_heads=4,
)  # fmt: skip

VARIANTS = {
    "prenorm-lightweight-learnedpos-gelu-unshared": dict(
        encoder_branch_type=["attn:1:16:2", "lightweight:default:16:2"],
        decoder_branch_type=["attn:1:16:4", "lightweight:default:16:2"],
        encoder_normalize_before=True, decoder_normalize_before=True,
        encoder_learned_pos=True, decoder_learned_pos=True, activation_fn="gelu",
        share_all_embeddings=False, share_decoder_input_output_embed=False,
    ),
    "three-branches-noglu-nosoftmax-shared-output": dict(
        encoder_branch_type=["attn:1:16:2", "dynamic:default:8:2", "lightweight:5:8:1"],
        decoder_branch_type=["attn:1:16:2", "dynamic:default:8:2", "lightweight:4:8:1"],
        encoder_glu=False, decoder_glu=False, weight_softmax=False,
        share_all_embeddings=False, share_decoder_input_output_embed=True,
    ),
    "no-conv-linear-no-positions": dict(
        encoder_branch_type=["attn:1:16:2", "dynamic:default:16:4"],
        decoder_branch_type=["attn:1:16:2", "dynamic:default:16:4"],
        conv_linear=False, no_token_positional_embeddings=True,
    ),
}  # fmt: skip


def make_model_dir(tmp: Path, reference_dir: Path, args: Namespace, state: dict) -> Path:
    """A fairseq-style model directory: checkpoint.pt + the fixture's (joined) dictionaries."""
    for name in ("dict.src.txt", "dict.tgt.txt"):
        shutil.copy(reference_dir / name, tmp / name)
    torch.save({"args": args, "model": state}, tmp / "checkpoint.pt")
    return tmp


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant(variant, upstream_ref, reference_dir, expected, tmp_path):
    args, _ = read_checkpoint(reference_dir / "checkpoint.pt")
    args = Namespace(**{**vars(args), **_SMALL, **VARIANTS[variant]})
    state = upstream_ref.random_upstream_state(args, vocab=88, seed=sorted(VARIANTS).index(variant))
    model = load_model_dir(make_model_dir(tmp_path, reference_dir, args, state)).model

    src, prev = torch.from_numpy(expected["src_tokens"]), torch.from_numpy(expected["prev_output_tokens"])
    non_pad_src, non_pad_tgt = ~expected["encoder_padding_mask"], expected["target"] != PAD
    with torch.no_grad():
        ref_encoder_out, ref_mask = upstream_ref.encode(state, args, src)
        ref_logits = upstream_ref.decode(state, args, prev, ref_encoder_out, ref_mask)
        encoder_out = model.encoder(src)
        logits = model.decoder(prev, encoder_out)
        cache = model.decoder.new_cache(encoder_out, prev.size(1))
        steps = torch.stack([model.log_probs(model.decoder.step(prev[:, t], cache)) for t in range(prev.size(1))], 1)

    assert _max_err(encoder_out.out, ref_encoder_out.transpose(0, 1), non_pad_src) < ATOL
    assert _max_err(logits, ref_logits, non_pad_tgt) < ATOL
    assert _max_err(steps, torch.log_softmax(ref_logits, -1), non_pad_tgt) < ATOL


CUDA = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize(
    "device,dtype",
    [
        ("cpu", torch.bfloat16),
        ("cpu", torch.float16),
        pytest.param("cuda", torch.bfloat16, marks=CUDA),
        pytest.param("cuda", torch.float16, marks=CUDA),
    ],
)
def test_reduced_precision(device, dtype, upstream_ref, loaded, reference_dir, expected):
    """``model.to(dtype)`` keeps float32 softmaxes: its error against the float32 fixture is within 2x that of the
    upstream computation run in the same dtype on the same device."""
    args, sd = read_checkpoint(reference_dir / "checkpoint.pt")
    src = torch.from_numpy(expected["src_tokens"]).to(device)
    prev = torch.from_numpy(expected["prev_output_tokens"]).to(device)
    mask = expected["target"] != PAD
    sd = {k: v.to(device, dtype) for k, v in sd.items()}
    model = copy.deepcopy(loaded.model).to(device, dtype)
    with torch.no_grad():
        encoder_out, padding = upstream_ref.encode(sd, args, src)
        ref_logits = upstream_ref.decode(sd, args, prev, encoder_out, padding)
        log_probs = model.log_probs(model(src, prev))
    ref_err = _max_err(torch.log_softmax(ref_logits.float(), -1).cpu(), expected["decoder_log_probs"], mask)
    assert log_probs.dtype == torch.float32
    assert _max_err(log_probs.cpu(), expected["decoder_log_probs"], mask) <= 2 * ref_err
