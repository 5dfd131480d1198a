"""The per-request audio options that servers apply to the engine's stream: speed, volume and
sample rate, as one streaming chain (docs/audio.md).

The engine streams float32 mono at 32 kHz in chunks of any size; `EffectChain.process` turns
each into the chunk to send, `pause` inserts silence between sentences, `finish` returns what is
still held. Order: time stretch (Sonic, pitch-synchronous, at 32 kHz), resample (soxr), then
gain with a peak limiter, last so that nothing after it can push a sample past full scale (a
resampler's filter rings above a clipped peak). Each stage is left out when it would do nothing,
so the default options return the engine's audio unchanged, and every stage gives the same
samples however the stream is cut into chunks.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Protocol

import libsonic
import numpy as np
import soxr

from soprano.constants import SAMPLE_RATE, TOKEN_SAMPLES

MIN_SPEED = 0.25
MAX_SPEED = 4.0
MAX_VOLUME = 10.0
"""+20 dB; the limiter holds the peaks of anything louder than full scale."""
SAMPLE_RATES = (8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000)
"""The output rates a request may ask for: telephony to studio, OpenAI's pcm (24 kHz) included."""
MAX_PAUSE_SECONDS = 60.0

RESAMPLE_QUALITY = "HQ"
"""soxr's high quality: 20-bit precision, linear phase, flat to 91 % of the lower Nyquist
frequency; 11 to 63 ms held back depending on the rate (docs/audio.md, resampling)."""

STRETCH_BLOCK = TOKEN_SAMPLES // 8
"""Sonic is always given blocks of this many samples (8 ms), so its output does not depend on how
the stream is chunked; the engine's chunks are whole tokens and never wait for a block to fill."""

LIMITER_CEILING = 1.0
"""Full scale: the loudest sample the limiter lets through."""
LIMITER_HOLD_SECONDS = 0.02
"""How long the limiter holds a peak's gain: longer than a pitch period (2.5 to 17 ms)."""
LIMITER_RELEASE_SECONDS = 0.1
"""Time constant with which the gain then recovers: short against a word."""
LIMITER_BLOCK = 4096
"""The limiter's envelope is computed per block at fixed stream positions: each sample then gets
the same arithmetic however the stream is chunked (its cost is one vectorised pass per block)."""

_EMPTY = np.zeros(0, dtype=np.float32)


@dataclass(frozen=True)
class AudioEffects:
    """What a request asks of its audio; the defaults change nothing. Invalid values raise
    ValueError naming the field and its range (the HTTP server answers them with a 400)."""

    speed: float = 1.0
    """Speaking rate, pitch kept: 2 is twice as fast, 0.5 half as fast (0.25 to 4)."""
    volume: float = 1.0
    """Amplitude factor, above 0 and at most 10; peaks that would pass full scale are limited."""
    sample_rate: int = SAMPLE_RATE
    """Output rate in Hz, one of SAMPLE_RATES."""

    def __post_init__(self) -> None:
        speed = _number("speed", self.speed)
        if not MIN_SPEED <= speed <= MAX_SPEED:
            raise ValueError(f"speed must be from {MIN_SPEED} to {MAX_SPEED}, got {self.speed!r}")
        volume = _number("volume", self.volume)
        if not 0 < volume <= MAX_VOLUME:
            raise ValueError(
                f"volume must be above 0 and at most {MAX_VOLUME}, got {self.volume!r}"
            )
        rate = self.sample_rate
        integral = isinstance(rate, numbers.Integral) and not isinstance(rate, bool)
        if not integral or rate not in SAMPLE_RATES:
            rates = ", ".join(map(str, SAMPLE_RATES))
            raise ValueError(f"sample_rate must be one of {rates} (Hz), got {rate!r}")
        object.__setattr__(self, "speed", speed)
        object.__setattr__(self, "volume", volume)
        object.__setattr__(self, "sample_rate", int(rate))

    @property
    def identity(self) -> bool:
        """True when the options leave the audio exactly as the engine made it."""
        return self.speed == 1 and self.volume == 1 and self.sample_rate == SAMPLE_RATE


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


class _Stage(Protocol):
    def process(self, audio: np.ndarray) -> np.ndarray: ...

    def flush(self) -> np.ndarray:
        """Everything still held, as if the stream ended here; the stage then starts afresh."""
        ...


class _TimeStretch:
    """Sonic's pitch-synchronous overlap-add: it cuts and repeats whole pitch periods, which
    keeps the pitch and the voice (docs/audio.md has the comparison that chose it)."""

    def __init__(self, speed: float) -> None:
        self._sonic = libsonic.SonicStream(SAMPLE_RATE, 1)
        self._sonic.set_speed(speed)
        self._pending = _EMPTY

    def process(self, audio: np.ndarray) -> np.ndarray:
        pending = np.concatenate((self._pending, audio)) if len(self._pending) else audio
        whole = len(pending) - len(pending) % STRETCH_BLOCK
        for start in range(0, whole, STRETCH_BLOCK):
            self._sonic.write(pending[start : start + STRETCH_BLOCK])
        self._pending = pending[whole:].copy()
        return self._read()

    def flush(self) -> np.ndarray:
        if len(self._pending):
            self._sonic.write(self._pending)
            self._pending = _EMPTY
        self._sonic.flush()
        return self._read()

    def _read(self) -> np.ndarray:
        return np.asarray(self._sonic.read(self._sonic.available_frames()), dtype=np.float32)


class _Resample:
    """soxr's streaming resampler from the engine's 32 kHz."""

    def __init__(self, sample_rate: int) -> None:
        self._soxr = soxr.ResampleStream(
            SAMPLE_RATE, sample_rate, 1, dtype="float32", quality=RESAMPLE_QUALITY
        )

    def process(self, audio: np.ndarray) -> np.ndarray:
        return np.asarray(self._soxr.resample_chunk(audio), dtype=np.float32)

    def flush(self) -> np.ndarray:
        rest = np.asarray(self._soxr.resample_chunk(_EMPTY, last=True), dtype=np.float32)
        self._soxr.clear()
        return rest


class _Gain:
    """Volume with a peak limiter that needs no look-ahead. Its envelope is the largest level
    of the last LIMITER_HOLD_SECONDS, released with LIMITER_RELEASE_SECONDS after that; the gain
    keeps envelope × volume at the ceiling. Holding for longer than a pitch period keeps the gain
    still within each period, so a limited vowel keeps its waveform (no added harmonics), and
    audio whose peaks stay below the ceiling is multiplied by the volume and nothing else.

    The release env[n] = max(held[n], env[n-1]·r) is computed per block in the log domain as a
    running maximum, log env[n] = (n - b)·log r + max over k ≤ n of (log held[k] - (k - b)·log r)
    with b the block's start, so that a chunk starting mid-block continues the same maximum.
    """

    def __init__(self, volume: float, sample_rate: int) -> None:
        self._volume = np.float32(volume)
        self._log_decay = -1.0 / (LIMITER_RELEASE_SECONDS * sample_rate)
        self._hold = round(LIMITER_HOLD_SECONDS * sample_rate)
        self.flush()

    def flush(self) -> np.ndarray:
        self._recent = np.zeros(self._hold - 1)
        """The levels of the samples before this chunk that are still held."""
        self._position = 0
        """Samples of the current release block already seen."""
        self._peak = -math.inf
        """The release's running maximum in the current block (log, relative to its start)."""
        return _EMPTY

    def process(self, audio: np.ndarray) -> np.ndarray:
        scaled = audio * self._volume
        if len(scaled) == 0:
            return scaled
        levels = np.concatenate((self._recent, np.abs(scaled.astype(np.float64))))
        self._recent = levels[len(levels) - len(self._recent) :]
        held = _sliding_max(levels, self._hold)
        gains = np.empty(len(scaled))
        start = 0
        while start < len(held):
            end = min(len(held), start + LIMITER_BLOCK - self._position)
            gains[start:end] = self._gains(held[start:end])
            start = end
        if gains.min() < 1:
            scaled *= gains.astype(np.float32)
            np.clip(scaled, -LIMITER_CEILING, LIMITER_CEILING, out=scaled)
        return scaled

    def _gains(self, held: np.ndarray) -> np.ndarray:
        offsets = (self._position + np.arange(len(held))) * self._log_decay
        with np.errstate(divide="ignore"):
            running = np.maximum.accumulate(np.maximum(np.log(held) - offsets, self._peak))
        self._peak = float(running[-1])
        self._position += len(held)
        if self._position == LIMITER_BLOCK:
            self._peak += LIMITER_BLOCK * self._log_decay
            self._position = 0
        envelope = np.exp(running + offsets)
        return np.minimum(1.0, LIMITER_CEILING / np.maximum(envelope, LIMITER_CEILING))


def _sliding_max(values: np.ndarray, window: int) -> np.ndarray:
    """max(values[i : i + window]) for every full window, in a few passes (van Herk and
    Gil-Werman: per block of `window`, a running maximum from each end)."""
    count = len(values) - window + 1
    padded = np.concatenate((values, np.full(-len(values) % window, -np.inf)))
    blocks = padded.reshape(-1, window)
    forward = np.maximum.accumulate(blocks, axis=1).ravel()
    backward = np.maximum.accumulate(blocks[:, ::-1], axis=1)[:, ::-1].ravel()
    return np.maximum(backward[:count], forward[window - 1 : window - 1 + count])


class EffectChain:
    """One request's stream through its AudioEffects: `process` each engine chunk (float32 mono
    at 32 kHz, any length), `pause` between sentences, `finish` at the end; every call returns
    float32 samples at `effects.sample_rate` to send now. Chunking never changes the output."""

    def __init__(self, effects: AudioEffects) -> None:
        self.effects = effects
        self._stages: list[_Stage] = []
        if effects.speed != 1:
            self._stages.append(_TimeStretch(effects.speed))
        if effects.sample_rate != SAMPLE_RATE:
            self._stages.append(_Resample(effects.sample_rate))
        if effects.volume != 1:
            self._stages.append(_Gain(effects.volume, effects.sample_rate))

    def process(self, chunk: np.ndarray) -> np.ndarray:
        """The audio ready for this chunk; the chunk itself, untouched, when the effects are the
        identity. The stretch and resampler hold back a few milliseconds (docs/audio.md)."""
        if not self._stages:
            return chunk
        audio = np.asarray(chunk, dtype=np.float32)
        if audio.ndim != 1:
            raise ValueError(f"audio chunks must be 1-D (mono), got shape {audio.shape}")
        for stage in self._stages:
            audio = stage.process(audio)
        return audio

    def pause(self, seconds: float) -> np.ndarray:
        """All audio still held, then exactly round(seconds × sample_rate) samples of silence
        (0 to MAX_PAUSE_SECONDS): the audio after it starts as a new stream would, so a
        sentence's end is spoken whole and the pause's length is exact at any speed."""
        if not 0 <= _number("pause", seconds) <= MAX_PAUSE_SECONDS:
            raise ValueError(f"pause must be from 0 to {MAX_PAUSE_SECONDS} s, got {seconds!r}")
        silence = np.zeros(round(seconds * self.effects.sample_rate), dtype=np.float32)
        return np.concatenate((self.finish(), silence))

    def finish(self) -> np.ndarray:
        """All audio still held, each stage's pending samples pushed through the stages after
        it; the chain can then take a new stream."""
        out = _EMPTY
        for index, stage in enumerate(self._stages):
            held = stage.flush()
            for later in self._stages[index + 1 :]:
                held = later.process(held)
            out = np.concatenate((out, held)) if len(out) else held
        return out
