"""Voices: the checkpoints one server speaks with, each under a name.

Soprano has one voice per checkpoint; fine-tunes (Soprano-Factory) are new voices and
languages. A server is given voices as `NAME=MODEL` (a folder or a Hugging Face repo id), as a
bare model (named after its folder or repo), or finds them as checkpoint folders inside its data
folders. One of them is the default, used when a request names none (or one it does not have).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath

from soprano.checkpoint import REQUIRED_FILES

DEFAULT_LANGUAGE = "en_US"
"""What the published checkpoints speak."""

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_LANGUAGE = re.compile(r"^[a-z]{2,3}([_-][A-Za-z0-9]{2,8})?$")
LANGUAGE_KEY = "language"
"""The one option a voice declaration takes after its model: `NAME=MODEL,language=de_DE`."""


@dataclass(frozen=True)
class Voice:
    """A named checkpoint and the language it speaks."""

    name: str
    model: str
    """A checkpoint folder or a Hugging Face repo id."""
    language: str = DEFAULT_LANGUAGE

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(
                f"voice name {self.name!r} must be 1-64 letters, digits, '.', '_' or '-'"
            )
        if not self.model:
            raise ValueError(f"voice {self.name!r} needs a model")
        if not _LANGUAGE.match(self.language):
            raise ValueError(
                f"voice {self.name!r}: language {self.language!r} is not a language code "
                "such as en_US"
            )


def model_voice_name(model: str) -> str:
    """A model's voice is named after its folder or its repo: ekwek/Soprano-1.1-80M speaks as
    Soprano-1.1-80M."""
    return PurePath(model.rstrip("/\\")).name or model


def parse_voice(text: str, data_dirs: Sequence[str | Path] = ()) -> Voice:
    """`NAME=MODEL[,language=LANG]`, or a bare `NAME` found in a data folder, or a bare model.

    Raises ValueError with the reason.
    """
    declaration, _, options = text.partition(",")
    language = DEFAULT_LANGUAGE
    if options:
        key, _, value = options.partition("=")
        if key.strip() != LANGUAGE_KEY or not value.strip():
            raise ValueError(f"voice {text!r}: after the model only ',language=LANG' may follow")
        language = value.strip()
    name, equals, model = declaration.partition("=")
    if not equals:
        model = declaration
        name = model_voice_name(declaration)
        folder = next((d for d in map(Path, data_dirs) if is_checkpoint(d / declaration)), None)
        if folder is not None:
            model = str(folder / declaration)
    return Voice(name.strip(), model.strip(), language)


def is_checkpoint(folder: Path) -> bool:
    return all((folder / name).is_file() for name in REQUIRED_FILES)


def discover_voices(data_dirs: Iterable[str | Path]) -> list[Voice]:
    """Every checkpoint folder directly inside the data folders, named after its folder (the
    first data folder wins a name that two have), in name order."""
    found: dict[str, Voice] = {}
    for data_dir in map(Path, data_dirs):
        if not data_dir.is_dir():
            continue
        for folder in sorted(data_dir.iterdir()):
            if folder.name not in found and _NAME.match(folder.name) and is_checkpoint(folder):
                found[folder.name] = Voice(folder.name, str(folder))
    return list(found.values())


@dataclass(frozen=True)
class VoiceCatalog:
    """The voices of a server, in the order they are listed, and the default one."""

    voices: tuple[Voice, ...]
    default: str

    def __post_init__(self) -> None:
        if not self.voices:
            raise ValueError("a server needs at least one voice")
        names = [voice.name for voice in self.voices]
        if len(set(names)) != len(names):
            raise ValueError(f"voice names must differ: {', '.join(names)}")
        if self.default not in names:
            raise ValueError(
                f"default voice {self.default!r} is not one of the voices: {', '.join(names)}"
            )

    @property
    def names(self) -> list[str]:
        return [voice.name for voice in self.voices]

    def get(self, name: str) -> Voice | None:
        return next((voice for voice in self.voices if voice.name == name), None)

    @property
    def default_voice(self) -> Voice:
        voice = self.get(self.default)
        assert voice is not None  # checked when made
        return voice

    @classmethod
    def build(
        cls, declared: Sequence[Voice], found: Sequence[Voice], model: str, default: str | None
    ) -> VoiceCatalog:
        """The declared voices (or, with none, the voice of `model`), then those found that
        none of them is named like. The default is `default`, else the first voice."""
        voices = list(declared) or [Voice(model_voice_name(model), model)]
        names = {voice.name for voice in voices}
        voices += [voice for voice in found if voice.name not in names]
        return cls(tuple(voices), default or voices[0].name)
