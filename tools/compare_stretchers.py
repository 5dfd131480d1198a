"""Compare pitch-preserving time stretchers on real speech, used as EffectChain uses them:
streaming, in the engine's chunks. The figures in docs/audio.md come from this script.

Speech: espeak-ng (Debian), SENTENCES × VOICES of soprano.testing.speech, at 32 kHz. Each
candidate stretches every utterance at each speed, fed in the engine's chunk sizes (5 tokens, then
growing to 8), and is scored on:

- f0 error: |f0 out / f0 in − 1| at the same points of the speech (median over frames voiced in
  both, YIN), mean over utterances; nan where an output has no frame voiced in both;
- duration error: |output length × speed / input length − 1|;
- round trip: stretched by the speed, then by its inverse, against the original: log-mel
  distance in dB (0 = identical; halving the amplitude scores 6);
- chunked = one-shot: the largest sample difference between feeding random chunk sizes (1 to
  5000 samples) and one call (and the length difference, if any), and the sharpest second
  difference near the chunk seams against the same places of the one-shot output ("seam
  clicks": 1 when chunking adds nothing, above 1 when a seam is sharper);
- cost: milliseconds of processing per second of audio (every candidate runs on the calling
  thread), median of interleaved rounds; latency: milliseconds of output held back after each
  engine chunk (median; for EffectChain also after the first chunk).

The optional candidates are installed only for this comparison:

    .venv/bin/pip install audiotsm pylibrb python-stretch pedalboard
    .venv/bin/python tools/compare_stretchers.py > /tmp/stretchers.md

pylibrb and python-stretch have no aarch64 wheels, and pedalboard's and sox's stretches are
offline only; they are measured as references for quality.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import subprocess
import tempfile
import time
import wave
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from soprano.audio import AudioEffects, EffectChain
from soprano.audio.effects import _TimeStretch
from soprano.constants import SAMPLE_RATE, TOKEN_SAMPLES
from soprano.decoder import ChunkSchedule
from soprano.testing.speech import (
    SENTENCES,
    VOICES,
    mel_distance,
    pitch_ratio,
    speak,
)

SPEEDS = (0.5, 0.75, 1.25, 1.5, 2.0, 3.0)
FIRST_CHUNK_TOKENS = 5
ENGINE_SCHEDULE = ChunkSchedule(1, 8)
TIMING_ROUNDS = 3


class Stretcher(Protocol):
    def process(self, audio: np.ndarray) -> np.ndarray: ...

    def flush(self) -> np.ndarray: ...


class Sonic:
    """libsonic as EffectChain runs it (fixed 256-sample writes)."""

    streaming = True

    def __init__(self, speed: float) -> None:
        self._stage = _TimeStretch(speed)

    def process(self, audio: np.ndarray) -> np.ndarray:
        return self._stage.process(audio)

    def flush(self) -> np.ndarray:
        return self._stage.flush()


class AudioTsm:
    """audiotsm's real-time API (pure Python and numpy)."""

    streaming = True
    method = "wsola"

    def __init__(self, speed: float) -> None:
        import audiotsm
        from audiotsm.io.array import ArrayWriter

        self._tsm = getattr(audiotsm, self.method)(1, speed=speed)
        self._writer_type = ArrayWriter

    def process(self, audio: np.ndarray) -> np.ndarray:
        from audiotsm.io.array import ArrayReader

        reader = ArrayReader(audio[None, :].astype(np.float32))
        writer = self._writer_type(1)
        finished = False
        while not (finished and reader.empty):
            self._tsm.read_from(reader)
            _, finished = self._tsm.write_to(writer)
        return np.asarray(writer.data[0], dtype=np.float32)

    def flush(self) -> np.ndarray:
        writer = self._writer_type(1)
        finished = False
        while not finished:
            _, finished = self._tsm.flush_to(writer)
        self._tsm.clear()
        return np.asarray(writer.data[0], dtype=np.float32)


class AudioTsmPhaseVocoder(AudioTsm):
    method = "phasevocoder"


class RubberBand:
    """Rubber Band's real-time mode (pylibrb), padded and delay-trimmed as its manual says."""

    streaming = True
    engine = "ENGINE_FINER"
    max_block = 16384

    def __init__(self, speed: float) -> None:
        import pylibrb

        option = pylibrb.Option.PROCESS_REALTIME | getattr(pylibrb.Option, self.engine)
        self._rb = pylibrb.RubberBandStretcher(SAMPLE_RATE, 1, option, initial_time_ratio=1 / speed)
        self._rb.set_max_process_size(self.max_block)
        self._rb.process(np.zeros((1, self._rb.get_preferred_start_pad()), np.float32))
        self._skip = self._rb.get_start_delay()
        self._speed = speed
        self._fed = 0
        self._made = 0

    def process(self, audio: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, len(audio), self.max_block):
            self._rb.process(audio[None, start : start + self.max_block].astype(np.float32))
            out.append(self._take())
        self._fed += len(audio)
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    def flush(self) -> np.ndarray:
        self._rb.process(np.zeros((1, 0), np.float32), final=True)
        out = [self._take()]
        while not self._rb.is_done():
            out.append(self._take())
        rest = np.concatenate(out)
        expected = round(self._fed / self._speed) - self._made
        return rest[: max(0, expected)]

    def _take(self) -> np.ndarray:
        got = np.asarray(self._rb.retrieve_available(), dtype=np.float32).reshape(-1)
        dropped = min(self._skip, len(got))
        self._skip -= dropped
        got = got[dropped:]
        self._made += len(got)
        return got


class RubberBandFaster(RubberBand):
    engine = "ENGINE_FASTER"


class Signalsmith:
    """Signalsmith Stretch (python-stretch): output length follows the time factor per call;
    its latency is trimmed from the start and flushed with silence at the end."""

    streaming = True

    def __init__(self, speed: float) -> None:
        import python_stretch

        self._stretch = python_stretch.Signalsmith.Stretch()
        self._stretch.preset(1, SAMPLE_RATE)
        self._stretch.setTimeFactor(speed)
        self._speed = speed
        self._skip = round(self._stretch.outputLatency() + self._stretch.inputLatency() / speed)
        self._fed = 0
        self._made = 0

    def process(self, audio: np.ndarray) -> np.ndarray:
        self._fed += len(audio)
        return self._run(audio)

    def flush(self) -> np.ndarray:
        tail = self._stretch.inputLatency() + round(self._stretch.outputLatency() * self._speed)
        rest = self._run(np.zeros(tail + 1024, np.float32))
        return rest[: max(0, round(self._fed / self._speed) - self._made + len(rest))]

    def _run(self, audio: np.ndarray) -> np.ndarray:
        if len(audio) == 0:
            return np.zeros(0, np.float32)
        got = np.asarray(self._stretch.process(audio[None, :]), dtype=np.float32).reshape(-1)
        dropped = min(self._skip, len(got))
        self._skip -= dropped
        got = got[dropped:]
        self._made += len(got)
        return got


class Offline:
    """A whole-utterance stretch: nothing comes out before the end."""

    streaming = False

    def __init__(self, speed: float) -> None:
        self._speed = speed
        self._held: list[np.ndarray] = []

    def process(self, audio: np.ndarray) -> np.ndarray:
        self._held.append(audio)
        return np.zeros(0, np.float32)

    def flush(self) -> np.ndarray:
        audio = np.concatenate(self._held) if self._held else np.zeros(0, np.float32)
        self._held = []
        return self.stretch(audio) if len(audio) else audio

    def stretch(self, audio: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class PedalboardOffline(Offline):
    def stretch(self, audio: np.ndarray) -> np.ndarray:
        import pedalboard

        out = pedalboard.time_stretch(audio[None, :], SAMPLE_RATE, self._speed)
        return np.asarray(out, dtype=np.float32).reshape(-1)


class SoxTempo(Offline):
    """sox's `tempo -s` (WSOLA tuned for speech), through the command line."""

    def stretch(self, audio: np.ndarray) -> np.ndarray:
        with tempfile.TemporaryDirectory() as folder:
            source, target = Path(folder) / "in.wav", Path(folder) / "out.wav"
            _write_wav(source, audio)
            subprocess.run(
                ["sox", str(source), "-D", str(target), "tempo", "-s", f"{self._speed}"], check=True
            )
            with wave.open(str(target), "rb") as wav:
                pcm = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
        return pcm.astype(np.float32) / 32768.0


def _write_wav(path: Path, audio: np.ndarray) -> None:
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(SAMPLE_RATE)
        wav.writeframes((np.clip(audio, -1, 1) * 32767).round().astype("<i2").tobytes())


def _available(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


CANDIDATES: dict[str, tuple[Callable[[float], Any], Callable[[], bool], str]] = {
    "Sonic (libsonic)": (Sonic, lambda: _available("libsonic"), "x86_64, aarch64; 0.2 MB"),
    "WSOLA (audiotsm)": (AudioTsm, lambda: _available("audiotsm"), "pure Python; 0.03 MB"),
    "phase vocoder (audiotsm)": (
        AudioTsmPhaseVocoder,
        lambda: _available("audiotsm"),
        "pure Python; 0.03 MB",
    ),
    "Rubber Band R3 (pylibrb)": (RubberBand, lambda: _available("pylibrb"), "x86_64 only"),
    "Rubber Band R2 (pylibrb)": (RubberBandFaster, lambda: _available("pylibrb"), "x86_64 only"),
    "Signalsmith (python-stretch)": (
        Signalsmith,
        lambda: _available("python_stretch"),
        "x86_64 only",
    ),
    "Rubber Band offline (pedalboard)": (
        PedalboardOffline,
        lambda: _available("pedalboard"),
        "offline only; 5 MB",
    ),
    "sox tempo -s (offline)": (SoxTempo, lambda: shutil.which("sox") is not None, "CLI only"),
}


def engine_chunks(length: int) -> Iterator[slice]:
    """The sample ranges of a stream cut as the engine's ChunkSchedule cuts it."""
    start, sent = 0, 0
    tokens = FIRST_CHUNK_TOKENS
    while start < length:
        end = min(length, start + tokens * TOKEN_SAMPLES)
        yield slice(start, end)
        sent += tokens
        start = end
        tokens = ENGINE_SCHEDULE.size_after(sent)


def random_chunks(length: int, rng: np.random.Generator) -> Iterator[slice]:
    start = 0
    while start < length:
        end = min(length, start + int(rng.integers(1, 5001)))
        yield slice(start, end)
        start = end


def run(
    factory: Callable[[float], Stretcher],
    speed: float,
    audio: np.ndarray,
    chunks: Iterator[slice],
    rate: int = SAMPLE_RATE,
) -> tuple[np.ndarray, list[int], list[float]]:
    """Output (at `rate`), the output length after each chunk, and the milliseconds of output
    held back after each."""
    stretcher = factory(speed)
    pieces, seams, held = [], [], []
    made = 0
    for piece in chunks:
        out = stretcher.process(audio[piece])
        pieces.append(out)
        made += len(out)
        seams.append(made)
        held.append((piece.stop / speed / SAMPLE_RATE - made / rate) * 1000)
    pieces.append(stretcher.flush())
    return np.concatenate(pieces), seams, held


def clickiness(streamed: np.ndarray, seams: list[int], whole: np.ndarray) -> float:
    """The sharpest second difference near the chunk seams of the streamed output, against the
    same places of the one-shot output: 1 when chunking adds nothing there."""

    def worst(audio: np.ndarray) -> float:
        curvature = np.abs(np.diff(audio, 2))
        near = [curvature[max(0, s - 32) : s + 32] for s in seams if s < len(curvature)]
        return max((float(c.max()) for c in near if len(c)), default=0.0)

    return worst(streamed) / max(worst(whole), 1e-12)


def measure(
    name: str, factory: Callable[[float], Stretcher], utterances: list[np.ndarray]
) -> dict[float, dict[str, float]]:
    rng = np.random.default_rng(0)
    results: dict[float, dict[str, float]] = {}
    for speed in SPEEDS:
        f0_errors, durations, trips, diffs, lengths, clicks, held = [], [], [], [], [], [], []
        for audio in utterances:
            out, _, lag = run(factory, speed, audio, engine_chunks(len(audio)))
            held.extend(lag)
            try:
                f0_errors.append(abs(pitch_ratio(audio, out, speed) - 1) * 100)
            except ValueError:  # no frame voiced in both: the output lost its voicing
                f0_errors.append(math.nan)
            durations.append(abs(len(out) * speed / len(audio) - 1) * 100)
            back, _, _ = run(factory, 1 / speed, out, engine_chunks(len(out)))
            trips.append(mel_distance(audio, back))
            whole, _, _ = run(factory, speed, audio, iter([slice(0, len(audio))]))
            chunked, seams, _ = run(factory, speed, audio, random_chunks(len(audio), rng))
            common = min(len(whole), len(chunked))
            diffs.append(float(np.abs(whole[:common] - chunked[:common]).max()))
            lengths.append(abs(len(whole) - len(chunked)))
            clicks.append(clickiness(chunked, seams, whole))
        results[speed] = {
            "f0": float(np.mean(f0_errors)),
            "duration": float(np.mean(durations)),
            "trip": float(np.mean(trips)),
            "diff": max(diffs),
            "lengths": max(lengths),
            "clicks": max(clicks),
            "held": float(np.median(held)),
        }
        print(f"  {name} ×{speed}: {results[speed]}", flush=True)
    return results


def timings(names: list[str], speech: np.ndarray) -> dict[str, dict[float, float]]:
    """ms of processing per second of audio, interleaved across candidates, median of rounds."""
    samples: dict[str, dict[float, list[float]]] = {n: {s: [] for s in SPEEDS} for n in names}
    seconds = len(speech) / SAMPLE_RATE
    for _ in range(TIMING_ROUNDS):
        for speed in SPEEDS:
            for name in names:
                started = time.perf_counter()
                run(CANDIDATES[name][0], speed, speech, engine_chunks(len(speech)))
                samples[name][speed].append((time.perf_counter() - started) / seconds * 1000)
    return {n: {s: statistics.median(v) for s, v in by.items()} for n, by in samples.items()}


CHAIN_OPTIONS = (
    AudioEffects(volume=2.0),
    AudioEffects(sample_rate=24000),
    AudioEffects(sample_rate=48000),
    AudioEffects(sample_rate=22050),
    AudioEffects(sample_rate=16000),
    AudioEffects(sample_rate=8000),
    AudioEffects(speed=0.5),
    AudioEffects(speed=1.5),
    AudioEffects(speed=2.0),
    AudioEffects(speed=1.5, volume=2.0, sample_rate=24000),
)


class _Chain:
    """EffectChain in the Stretcher shape, so `run` can time it and measure what it holds."""

    def __init__(self, effects: AudioEffects) -> None:
        self._chain = EffectChain(effects)

    def process(self, audio: np.ndarray) -> np.ndarray:
        return self._chain.process(audio)

    def flush(self) -> np.ndarray:
        return self._chain.finish()


def chain_table(speech: np.ndarray) -> None:
    """What each option of EffectChain costs and holds back, in the engine's chunks."""
    seconds = len(speech) / SAMPLE_RATE
    cost: dict[AudioEffects, list[float]] = {effects: [] for effects in CHAIN_OPTIONS}
    held: dict[AudioEffects, tuple[float, float]] = {}
    for _ in range(TIMING_ROUNDS):
        for effects in CHAIN_OPTIONS:
            started = time.perf_counter()
            _, _, lag = run(
                lambda _speed, effects=effects: _Chain(effects),
                effects.speed,
                speech,
                engine_chunks(len(speech)),
                effects.sample_rate,
            )
            cost[effects].append((time.perf_counter() - started) / seconds * 1000)
            held[effects] = (lag[0], float(np.median(lag)))
    print("\n| EffectChain | ms per s of audio | held back ms: first chunk | median |")
    print("|---|---|---|---|")
    for effects in CHAIN_OPTIONS:
        options = ", ".join(
            f"{field}={getattr(effects, field):g}"
            for field in ("speed", "volume", "sample_rate")
            if getattr(effects, field) != getattr(AudioEffects(), field)
        )
        first, typical = held[effects]
        print(
            f"| {options} | {statistics.median(cost[effects]):.1f} | {first:.0f} | {typical:.0f} |"
        )


RESAMPLE_RATES = (24000, 48000, 22050, 16000, 8000)
RESAMPLE_QUALITIES = ("LQ", "MQ", "HQ", "VHQ")


class _Resampler:
    """A soxr stream in the Stretcher shape."""

    def __init__(self, rate: int, quality: str) -> None:
        import soxr

        self._soxr = soxr.ResampleStream(SAMPLE_RATE, rate, 1, dtype="float32", quality=quality)

    def process(self, audio: np.ndarray) -> np.ndarray:
        return np.asarray(self._soxr.resample_chunk(audio), dtype=np.float32)

    def flush(self) -> np.ndarray:
        return np.asarray(
            self._soxr.resample_chunk(np.zeros(0, np.float32), last=True), dtype=np.float32
        )


def resampler_table(speech: np.ndarray) -> None:
    """soxr's output held back in the engine's chunks (median, ms), by rate and quality."""
    print("\n| rate | " + " | ".join(RESAMPLE_QUALITIES) + " |")
    print("|---|" + "---|" * len(RESAMPLE_QUALITIES))
    for rate in RESAMPLE_RATES:
        held = []
        for quality in RESAMPLE_QUALITIES:
            _, _, lag = run(
                lambda _speed, rate=rate, quality=quality: _Resampler(rate, quality),
                1.0,
                speech,
                engine_chunks(len(speech)),
                rate,
            )
            held.append(f"{np.median(lag):.0f}")
        print(f"| {rate} | " + " | ".join(held) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="candidate names to run (default: all there)")
    parser.add_argument(
        "--part", choices=("all", "stretchers", "chain", "resampler"), default="all"
    )
    args = parser.parse_args()
    names = [n for n, (_, there, _) in CANDIDATES.items() if there()]
    if args.only:
        names = [n for n in names if any(o.lower() in n.lower() for o in args.only)]
    missing = [n for n in CANDIDATES if n not in names]
    utterances = [speak(text, voice) for voice in VOICES for text in SENTENCES]
    speech = np.concatenate(utterances)
    print(f"{len(utterances)} utterances, {len(speech) / SAMPLE_RATE:.1f} s; load: {_load()}")
    if args.part in ("all", "resampler"):
        resampler_table(speech)
    if args.part in ("all", "chain"):
        chain_table(speech)
    if args.part in ("all", "stretchers"):
        quality = {name: measure(name, CANDIDATES[name][0], utterances) for name in names}
        speed_ms = timings(names, speech)
        print(f"\nload after: {_load()}; not measured: {', '.join(missing) or 'none'}")
        _table(names, quality, speed_ms)


def _load() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def _table(
    names: list[str],
    quality: dict[str, dict[float, dict[str, float]]],
    speed_ms: dict[str, dict[float, float]],
) -> None:
    print(
        "\n| candidate | speed | f0 error % | duration error % | round trip dB "
        "| chunked = one-shot | seam clicks | ms per s | held back ms |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name in names:
        streaming = CANDIDATES[name][0].streaming
        for speed in SPEEDS:
            r = quality[name][speed]
            exact = "exact" if r["diff"] == 0 and r["lengths"] == 0 else f"{r['diff']:.2g}"
            if r["lengths"]:
                exact += f", ±{r['lengths']:.0f} samples"
            seams = f"{exact} | {r['clicks']:.2f}" if streaming else "offline | -"
            held = f"{r['held']:.0f}" if streaming else "all"
            print(
                f"| {name} | {speed} | {r['f0']:.1f} | {r['duration']:.2f} | {r['trip']:.1f} "
                f"| {seams} | {speed_ms[name][speed]:.1f} | {held} |"
            )
    print("\n| candidate | wheels / size |")
    print("|---|---|")
    for name in names:
        print(f"| {name} | {CANDIDATES[name][2]} |")


if __name__ == "__main__":
    main()
