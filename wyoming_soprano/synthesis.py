"""How every connection shares the one engine: a single inference thread that takes turns.

The engine is loaded once and is not thread-safe, and inference must never run on the event loop
(describe has to be answered within a second while others synthesize). So every engine call runs
on one worker thread. Each connection has a session: a queue of sentences, generated one after
the other with `infer_stream`. The worker advances the sessions round-robin, one audio chunk per
turn, so a new client gets its first audio after at most one chunk of each other active client,
instead of waiting behind whole texts as behind a lock or a FIFO queue.

A sentence at a time (not the whole text in one batch) has three reasons: the first audio comes
sooner (a batch of one steps fastest), the work per call is bounded however long the text, and a
streamed text, whose sentences arrive one by one, makes exactly the engine calls that the same
text sent in one `synthesize` makes, so the two give identical audio. (Batching changes the float
rounding of the LM slightly: a sentence generated inside a batch can differ from itself generated
alone by one PCM step.) Batching across clients would need an engine that admits new prompts into
a running batch; `infer_stream` fixes its batch when it starts.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator, Generator
from typing import TYPE_CHECKING

import torch

from soprano.audio import to_pcm16
from soprano.constants import SAMPLE_RATE, SAMPLE_WIDTH
from soprano.lm import SamplingParams

if TYPE_CHECKING:
    from soprano import SopranoTTS

_LOGGER = logging.getLogger(__name__)

MAX_BACKLOG_SECONDS = 60
"""Audio a session may have ready but not yet taken before it waits for its client."""
MAX_BACKLOG_BYTES = MAX_BACKLOG_SECONDS * SAMPLE_RATE * SAMPLE_WIDTH


class SynthesisError(Exception):
    """The engine failed on a request; the message is the engine's."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error) or type(error).__name__)
        self.code = type(error).__name__


class AudioJob:
    """One sentence. The worker thread produces its PCM; one coroutine consumes it."""

    def __init__(self, sentence: str, session: SynthesisSession) -> None:
        self.sentence = sentence
        self.session = session
        self._loop = asyncio.get_running_loop()
        self._pcm: asyncio.Queue[bytes | SynthesisError | None] = asyncio.Queue()
        self.cancelled = False
        self.generator: Generator[torch.Tensor, None, None] | None = None

    async def pcm_chunks(self) -> AsyncIterator[bytes]:
        """16-bit PCM in the order the engine yields it; raises SynthesisError on failure."""
        while (item := await self._pcm.get()) is not None:
            if isinstance(item, SynthesisError):
                raise item
            self.session.consumed(len(item))
            yield item

    def deliver(self, item: bytes | SynthesisError | None) -> bool:
        """Hand an item to the consumer (worker thread side); False once the loop is gone."""
        try:
            self._loop.call_soon_threadsafe(self._pcm.put_nowait, item)
        except RuntimeError:
            return False
        return True


class SynthesisSession:
    """One connection's sentences, generated in order; created by `Synthesizer.open_session`."""

    def __init__(self, synthesizer: Synthesizer) -> None:
        self._synthesizer = synthesizer
        self.jobs: deque[AudioJob] = deque()
        self.scheduled = False
        """In the worker's round or on the worker right now."""
        self.backlog = 0
        """Bytes produced but not yet taken by the consumer."""

    def submit(self, sentence: str) -> AudioJob:
        """Queue one sentence; its audio starts flowing once the sentences before it are done."""
        job = AudioJob(sentence, self)
        self._synthesizer.enqueue(self, job)
        return job

    def cancel(self) -> None:
        """Stop generating: each unfinished job is closed at its next turn, on the worker."""
        self._synthesizer.cancel(self)

    def consumed(self, size: int) -> None:
        self._synthesizer.consumed(self, size)


class Synthesizer:
    """Owns the engine and its worker thread; sessions are used from the event loop.

    A session whose consumer falls `max_backlog_bytes` behind (a client that stops reading)
    gets no turns until it catches up, so it can neither fill the memory nor hold the worker.
    """

    def __init__(
        self,
        tts: SopranoTTS,
        sampling: SamplingParams,
        chunk_size: int,
        max_backlog_bytes: int = MAX_BACKLOG_BYTES,
    ) -> None:
        self.tts = tts
        self.sampling = sampling
        self.chunk_size = chunk_size
        self.max_backlog_bytes = max_backlog_bytes
        self._turns: deque[SynthesisSession] = deque()
        self._busy: set[SynthesisSession] = set()
        """Sessions with unfinished jobs, whether scheduled or held back."""
        self._lock = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="soprano-inference")
        self._thread.start()

    def open_session(self) -> SynthesisSession:
        return SynthesisSession(self)

    def enqueue(self, session: SynthesisSession, job: AudioJob) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("the synthesizer is closed")
            session.jobs.append(job)
            self._busy.add(session)
            self._schedule(session)

    def cancel(self, session: SynthesisSession) -> None:
        with self._lock:
            for job in session.jobs:
                job.cancelled = True
            self._schedule(session)

    def consumed(self, session: SynthesisSession, size: int) -> None:
        with self._lock:
            session.backlog -= size
            self._schedule(session)

    def close(self) -> None:
        """Stop the worker after its current turn; unfinished jobs are closed, not completed."""
        with self._lock:
            self._closed = True
            self._lock.notify()
        self._thread.join()

    def _schedule(self, session: SynthesisSession) -> None:
        """Give the session a turn if it has work and room for more audio (lock held)."""
        if session.scheduled or not session.jobs:
            return
        if session.backlog >= self.max_backlog_bytes and not session.jobs[0].cancelled:
            return
        session.scheduled = True
        self._turns.append(session)
        self._lock.notify()

    def _work(self) -> None:
        while (session := self._next_turn()) is not None:
            job = session.jobs[0]
            done = self._advance(job)
            with self._lock:
                session.scheduled = False
                if done:
                    session.jobs.popleft()
                if not session.jobs:
                    self._busy.discard(session)
                self._schedule(session)
        self._close_remaining()

    def _next_turn(self) -> SynthesisSession | None:
        with self._lock:
            while not self._turns and not self._closed:
                self._lock.wait()
            return None if self._closed else self._turns.popleft()

    def _advance(self, job: AudioJob) -> bool:
        """Produce the job's next chunk; True when the job is over."""
        if job.cancelled:
            self._finish(job, None)
            return True
        try:
            if job.generator is None:
                job.generator = self._start(job.sentence)
            chunk = next(job.generator)
        except StopIteration:
            self._finish(job, None)
            return True
        except Exception as error:  # the engine's failure is reported to that client only
            _LOGGER.exception("Synthesis failed for %r", job.sentence)
            self._finish(job, SynthesisError(error))
            return True
        pcm = to_pcm16(chunk)
        with self._lock:
            job.session.backlog += len(pcm)
        if job.deliver(pcm):
            return False
        self._finish(job, None)
        return True

    def _start(self, sentence: str) -> Generator[torch.Tensor, None, None]:
        return self.tts.infer_stream(
            sentence,
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
                _LOGGER.debug("Stopped synthesis of %r", job.sentence)
        job.deliver(error)

    def _close_remaining(self) -> None:
        with self._lock:
            remaining = [job for session in self._busy for job in session.jobs]
            self._busy.clear()
            self._turns.clear()
        for job in remaining:
            job.cancelled = True
            self._finish(job, None)
