"""Audio that leaves the engine: 16-bit PCM and WAV (`formats`), and the per-request speed,
volume and sample rate applied while streaming (`effects`), and pauses (`pauses`)."""

from soprano.audio.effects import SAMPLE_RATES, AudioEffects, EffectChain
from soprano.audio.formats import PCM16_SCALE, to_pcm16, wav_bytes, write_wav
from soprano.audio.pauses import AudioOptions, AudioShaper

__all__ = [
    "PCM16_SCALE",
    "SAMPLE_RATES",
    "AudioEffects",
    "AudioOptions",
    "AudioShaper",
    "EffectChain",
    "to_pcm16",
    "wav_bytes",
    "write_wav",
]
