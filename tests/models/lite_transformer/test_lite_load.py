"""Checkpoint and dictionary loading: the fixture's files, upstream quirks and clear errors for bad inputs."""

from __future__ import annotations

import shutil
import sys
import types
from argparse import Namespace

import pytest
import torch

from turboformer.models.lite_transformer.dictionary import Dictionary, DictionaryError
from turboformer.models.lite_transformer.load import (
    CheckpointError,
    checkpoint_name_map,
    load_model,
    load_model_dir,
    read_checkpoint,
)

PAD = 1


@pytest.fixture(scope="module")
def checkpoint(reference_dir) -> tuple[Namespace, dict[str, torch.Tensor]]:
    return read_checkpoint(reference_dir / "checkpoint.pt")


# ---------------------------------------------------------------------------------------------- dictionaries


def test_dictionary_matches_fixture(loaded, reference_dir, expected):
    """88 symbols with implicit specials; test.src/test.tgt encode to the fixture's src_tokens/target rows."""
    src_dict = loaded.src_dict
    assert len(src_dict) == 88 and src_dict.symbols[:5] == ["<s>", "<pad>", "</s>", "<unk>", "the"]
    assert (src_dict.bos, src_dict.pad, src_dict.eos, src_dict.unk) == (0, 1, 2, 3)
    assert src_dict.symbols[-1] == "madeupword0003"
    sources = (reference_dir / "test.src").read_text().splitlines()
    targets = (reference_dir / "test.tgt").read_text().splitlines()
    for row, sample in enumerate(expected["sample_id"]):
        src_row = [t for t in expected["src_tokens"][row].tolist() if t != PAD]
        tgt_row = [t for t in expected["target"][row].tolist() if t != PAD]
        assert src_dict.encode(sources[sample]) == src_row
        assert loaded.tgt_dict.encode(targets[sample]) == tgt_row


def test_dictionary_string_and_unknowns(loaded):
    d = loaded.tgt_dict
    assert d.encode("the  zzz\tof") == [4, 3, 5, 2]
    assert d.string([0, 4, 3, 5, 2]) == "<s> the <unk> of"  # fairseq 0.8 keeps <s>, drops </s>
    with pytest.raises(DictionaryError, match="outside the dictionary"):
        d.string([88])


@pytest.mark.parametrize(
    "content,message", [("the 12\nof\n", "expected '<symbol> <count>'"), ("the 3\nthe 2\n", "duplicate")]
)
def test_bad_dictionary(tmp_path, content, message):
    path = tmp_path / "dict.txt"
    path.write_text(content)
    with pytest.raises(DictionaryError, match=message):
        Dictionary.load(path)


# ---------------------------------------------------------------------------------------------- checkpoint files


def test_read_fixture_checkpoint(checkpoint):
    args, state = checkpoint
    assert isinstance(args, Namespace) and args.arch == "transformer_multibranch_v2_wmt_en_de"
    assert len(state) == 131 and all(isinstance(v, torch.Tensor) for v in state.values())


class NotAllowed:
    pass


def test_refuses_unknown_pickled_classes(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"args": Namespace(), "model": {}, "extra": NotAllowed()}, path)
    with pytest.raises(CheckpointError, match="NotAllowed"):
        read_checkpoint(path)


def test_fairseq_objects_become_placeholders(tmp_path, monkeypatch, checkpoint):
    """Training checkpoints pickle fairseq meters and init functions; they load without fairseq installed."""
    module = types.ModuleType("fairseq.meters")

    class AverageMeter:
        def __init__(self):
            self.avg = 1.5

    def ratio_xavier_uniform_(tensor):
        return tensor

    for obj in (AverageMeter, ratio_xavier_uniform_):
        obj.__module__, obj.__qualname__ = module.__name__, obj.__name__
        setattr(module, obj.__name__, obj)
    monkeypatch.setitem(sys.modules, "fairseq", types.ModuleType("fairseq"))
    monkeypatch.setitem(sys.modules, "fairseq.meters", module)
    args, state = checkpoint
    path = tmp_path / "checkpoint.pt"
    torch.save(
        {
            "args": Namespace(**{**vars(args), "ffn_init": ratio_xavier_uniform_}),
            "model": state,
            "train_meters": {"loss": AverageMeter()},
        },
        path,
    )
    monkeypatch.delitem(sys.modules, "fairseq.meters")
    monkeypatch.delitem(sys.modules, "fairseq")
    loaded_args, loaded_state = read_checkpoint(path)
    assert loaded_args.arch == args.arch and loaded_state.keys() == state.keys()


@pytest.mark.parametrize(
    "payload,message",
    [
        (b"not a checkpoint", "not a torch checkpoint"),
        ({"model": {}}, "expected a dict with 'args' and 'model'"),
        ({"args": {}, "model": {}}, "argparse.Namespace"),
    ],
)
def test_bad_checkpoint_files(tmp_path, payload, message):
    path = tmp_path / "checkpoint.pt"
    if isinstance(payload, bytes):
        path.write_bytes(payload)
    else:
        torch.save(payload, path)
    with pytest.raises(CheckpointError, match=message):
        read_checkpoint(path)


def test_missing_files(tmp_path, reference_dir):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        read_checkpoint(tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="model directory not found"):
        load_model_dir(tmp_path / "nowhere")
    shutil.copy(reference_dir / "checkpoint.pt", tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match=r"dict\.src\.txt"):
        load_model_dir(tmp_path)


# ---------------------------------------------------------------------------------------------- weights


def test_name_map_covers_the_model(loaded):
    names = checkpoint_name_map(loaded.model.config)
    assert set(names) == set(loaded.model.state_dict())
    assert (
        names["encoder.layers.2.lsra.branches.1.weight_linear.weight"]
        == "encoder.layers.2.self_attn.branches.1.weight_linear.weight"
    )
    assert names["decoder.layers.1.cross_attn.q_proj.bias"] == "decoder.layers.1.encoder_attn.q_proj.bias"
    assert names["decoder.layers.0.ffn_norm.weight"] == "decoder.layers.0.final_layer_norm.weight"


def test_weights_loaded(loaded, checkpoint):
    _, state = checkpoint
    ours = loaded.model.state_dict()
    for name, theirs in checkpoint_name_map(loaded.model.config).items():
        assert torch.equal(ours[name], state[theirs]), name


def test_old_branchs_spelling(loaded, checkpoint):
    args, state = checkpoint
    old = {k.replace(".branches.", ".branchs."): v for k, v in state.items()}
    assert any(".branchs." in k for k in old)
    model = load_model(args, old, 88, 88)
    for name, tensor in loaded.model.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_mismatches_are_reported_together(checkpoint):
    args, state = checkpoint
    broken = dict(state)
    del broken["decoder.layers.1.fc2.bias"]
    broken["encoder.layers.0.fc1.weight"] = torch.zeros(97, 96)
    broken["encoder.layers.0.mystery.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError) as info:
        load_model(args, broken, 88, 88)
    message = str(info.value)
    assert "missing: decoder.layers.1.fc2.bias" in message
    assert "shape mismatch: encoder.layers.0.fc1.weight: checkpoint (97, 96), model (96, 96)" in message
    assert "unexpected: encoder.layers.0.mystery.weight" in message


def test_dictionary_size_must_match_embeddings(checkpoint):
    args, state = checkpoint
    with pytest.raises(CheckpointError, match=r"encoder.embed_tokens.weight: checkpoint \(88, 96\), model \(90, 96\)"):
        load_model(args, state, 90, 90)


def test_shared_embeddings_must_be_equal(checkpoint):
    args, state = checkpoint
    broken = dict(state)
    broken["decoder.embed_tokens.weight"] = state["decoder.embed_tokens.weight"] + 1
    with pytest.raises(CheckpointError, match="embeddings differ"):
        load_model(args, broken, 88, 88)


def test_final_norm_follows_version(checkpoint, upstream_ref):
    """fairseq drops the pre-norm decoder's final LayerNorm when decoder.version <= 2 (old checkpoints)."""
    args, _ = checkpoint
    args = Namespace(**{**vars(args), "encoder_normalize_before": True, "decoder_normalize_before": True})
    state = upstream_ref.random_upstream_state(args, vocab=88)
    assert load_model(args, state, 88, 88).decoder.final_norm is not None
    old = {k: v for k, v in state.items() if not k.startswith("decoder.layer_norm.")}
    old["decoder.version"] = torch.tensor([2.0])
    model = load_model(args, old, 88, 88)
    assert model.decoder.final_norm is None and model.encoder.final_norm is not None
