"""Float audio to the formats that leave the engine: 16-bit PCM bytes and WAV files."""

from __future__ import annotations

import io
import os
import wave

import numpy as np
import torch

from soprano.constants import SAMPLE_RATE, SAMPLE_WIDTH

PCM16_SCALE = 32767


def to_pcm16(audio: torch.Tensor | np.ndarray) -> bytes:
    """Little-endian signed 16-bit mono PCM, clipped to [-1, 1] first."""
    samples = audio.detach().cpu().numpy() if isinstance(audio, torch.Tensor) else audio
    clipped = np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0)
    return (clipped * PCM16_SCALE).round().astype("<i2").tobytes()


def wav_bytes(audio: torch.Tensor | np.ndarray, sample_rate: int = SAMPLE_RATE) -> bytes:
    """A complete 16-bit PCM WAV file in memory."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(SAMPLE_WIDTH)
        wav.setframerate(sample_rate)
        wav.writeframes(to_pcm16(audio))
    return buffer.getvalue()


def write_wav(
    path: str | os.PathLike[str], audio: torch.Tensor | np.ndarray, sample_rate: int = SAMPLE_RATE
) -> None:
    """Write 16-bit PCM WAV, the format every player opens."""
    with open(path, "wb") as file:
        file.write(wav_bytes(audio, sample_rate))
