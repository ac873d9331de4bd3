"""The upstream reference models (openai-whisper, Hugging Face) holding the same weights as ours.

The weights go back to each upstream layout by splitting our fused matrices along rows; a wrong name map
would put a weight where the reference does not expect it and the comparisons would fail.
"""

from __future__ import annotations

from turboformer.models.whisper.convert import openai_checkpoint as openai_state_dict  # noqa: F401
from turboformer.models.whisper.convert import random_state  # noqa: F401
from turboformer.models.whisper.convert import to_huggingface as hf_model  # noqa: F401
from turboformer.models.whisper.convert import to_openai as openai_model  # noqa: F401
