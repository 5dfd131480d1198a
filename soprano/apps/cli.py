"""`soprano`: speak text into an audio file, into a pipe as raw PCM, or through the sound card.

The model loads once per call and long texts are generated a few sentences per batch, so the
progress bar moves while batching keeps the engine fast.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch

from soprano.apps.options import (
    add_audio_arguments,
    add_model_arguments,
    add_sampling_arguments,
    add_voice_arguments,
    at_least,
    audio_options,
    configure_logging,
    load_tts,
    sampling_params,
    voice_catalog,
)
from soprano.audio import to_pcm16
from soprano.audio.pauses import AudioOptions, AudioShaper
from soprano.constants import SAMPLE_RATE
from soprano.encoding import format_for_path, require_encoder, write_audio
from soprano.errors import SopranoError
from soprano.lm import SamplingParams
from soprano.serving import DEFAULT_MAX_CHUNK_TOKENS
from soprano.serving.voices import Voice
from soprano.text import prepare_text
from soprano.tts import SopranoTTS

PROG = "soprano"
DEFAULT_OUTPUT = "output.wav"
SENTENCES_PER_BATCH = 8
"""Sentences generated together: big enough to batch well, small enough for a live progress bar."""
PROGRESS_BAR_WIDTH = 24
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130

PLAY_INSTALL_HINT = (
    "--play needs the sounddevice package and the PortAudio library "
    "(pip install 'wyoming-soprano[play]'; on Debian/Ubuntu also: apt install libportaudio2)"
)


class CliError(Exception):
    """A problem with what the user asked for, reported as one line."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        allow_abbrev=False,
        prog=PROG,
        description="Speak text with Soprano: into a file, as raw PCM on standard output "
        "(--stream), or through the sound card (--play).",
        epilog="examples: soprano 'Hello there.' -o hello.flac | "
        f"soprano --stream 'Hello' | aplay -r {SAMPLE_RATE} -f S16_LE -c 1 | "
        "soprano --file book.txt -o book.mp3",
    )
    parser.add_argument("text", nargs="*", help="text to speak (words are joined by spaces)")
    parser.add_argument(
        "-f", "--file", help="read the text from this file ('-' for standard input)"
    )
    parser.add_argument(
        "-o",
        "--output",
        help=f"audio file: .wav, .flac, .mp3, .opus/.ogg or .pcm/.raw (default without "
        f"--stream or --play: {DEFAULT_OUTPUT})",
    )
    realtime = parser.add_mutually_exclusive_group()
    realtime.add_argument(
        "-s",
        "--stream",
        action="store_true",
        help="write raw 16-bit little-endian mono PCM (at --sample-rate) to standard output "
        "while it is generated",
    )
    realtime.add_argument(
        "-p", "--play", action="store_true", help="play through the sound card while generating"
    )
    parser.add_argument(
        "--chunk-size",
        type=at_least(1),
        default=1,
        metavar="TOKENS",
        help="tokens per streamed chunk with --stream/--play (default: 1, lowest latency)",
    )
    parser.add_argument(
        "--retries",
        type=at_least(0),
        default=0,
        help="regenerate sentences that look hallucinated, up to this many times (file output)",
    )
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="no progress bar and no warnings"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the engine does")
    add_model_arguments(parser)
    add_voice_arguments(parser)
    add_sampling_arguments(parser)
    add_audio_arguments(parser, "of the output")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    sampling = sampling_params(parser, args)
    voice = voice_catalog(parser, args).default_voice
    audio = audio_options(parser, args)
    configure_logging(
        logging.ERROR if args.quiet else logging.INFO if args.verbose else logging.WARNING
    )
    try:
        return _run(args, sampling, voice, audio)
    except (CliError, SopranoError, ValueError, OSError) as error:
        print(f"{PROG}: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _run(
    args: argparse.Namespace, sampling: SamplingParams, voice: Voice, audio: AudioOptions
) -> int:
    """Speak with `voice` (the default of the voice options)."""
    text = _read_text(args)
    sentences = prepare_text(text)
    if not sentences:
        raise CliError("the text has nothing to speak")
    output = args.output or (None if args.stream or args.play else DEFAULT_OUTPUT)
    if output is not None:
        require_encoder(format_for_path(output).name)
    if args.stream and sys.stdout.isatty():
        raise CliError(
            "--stream writes raw PCM; pipe it into a player, e.g. "
            f"| aplay -r {audio.sample_rate} -f S16_LE -c 1"
        )
    if args.retries and (args.stream or args.play):
        raise CliError("--retries works for file output only: streamed audio cannot be taken back")
    player = _open_player(audio.sample_rate) if args.play else None

    tts = load_tts(args, voice.model)
    progress = Progress(len(sentences), sys.stderr, enabled=not args.quiet and sys.stderr.isatty())
    pieces: list[torch.Tensor] = []
    try:
        if args.stream or player is not None:
            sink = player.write if player is not None else _write_stdout
            for chunk in _stream(tts, sentences, args.chunk_size, sampling, audio, progress):
                if not sink(chunk):
                    break
                if output is not None:
                    pieces.append(chunk)
        else:
            pieces = list(_generate(tts, sentences, args.retries, sampling, audio, progress))
    finally:
        progress.close()
        if player is not None:
            player.close()
    if output is not None:
        write_audio(output, torch.cat(pieces) if pieces else torch.zeros(0), audio.sample_rate)
    return 0


def _read_text(args: argparse.Namespace) -> str:
    if args.text and args.file:
        raise CliError("give the text either as arguments or with --file, not both")
    if args.text:
        return " ".join(args.text)
    if args.file == "-" or (args.file is None and not sys.stdin.isatty()):
        return sys.stdin.read()
    if args.file is not None:
        return Path(args.file).read_text(encoding="utf-8")
    raise CliError("no text: give it as arguments, with --file, or on standard input")


def _batches(sentences: list[str]) -> Iterator[list[str]]:
    for start in range(0, len(sentences), SENTENCES_PER_BATCH):
        yield sentences[start : start + SENTENCES_PER_BATCH]


def _generate(
    tts: SopranoTTS,
    sentences: list[str],
    retries: int,
    sampling: SamplingParams,
    audio: AudioOptions,
    progress: Progress,
) -> Iterator[torch.Tensor]:
    """Each sentence's audio, through the effects, with the pauses between and after."""
    shaper = AudioShaper(audio)
    yield torch.from_numpy(shaper.start().audio)
    for number, batch in enumerate(_batches(sentences)):
        for index, sentence in enumerate(
            tts.infer_batch(batch, retries=retries, sampling=sampling)
        ):
            progress.add_audio(len(sentence))
            if number or index:
                yield torch.from_numpy(shaper.sentence_end().audio)
            yield torch.from_numpy(shaper.audio(sentence))
        progress.add_sentences(len(batch))
    yield torch.from_numpy(shaper.end().audio)


def _stream(
    tts: SopranoTTS,
    sentences: list[str],
    chunk_size: int,
    sampling: SamplingParams,
    audio: AudioOptions,
    progress: Progress,
) -> Iterator[torch.Tensor]:
    """Chunks as they are generated; a batch's sentences are generated together (no gaps).
    A batch after the first starts with the pause between sentences."""
    batches = list(_batches(sentences))
    for number, batch in enumerate(batches):
        pauses = replace(
            audio,
            leading_silence=audio.sentence_silence if number else 0.0,
            trailing_silence=audio.trailing_silence if number == len(batches) - 1 else 0.0,
        )
        chunks = tts.infer_stream(
            " ".join(batch),
            chunk_size,
            max_chunk_size=max(chunk_size, DEFAULT_MAX_CHUNK_TOKENS),
            sampling=sampling,
            audio=pauses,
        )
        try:
            for chunk in chunks:
                progress.add_audio(len(chunk))
                yield chunk
        finally:
            chunks.close()
        progress.add_sentences(len(batch))


def _write_stdout(chunk: torch.Tensor) -> bool:
    """False once the reader has gone (a player closed its end of the pipe)."""
    try:
        sys.stdout.buffer.write(to_pcm16(chunk))
        sys.stdout.buffer.flush()
    except BrokenPipeError:
        # Nothing more can reach the reader; point stdout at /dev/null so the exit flush is quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return False
    return True


class Player:
    """The default sound card, fed chunk by chunk."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._stream.start()

    def write(self, chunk: torch.Tensor) -> bool:
        self._stream.write(np.ascontiguousarray(chunk.numpy(), dtype=np.float32))
        return True

    def close(self) -> None:
        self._stream.stop()
        self._stream.close()


def _open_player(sample_rate: int) -> Player:
    try:
        import sounddevice
    except (ImportError, OSError) as error:
        raise CliError(f"{PLAY_INSTALL_HINT}: {error}") from error
    try:
        stream = sounddevice.OutputStream(samplerate=sample_rate, channels=1, dtype="float32")
    except Exception as error:  # PortAudio reports a missing card as its own error type
        raise CliError(f"cannot play: no usable sound output device ({error})") from error
    return Player(stream)


class Progress:
    """One status line on standard error: sentences done / total, audio seconds, speed."""

    def __init__(self, total_sentences: int, stream: TextIO, enabled: bool) -> None:
        self.total_sentences = total_sentences
        self.sentences_done = 0
        self.audio_samples = 0
        self._stream = stream
        self._enabled = enabled
        self._started = time.perf_counter()

    def add_audio(self, samples: int) -> None:
        self.audio_samples += samples
        self._draw()

    def add_sentences(self, count: int) -> None:
        self.sentences_done += count
        self._draw()

    def line(self) -> str:
        filled = PROGRESS_BAR_WIDTH * self.sentences_done // self.total_sentences
        bar = "#" * filled + "-" * (PROGRESS_BAR_WIDTH - filled)
        audio_seconds = self.audio_samples / SAMPLE_RATE
        elapsed = max(time.perf_counter() - self._started, 1e-9)
        return (
            f"[{bar}] {self.sentences_done}/{self.total_sentences} sentences | "
            f"{audio_seconds:.1f} s audio | {audio_seconds / elapsed:.1f}x real time"
        )

    def close(self) -> None:
        if self._enabled:
            self._stream.write("\n")
            self._stream.flush()

    def _draw(self) -> None:
        if self._enabled:
            self._stream.write("\r" + self.line())
            self._stream.flush()


def _one_line(error: BaseException) -> str:
    message = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, FileNotFoundError) and error.filename:
        return f"no such file: {error.filename}"
    return message


if __name__ == "__main__":
    sys.exit(main())
