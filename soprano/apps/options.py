"""What the command-line programs share: model and sampling options, and loading the engine once."""

from __future__ import annotations

import argparse
import dataclasses
import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from soprano.audio.effects import MAX_SPEED, MAX_VOLUME, MIN_SPEED, SAMPLE_RATES, AudioEffects
from soprano.audio.pauses import AudioOptions
from soprano.constants import (
    DEFAULT_MODEL,
    DEFAULT_REPETITION_PENALTY,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_P,
    MAX_NEW_TOKENS,
    SAMPLE_RATE,
)
from soprano.lm import BACKENDS, SamplingParams
from soprano.lm.native import DTYPES
from soprano.serving import ServingLimits
from soprano.serving.voices import VoiceCatalog, discover_voices, model_voice_name, parse_voice
from soprano.tts import SopranoTTS

Number = TypeVar("Number", int, float)


def checked(
    convert: Callable[[str], Number], accept: Callable[[Number], bool], requirement: str
) -> Callable[[str], Number]:
    """An argparse `type` that also checks the value, so that a bad one is a usage error (exit
    code 2, "argument --x: must be ...") before any model loads, not an engine error (1).
    The sampling options are checked by SamplingParams itself (`sampling_params`)."""

    def parse(text: str) -> Number:
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not accept(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text!r}")
        return value

    return parse


def at_least(minimum: int) -> Callable[[str], int]:
    return checked(int, lambda value: value >= minimum, f"an integer >= {minimum}")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "-m",
        "--model",
        "--model-path",
        dest="model",
        default=DEFAULT_MODEL,
        help=f"local checkpoint folder or Hugging Face repo id (default: {DEFAULT_MODEL})",
    )
    group.add_argument(
        "-d", "--device", default="auto", help="auto, cuda, cuda:N, mps or cpu (default: auto)"
    )
    group.add_argument(
        "-b", "--backend", default="auto", choices=BACKENDS, help="language-model backend"
    )
    add_backend_option_arguments(group)
    group.add_argument(
        "--cache-size",
        type=at_least(1),
        metavar="MB",
        help="lmdeploy KV-cache size (default: the engine's)",
    )
    group.add_argument(
        "--decoder-batch-size",
        type=at_least(1),
        metavar="N",
        help="sentences decoded together (default: the engine's)",
    )


def add_backend_option_arguments(group: argparse._ActionsContainer) -> None:
    """--dtype and --threads, the native backend's options (see `backend_options`)."""
    group.add_argument(
        "--dtype",
        choices=DTYPES,
        help="native backend arithmetic: float32 (exact, default), bfloat16 or int8 (lossy)",
    )
    group.add_argument(
        "--threads",
        type=at_least(1),
        metavar="N",
        help="native backend CPU threads (default: one per core)",
    )


def backend_options(args: argparse.Namespace) -> dict[str, Any]:
    """The native backend options that were given on the command line."""
    given = {"dtype": args.dtype, "threads": args.threads}
    return {name: value for name, value in given.items() if value is not None}


def add_sampling_arguments(
    parser: argparse.ArgumentParser, title: str = "sampling"
) -> argparse._ArgumentGroup:
    """The sampling options, the same on every command; read them with `sampling_params`."""
    group = parser.add_argument_group(title)
    group.add_argument(
        "--temperature",
        type=float,
        default=DEFAULT_TEMPERATURE,
        help=f"0 is greedy and repeatable (default: {DEFAULT_TEMPERATURE})",
    )
    group.add_argument(
        "--top-p", type=float, default=DEFAULT_TOP_P, help=f"(default: {DEFAULT_TOP_P})"
    )
    group.add_argument(
        "--repetition-penalty",
        type=float,
        default=DEFAULT_REPETITION_PENALTY,
        help=f"(default: {DEFAULT_REPETITION_PENALTY})",
    )
    group.add_argument("--seed", type=int, default=None, help="makes sampling repeatable")
    group.add_argument(
        "--max-new-tokens",
        type=int,
        default=MAX_NEW_TOKENS,
        metavar="N",
        help=f"longest audio per sentence, in 64 ms tokens (default: {MAX_NEW_TOKENS})",
    )
    return group


def sampling_params(parser: argparse.ArgumentParser, args: argparse.Namespace) -> SamplingParams:
    """The sampling options as SamplingParams; a bad value is a usage error (exit code 2)."""
    try:
        return SamplingParams.of(args)
    except ValueError as error:
        parser.error(str(error))


SERVING_FLAGS = {
    "max_batch_size": ("--max-batch-size", "N", "sentences generated together; more take turns"),
    "max_requests": ("--max-requests", "N", "requests running or waiting; more are refused"),
    "max_buffered_seconds": (
        "--max-buffered-seconds",
        "S",
        "audio a request may have ready but unread before its generation pauses",
    ),
    "max_new_tokens": (
        "--max-new-tokens-limit",
        "N",
        "largest max_new_tokens a request may ask for",
    ),
    "max_input_chars": ("--max-input-chars", "N", "longest text of one request (as OpenAI)"),
}
"""The command-line flag of each ServingLimits field, with its metavar and help."""


def add_serving_arguments(parser: argparse.ArgumentParser) -> None:
    """The serving limits (ServingLimits), the same on every server."""
    group = parser.add_argument_group("serving limits")
    for field in dataclasses.fields(ServingLimits):
        flag, metavar, help_text = SERVING_FLAGS[field.name]
        group.add_argument(
            flag,
            dest=f"limit_{field.name}",  # apart from the sampling option max_new_tokens
            type=type(field.default),
            default=field.default,
            metavar=metavar,
            help=f"{help_text} (default: {field.default:g})",
        )


def serving_limits(parser: argparse.ArgumentParser, args: argparse.Namespace) -> ServingLimits:
    """The serving-limit options as ServingLimits; a bad value is a usage error (exit code 2)."""
    try:
        return ServingLimits(**{name: getattr(args, f"limit_{name}") for name in SERVING_FLAGS})
    except ValueError as error:
        parser.error(str(error))


def add_audio_arguments(parser: argparse.ArgumentParser, scope: str) -> None:
    """Speed, volume, sample rate and pauses (AudioOptions), the same on every command; read
    them with `audio_options`. `scope` says what they apply to."""
    group = parser.add_argument_group("audio", f"Audio effects and pauses ({scope}).")
    group.add_argument(
        "--speed",
        type=float,
        default=1.0,
        help=f"speaking rate, pitch kept: {MIN_SPEED} to {MAX_SPEED} (default: 1)",
    )
    group.add_argument(
        "--volume",
        type=float,
        default=1.0,
        help=f"loudness factor, up to {MAX_VOLUME:g}; peaks are limited, never clipped "
        "(default: 1)",
    )
    group.add_argument(
        "--sample-rate",
        type=int,
        metavar="HZ",
        help=f"output rate: {', '.join(map(str, SAMPLE_RATES))} (default: {SAMPLE_RATE})",
    )
    group.add_argument(
        "--sentence-silence",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="silence between sentences (default: 0)",
    )
    group.add_argument(
        "--trailing-silence",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="silence after the last sentence, for speakers that cut the end (default: 0)",
    )


def audio_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> AudioOptions:
    """The audio options as AudioOptions; a bad value is a usage error (exit code 2)."""
    try:
        effects = AudioEffects(args.speed, args.volume, args.sample_rate or SAMPLE_RATE)
        return AudioOptions(effects, args.sentence_silence, args.trailing_silence)
    except ValueError as error:
        parser.error(str(error))


def add_voice_arguments(parser: argparse.ArgumentParser) -> None:
    """The voices a program speaks with; read them with `voice_catalog`."""
    group = parser.add_argument_group("voices")
    group.add_argument(
        "--voice",
        action="append",
        default=[],
        metavar="NAME=MODEL",
        help="a voice: NAME=MODEL[,language=LANG] (MODEL a checkpoint folder or Hugging Face "
        "repo id; language default en_US), a bare model, or the name of a folder in a "
        "--data-dir (repeatable; default: the --model voice)",
    )
    group.add_argument(
        "--default-voice", metavar="NAME", help="voice of requests that name none (default: first)"
    )
    group.add_argument(
        "--data-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="folder whose checkpoint folders are voices too, named after their folders "
        "(repeatable)",
    )
    group.add_argument(
        "--download-dir",
        metavar="DIR",
        help="where repo ids are downloaded to and cached (default: the first --data-dir, "
        "else the Hugging Face cache)",
    )


def voice_catalog(parser: argparse.ArgumentParser, args: argparse.Namespace) -> VoiceCatalog:
    """The voices the options name; a bad one is a usage error (exit code 2)."""
    try:
        declared = [parse_voice(text, args.data_dir) for text in args.voice]
        model = find_model(args.model, args.data_dir)
        found = discover_voices(args.data_dir)
        return VoiceCatalog.build(declared, found, model, args.default_voice)
    except ValueError as error:
        parser.error(str(error))


def find_model(model: str, data_dirs: list[str]) -> str:
    """A checkpoint folder named after the model in a data folder wins over the hub or its
    cache (an offline copy of a published checkpoint)."""
    if Path(model).expanduser().is_dir():
        return model
    for data_dir in data_dirs:
        folder = Path(data_dir) / model_voice_name(model)
        if folder.is_dir():
            return str(folder)
    return model


def load_tts(args: argparse.Namespace, model: str | None = None) -> SopranoTTS:
    """The engine the model options describe (for `model`, default --model); errors are
    SopranoError or ValueError."""
    sizes = {"cache_size_mb": args.cache_size, "decoder_batch_size": args.decoder_batch_size}
    download_dir = args.download_dir or (args.data_dir[0] if args.data_dir else None)
    model = model or args.model
    logger = logging.getLogger("soprano")
    logger.info("Loading model %s", model)
    tts = SopranoTTS(
        backend=args.backend,
        device=args.device,
        model_path=model,
        cache_dir=download_dir,
        backend_options=backend_options(args),
        **{name: value for name, value in sizes.items() if value is not None},
    )
    logger.info("Model %s on device %s with the %s backend", model, tts.device, tts.backend)
    return tts


def voice_loaders(
    args: argparse.Namespace, catalog: VoiceCatalog
) -> dict[str, Callable[[], SopranoTTS]]:
    """A loader per voice, for SpeechService (which loads them all on its engine thread)."""
    return {voice.name: partial(load_tts, args, voice.model) for voice in catalog.voices}


def configure_logging(level: int) -> None:
    """Engine messages (a sentence cut at max_new_tokens...) on standard error, one per line.

    `level` applies to Soprano's own loggers; other libraries only report warnings.
    """
    logging.basicConfig(
        level=max(logging.WARNING, level), format="%(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("soprano").setLevel(level)
