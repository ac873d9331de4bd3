"""turboformer: a fast, faithful inference engine for speech, translation and vision transformers."""

__version__ = "0.1.0"
