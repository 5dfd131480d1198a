"""Encoders for the audio formats the frontends send: wav, pcm, flac, mp3 and opus.

Every encoder works incrementally, so a frontend can send audio while it is being generated, and
every one starts from the same 16-bit PCM (`soprano.audio.to_pcm16`), so the lossless formats
decode to identical samples. Libraries: wav and pcm need only the standard library; flac and opus
use libsndfile (`soundfile`), opus after resampling to 48 kHz with `soxr` because Opus has no
32 kHz mode; mp3 uses LAME (`lameenc`). soundfile and lameenc come with the `http` extra (soxr
with the engine, for the audio options), and all three are imported only when their format is
asked for.
"""

from __future__ import annotations

import os
import struct
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from soprano.audio import to_pcm16, wav_bytes
from soprano.constants import SAMPLE_RATE, SAMPLE_WIDTH
from soprano.errors import SopranoError

OPUS_SAMPLE_RATE = 48_000
"""The Opus rate that 32 kHz converts to exactly (×3/2); Opus has no 32 kHz mode."""

MP3_BIT_RATE_KBPS = 128
"""Transparent for 32 kHz mono speech, and small enough to stream anywhere."""

MP3_QUALITY = 2
"""LAME's 'high quality' algorithm setting (0 best and slowest, 9 worst)."""

UNKNOWN_SIZE = 0xFFFF_FFFF
"""RIFF and data size of a streamed WAV whose length is not known yet; readers read to EOF."""

EXTRA_INSTALL_HINT = "pip install 'wyoming-soprano[http]'"


class EncoderUnavailableError(SopranoError):
    """The library that encodes a format is not installed."""


@dataclass(frozen=True)
class AudioFormat:
    """An output format: what it is called, how it is served, which files it is written to."""

    name: str
    media_type: str
    suffixes: tuple[str, ...]
    library: str
    modules: tuple[str, ...] = ()
    """Python packages its encoder imports."""


FORMATS: dict[str, AudioFormat] = {
    fmt.name: fmt
    for fmt in (
        AudioFormat("wav", "audio/wav", (".wav",), "Python standard library"),
        AudioFormat("pcm", "audio/pcm", (".pcm", ".raw"), "Python standard library"),
        AudioFormat("flac", "audio/flac", (".flac",), "libsndfile (soundfile)", ("soundfile",)),
        AudioFormat("mp3", "audio/mpeg", (".mp3",), "LAME (lameenc)", ("lameenc",)),
        AudioFormat(
            "opus",
            "audio/ogg",
            (".opus", ".ogg"),
            "libsndfile (soundfile) and soxr",
            ("soundfile", "soxr"),
        ),
    )
}


def audio_format(name: str) -> AudioFormat:
    """The format called `name`; ValueError names the ones there are."""
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(
            f"unknown audio format {name!r}; choose one of {', '.join(FORMATS)}"
        ) from None


def require_encoder(name: str) -> AudioFormat:
    """The format, once its encoder's packages import (else EncoderUnavailableError)."""
    fmt = audio_format(name)
    for module in fmt.modules:
        _import(module, fmt)
    return fmt


def format_for_path(path: str | os.PathLike[str]) -> AudioFormat:
    """The format a file name asks for by its suffix."""
    suffix = Path(path).suffix.lower()
    for fmt in FORMATS.values():
        if suffix in fmt.suffixes:
            return fmt
    known = ", ".join(s for fmt in FORMATS.values() for s in fmt.suffixes)
    raise ValueError(f"cannot tell the audio format of {os.fspath(path)!r}; use one of {known}")


class _ForwardSink:
    """A write-only file that hands out its bytes as soon as they are written.

    Encoders that patch their headers when they close (libsndfile's FLAC and Ogg writers) seek
    back and rewrite; a rewrite of bytes that were already taken is dropped, so a stream keeps
    its 'length unknown' header while a file taken only at the end gets the exact one.
    """

    def __init__(self) -> None:
        self._pending = bytearray()
        self._taken = 0
        self._position = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        data = bytes(data)
        skip = max(0, self._taken - self._position)
        start = self._position + skip - self._taken
        kept = data[skip:]
        if start > len(self._pending):
            self._pending.extend(bytes(start - len(self._pending)))
        self._pending[start : start + len(kept)] = kept
        self._position += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._position, os.SEEK_END: self._end()}[whence]
        self._position = base + offset
        return self._position

    def tell(self) -> int:
        return self._position

    def read(self, size: int = -1) -> bytes:
        return b""

    def take(self) -> bytes:
        """The bytes written since the last take; they can no longer be rewritten."""
        taken = bytes(self._pending)
        self._pending.clear()
        self._taken += len(taken)
        return taken

    def _end(self) -> int:
        return self._taken + len(self._pending)


class AudioEncoder(ABC):
    """Encode 32 kHz float audio piece by piece.

    `write` adds audio, `take` returns the bytes ready so far, `finish` flushes the codec and
    returns the rest. A stream takes after every write; a whole file is `write` then `finish`.
    """

    def __init__(self, fmt: AudioFormat, sample_rate: int) -> None:
        self.format = fmt
        self.sample_rate = sample_rate
        self.samples_written = 0
        self._sink = _ForwardSink()

    def write(self, audio: torch.Tensor | np.ndarray) -> None:
        pcm = np.frombuffer(to_pcm16(audio), dtype="<i2")
        if len(pcm):
            self._encode(pcm)
            self.samples_written += len(pcm)

    def take(self) -> bytes:
        return self._sink.take()

    def finish(self) -> bytes:
        self._close()
        return self._sink.take()

    @abstractmethod
    def _encode(self, pcm: np.ndarray) -> None: ...

    @abstractmethod
    def _close(self) -> None: ...


class _PcmEncoder(AudioEncoder):
    def _encode(self, pcm: np.ndarray) -> None:
        self._sink.write(pcm.tobytes())

    def _close(self) -> None:
        pass


class _StreamingWavEncoder(AudioEncoder):
    """WAV whose header says 'size unknown', for a stream whose length is not known."""

    def __init__(self, fmt: AudioFormat, sample_rate: int) -> None:
        super().__init__(fmt, sample_rate)
        self._sink.write(_wav_header(sample_rate, UNKNOWN_SIZE))

    def _encode(self, pcm: np.ndarray) -> None:
        self._sink.write(pcm.tobytes())

    def _close(self) -> None:
        pass


def _wav_header(sample_rate: int, data_size: int) -> bytes:
    riff_size = UNKNOWN_SIZE if data_size == UNKNOWN_SIZE else 36 + data_size
    return struct.pack(
        "<4sI4s4sIHHIIHH4sI",
        b"RIFF",
        riff_size,
        b"WAVE",
        b"fmt ",
        16,
        1,
        1,
        sample_rate,
        sample_rate * SAMPLE_WIDTH,
        SAMPLE_WIDTH,
        8 * SAMPLE_WIDTH,
        b"data",
        data_size,
    )


class _Mp3Encoder(AudioEncoder):
    def __init__(self, fmt: AudioFormat, sample_rate: int) -> None:
        super().__init__(fmt, sample_rate)
        lameenc = _import("lameenc", fmt)
        self._lame = lameenc.Encoder()
        self._lame.set_channels(1)
        self._lame.set_in_sample_rate(sample_rate)
        self._lame.set_out_sample_rate(sample_rate)
        self._lame.set_bit_rate(MP3_BIT_RATE_KBPS)
        self._lame.set_quality(MP3_QUALITY)

    def _encode(self, pcm: np.ndarray) -> None:
        self._sink.write(self._lame.encode(pcm.tobytes()))

    def _close(self) -> None:
        self._sink.write(self._lame.flush())


class _SoundFileEncoder(AudioEncoder):
    """FLAC or Ogg Opus through libsndfile, resampled first where the codec needs it."""

    def __init__(
        self, fmt: AudioFormat, sample_rate: int, container: str, subtype: str, codec_rate: int
    ) -> None:
        super().__init__(fmt, sample_rate)
        soundfile = _import("soundfile", fmt)
        self._resampler: Any = None
        if codec_rate != sample_rate:
            soxr = _import("soxr", fmt)
            self._resampler = soxr.ResampleStream(sample_rate, codec_rate, 1, dtype="int16")
        self._file = soundfile.SoundFile(
            self._sink, "w", samplerate=codec_rate, channels=1, format=container, subtype=subtype
        )

    def _encode(self, pcm: np.ndarray) -> None:
        if self._resampler is not None:
            pcm = self._resampler.resample_chunk(pcm)
        self._file.write(pcm)

    def _close(self) -> None:
        if self._resampler is not None:
            self._file.write(self._resampler.resample_chunk(np.zeros(0, np.int16), last=True))
        self._file.close()


def _import(module: str, fmt: AudioFormat) -> Any:
    try:
        return __import__(module)
    except (ImportError, OSError) as error:
        raise EncoderUnavailableError(
            f"{fmt.name} output needs the {module} package ({error}); {EXTRA_INSTALL_HINT}"
        ) from error


def stream_encoder(name: str, sample_rate: int = SAMPLE_RATE) -> AudioEncoder:
    """An encoder whose output can be sent as it is taken, before the length is known."""
    fmt = audio_format(name)
    if fmt.name == "wav":
        return _StreamingWavEncoder(fmt, sample_rate)
    if fmt.name == "pcm":
        return _PcmEncoder(fmt, sample_rate)
    if fmt.name == "mp3":
        return _Mp3Encoder(fmt, sample_rate)
    if fmt.name == "flac":
        return _SoundFileEncoder(fmt, sample_rate, "FLAC", "PCM_16", sample_rate)
    return _SoundFileEncoder(fmt, sample_rate, "OGG", "OPUS", OPUS_SAMPLE_RATE)


def encode_audio(
    audio: torch.Tensor | np.ndarray, name: str, sample_rate: int = SAMPLE_RATE
) -> bytes:
    """A complete file of the format `name`, with exact lengths in its header."""
    if audio_format(name).name == "wav":
        return wav_bytes(audio, sample_rate)
    encoder = stream_encoder(name, sample_rate)
    encoder.write(audio)
    return encoder.finish()


def write_audio(
    path: str | os.PathLike[str], audio: torch.Tensor | np.ndarray, sample_rate: int = SAMPLE_RATE
) -> None:
    """Write `audio` in the format that the file's suffix names."""
    data = encode_audio(audio, format_for_path(path).name, sample_rate)
    Path(path).write_bytes(data)
