"""Whisper: checkpoints in three formats, a CPU reference path and the CUDA-graph GPU engine."""

from turboformer.models.whisper.config import WHISPER_CONFIGS, WhisperConfig
from turboformer.models.whisper.decoding import DecodingOptions, DecodingResult
from turboformer.models.whisper.load import CheckpointError
from turboformer.models.whisper.pipeline import WhisperModel
from turboformer.models.whisper.transcribe import Segment, TranscribeOptions, Transcription

__all__ = [
    "WHISPER_CONFIGS",
    "CheckpointError",
    "DecodingOptions",
    "DecodingResult",
    "Segment",
    "TranscribeOptions",
    "Transcription",
    "WhisperConfig",
    "WhisperModel",
]
