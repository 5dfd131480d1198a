"""Voices: how a server is told its checkpoints, finds more, and picks the default."""

from __future__ import annotations

from pathlib import Path

import pytest

from soprano.apps.options import voice_catalog
from soprano.checkpoint import REQUIRED_FILES
from soprano.constants import DEFAULT_MODEL
from soprano.serving.voices import (
    DEFAULT_LANGUAGE,
    Voice,
    VoiceCatalog,
    discover_voices,
    parse_voice,
)
from wyoming_soprano.__main__ import build_parser


def fake_checkpoint(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for name in REQUIRED_FILES:
        (folder / name).write_bytes(b"")
    return folder


def test_a_declaration_names_a_model_and_may_give_its_language() -> None:
    assert parse_voice("nova=/models/nova") == Voice("nova", "/models/nova", DEFAULT_LANGUAGE)
    assert parse_voice("de=someone/Soprano-DE,language=de_DE") == Voice(
        "de", "someone/Soprano-DE", "de_DE"
    )
    assert parse_voice("ekwek/Soprano-1.1-80M") == Voice("Soprano-1.1-80M", "ekwek/Soprano-1.1-80M")


def test_a_bare_name_is_looked_up_in_the_data_folders(tmp_path: Path) -> None:
    fake_checkpoint(tmp_path / "second" / "anna")
    voice = parse_voice("anna", [tmp_path / "first", tmp_path / "second"])
    assert voice == Voice("anna", str(tmp_path / "second" / "anna"))


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("=model", "voice name '' must be"),
        ("has space=model", "voice name 'has space' must be"),
        ("nova=", "voice 'nova' needs a model"),
        ("nova=model,language=English", "language 'English' is not a language code"),
        ("nova=model,speed=2", "only ',language=LANG' may follow"),
    ],
)
def test_bad_declarations_say_what_is_wrong(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_voice(text)


def test_checkpoint_folders_in_data_folders_are_voices_and_the_first_folder_wins(
    tmp_path: Path,
) -> None:
    fake_checkpoint(tmp_path / "a" / "zoe")
    fake_checkpoint(tmp_path / "a" / "bob")
    fake_checkpoint(tmp_path / "b" / "zoe")
    (tmp_path / "a" / "not-a-checkpoint").mkdir()
    (tmp_path / "a" / "not-a-checkpoint" / "config.json").write_text("{}")
    (tmp_path / "a" / "models--ekwek--Soprano-1.1-80M").mkdir()  # a hub cache, not a voice

    voices = discover_voices([tmp_path / "a", tmp_path / "b", tmp_path / "missing"])

    assert voices == [
        Voice("bob", str(tmp_path / "a" / "bob")),
        Voice("zoe", str(tmp_path / "a" / "zoe")),
    ]


def catalog(*argv: str) -> VoiceCatalog:
    parser = build_parser()
    return voice_catalog(parser, parser.parse_args(list(argv)))


def test_without_declarations_the_model_is_the_default_voice_and_found_ones_follow(
    tmp_path: Path,
) -> None:
    fake_checkpoint(tmp_path / "anna")
    fake_checkpoint(tmp_path / "Soprano-1.1-80M")  # an offline copy of the model: one voice

    voices = catalog("--data-dir", str(tmp_path))

    assert voices.names == ["Soprano-1.1-80M", "anna"]
    assert voices.default == "Soprano-1.1-80M"
    assert voices.default_voice.model == str(tmp_path / "Soprano-1.1-80M")
    assert catalog().voices == (Voice("Soprano-1.1-80M", DEFAULT_MODEL),)


def test_declared_voices_replace_the_model_voice_and_win_over_found_names(
    tmp_path: Path,
) -> None:
    fake_checkpoint(tmp_path / "anna")
    fake_checkpoint(tmp_path / "bob")

    voices = catalog(
        *("--data-dir", str(tmp_path), "--voice", "anna=/elsewhere/anna,language=fr_FR"),
        *("--voice", "carl=/models/carl", "--default-voice", "bob"),
    )

    assert voices.voices == (
        Voice("anna", "/elsewhere/anna", "fr_FR"),
        Voice("carl", "/models/carl"),
        Voice("bob", str(tmp_path / "bob")),
    )
    assert voices.default == "bob"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--voice", "a=x", "--voice", "a=y"], "voice names must differ: a, a"),
        (["--voice", "a=x", "--default-voice", "b"], "default voice 'b' is not one of the voices"),
        (["--voice", "bad name=x"], "voice name 'bad name' must be"),
    ],
)
def test_bad_voice_options_are_usage_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        catalog(*argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
