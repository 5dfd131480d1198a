"""The `info` answer to `describe`: one TTS program with a voice per checkpoint.

Home Assistant raises on a missing required field, loads nothing for a program without an
installed voice with a language, and shows `description or name` (docs/wyoming.md, info).
"""

from __future__ import annotations

from wyoming.info import Attribution, Info, TtsProgram, TtsVoice

from soprano.serving.voices import VoiceCatalog
from wyoming_soprano import __version__

PROGRAM_NAME = "soprano"

SOPRANO_ATTRIBUTION = Attribution(name="ekwek1", url="https://github.com/ekwek1/soprano")


def build_info(catalog: VoiceCatalog, streaming: bool) -> Info:
    """`streaming` advertises `supports_synthesize_streaming` (streaming events work anyway)."""
    voices = [
        TtsVoice(
            name=voice.name,
            description=voice.name,
            attribution=SOPRANO_ATTRIBUTION,
            installed=True,
            version=None,
            languages=[voice.language],
        )
        for voice in catalog.voices
    ]
    program = TtsProgram(
        name=PROGRAM_NAME,
        description="Soprano: fast, streaming neural text to speech",
        attribution=SOPRANO_ATTRIBUTION,
        installed=True,
        version=__version__,
        voices=voices,
        supports_synthesize_streaming=streaming,
    )
    return Info(tts=[program])
