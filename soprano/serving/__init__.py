"""Serving: one engine thread and continuous batching that every frontend shares."""

from soprano.serving.scheduler import Job, Scheduler
from soprano.serving.service import (
    DEFAULT_MAX_CHUNK_TOKENS,
    ServerBusyError,
    ServingLimits,
    SpeechService,
    SpeechStream,
    SynthesisError,
)

__all__ = [
    "DEFAULT_MAX_CHUNK_TOKENS",
    "Job",
    "Scheduler",
    "ServerBusyError",
    "ServingLimits",
    "SpeechService",
    "SpeechStream",
    "SynthesisError",
]
