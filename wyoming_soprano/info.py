"""The `info` answer to `describe`: one TTS program with one English voice.

Home Assistant raises on a missing required field, loads nothing for a program without an
installed voice with a language, and shows `description or name` (docs/wyoming.md, info).
"""

from __future__ import annotations

from pathlib import PurePath

from wyoming.info import Attribution, Info, TtsProgram, TtsVoice

from wyoming_soprano import __version__

PROGRAM_NAME = "soprano"
LANGUAGES = ["en_US"]
"""The published Soprano checkpoints speak English only."""

SOPRANO_ATTRIBUTION = Attribution(name="ekwek1", url="https://github.com/ekwek1/soprano")


def voice_name(model: str) -> str:
    """The voice is named after the model: its repo name or its folder name."""
    return PurePath(model.rstrip("/\\")).name or model


def build_info(model: str, streaming: bool) -> Info:
    """`streaming` advertises `supports_synthesize_streaming` (streaming events work anyway)."""
    name = voice_name(model)
    voice = TtsVoice(
        name=name,
        description=f"{name} (32 kHz)",
        attribution=SOPRANO_ATTRIBUTION,
        installed=True,
        version=None,
        languages=list(LANGUAGES),
    )
    program = TtsProgram(
        name=PROGRAM_NAME,
        description="Soprano: fast, streaming neural text to speech",
        attribution=SOPRANO_ATTRIBUTION,
        installed=True,
        version=__version__,
        voices=[voice],
        supports_synthesize_streaming=streaming,
    )
    return Info(tts=[program])
