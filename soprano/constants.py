"""Numbers fixed by the published Soprano checkpoints, named once for every module and frontend."""

SAMPLE_RATE = 32_000
"""Output sample rate in Hz."""

HOP_LENGTH = 512
"""iSTFT hop of the decoder, in samples."""

N_FFT = 2048
"""iSTFT size (and window length) of the decoder."""

UPSAMPLE_FACTOR = 4
"""Decoder frames per LM hidden state."""

TOKEN_SAMPLES = HOP_LENGTH * UPSAMPLE_FACTOR
"""Audio samples per generated token (2048, i.e. 64 ms)."""

TOKENS_PER_SECOND = SAMPLE_RATE / TOKEN_SAMPLES
"""15.625 audio tokens make one second of audio."""

RECEPTIVE_FIELD = 4
"""Tokens of right context after which a decoded sample no longer changes (docs/decoder.md)."""

SAMPLE_WIDTH = 2
"""Bytes per sample of the 16-bit PCM that the frontends send."""

# Token ids of the Soprano vocabulary (docs/checkpoint.md, vocabulary).
UNK_ID = 0
TEXT_ID = 1
START_ID = 2
STOP_ID = 3
AUDIO_TOKEN_OFFSET = 4
"""Audio code c has token id c + AUDIO_TOKEN_OFFSET."""
AUDIO_CODES = 8000

DEFAULT_MODEL = "ekwek/Soprano-1.1-80M"

# Sampling defaults of upstream ≥ 0.1.0 (docs/generation.md, sampling).
DEFAULT_TEMPERATURE = 0.0
DEFAULT_TOP_P = 0.95
DEFAULT_REPETITION_PENALTY = 1.2
MAX_NEW_TOKENS = 512
