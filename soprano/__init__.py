"""Soprano: a fast, streaming, lossless text-to-speech engine."""

from soprano.constants import SAMPLE_RATE, TOKEN_SAMPLES
from soprano.errors import BackendUnavailableError, ModelLoadError, SopranoError
from soprano.tts import SopranoTTS

__all__ = [
    "SAMPLE_RATE",
    "TOKEN_SAMPLES",
    "BackendUnavailableError",
    "ModelLoadError",
    "SopranoError",
    "SopranoTTS",
]
