"""A request's audio as it leaves: effects on every chunk, pauses between and around sentences.

Every frontend (and `SopranoTTS.infer_stream`) takes the same `AudioOptions`; an `AudioShaper`
applies them to one request's audio as it arrives, in order: `start`, then `audio` for each
chunk with `sentence_end` between two sentences, then `end`. The defaults leave the engine's
audio exactly as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from soprano.audio.effects import AudioEffects, EffectChain

MAX_SILENCE_SECONDS = 10.0
"""Longest pause a request may ask for, between sentences or around them."""


@dataclass(frozen=True)
class AudioOptions:
    """How a request's audio leaves: effects (speed, volume, sample rate) and pauses."""

    effects: AudioEffects = field(default_factory=AudioEffects)
    sentence_silence: float = 0.0
    """Seconds of silence between two sentences (as wyoming-piper's --sentence-silence)."""
    trailing_silence: float = 0.0
    """Seconds of silence after the last sentence: some speakers cut the end of a stream."""
    leading_silence: float = 0.0
    """Seconds of silence before the first sentence: for a request that continues an answer
    an earlier request began (Wyoming's streamed sentences)."""

    def __post_init__(self) -> None:
        for name in ("sentence_silence", "trailing_silence", "leading_silence"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not 0 <= value <= MAX_SILENCE_SECONDS
            ):
                raise ValueError(
                    f"{name} must be from 0 to {MAX_SILENCE_SECONDS:g} seconds, got {value!r}"
                )

    @property
    def sample_rate(self) -> int:
        return self.effects.sample_rate

    @property
    def identity(self) -> bool:
        """True when the audio leaves exactly as the engine made it."""
        silences = (self.sentence_silence, self.trailing_silence, self.leading_silence)
        return self.effects.identity and not any(silences)


@dataclass(frozen=True)
class Pause:
    """Audio the effects still held, then `seconds` of silence."""

    seconds: float
    audio: np.ndarray


class AudioShaper:
    """Applies AudioOptions to one request's audio, chunk by chunk (see the module)."""

    def __init__(self, options: AudioOptions) -> None:
        self.options = options
        self.chain = EffectChain(options.effects)

    def start(self) -> Pause:
        return self._pause(self.options.leading_silence)

    def audio(self, chunk: torch.Tensor | np.ndarray) -> np.ndarray:
        samples = chunk.detach().cpu().numpy() if isinstance(chunk, torch.Tensor) else chunk
        return self.chain.process(samples)

    def sentence_end(self) -> Pause:
        return self._pause(self.options.sentence_silence)

    def end(self) -> Pause:
        """The rest of the audio and the trailing silence."""
        return Pause(self.options.trailing_silence, self.chain.pause(self.options.trailing_silence))

    def _pause(self, seconds: float) -> Pause:
        """No pause at all leaves the effects' stream unbroken."""
        if not seconds:
            return Pause(0.0, np.zeros(0, dtype=np.float32))
        return Pause(seconds, self.chain.pause(seconds))
