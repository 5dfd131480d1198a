"""Soprano: a fast, streaming, lossless text-to-speech engine."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from soprano.constants import SAMPLE_RATE, TOKEN_SAMPLES
from soprano.cpu.threads import apply_openmp_defaults
from soprano.errors import BackendUnavailableError, ModelLoadError, SopranoError

# Before anything imports torch: libgomp reads its variables once, when torch loads it.
apply_openmp_defaults(torch_loaded="torch" in sys.modules)

if TYPE_CHECKING:
    from soprano.lm.base import SamplingParams
    from soprano.tts import SopranoTTS

__all__ = [
    "SAMPLE_RATE",
    "TOKEN_SAMPLES",
    "BackendUnavailableError",
    "ModelLoadError",
    "SamplingParams",
    "SopranoError",
    "SopranoTTS",
]


def __getattr__(name: str) -> Any:
    """Import the engine (and torch) on first use, so `--help` and `--version` stay instant."""
    if name == "SopranoTTS":
        from soprano.tts import SopranoTTS

        return SopranoTTS
    if name == "SamplingParams":
        from soprano.lm.base import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'soprano' has no attribute {name!r}")
