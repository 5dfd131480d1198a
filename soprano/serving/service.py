"""The one serving layer that every frontend uses: an engine thread, continuous batching, limits.

Frontends (Wyoming, HTTP, web UI) keep protocol and encoding only. They `submit` a request's
sentences and read its audio from the returned `SpeechStream`, blocking or with `async for`;
the engine thread runs the `Scheduler`, so inference never runs on an event loop, and the
kernels release the GIL while they compute. Taking a chunk from the stream is what lets its
generation go on (backpressure), `cancel` (or leaving an `async for` early) frees its rows at
the next step, and a failure ends only the requests whose step failed.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from soprano.audio.pauses import AudioOptions, AudioShaper, Pause
from soprano.constants import SAMPLE_RATE
from soprano.decoder import ChunkSchedule
from soprano.errors import SopranoError
from soprano.lm import SamplingParams
from soprano.serving.scheduler import Job, Scheduler, SentenceEnd

if TYPE_CHECKING:
    from soprano.tts import SopranoTTS

_LOGGER = logging.getLogger(__name__)

SINGLE_VOICE = "default"
"""The voice name of a service made from one engine."""

DEFAULT_MAX_CHUNK_TOKENS = 8
"""Streamed chunks grow to half a second of audio (ChunkSchedule); a stream then costs about
what offline decoding costs, while the first chunk still leaves after 5 tokens."""


@dataclass(frozen=True)
class ServingLimits:
    """What one server will take on; every frontend shares these (and their flags)."""

    max_batch_size: int = 16
    """Sentences advanced together in one step (more wait for a row, in fair turns)."""
    max_requests: int = 64
    """Requests running or waiting; more are refused with ServerBusyError."""
    max_buffered_seconds: float = 30.0
    """Audio a request may have ready but not yet taken before its generation pauses."""
    max_new_tokens: int = 1024
    """Largest `max_new_tokens` a request may ask for (it sizes the KV cache: 17 KB a token)."""
    max_input_chars: int = 4096
    """Longest text one request may send (OpenAI's own limit)."""

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_requests", "max_new_tokens", "max_input_chars"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not self.max_buffered_seconds > 0:
            raise ValueError(f"max_buffered_seconds must be > 0, got {self.max_buffered_seconds}")


class ServerBusyError(SopranoError):
    """The server holds `max_requests` requests already; try again later."""


class SynthesisError(SopranoError):
    """Generation failed for this request; the message and `code` are the engine's."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error) or type(error).__name__)
        self.code = type(error).__name__


Prompts = list[tuple[str, list[int]]]
"""A request's sentences with their prompts' token ids."""

Delivered = tuple[torch.Tensor, int] | BaseException | None
"""What a stream holds: audio with the engine samples it stands for (backpressure counts
those), the error that ended it, or its end."""


class SpeechStream:
    """The audio of one request: float32 chunks at `sample_rate`, in order, read once.

    Iterate it (blocking) or `async for` it; either ends when the audio does and raises
    SynthesisError if generation failed. Stopping early (break, an exception, `cancel`) stops
    the generation.
    """

    def __init__(self, service: SpeechService, sample_rate: int = SAMPLE_RATE) -> None:
        self._service = service
        self.sample_rate = sample_rate
        self.job: Job | None = None
        self._items: deque[Delivered] = deque()
        self._lock = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready: asyncio.Event | None = None
        self._ended = False
        self.cancelled = False

    def cancel(self) -> None:
        """Stop generating; safe from any thread, and after the end. The engine thread drops
        the job at its next turn (`Scheduler.step` ends cancelled jobs first)."""
        if not self.cancelled and not self._ended:
            self.cancelled = True
            if self.job is not None:
                self.job.cancelled = True
            self._service._notify()

    def __iter__(self) -> Iterator[torch.Tensor]:
        try:
            while True:
                with self._lock:
                    while not self._items:
                        self._lock.wait()
                    item = self._items.popleft()
                if (chunk := self._taken(item)) is None:
                    return
                if len(chunk):
                    yield chunk
        finally:
            self.cancel()

    async def chunks(self) -> AsyncIterator[torch.Tensor]:
        """The chunks without blocking the event loop."""
        with self._lock:
            self._loop = asyncio.get_running_loop()
            self._ready = asyncio.Event()
        try:
            while True:
                with self._lock:
                    if not self._items:
                        self._ready.clear()
                        waiting = True
                    else:
                        item = self._items.popleft()
                        waiting = False
                if waiting:
                    await self._ready.wait()
                    continue
                if (chunk := self._taken(item)) is None:
                    return
                if len(chunk):
                    yield chunk
        finally:
            self.cancel()

    def __aiter__(self) -> AsyncIterator[torch.Tensor]:
        return self.chunks()

    def _taken(self, item: Delivered) -> torch.Tensor | None:
        """Account for a consumed item; None at the end."""
        if item is None:
            self._ended = True
            return None
        if isinstance(item, BaseException):
            self._ended = True
            raise SynthesisError(item)
        audio, samples = item
        job = self.job
        if job is not None and samples:
            job.consumed_samples += samples
            self._service._consumed(job, samples)
        return audio

    def _deliver(self, item: Delivered) -> None:
        """Engine thread: hand over an item."""
        with self._lock:
            self._items.append(item)
            self._lock.notify()
            loop, ready = self._loop, self._ready
        if loop is not None and ready is not None:
            try:
                loop.call_soon_threadsafe(ready.set)
            except RuntimeError:  # the consumer's loop is gone: nobody will read this
                self.cancel()


class SpeechService:
    """Owns the engine thread and one Scheduler per voice; `submit` from any thread or loop.

    Every voice is its own checkpoint, so its sentences batch only with its own; the engine
    thread gives each voice with work one step in turn.
    """

    engines: dict[str, SopranoTTS]
    _schedulers: dict[str, Scheduler]
    """Both made on the engine thread, before the constructor returns."""

    def __init__(
        self,
        engines: SopranoTTS | Callable[[], SopranoTTS] | Mapping[str, Callable[[], SopranoTTS]],
        limits: ServingLimits | None = None,
        default_voice: str | None = None,
    ) -> None:
        """`engines` is a loaded engine, or (better) a function that loads one, or a voice
        name → loader mapping: they are then loaded on the engine's own thread, which is then
        the only thread that ever runs the kernels' OpenMP work. Measured on 2 cores, a second
        thread team (the loading thread's) made every step about a third slower. Raises what
        loading raises."""
        loaders = dict(engines) if isinstance(engines, Mapping) else {SINGLE_VOICE: engines}
        if not loaders:
            raise ValueError("a speech service needs at least one voice")
        self.voices = tuple(loaders)
        self.default_voice = default_voice or self.voices[0]
        if self.default_voice not in loaders:
            raise ValueError(f"default voice {self.default_voice!r} is not one of the voices")
        self.limits = limits or ServingLimits()
        self._max_buffered_samples = int(self.limits.max_buffered_seconds * SAMPLE_RATE)
        self._inbox: list[tuple[SpeechStream, str, Prompts, AudioOptions, dict[str, Any]]] = []
        self._wake = threading.Condition()
        self._closed = False
        self._requests = 0
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            try:
                self.engines = {}
                self._schedulers = {}
                for name, load in loaders.items():
                    tts = load() if callable(load) else load
                    self.engines[name] = tts
                    self._schedulers[name] = Scheduler(
                        tts.lm,
                        tts.decoder,
                        self.limits.max_batch_size,
                        max_buffered_samples=self._max_buffered_samples,
                    )
            except BaseException as error:  # the caller re-raises it
                failure.append(error)
                return
            finally:
                ready.set()
            self._run()

        self._thread = threading.Thread(target=run, name="soprano-engine", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            raise failure[0]

    @property
    def tts(self) -> SopranoTTS:
        """The default voice's engine."""
        return self.engines[self.default_voice]

    @property
    def requests_in_progress(self) -> int:
        """Requests running or waiting."""
        with self._wake:
            return self._requests

    def submit(
        self,
        sentences: Sequence[str],
        sampling: SamplingParams | None = None,
        chunk_size: int = 1,
        max_chunk_size: int | None = DEFAULT_MAX_CHUNK_TOKENS,
        retries: int = 0,
        voice: str | None = None,
        audio: AudioOptions | None = None,
    ) -> SpeechStream:
        """Queue the sentences (from `soprano.text.prepare_text`) as one request, spoken by
        `voice` (default: the default voice), its audio shaped by `audio`.

        The first chunk holds `chunk_size` tokens, later ones grow to `max_chunk_size` (None:
        all `chunk_size`). Raises ValueError for parameters beyond the limits or an unknown
        voice, and ServerBusyError when the server is full.
        """
        voice = voice or self.default_voice
        if voice not in self.engines:
            raise ValueError(f"unknown voice {voice!r}; this server has {', '.join(self.voices)}")
        sampling = sampling or SamplingParams()
        if sampling.max_new_tokens > self.limits.max_new_tokens:
            raise ValueError(
                f"max_new_tokens must be at most {self.limits.max_new_tokens} on this server, "
                f"got {sampling.max_new_tokens}"
            )
        if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= 10:
            raise ValueError(f"retries must be an integer from 0 to 10, got {retries!r}")
        largest = max(chunk_size, max_chunk_size) if max_chunk_size is not None else None
        schedule = ChunkSchedule(chunk_size, largest)
        tokenizer = self.engines[voice].tokenizer
        prompts = [(text, tokenizer.encode(text)) for text in sentences]
        audio = audio or AudioOptions()
        stream = SpeechStream(self, audio.sample_rate)
        options = {
            "params": sampling,
            "schedule": schedule,
            "retries": retries,
            "speed": audio.effects.speed,
        }
        with self._wake:
            if self._closed:
                raise ServerBusyError("the server is shutting down")
            if self._requests >= self.limits.max_requests:
                raise ServerBusyError(
                    f"the server is busy with {self._requests} requests; try again shortly"
                )
            self._requests += 1
            self._inbox.append((stream, voice, prompts, audio, options))
            self._wake.notify()
        return stream

    def close(self) -> None:
        """Stop the engine thread; unfinished requests end (their streams just stop)."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join()

    def _notify(self) -> None:
        with self._wake:
            self._wake.notify()

    def _consumed(self, job: Job, samples: int) -> None:
        """Wake the engine if taking `samples` let a paused job run again."""
        limit = self._max_buffered_samples
        if job.buffered_samples < limit <= job.buffered_samples + samples:
            self._notify()

    def _run(self) -> None:
        schedulers = self._schedulers
        while True:
            with self._wake:
                while not self._closed and not self._inbox and not self._runnable():
                    self._wake.wait()
                if self._closed:
                    break
                inbox, self._inbox = self._inbox, []
            for stream, voice, prompts, audio, options in inbox:
                self._start(stream, schedulers[voice], prompts, audio, options)
            for name, scheduler in schedulers.items():
                if scheduler.runnable:
                    scheduler.step(self._allowance_beside(name))
        for scheduler in schedulers.values():
            for job in list(scheduler.jobs):
                scheduler.cancel(job)

    def _allowance_beside(self, voice: str) -> float:
        """The other voices' prefill allowance: their requests wait for this voice's step."""
        others = (s.prefill_allowance() for n, s in self._schedulers.items() if n != voice)
        return min(others, default=math.inf)

    def _runnable(self) -> bool:
        return any(scheduler.runnable for scheduler in self._schedulers.values())

    def _start(
        self,
        stream: SpeechStream,
        scheduler: Scheduler,
        prompts: Prompts,
        audio: AudioOptions,
        options: dict[str, Any],
    ) -> None:
        """Submit the job; its audio goes through `audio`'s effects here, on the engine thread,
        between steps (on a thread of its own, that work would take cores from the kernels'
        thread team in the middle of a step)."""
        shaper = None if audio.identity else AudioShaper(audio)

        def pause(silence: Pause) -> None:
            """Deliver a pause; its silence counts as audio the consumer has yet to take
            (backpressure), as if the engine had made it."""
            samples = round(silence.seconds * SAMPLE_RATE)
            job = stream.job
            if job is not None:
                job.add_silence(samples)
            stream._deliver((_tensor(silence.audio), samples if job is not None else 0))

        def deliver(item: torch.Tensor | SentenceEnd | BaseException | None) -> None:
            if isinstance(item, torch.Tensor):
                audio = item if shaper is None else _tensor(shaper.audio(item))
                stream._deliver((audio, len(item)))
            elif isinstance(item, SentenceEnd):
                if shaper is not None:
                    pause(shaper.sentence_end())
            else:
                if item is None and shaper is not None and not stream.cancelled:
                    pause(shaper.end())
                self._finished()
                stream._deliver(item)

        if shaper is not None:
            pause(shaper.start())

        stream.job = scheduler.submit(prompts, deliver=deliver, **options)
        if stream.cancelled:  # while it waited in the inbox
            stream.job.cancelled = True

    def _finished(self) -> None:
        with self._wake:
            self._requests -= 1


def _tensor(audio: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))
