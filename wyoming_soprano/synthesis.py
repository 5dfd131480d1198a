"""How every connection shares the one engine: a single inference thread that takes turns.

The engine is loaded once and is not thread-safe, and inference must never run on the event loop
(describe has to be answered within a second while others synthesize). So all engine calls run on
one worker thread. Each request is an `infer_stream` generator; the worker advances the active
generators round-robin, one audio chunk per turn. A new request therefore gets its first audio
after at most one chunk of every other active request, instead of waiting behind whole texts as
it would behind a lock or a FIFO queue. Cross-request batching would need an engine that admits
new prompts into a running batch; `infer_stream` fixes its batch when it starts.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING

import torch

from soprano.audio import to_pcm16
from soprano.lm import SamplingParams

if TYPE_CHECKING:
    from soprano import SopranoTTS

_LOGGER = logging.getLogger(__name__)


class SynthesisError(Exception):
    """The engine failed on a request; the message is the engine's."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error) or type(error).__name__)
        self.code = type(error).__name__


class AudioJob:
    """One engine call. The worker thread produces its PCM; one coroutine consumes it."""

    def __init__(self, text: str, loop: asyncio.AbstractEventLoop) -> None:
        self.text = text
        self._loop = loop
        self._pcm: asyncio.Queue[bytes | SynthesisError | None] = asyncio.Queue()
        self._cancelled = False
        self.generator: Iterator[torch.Tensor] | None = None

    def cancel(self) -> None:
        """Stop generating; the worker closes the generator at the job's next turn."""
        self._cancelled = True

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    async def pcm_chunks(self) -> AsyncIterator[bytes]:
        """16-bit PCM in the order the engine yields it; raises SynthesisError on failure."""
        while (item := await self._pcm.get()) is not None:
            if isinstance(item, SynthesisError):
                raise item
            yield item

    def deliver(self, item: bytes | SynthesisError | None) -> bool:
        """Hand an item to the consumer (worker thread side); False once the loop is gone."""
        try:
            self._loop.call_soon_threadsafe(self._pcm.put_nowait, item)
        except RuntimeError:
            return False
        return True


class Synthesizer:
    """Owns the engine and its worker thread; `submit` is called from the event loop."""

    def __init__(self, tts: SopranoTTS, sampling: SamplingParams, chunk_size: int) -> None:
        self.tts = tts
        self.sampling = sampling
        self.chunk_size = chunk_size
        self._turns: deque[AudioJob] = deque()
        self._wakeup = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="soprano-inference")
        self._thread.start()

    def submit(self, text: str) -> AudioJob:
        """Queue `text` for synthesis; its audio starts flowing at the job's first turn."""
        job = AudioJob(text, asyncio.get_running_loop())
        with self._wakeup:
            if self._closed:
                raise RuntimeError("the synthesizer is closed")
            self._turns.append(job)
            self._wakeup.notify()
        return job

    def close(self) -> None:
        """Stop the worker after its current turn; unfinished jobs are closed, not completed."""
        with self._wakeup:
            self._closed = True
            self._wakeup.notify()
        self._thread.join()

    def _work(self) -> None:
        while (job := self._next_turn()) is not None:
            if job.cancelled:
                self._finish(job, None)
                continue
            try:
                if job.generator is None:
                    job.generator = self._start(job.text)
                chunk = next(job.generator)
            except StopIteration:
                self._finish(job, None)
                continue
            except Exception as error:  # the engine's failure is reported to that client only
                _LOGGER.exception("Synthesis failed for %r", job.text)
                self._finish(job, SynthesisError(error))
                continue
            if job.deliver(to_pcm16(chunk)):
                with self._wakeup:
                    self._turns.append(job)
            else:
                self._finish(job, None)
        self._close_remaining()

    def _next_turn(self) -> AudioJob | None:
        with self._wakeup:
            while not self._turns and not self._closed:
                self._wakeup.wait()
            if self._closed:
                return None
            return self._turns.popleft()

    def _start(self, text: str) -> Iterator[torch.Tensor]:
        return self.tts.infer_stream(
            text,
            chunk_size=self.chunk_size,
            temperature=self.sampling.temperature,
            top_p=self.sampling.top_p,
            repetition_penalty=self.sampling.repetition_penalty,
            seed=self.sampling.seed,
            max_new_tokens=self.sampling.max_new_tokens,
        )

    def _finish(self, job: AudioJob, error: SynthesisError | None) -> None:
        """Close the generator here, on the engine's thread, and end the consumer's stream."""
        if job.generator is not None:
            job.generator.close()
            job.generator = None
        if job.cancelled:
            _LOGGER.debug("Stopped synthesis of %r", job.text)
        job.deliver(error)

    def _close_remaining(self) -> None:
        with self._wakeup:
            remaining = list(self._turns)
            self._turns.clear()
        for job in remaining:
            job.cancel()
            self._finish(job, None)
