"""Real speech for audio tests and measurements, made on the spot by Debian's espeak-ng, and the
measures that judge what an effect did to it (pitch, frequency, spectral distance).

The model's random-weight test checkpoints make noise, not speech, so they cannot tell whether a
time stretch keeps the pitch; espeak-ng's formant speech can, and no audio is committed.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import wave
from pathlib import Path

import numpy as np

from soprano.constants import SAMPLE_RATE

ESPEAK = "espeak-ng"

SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "Turn on the kitchen lights and set them to fifty percent.",
    "Tomorrow will be sunny, with a high of twenty two degrees.",
    "Soprano reads your messages aloud while they are still being written.",
)
"""Assistant-like sentences with voiced and unvoiced sounds, stops and fricatives."""

VOICES = ("en-us", "en-us+f3")
"""A low (about 110 Hz) and a high (about 200 Hz) voice."""

F0_MIN, F0_MAX = 70.0, 400.0
"""The range of speaking pitch the f0 estimate searches, in Hz."""

F0_FRAME_SECONDS = 0.025
"""Short enough to find voiced frames in speech played three times as fast."""
F0_HOP_SECONDS = 0.01
F0_THRESHOLD = 0.15
"""A frame is voiced when its normalised difference dips below this (YIN's threshold)."""


MEL_BANDS = 40
MEL_MIN_HZ = 50.0
MEL_MAX_HZ = 8000.0
"""espeak-ng speaks at 22050 Hz and puts little above this."""
MEL_FLOOR_DB = 80.0


class EspeakMissingError(RuntimeError):
    """espeak-ng is not installed; `script/setup --dev` installs it with apt."""


def speak(text: str, voice: str = VOICES[0], sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """`text` spoken by espeak-ng as float32 mono at `sample_rate` (resampled from its 22050 Hz)."""
    import soxr

    binary = shutil.which(ESPEAK)
    if binary is None:
        raise EspeakMissingError(
            f"{ESPEAK} is not installed: the audio tests speak with it. Run `script/setup --dev` "
            f"(or `apt-get install {ESPEAK}`)."
        )
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "speech.wav"
        subprocess.run([binary, "-v", voice, "-w", str(path), text], check=True)
        with wave.open(str(path), "rb") as wav:
            rate = wav.getframerate()
            pcm = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
    audio = pcm.astype(np.float32) / 32768.0
    return np.asarray(soxr.resample(audio, rate, sample_rate, quality="VHQ"), dtype=np.float32)


def _frames(audio: np.ndarray, size: int, hop: int) -> np.ndarray:
    count = 1 + max(0, len(audio) - size) // hop
    index = np.arange(size)[None, :] + hop * np.arange(count)[:, None]
    return np.asarray(audio[index], dtype=np.float64)


def f0_track(audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> tuple[np.ndarray, np.ndarray]:
    """The start times (s) and f0 (Hz) of the voiced 10 ms frames (YIN's cumulative mean
    normalised difference)."""
    size = round(F0_FRAME_SECONDS * sample_rate)
    max_lag = round(sample_rate / F0_MIN)
    min_lag = round(sample_rate / F0_MAX)
    hop = round(F0_HOP_SECONDS * sample_rate)
    if len(audio) < size + max_lag:
        return np.zeros(0), np.zeros(0)
    frames = _frames(audio, size + max_lag, hop)
    loud = np.sqrt(np.mean(frames**2, axis=1))
    kept = np.flatnonzero(loud > 0.1 * np.max(loud))
    frames = frames[kept]
    n_fft = 1 << int(np.ceil(np.log2(frames.shape[1])))  # lags up to max_lag never wrap
    spectrum = np.fft.rfft(frames, n_fft)
    window = np.fft.rfft(frames[:, :size], n_fft)
    correlation = np.fft.irfft(np.conj(window) * spectrum, n_fft)[:, : max_lag + 1]
    energy = np.cumsum(np.pad(frames**2, ((0, 0), (1, 0))), axis=1)
    head = energy[:, size] - energy[:, 0]
    lags = np.arange(max_lag + 1)
    tail = energy[:, lags + size] - energy[:, lags]
    difference = head[:, None] + tail - 2 * correlation
    difference[:, 0] = 0
    running = np.cumsum(difference[:, 1:], axis=1) / lags[1:]
    normalised = np.ones_like(difference)
    normalised[:, 1:] = difference[:, 1:] / np.maximum(running, 1e-12)
    times, f0 = [], []
    for index, row in zip(kept, normalised, strict=True):
        below = np.flatnonzero(row[min_lag:] < F0_THRESHOLD)
        if len(below) == 0:
            continue
        lag = min_lag + below[0]
        while lag + 1 <= max_lag and row[lag + 1] < row[lag]:
            lag += 1
        if lag < max_lag:
            left, mid, right = row[lag - 1], row[lag], row[lag + 1]
            bend = left - 2 * mid + right
            lag += 0.5 * (left - right) / bend if bend > 0 else 0.0
        times.append(index * hop / sample_rate)
        f0.append(sample_rate / lag)
    return np.asarray(times), np.asarray(f0)


def pitch_ratio(original: np.ndarray, changed: np.ndarray, speed: float) -> float:
    """The median ratio of f0 in `changed` to f0 in `original` at the same point of the speech
    (time × speed), over the frames voiced in both: 1 when a time stretch keeps the pitch."""
    times_in, f0_in = f0_track(original)
    times_out, f0_out = f0_track(changed)
    if len(f0_in) == 0 or len(f0_out) == 0:
        raise ValueError("no voiced frames")
    nearest = np.abs(times_in[None, :] - times_out[:, None] * speed).argmin(axis=1)
    close = np.abs(times_in[nearest] - times_out * speed) <= F0_HOP_SECONDS
    if not close.any():
        raise ValueError("no frame voiced in both")
    return float(np.median(f0_out[close] / f0_in[nearest[close]]))


def peak_frequency(audio: np.ndarray, sample_rate: int) -> float:
    """The frequency of the strongest spectral peak, interpolated between bins."""
    window = np.hanning(len(audio))
    magnitude = np.abs(np.fft.rfft(audio * window))
    peak = int(np.argmax(magnitude[1:-1])) + 1
    left, mid, right = np.log(magnitude[peak - 1 : peak + 2] + 1e-30)
    offset = 0.5 * (left - right) / (left - 2 * mid + right)
    return float((peak + offset) * sample_rate / len(audio))


def mel_distance(reference: np.ndarray, other: np.ndarray, sample_rate: int = SAMPLE_RATE) -> float:
    """Root-mean-square difference in dB of log mel spectra (40 bands, 50 Hz to 8 kHz, floored
    80 dB below the peak), over the reference's non-silent 25 ms frames, after aligning `other`
    to `reference` by cross-correlation. Halving the amplitude scores 6 dB."""
    size, hop = round(0.025 * sample_rate), round(0.01 * sample_rate)
    shift = _best_lag(reference, other)
    other = np.roll(np.pad(other, (0, max(0, len(reference) - len(other)))), -shift)
    other = other[: len(reference)]
    window = np.hanning(size)
    bank = _mel_bank(size, sample_rate)
    bands = [
        (np.abs(np.fft.rfft(_frames(signal, size, hop) * window)) ** 2) @ bank.T
        for signal in (reference, other)
    ]
    floor = bands[0].max() * 10 ** (-MEL_FLOOR_DB / 10)
    loud = bands[0].sum(axis=1) > 1e-3 * bands[0].sum(axis=1).max()
    difference = 10 * np.log10(
        np.maximum(bands[0][loud], floor) / np.maximum(bands[1][loud], floor)
    )
    return float(np.mean(np.sqrt(np.mean(difference**2, axis=1))))


def _mel_bank(size: int, sample_rate: int) -> np.ndarray:
    """Triangular mel filters over the rfft bins of a `size`-sample frame."""

    def mel(hz: np.ndarray) -> np.ndarray:
        return 2595 * np.log10(1 + hz / 700)

    edges_mel = np.linspace(mel(np.array(MEL_MIN_HZ)), mel(np.array(MEL_MAX_HZ)), MEL_BANDS + 2)
    edges = 700 * (10 ** (edges_mel / 2595) - 1)
    bins = np.fft.rfftfreq(size, 1 / sample_rate)
    low, mid, high = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bins - low) / (mid - low)
    falling = (high - bins) / (high - mid)
    return np.clip(np.minimum(rising, falling), 0, None)


def _best_lag(reference: np.ndarray, other: np.ndarray) -> int:
    n = 1 << int(np.ceil(np.log2(len(reference) + len(other))))
    correlation = np.fft.irfft(np.fft.rfft(other, n) * np.conj(np.fft.rfft(reference, n)), n)
    lag = int(np.argmax(correlation))
    return lag - n if lag > n // 2 else lag
