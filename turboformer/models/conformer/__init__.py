"""WeNet U2/U2++ Conformer speech recognition (CTC + attention decoder, streaming chunks).

    from turboformer.models.conformer import ConformerRecognizer, RecognizeOptions
    recognizer = ConformerRecognizer.from_dir("exp/u2pp_conformer")  # train.yaml, final.pt, units.txt, global_cmvn
    print(recognizer.recognize(["a.wav"], RecognizeOptions(mode="attention_rescoring"))[0].text)
"""

from .config import (
    CONFORMER_CONFIGS,
    ConformerConfig,
    ConformerConfigError,
    config_from_name,
    parse_train_yaml,
)
from .encoder import ConformerInputError
from .engine import ConformerEngine, EngineOptions, EngineOptionsError
from .load import CheckpointError, SymbolTable, load_conformer
from .model import ConformerASR, build_model
from .recognize import (
    ConformerRecognizer,
    Hypothesis,
    Recognition,
    RecognizeOptions,
    RecognizeOptionsError,
)

__all__ = [
    "CONFORMER_CONFIGS",
    "CheckpointError",
    "ConformerASR",
    "ConformerConfig",
    "ConformerConfigError",
    "ConformerEngine",
    "ConformerInputError",
    "ConformerRecognizer",
    "EngineOptions",
    "EngineOptionsError",
    "Hypothesis",
    "Recognition",
    "RecognizeOptions",
    "RecognizeOptionsError",
    "SymbolTable",
    "build_model",
    "config_from_name",
    "load_conformer",
    "parse_train_yaml",
]
