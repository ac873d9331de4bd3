"""``train.yaml`` parsing and the WeNet checkpoint loader: name map, CMVN formats, older checkpoints, mismatches."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import yaml

from turboformer.models.conformer import (
    CONFORMER_CONFIGS,
    CheckpointError,
    ConformerConfigError,
    ConformerRecognizer,
    RecognizeOptions,
    RecognizeOptionsError,
    build_model,
    config_from_name,
    load_conformer,
    parse_train_yaml,
)
from turboformer.models.conformer.encoder import sinusoid_table
from turboformer.models.conformer.load import load_global_cmvn


@pytest.fixture(scope="module")
def train_yaml(ref) -> dict:
    return yaml.safe_load((ref.dir / "train.yaml").read_text())


@pytest.fixture(scope="module")
def wenet_state(ref) -> dict[str, torch.Tensor]:
    return torch.load(ref.dir / "final.pt", map_location="cpu", weights_only=True)


def make_model_dir(tmp_path, ref, conf: dict | None = None, state: dict | None = None):
    """A copy of the fixture model directory with ``train.yaml`` and/or ``final.pt`` replaced."""
    for name in ("units.txt", "global_cmvn", "train.yaml", "final.pt"):
        shutil.copy(ref.dir / name, tmp_path / name)
    if conf is not None:
        (tmp_path / "train.yaml").write_text(yaml.safe_dump(conf))
    if state is not None:
        torch.save(state, tmp_path / "final.pt")
    return tmp_path


def with_changes(conf: dict, section: str | None = None, **changes) -> dict:
    out = yaml.safe_load(yaml.safe_dump(conf))  # deep copy
    (out[section] if section else out).update(changes)
    return out


# -- configuration --------------------------------------------------------------------------------------------


def test_parse_fixture_yaml(train_yaml):
    """Values stated in the fixture README (aishell U2++ structure, tiny sizes)."""
    config = parse_train_yaml(train_yaml)
    enc, dec = config.encoder, config.decoder
    assert (enc.input_dim, enc.output_size, enc.attention_heads, enc.head_dim) == (80, 96, 4, 24)
    assert (enc.linear_units, enc.num_blocks, enc.input_layer, enc.subsampling_rate, enc.right_context) == (
        160, 3, "conv2d", 4, 6,
    )  # fmt: skip
    assert (enc.cnn_module_kernel, enc.causal, enc.cnn_module_norm, enc.macaron_style) == (8, True, "layer_norm", True)
    assert enc.use_dynamic_chunk and enc.static_chunk_size == 0
    assert (dec.kind, dec.attention_heads, dec.linear_units, dec.num_blocks, dec.r_num_blocks) == (
        "bitransformer", 4, 144, 2, 1,
    )  # fmt: skip
    assert (config.vocab_size, config.blank_id, config.sos_id, config.eos_id) == (67, 0, 2, 2)
    assert (config.cmvn_file, config.cmvn_is_json) == ("global_cmvn", True)
    assert (config.fbank.sample_rate, config.fbank.num_mel_bins, config.fbank.frame_length_ms) == (16000, 80, 25.0)


def test_parse_older_layout(train_yaml):
    """Older WeNet yaml: top-level cmvn_file/is_json_cmvn, no special tokens (sos = eos = vocab_size - 1)."""
    conf = with_changes(train_yaml)
    for key in ("cmvn", "cmvn_conf", "tokenizer", "tokenizer_conf", "model"):
        conf.pop(key)
    conf.update(cmvn_file="exp/global_cmvn", is_json_cmvn=False)
    config = parse_train_yaml(conf)
    assert (config.sos_id, config.eos_id, config.blank_id) == (66, 66, 0)
    assert (config.cmvn_file, config.cmvn_is_json) == ("exp/global_cmvn", False)


@pytest.mark.parametrize(
    "section, key, value, message",
    [
        ("encoder_conf", "normalize_before", False, "normalize_before=False is not supported"),
        ("encoder_conf", "pos_enc_layer_type", "abs_pos", "pos_enc_layer_type='abs_pos' is not supported"),
        ("encoder_conf", "selfattention_layer_type", "selfattn", "selfattention_layer_type"),
        ("encoder_conf", "activation_type", "relu", "activation_type='relu'"),
        ("encoder_conf", "input_layer", "conv2d2", "input_layer='conv2d2'"),
        ("encoder_conf", "cnn_module_norm", "group_norm", "cnn_module_norm='group_norm'"),
        ("encoder_conf", "some_new_option", 1, "some_new_option is not a WeNet option"),
        ("encoder_conf", "attention_heads", 5, "not divisible"),
        ("decoder_conf", "concat_after", True, "concat_after=True"),
        (None, "encoder", "transformer", "encoder='transformer' is not supported"),
        (None, "decoder", "rnn", "decoder='rnn' is not supported"),
        (None, "model", "transducer", "model='transducer'"),
    ],
)
def test_unsupported_options_are_named(train_yaml, section, key, value, message):
    with pytest.raises(ConformerConfigError, match=message):
        parse_train_yaml(with_changes(train_yaml, section, **{key: value}))


def test_yaml_scientific_notation(train_yaml):
    text = yaml.safe_dump(train_yaml).replace("normalize_before: true", "norm_eps: 1e-5\n  normalize_before: true")
    conf = yaml.safe_load(text)
    assert conf["encoder_conf"]["norm_eps"] == "1e-5"  # YAML 1.1: a string
    assert parse_train_yaml(conf).encoder.norm_eps == 1e-5


def test_non_causal_even_kernel_rejected(train_yaml):
    with pytest.raises(ConformerConfigError, match="odd cnn_module_kernel"):
        parse_train_yaml(with_changes(train_yaml, "encoder_conf", causal=False))


def test_named_aishell_size():
    config = config_from_name("aishell-u2pp-conformer")
    assert config is CONFORMER_CONFIGS["aishell-u2pp-conformer"]
    with torch.device("meta"):
        model = build_model(config)
    assert len(model.encoder.layers) == 12 and model.encoder.layers[0].self_attn.d_k == 64
    assert model.encoder.layers[0].conv_module.depthwise_conv.weight.shape == (256, 1, 8)
    assert len(model.decoder.left_decoder.layers) == len(model.decoder.right_decoder.layers) == 3
    assert model.ctc.ctc_lo.weight.shape == (4233, 256)
    with pytest.raises(ConformerConfigError, match="unknown Conformer size"):
        config_from_name("aishell-u3")


# -- checkpoint loading ---------------------------------------------------------------------------------------


def test_positional_tables_match_checkpoint(wenet_state):
    """Our float32 sinusoid recipe reproduces WeNet's stored ``pe`` buffers (used when a checkpoint has none).

    Vectorised sin/cos differ by CPU (1.9e-6 measured at p ~ 4500 here); a float64 recipe would be off by up
    to 3e-4 (fixture README), so 1e-5 still tells the recipes apart."""
    table = sinusoid_table(5000, 96)
    for key in ("encoder.embed.pos_enc.pe", "decoder.left_decoder.embed.1.pe", "decoder.right_decoder.embed.1.pe"):
        torch.testing.assert_close(table, wenet_state[key][0], atol=1e-5, rtol=0, msg=key)


def test_cmvn_files_equal_checkpoint_buffers(ref, wenet_state, tmp_path):
    """JSON statistics and the same statistics as a Kaldi text matrix give WeNet's stored CMVN buffers."""
    mean, istd = load_global_cmvn(ref.dir / "global_cmvn", is_json=True)
    torch.testing.assert_close(mean, wenet_state["encoder.global_cmvn.mean"], rtol=0, atol=0)
    torch.testing.assert_close(istd, wenet_state["encoder.global_cmvn.istd"], rtol=0, atol=0)
    stats = json.loads((ref.dir / "global_cmvn").read_text())
    sums = " ".join(repr(v) for v in stats["mean_stat"])
    squares = " ".join(repr(v) for v in stats["var_stat"])
    (tmp_path / "cmvn.ark").write_text(f" [\n  {sums} {stats['frame_num']}\n  {squares} 0 ]\n")
    mean_k, istd_k = load_global_cmvn(tmp_path / "cmvn.ark", is_json=False)
    torch.testing.assert_close(mean_k, mean, rtol=0, atol=0)
    torch.testing.assert_close(istd_k, istd, rtol=0, atol=0)
    (tmp_path / "bad").write_text('{"mean_stat": [1.0]}')
    with pytest.raises(CheckpointError, match="malformed CMVN"):
        load_global_cmvn(tmp_path / "bad")


@torch.inference_mode()
def test_older_checkpoint_without_tables_and_cmvn(ref, wenet_state, tmp_path):
    """Without stored ``pe`` or CMVN buffers, the tables are recomputed and CMVN read from global_cmvn."""
    state = {k: v for k, v in wenet_state.items() if not k.endswith(".pe") and "global_cmvn" not in k}
    model, _ = load_conformer(make_model_dir(tmp_path, ref, state=state))
    out, lengths = model.encode(torch.from_numpy(ref.inputs["feats"]), torch.from_numpy(ref.inputs["feats_lengths"]))
    ref.assert_close_valid(out, "encoder_out", lengths.tolist())


@pytest.mark.parametrize(
    "section, changes, messages",
    [
        ("encoder_conf", {"num_blocks": 2}, ["unexpected", "encoder.encoders.2."]),
        ("encoder_conf", {"num_blocks": 4}, ["missing", "encoder.encoders.3."]),
        ("encoder_conf", {"linear_units": 128}, ["shape mismatch", "feed_forward.w_1.weight", "(160, 96)"]),
        ("encoder_conf", {"cnn_module_norm": "batch_norm"}, ["missing", "running_mean"]),
        ("decoder_conf", {"r_num_blocks": 0}, ["unexpected", "decoder.right_decoder."]),
        (None, {"decoder": "transformer", "decoder_conf": {"num_blocks": 2}}, ["missing", "decoder.embed.0.weight"]),
    ],
)
def test_yaml_that_does_not_match_checkpoint(ref, train_yaml, tmp_path, section, changes, messages):
    conf = with_changes(train_yaml, section, **changes)
    with pytest.raises(CheckpointError) as error:
        load_conformer(make_model_dir(tmp_path, ref, conf=conf))
    for message in messages:
        assert message in str(error.value)


def test_broken_model_directories(ref, train_yaml, tmp_path):
    with pytest.raises(CheckpointError, match="train.yaml"):
        load_conformer(tmp_path)
    model_dir = make_model_dir(tmp_path, ref, conf=with_changes(train_yaml, output_dim=68, vocab_size=68))
    with pytest.raises(CheckpointError, match="67 units but train.yaml output_dim=68"):
        load_conformer(model_dir)
    make_model_dir(tmp_path, ref)
    (tmp_path / "final.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot load checkpoint"):
        load_conformer(tmp_path)
    (tmp_path / "final.pt").unlink()
    with pytest.raises(CheckpointError, match="no final.pt"):
        load_conformer(tmp_path)


def test_plain_transformer_decoder_layout(ref, train_yaml, wenet_state, tmp_path):
    """A WeNet ``decoder: transformer`` checkpoint stores its decoder directly under ``decoder.``."""
    state = {}
    for key, value in wenet_state.items():
        if key.startswith("decoder.right_decoder."):
            continue
        state[key.replace("decoder.left_decoder.", "decoder.")] = value
    conf = with_changes(train_yaml, decoder="transformer")
    conf["decoder_conf"].pop("r_num_blocks")
    recognizer = ConformerRecognizer.from_dir(make_model_dir(tmp_path, ref, conf=conf, state=state))
    assert recognizer.model.decoder.right_decoder is None
    features = ref.features()
    attention = recognizer.recognize_features(features, RecognizeOptions(mode="attention", beam_size=ref.BEAM))
    assert [r.tokens for r in attention] == [ref.tokens("single_attention", b) for b in range(3)]
    rescoring = recognizer.recognize_features(  # reverse_weight defaults to 0 without a right-to-left decoder
        features, RecognizeOptions(mode="attention_rescoring", beam_size=ref.BEAM, ctc_weight=0.0)
    )
    for b, r in enumerate(rescoring):
        assert r.tokens == ref.tokens("full_attention_rescoring_rw0_cw0", b)
        assert r.score == pytest.approx(ref["full_attention_rescoring_rw0_cw0_scores"][b], abs=ref.SCORE_ATOL)
    with pytest.raises(RecognizeOptionsError, match="reverse_weight > 0 needs a bitransformer"):
        recognizer.recognize_features(features, RecognizeOptions(reverse_weight=0.5))


def test_units_and_detokenize(recognizer, ref):
    symbols = recognizer.symbols
    assert len(symbols) == 67
    assert symbols.units[:5] == ("<blank>", "<unk>", "<sos/eos>", "▁", "'")
    assert symbols.units[5] == "a" and symbols.units[30] == "z"
    wav = json.loads((ref.dir / "expected_decode.json").read_text())["wav"]
    for mode in ("attention", "ctc_greedy_search", "ctc_prefix_beam_search", "attention_rescoring"):
        entry = wav[mode][0]
        assert symbols.detokenize(entry["tokens"]) == entry["text"]  # upstream char tokenizer text
    assert np.all(np.diff([int(line.split()[1]) for line in (ref.dir / "units.txt").read_text().splitlines()]) == 1)
