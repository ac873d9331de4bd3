"""LiteTransformerConfig from the fixture's args (values listed in the fixture README), branch specs, named sizes
and the errors for unsupported options."""

from __future__ import annotations

from argparse import Namespace

import pytest

from turboformer.models.lite_transformer.config import (
    BranchSpec,
    ConfigError,
    LiteTransformerConfig,
)
from turboformer.models.lite_transformer.load import read_checkpoint
from turboformer.models.lite_transformer.model import build_model


@pytest.fixture(scope="module")
def args(reference_dir) -> Namespace:
    return read_checkpoint(reference_dir / "checkpoint.pt")[0]


def with_args(args: Namespace, **changes) -> Namespace:
    return Namespace(**{**vars(args), **changes})


def test_fixture_args(args):
    config = LiteTransformerConfig.from_args(args, 88, 88)
    enc, dec = config.encoder, config.decoder
    assert (enc.embed_dim, enc.ffn_dim, enc.layers, dec.embed_dim, dec.ffn_dim, dec.layers) == (96, 96, 3, 96, 96, 2)
    branches = (BranchSpec("attn", 48, 4), BranchSpec("dynamic", 48, 4))
    assert enc.branches == dec.branches == branches
    assert enc.kernel_sizes == (3, 7, 15) and dec.kernel_sizes == (3, 7)
    assert [enc.layer_kernels(i) for i in range(3)] == [(0, 3), (0, 7), (0, 15)]
    assert enc.glu and dec.glu and config.conv_linear and config.weight_softmax
    assert dec.attention_heads == 8
    assert not (enc.normalize_before or dec.normalize_before or enc.final_norm or dec.final_norm)
    assert not (enc.learned_pos or dec.learned_pos) and config.positional_embeddings
    assert config.share_all_embeddings and config.share_decoder_input_output_embed
    assert config.activation_fn == "relu" and config.left_pad_source
    assert enc.max_positions == dec.max_positions == 1024


@pytest.mark.parametrize(
    "spec,parsed",
    [
        ("attn:1:48:4", BranchSpec("attn", 48, 4, None)),
        ("dynamic:default:48:4", BranchSpec("dynamic", 48, 4, None)),
        ("lightweight:31:248:2", BranchSpec("lightweight", 248, 2, 31)),
    ],
)
def test_branch_spec(spec, parsed):
    assert BranchSpec.parse(spec) == parsed


@pytest.mark.parametrize(
    "spec,message",
    [("conv:3:48:4", "unknown branch type"), ("dynamic:x:48:4", "integers"), ("dynamic:3:48", "type:kernel:dim:heads")],
)
def test_bad_branch_spec(spec, message):
    with pytest.raises(ConfigError, match=message):
        BranchSpec.parse(spec)


@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(arch="transformer_wmt_en_de"), "not a Lite Transformer"),
        (dict(arch="transformer_multibranch_v2_big"), "not supported"),
        (dict(adaptive_softmax_cutoff="1000,5000"), "adaptive_softmax_cutoff"),
        (dict(encoder_branch_type=None), "plain transformer"),
        (dict(encoder_branch_type=["attn:1:48:4", "dynamic:default:40:4"]), "sum to 88, not 96"),
        (dict(decoder_branch_type=["attn:1:48:5", "dynamic:default:48:4"]), "not divisible by its 5 heads"),
        (dict(encoder_kernel_size_list=[3, 4, 15]), "even kernel size 4"),
        (dict(decoder_kernel_size_list=[3, 7, 15, 31], decoder_layers=5), "4 entries for 5 layers"),
        (dict(activation_fn="swish"), "activation_fn 'swish'"),
        (dict(decoder_attention_heads=7), "not divisible by 7"),
    ],
)
def test_unsupported_args(args, changes, message):
    with pytest.raises(ConfigError, match=message):
        LiteTransformerConfig.from_args(with_args(args, **changes), 88, 88)


def test_shared_embeddings_need_joined_dictionary(args):
    with pytest.raises(ConfigError, match="joined dictionary"):
        LiteTransformerConfig.from_args(args, 88, 96)


def test_kernel_list_resolution(args):
    """upstream base_architecture: one size repeats, a longer list is truncated."""
    one = LiteTransformerConfig.from_args(with_args(args, encoder_kernel_size_list=[5]), 88, 88)
    assert one.encoder.kernel_sizes == (5, 5, 5)
    long = LiteTransformerConfig.from_args(with_args(args, decoder_kernel_size_list=[3, 7, 15, 31]), 88, 88)
    assert long.decoder.kernel_sizes == (3, 7)


def test_arch_defaults(args):
    """Options missing from args take the architecture's defaults (iwslt: ffn 1024, 4 heads)."""
    dropped = ("encoder_ffn_embed_dim", "decoder_ffn_embed_dim", "decoder_attention_heads")
    trimmed = Namespace(**{k: v for k, v in vars(args).items() if k not in dropped})
    config = LiteTransformerConfig.from_args(with_args(trimmed, arch="transformer_multibranch_v2_iwslt_de_en"), 88, 88)
    assert (config.encoder.ffn_dim, config.decoder.ffn_dim, config.decoder.attention_heads) == (1024, 1024, 4)


def test_pre_norm_final_norms(args):
    config = LiteTransformerConfig.from_args(
        with_args(args, encoder_normalize_before=True, decoder_normalize_before=True), 88, 88
    )
    assert config.encoder.final_norm and config.decoder.final_norm
    no_final = with_args(args, decoder_normalize_before=True, no_decoder_final_norm=True)
    assert not LiteTransformerConfig.from_args(no_final, 88, 88).decoder.final_norm


@pytest.mark.parametrize("name,dim", [("wmt-en-de", 496), ("wmt-en-de-408", 408), ("wmt-en-de-200", 200)])
def test_named_sizes(name, dim):
    """The repo's configs/wmt16.en-de/attention/multibranch_v2/embed{dim}.yml on the WMT En-De architecture."""
    config = LiteTransformerConfig.from_name(name, vocab_size=1000)
    for stack in (config.encoder, config.decoder):
        assert (stack.embed_dim, stack.ffn_dim, stack.layers, stack.attention_heads) == (dim, dim, 6, 8)
        assert stack.branches == (BranchSpec("attn", dim // 2, 4), BranchSpec("dynamic", dim // 2, 4))
        assert stack.kernel_sizes == (3, 7, 15, 31, 31, 31)
    assert config.src_vocab_size == config.tgt_vocab_size == 1000
    model = build_model(config)
    assert model.decoder.layers[5].lsra.branches[1].kernel_size == 31


def test_unknown_name():
    with pytest.raises(ConfigError, match="unknown Lite Transformer size"):
        LiteTransformerConfig.from_name("wmt-en-xx")
