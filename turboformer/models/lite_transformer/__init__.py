"""Lite Transformer translation (Wu et al., ICLR 2020) from mit-han-lab/lite-transformer (fairseq) checkpoints.

Parts: ``config`` (hyper-parameters from the checkpoint's args), ``dictionary`` (fairseq dictionaries),
``dynamic_conv`` (dynamic / lightweight convolution), ``model`` (encoder-decoder with static decoding caches),
``load`` (checkpoint name map), ``generate`` (fairseq beam search), ``translate`` (text pipeline), ``cli``.
"""

from turboformer.models.lite_transformer.config import ConfigError, LiteTransformerConfig
from turboformer.models.lite_transformer.generate import BeamSearch, BeamSearchOptions, Hypothesis
from turboformer.models.lite_transformer.load import CheckpointError, load_model_dir
from turboformer.models.lite_transformer.model import LiteTransformer, build_model
from turboformer.models.lite_transformer.translate import (
    LiteTransformerTranslator,
    TranslateError,
    TranslateOptions,
    Translation,
)

__all__ = [
    "BeamSearch",
    "BeamSearchOptions",
    "CheckpointError",
    "ConfigError",
    "Hypothesis",
    "LiteTransformer",
    "LiteTransformerConfig",
    "LiteTransformerTranslator",
    "TranslateError",
    "TranslateOptions",
    "Translation",
    "build_model",
    "load_model_dir",
]
