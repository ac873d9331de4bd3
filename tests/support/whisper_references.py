"""The upstream reference models (openai-whisper, Hugging Face) holding the same weights as ours.

The weights go back to each upstream layout by splitting our fused matrices along rows; a wrong name map
would put a weight where the reference does not expect it and the comparisons would fail.
"""

from __future__ import annotations

import numpy as np

from turboformer.models.whisper.convert import openai_checkpoint as openai_state_dict  # noqa: F401
from turboformer.models.whisper.convert import random_state  # noqa: F401
from turboformer.models.whisper.convert import to_huggingface as hf_model  # noqa: F401
from turboformer.models.whisper.convert import to_openai as openai_model  # noqa: F401


def long_form(clips, repeats: int = 2, silence_s: float = 3.0) -> np.ndarray:
    """The clips ``repeats`` times over, each followed by ``silence_s`` of silence: long-form audio of more than one
    30 s window with pauses to seek past."""
    silence = np.zeros(int(16000 * silence_s), np.float32)
    return np.concatenate([part for _ in range(repeats) for clip in clips for part in (clip, silence)])
