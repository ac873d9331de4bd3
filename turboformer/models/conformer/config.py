"""WeNet U2/U2++ Conformer configuration, parsed from the ``train.yaml`` that WeNet training writes.

Gulati et al., "Conformer: Convolution-augmented Transformer for Speech Recognition" (arXiv 2005.08100);
Zhang et al., "Unified Streaming and Non-streaming Two-pass End-to-end Model" (U2, arXiv 2012.05481);
Wu et al., "U2++: Unified Two-pass Bidirectional End-to-end Model" (arXiv 2106.05642).

Only the inference-relevant subset of WeNet's options is represented. Training-only keys (dropout rates,
spec-augment, optimiser, ...) are ignored; a key that would change the maths in a way we do not implement
raises :class:`ConformerConfigError` naming the key, never a silently different model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


class ConformerConfigError(ValueError):
    """The configuration (``train.yaml``) asks for something this engine does not implement or is inconsistent."""


# Conv2d subsampling front-ends: name -> (time subsampling rate, right context in input frames).
# WeNet wenet/transformer/subsampling.py: Conv2dSubsampling4/6/8 (kernel 3 stride 2; then 3/2, 5/3, 3/2+3/2).
SUBSAMPLING = {"conv2d": (4, 6), "conv2d6": (6, 10), "conv2d8": (8, 14)}

POSITIONAL_ROWS = 5000  # rows of WeNet's sinusoidal tables (max_len=5000): 200 s of encoder frames at 40 ms


@dataclass(frozen=True)
class EncoderConfig:
    """WeNet ``ConformerEncoder`` options (pre-norm, macaron, rel-pos, optional causal conv module)."""

    input_dim: int = 80  # fbank bins
    output_size: int = 256  # d_model
    attention_heads: int = 4
    linear_units: int = 2048  # FFN inner size
    num_blocks: int = 12
    input_layer: str = "conv2d"  # conv2d (4x) | conv2d6 (6x) | conv2d8 (8x)
    pos_enc_layer_type: str = "rel_pos"  # only WeNet's "rel_pos" (Transformer-XL style, no rel_shift)
    macaron_style: bool = True  # two half-step FFNs around attention and conv (Conformer paper Eq. 1)
    use_cnn_module: bool = True
    cnn_module_kernel: int = 15
    causal: bool = False  # causal depthwise conv: left padding kernel-1, enables streaming conv caches
    cnn_module_norm: str = "batch_norm"  # batch_norm | layer_norm
    use_dynamic_chunk: bool = False  # trained with dynamic chunk masks: any decoding chunk size is valid
    static_chunk_size: int = 0  # trained with one fixed chunk size (0: none)
    norm_eps: float = 1e-5
    conv_norm_eps: float = 1e-5
    final_norm: bool = True  # after_norm on the last block's output

    @property
    def head_dim(self) -> int:
        """d_k = D / H."""
        return self.output_size // self.attention_heads

    @property
    def subsampling_rate(self) -> int:
        """Input (10 ms) frames per encoder frame."""
        return SUBSAMPLING[self.input_layer][0]

    @property
    def right_context(self) -> int:
        """Input frames to the right of an output frame's first input frame that it depends on."""
        return SUBSAMPLING[self.input_layer][1]

    def validate(self) -> None:
        """Raise :class:`ConformerConfigError` for sizes or options this encoder cannot run."""
        if self.output_size % self.attention_heads:
            raise ConformerConfigError(
                f"encoder output_size={self.output_size} is not divisible by attention_heads={self.attention_heads}"
            )
        if self.input_layer not in SUBSAMPLING:
            raise ConformerConfigError(
                f"encoder input_layer={self.input_layer!r} is not supported (supported: {sorted(SUBSAMPLING)})"
            )
        if self.pos_enc_layer_type != "rel_pos":
            raise ConformerConfigError(
                f"encoder pos_enc_layer_type={self.pos_enc_layer_type!r} is not supported (only 'rel_pos')"
            )
        if self.cnn_module_norm not in ("batch_norm", "layer_norm"):
            raise ConformerConfigError(
                f"encoder cnn_module_norm={self.cnn_module_norm!r}: expected 'batch_norm' or 'layer_norm'"
            )
        if self.use_cnn_module and not self.causal and self.cnn_module_kernel % 2 == 0:
            raise ConformerConfigError(
                f"a non-causal conv module needs an odd cnn_module_kernel (got {self.cnn_module_kernel})"
            )


@dataclass(frozen=True)
class DecoderConfig:
    """WeNet ``TransformerDecoder`` / ``BiTransformerDecoder`` options (pre-norm, ReLU FFN)."""

    kind: str = "bitransformer"  # transformer | bitransformer
    attention_heads: int = 4
    linear_units: int = 2048
    num_blocks: int = 3  # left-to-right decoder depth
    r_num_blocks: int = 3  # right-to-left decoder depth (bitransformer only; 0: none)
    norm_eps: float = 1e-5

    def validate(self) -> None:
        """Raise :class:`ConformerConfigError` for an unsupported decoder."""
        if self.kind not in ("transformer", "bitransformer"):
            raise ConformerConfigError(f"decoder={self.kind!r} is not supported (transformer | bitransformer)")
        if self.kind == "transformer" and self.r_num_blocks:
            raise ConformerConfigError("decoder 'transformer' has no right-to-left decoder: r_num_blocks must be 0")


@dataclass(frozen=True)
class FbankConfig:
    """Kaldi filterbank front-end (WeNet ``compute_fbank``; dither is forced to 0 at decode time)."""

    sample_rate: int = 16000
    num_mel_bins: int = 80
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0


@dataclass(frozen=True)
class ConformerConfig:
    """A whole U2/U2++ model: encoder, CTC head, attention decoder, token ids and CMVN source."""

    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    fbank: FbankConfig = field(default_factory=FbankConfig)
    vocab_size: int = 4233
    blank_id: int = 0
    sos_id: int = 4232
    eos_id: int = 4232
    cmvn_file: str | None = None  # relative to the model directory
    cmvn_is_json: bool = True

    def validate(self) -> None:
        """Raise :class:`ConformerConfigError` if the parts or the token ids are inconsistent."""
        self.encoder.validate()
        self.decoder.validate()
        if self.encoder.input_dim != self.fbank.num_mel_bins:
            raise ConformerConfigError(
                f"input_dim={self.encoder.input_dim} differs from fbank num_mel_bins={self.fbank.num_mel_bins}"
            )
        for name in ("blank_id", "sos_id", "eos_id"):
            value = getattr(self, name)
            if not 0 <= value < self.vocab_size:
                raise ConformerConfigError(f"{name}={value} is outside the vocabulary [0, {self.vocab_size})")


# Named sizes for benchmarks (no weights exist offline): the AISHELL-1 U2++ Conformer recipe,
# wenet examples/aishell/s0/conf/train_u2++_conformer.yaml, with its 4233-unit character dictionary
# (<blank>=0, <unk>=1, ..., <sos/eos>=4232).
CONFORMER_CONFIGS: dict[str, ConformerConfig] = {
    "aishell-u2pp-conformer": ConformerConfig(
        encoder=EncoderConfig(
            input_dim=80,
            output_size=256,
            attention_heads=4,
            linear_units=2048,
            num_blocks=12,
            input_layer="conv2d",
            cnn_module_kernel=8,
            causal=True,
            cnn_module_norm="layer_norm",
            use_dynamic_chunk=True,
        ),
        decoder=DecoderConfig(kind="bitransformer", attention_heads=4, linear_units=2048, num_blocks=3, r_num_blocks=3),
        vocab_size=4233,
        sos_id=4232,
        eos_id=4232,
    ),
}


def config_from_name(name: str) -> ConformerConfig:
    """The named size ``name`` (a key of :data:`CONFORMER_CONFIGS`)."""
    if name not in CONFORMER_CONFIGS:
        raise ConformerConfigError(f"unknown Conformer size {name!r}; known: {sorted(CONFORMER_CONFIGS)}")
    return CONFORMER_CONFIGS[name]


# ---------------------------------------------------------------------------------------------------------------
# train.yaml parsing
# ---------------------------------------------------------------------------------------------------------------

# Keys that only matter for training (or that WeNet overrides at inference): accepted and ignored.
_ENCODER_TRAINING_KEYS = {
    "dropout_rate", "positional_dropout_rate", "attention_dropout_rate", "use_dynamic_left_chunk",
    "gradient_checkpointing", "use_sdpa", "positionwise_conv_kernel_size",
}  # fmt: skip
_DECODER_TRAINING_KEYS = {
    "dropout_rate", "positional_dropout_rate", "self_attention_dropout_rate", "src_attention_dropout_rate",
    "gradient_checkpointing", "use_sdpa",
}  # fmt: skip

# Keys we read, with the only value(s) we implement (WeNet's defaults); anything else is a clear error.
_ENCODER_FIXED = {
    "normalize_before": (True,),
    "selfattention_layer_type": ("rel_selfattn",),
    "activation_type": ("swish",),
    "positionwise_layer_type": ("linear",),
    "query_bias": (True,),
    "key_bias": (True,),
    "value_bias": (True,),
    "conv_bias": (True,),
    "mlp_bias": (True,),
    "layer_norm_type": ("layer_norm",),
    "mlp_type": ("position_wise_feed_forward",),
    "n_kv_head": (None,),
    "head_dim": (None,),
    "conv_inner_factor": (2,),
}
_DECODER_FIXED = {
    "normalize_before": (True,),
    "concat_after": (False,),
    "src_attention": (True,),
    "input_layer": ("embed",),
    "use_output_layer": (True,),
    "activation_type": ("relu",),
    "query_bias": (True,),
    "key_bias": (True,),
    "value_bias": (True,),
    "mlp_bias": (True,),
    "tie_word_embedding": (False,),
    "layer_norm_type": ("layer_norm",),
    "mlp_type": ("position_wise_feed_forward",),
    "n_kv_head": (None,),
    "head_dim": (None,),
}
_ENCODER_VALUES = {
    "output_size", "attention_heads", "linear_units", "num_blocks", "input_layer", "pos_enc_layer_type",
    "macaron_style", "use_cnn_module", "cnn_module_kernel", "causal", "cnn_module_norm", "use_dynamic_chunk",
    "static_chunk_size", "norm_eps", "conv_norm_eps", "final_norm",
}  # fmt: skip
_DECODER_VALUES = {"attention_heads", "linear_units", "num_blocks", "r_num_blocks", "norm_eps"}


_FLOAT_KEYS = {"norm_eps", "conv_norm_eps"}  # PyYAML reads "1e-5" (no dot) as a string


def _check_section(section: str, conf: Mapping[str, Any], values: set, fixed: dict, ignored: set) -> dict:
    """Validate one ``*_conf`` mapping; return the entries that become dataclass fields."""
    out = {}
    for key, value in conf.items():
        if key in values:
            if key in _FLOAT_KEYS:
                try:
                    value = float(value)
                except (TypeError, ValueError):
                    raise ConformerConfigError(f"{section}.{key}={value!r} is not a number") from None
            out[key] = value
        elif key in fixed:
            if value not in fixed[key]:
                raise ConformerConfigError(
                    f"{section}.{key}={value!r} is not supported (supported: {', '.join(map(repr, fixed[key]))})"
                )
        elif key not in ignored:
            raise ConformerConfigError(f"{section}.{key} is not a WeNet option this engine knows; refusing to guess")
    return out


def parse_train_yaml(conf: Mapping[str, Any]) -> ConformerConfig:
    """Build a :class:`ConformerConfig` from the parsed ``train.yaml`` of a WeNet model directory.

    Reads both layouts: current WeNet (``cmvn_conf``, ``tokenizer_conf.special_tokens``) and older releases
    (top-level ``cmvn_file``/``is_json_cmvn``; without special tokens, sos = eos = vocab_size - 1).
    """
    model = conf.get("model", "asr_model")
    if model != "asr_model":
        raise ConformerConfigError(f"model={model!r} is not supported (only WeNet 'asr_model', i.e. U2/U2++)")
    encoder_kind = conf.get("encoder", "conformer")
    if encoder_kind != "conformer":
        raise ConformerConfigError(f"encoder={encoder_kind!r} is not supported (only 'conformer')")
    if conf.get("ctc", "ctc") != "ctc":
        raise ConformerConfigError(f"ctc={conf['ctc']!r} is not supported (only 'ctc')")
    for key in ("input_dim", "output_dim"):
        if key not in conf:
            raise ConformerConfigError(f"train.yaml has no {key!r}")
    vocab_size = int(conf["output_dim"])
    if conf.get("vocab_size", vocab_size) != vocab_size:
        raise ConformerConfigError(f"vocab_size={conf['vocab_size']} differs from output_dim={vocab_size}")

    enc_conf = conf.get("encoder_conf") or {}
    encoder = EncoderConfig(
        input_dim=int(conf["input_dim"]),
        **_check_section("encoder_conf", enc_conf, _ENCODER_VALUES, _ENCODER_FIXED, _ENCODER_TRAINING_KEYS),
    )
    dec_conf = conf.get("decoder_conf") or {}
    decoder_kind = conf.get("decoder", "bitransformer")
    dec_values = _check_section("decoder_conf", dec_conf, _DECODER_VALUES, _DECODER_FIXED, _DECODER_TRAINING_KEYS)
    dec_values.setdefault("r_num_blocks", 0)  # WeNet BiTransformerDecoder default
    decoder = DecoderConfig(kind=decoder_kind, **dec_values)

    special = (conf.get("tokenizer_conf") or {}).get("special_tokens") or {}
    sos = int(special.get("<sos>", vocab_size - 1))
    eos = int(special.get("<eos>", vocab_size - 1))
    blank = int((conf.get("ctc_conf") or {}).get("ctc_blank_id", special.get("<blank>", 0)))

    if "cmvn_conf" in conf or conf.get("cmvn") is not None:
        cmvn_kind = conf.get("cmvn", "global_cmvn")
        if cmvn_kind not in ("global_cmvn", None):
            raise ConformerConfigError(f"cmvn={cmvn_kind!r} is not supported (only 'global_cmvn')")
        cmvn_conf = conf.get("cmvn_conf") or {}
        cmvn_file, is_json = cmvn_conf.get("cmvn_file"), bool(cmvn_conf.get("is_json_cmvn", True))
    else:  # older WeNet releases
        cmvn_file, is_json = conf.get("cmvn_file"), bool(conf.get("is_json_cmvn", True))

    dataset_conf = conf.get("dataset_conf") or {}
    for other in ("mfcc_conf", "log_mel_spectrogram_conf"):
        if other in dataset_conf:
            raise ConformerConfigError(f"dataset_conf.{other}: only Kaldi fbank features are supported")
    fbank_conf = dataset_conf.get("fbank_conf") or {}
    fbank = FbankConfig(
        sample_rate=int((dataset_conf.get("resample_conf") or {}).get("resample_rate", 16000)),
        num_mel_bins=int(fbank_conf.get("num_mel_bins", encoder.input_dim)),
        frame_length_ms=float(fbank_conf.get("frame_length", 25)),
        frame_shift_ms=float(fbank_conf.get("frame_shift", 10)),
    )

    config = ConformerConfig(
        encoder=encoder,
        decoder=decoder,
        fbank=fbank,
        vocab_size=vocab_size,
        blank_id=blank,
        sos_id=sos,
        eos_id=eos,
        cmvn_file=cmvn_file,
        cmvn_is_json=is_json,
    )
    config.validate()
    return config
