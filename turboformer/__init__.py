"""turboformer: a fast, faithful inference engine for speech, translation and vision transformers."""

__version__ = "0.1.0"


def load(model: str = "tiny.en", **kwargs):
    """Load a Whisper model by bundled name or checkpoint path (see ``WhisperModel.from_pretrained``)."""
    from turboformer.models.whisper.pipeline import WhisperModel

    return WhisperModel.from_pretrained(model, **kwargs)
