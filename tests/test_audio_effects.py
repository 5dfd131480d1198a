"""The per-request audio chain (soprano.audio.effects) on real speech spoken by espeak-ng.

The tests that need speech fail, with a message naming the fix, when espeak-ng is missing:
`script/setup --dev` installs it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from soprano.audio import SAMPLE_RATES, AudioEffects, EffectChain
from soprano.audio.effects import MAX_PAUSE_SECONDS
from soprano.constants import SAMPLE_RATE, TOKEN_SAMPLES
from soprano.testing import speech as speech_module
from soprano.testing.speech import (
    SENTENCES,
    VOICES,
    EspeakMissingError,
    peak_frequency,
    pitch_ratio,
    speak,
)

LENGTH_TOLERANCE = 0.01
"""Output length within 1 % of input / speed × rate ratio: Sonic ends a stream on whole pitch
periods (measured: at most 0.73 % at speed 0.25, under 0.2 % from 0.5 to 3)."""

PITCH_TOLERANCE = 0.02
"""f0 within 2 % of the original's at the same point of the speech (measured: at most 0.6 %
from speed 0.5 to 2 on both voices)."""

CHAINS = [
    AudioEffects(speed=1.5),
    AudioEffects(speed=0.5, volume=3.0),
    AudioEffects(speed=2.0, sample_rate=24000),
    AudioEffects(sample_rate=8000),
    AudioEffects(sample_rate=44100, volume=0.5),
    AudioEffects(volume=6.0),
    AudioEffects(speed=0.8, volume=10.0, sample_rate=48000),
]


@pytest.fixture(scope="module")
def speech() -> list[np.ndarray]:
    return [speak(text, voice) for voice in VOICES for text in SENTENCES[:2]]


def run(
    effects: AudioEffects, audio: np.ndarray, sizes: list[int] | None = None
) -> list[np.ndarray]:
    """Every piece the chain returns for `audio` cut into `sizes` (one call when None)."""
    chain = EffectChain(effects)
    pieces, start = [], 0
    for size in sizes if sizes is not None else [len(audio)]:
        pieces.append(chain.process(audio[start : start + size]))
        start += size
    assert start >= len(audio)
    pieces.append(chain.finish())
    return pieces


def random_sizes(length: int, seed: int) -> list[int]:
    """Chunk sizes from 0 (an empty chunk) to two tokens' worth, covering `length`."""
    rng = np.random.default_rng(seed)
    sizes: list[int] = []
    while sum(sizes) < length:
        sizes.append(int(rng.integers(0, 2 * TOKEN_SAMPLES)))
    return sizes


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"speed": 0.2}, "speed must be from 0.25 to 4.0"),
        ({"speed": 4.5}, "speed must be from 0.25 to 4.0"),
        ({"speed": math.nan}, "speed must be from 0.25 to 4.0"),
        ({"speed": "fast"}, "speed must be a number"),
        ({"speed": True}, "speed must be a number"),
        ({"volume": 0}, "volume must be above 0 and at most 10.0"),
        ({"volume": -1.0}, "volume must be above 0 and at most 10.0"),
        ({"volume": 10.5}, "volume must be above 0 and at most 10.0"),
        ({"volume": math.inf}, "volume must be above 0 and at most 10.0"),
        ({"volume": None}, "volume must be a number"),
        ({"sample_rate": 12345}, "sample_rate must be one of 8000, 11025, 16000, 22050, 24000"),
        ({"sample_rate": 24000.0}, "sample_rate must be one of"),
        ({"sample_rate": "24000"}, "sample_rate must be one of"),
        ({"sample_rate": True}, "sample_rate must be one of"),
    ],
)
def test_invalid_options_name_the_field_and_range(fields: dict[str, object], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        AudioEffects(**fields)  # type: ignore[arg-type]


def test_the_range_ends_and_every_rate_are_accepted() -> None:
    for fields in ({"speed": 0.25}, {"speed": 4}, {"volume": 10}, {"volume": 1e-3}):
        effects = AudioEffects(**fields)  # type: ignore[arg-type]
        assert isinstance(effects.speed, float) and isinstance(effects.volume, float)
    assert [AudioEffects(sample_rate=rate).sample_rate for rate in SAMPLE_RATES] == list(
        SAMPLE_RATES
    )
    numpy_values = AudioEffects(np.float32(1.5), np.float64(2), np.int64(24000))  # type: ignore[arg-type]
    assert numpy_values == AudioEffects(1.5, 2.0, 24000)
    assert type(numpy_values.sample_rate) is int
    assert 24000 in SAMPLE_RATES and SAMPLE_RATE in SAMPLE_RATES


def test_identity_returns_the_engine_audio_itself() -> None:
    assert AudioEffects().identity and AudioEffects(speed=1, volume=1).identity
    assert not AudioEffects(speed=1.1).identity
    assert not AudioEffects(volume=0.9).identity
    assert not AudioEffects(sample_rate=24000).identity
    chain = EffectChain(AudioEffects())
    audio = np.random.default_rng(0).standard_normal(5 * TOKEN_SAMPLES).astype(np.float32) * 2
    assert chain.process(audio) is audio
    tensor = torch.from_numpy(audio)
    assert chain.process(tensor) is tensor
    silence = chain.pause(0.25)
    assert silence.dtype == np.float32 and len(silence) == 8000 and not silence.any()
    assert len(chain.finish()) == 0


@pytest.mark.parametrize("effects", CHAINS, ids=str)
def test_chunking_never_changes_the_output(effects: AudioEffects, speech: list[np.ndarray]) -> None:
    audio = np.concatenate(speech[:2])
    whole = np.concatenate(run(effects, audio))
    for seed in range(2):
        pieces = run(effects, audio, random_sizes(len(audio), seed))
        assert all(piece.dtype == np.float32 and piece.ndim == 1 for piece in pieces)
        assert np.array_equal(np.concatenate(pieces), whole)


@pytest.mark.parametrize("effects", CHAINS, ids=str)
def test_pauses_are_exact_and_in_order(effects: AudioEffects, speech: list[np.ndarray]) -> None:
    first, second = speech[0], speech[1]
    chain = EffectChain(effects)
    head = chain.process(first)
    paused = chain.pause(0.3)
    tail = np.concatenate([chain.process(second), chain.pause(0.0), chain.pause(0.123)])
    silence = round(0.3 * effects.sample_rate)
    one_sentence = np.concatenate(run(effects, first))
    assert np.array_equal(np.concatenate([head, paused[:-silence]]), one_sentence)
    assert len(paused) - len(paused[:-silence]) == silence and not paused[-silence:].any()
    assert np.array_equal(
        tail[: -round(0.123 * effects.sample_rate)], np.concatenate(run(effects, second))
    )
    assert not tail[-round(0.123 * effects.sample_rate) :].any()


def test_pause_bounds() -> None:
    chain = EffectChain(AudioEffects(speed=1.5))
    for seconds in (-0.1, math.nan, math.inf, MAX_PAUSE_SECONDS + 1):
        with pytest.raises(ValueError, match=r"pause must be from 0 to 60\.0 s"):
            chain.pause(seconds)
    with pytest.raises(ValueError, match="pause must be a number"):
        chain.pause("1")  # type: ignore[arg-type]


@pytest.mark.parametrize("effects", CHAINS, ids=str)
def test_lengths_follow_speed_and_rate(effects: AudioEffects, speech: list[np.ndarray]) -> None:
    for audio in speech:
        out = np.concatenate(run(effects, audio))
        expected = len(audio) / effects.speed * effects.sample_rate / SAMPLE_RATE
        assert abs(len(out) - expected) <= LENGTH_TOLERANCE * expected


@pytest.mark.parametrize("speed", [0.5, 1.5, 2.0])
def test_speed_keeps_the_pitch(speed: float, speech: list[np.ndarray]) -> None:
    for audio in speech[::2]:  # one sentence per voice
        out = np.concatenate(run(AudioEffects(speed=speed), audio))
        assert abs(pitch_ratio(audio, out, speed) - 1) <= PITCH_TOLERANCE


@pytest.mark.parametrize("rate", [rate for rate in SAMPLE_RATES if rate != SAMPLE_RATE])
def test_resampling_keeps_frequencies(rate: int) -> None:
    seconds, frequency = 1.0, 1234.5
    t = np.arange(round(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    tone = (0.5 * np.sin(2 * np.pi * frequency * t)).astype(np.float32)
    out = np.concatenate(run(AudioEffects(sample_rate=rate), tone, random_sizes(len(tone), 3)))
    assert abs(len(out) - seconds * rate) <= 1
    assert peak_frequency(out, rate) == pytest.approx(frequency, rel=1e-4)
    assert np.max(np.abs(out[rate // 10 : -rate // 10])) == pytest.approx(0.5, rel=1e-3)


def test_limiter_holds_full_scale(speech: list[np.ndarray]) -> None:
    audio = np.concatenate(speech)
    for effects in (AudioEffects(volume=10), AudioEffects(volume=8, sample_rate=48000)):
        out = np.concatenate(run(effects, audio, random_sizes(len(audio), 4)))
        assert np.max(np.abs(out)) <= 1.0
        assert np.max(np.abs(out)) > 0.99
    loud = audio / np.max(np.abs(audio)) * 1.5
    assert np.max(np.abs(np.concatenate(run(AudioEffects(volume=0.9), loud)))) <= 1.0


def test_quiet_audio_is_scaled_exactly(speech: list[np.ndarray]) -> None:
    audio = np.concatenate(speech)
    quiet = audio / np.max(np.abs(audio)) * 0.09
    for volume in (0.25, 3.0, 10.0):
        chain = EffectChain(AudioEffects(volume=volume))
        assert np.array_equal(chain.process(quiet), quiet * np.float32(volume))


def test_limiting_adds_no_harmonics() -> None:
    """A vowel-like tone pushed 4× past full scale comes out as the same tone at full scale.
    The tones fit whole cycles into the 0.75 s analysed, so the window adds no leakage."""
    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    for frequency in (72.0, 112.0, 220.0):
        tone = (0.8 * np.sin(2 * np.pi * frequency * t)).astype(np.float32)
        out = EffectChain(AudioEffects(volume=5)).process(tone)[SAMPLE_RATE // 4 :]
        spectrum = np.abs(np.fft.rfft(out * np.hanning(len(out)))) ** 2
        peak = int(np.argmax(spectrum))
        tone_power = spectrum[peak - 3 : peak + 4].sum()
        distortion = math.sqrt((spectrum.sum() - tone_power) / tone_power)
        assert distortion < 1e-3
        assert np.max(np.abs(out)) == pytest.approx(1.0, abs=1e-3)


def test_chunks_are_checked() -> None:
    chain = EffectChain(AudioEffects(volume=2))
    with pytest.raises(ValueError, match="1-D"):
        chain.process(np.zeros((2, 100), dtype=np.float32))
    assert len(chain.process(np.zeros(0, dtype=np.float32))) == 0
    assert chain.process(torch.ones(4) * 0.25).tolist() == [0.5] * 4


def test_missing_espeak_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(speech_module.shutil, "which", lambda name: None)
    with pytest.raises(EspeakMissingError, match=r"Run `script/setup --dev`"):
        speak("Hello.")
