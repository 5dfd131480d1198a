"""Continuous batching: many requests' sentences share every step of the LM and the decoder.

Each `step` picks up to `max_batch_size` sentences, advances each by one token in one forward of
the LM (a sentence that starts brings its prompt into that same forward), and decodes, in one
pass of the decoder, the streamed chunks that those tokens completed. Sentences join and leave
between any two steps; a sentence that is not picked keeps its KV cache and waits.

A step admits new sentences up to PREFILL_TOKENS_PER_STEP prompt tokens, so a burst of
requests starts over a few steps instead of stalling everyone in one long step.

Who gets a row (fairness): a request's sentences are spoken in order, so the sentence each
request is speaking now comes first, then the next sentence of each, and so on; between
requests at the same depth, the one served least so far goes first (a deficit round robin), so a
long text cannot starve a short one, and more requests than rows take turns. A request whose
consumer has not taken `max_buffered_samples` of its audio gets no rows until it does
(backpressure: a client that stops reading stops its generation).

Exactness: the rows of a step are computed independently of each other (soprano/cpu/csrc, and
`decode_streams`), and each sentence's chunks follow its own `ChunkSchedule`, never the load.
So under greedy decoding a sentence's audio is the same bits whatever shares its steps.

Not thread-safe: `SpeechService` drives it from its engine thread; `SopranoTTS.infer_stream`
drives one inline.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

from soprano.decoder import ChunkSchedule, SopranoDecoder, StreamingDecoder, decode_streams
from soprano.hallucination import looks_hallucinated, warn_cut
from soprano.lm import LanguageModel, SamplingParams, SequenceBatch, Step

_LOGGER = logging.getLogger(__name__)

PREFILL_TOKENS_PER_STEP = 192
"""Prompt tokens that may join one step (at least one prompt always does). A prompt's prefill is
compute-bound, about 0.8 ms a token on two cores, so a burst of new requests admitted all at
once would stall every running stream for a second; two typical prompts a step cost one
step's worth of audio at most, and the first requests of a burst start speaking sooner."""

JobEnd = None
"""Delivered after a job's last chunk."""


class SentenceEnd:
    """Delivered between the audio of two sentences of a job (where a pause may go)."""


SENTENCE_END = SentenceEnd()

Delivery = Callable[[torch.Tensor | SentenceEnd | BaseException | None], None]
"""Receives a job's audio chunks in order, with SENTENCE_END between sentences, then None, or
the exception that ended it."""


@dataclass
class _Sentence:
    text: str
    prompt: list[int]
    params: SamplingParams
    decoder: StreamingDecoder | None = None
    key: int | None = None
    """Its sequence in the LM batch once started."""
    held: list[torch.Tensor] = field(default_factory=list)
    """Audio not yet delivered: a later sentence waits for the ones before it."""
    frames: list[torch.Tensor] = field(default_factory=list)
    """Hidden states, kept only where retries must inspect the sentence."""
    attempts: int = 0
    done: bool = False
    released: bool = False
    """All its audio is delivered."""


class Job:
    """One request: sentences spoken in order as one stream of audio chunks."""

    def __init__(
        self,
        number: int,
        sentences: list[_Sentence],
        schedule: ChunkSchedule,
        retries: int,
        deliver: Delivery,
    ) -> None:
        self.number = number
        self.sentences = sentences
        self.schedule = schedule
        self.retries = retries
        self._deliver = deliver
        self.served_tokens = 0
        self.produced_samples = 0
        self.silence_samples = 0
        """Pauses added by the serving layer, counted in produced_samples for backpressure."""
        self.consumed_samples = 0
        """Written by the consumer's thread only (see `SpeechService`)."""
        self.cancelled = False
        self.finished = False
        self.paused = False
        """Held back: its consumer has not taken max_buffered_samples of its audio."""

    @property
    def buffered_samples(self) -> int:
        return self.produced_samples - self.consumed_samples

    def _send(self, item: torch.Tensor | SentenceEnd | BaseException | None) -> None:
        if isinstance(item, torch.Tensor):
            self.produced_samples += len(item)
        self._deliver(item)


class Scheduler:
    """Owns the LM batch and every job's decoding state; see the module docstring."""

    def __init__(
        self,
        lm: LanguageModel,
        decoder: SopranoDecoder,
        max_batch_size: int,
        max_buffered_samples: int | None = None,
        prefill_budget: int = PREFILL_TOKENS_PER_STEP,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.lm = lm
        self.decoder = decoder
        self.max_batch_size = max_batch_size
        self.max_buffered_samples = max_buffered_samples
        self.prefill_budget = prefill_budget
        self.jobs: list[Job] = []
        self._batch: SequenceBatch = lm.open_batch()
        self._numbers = itertools.count()

    def submit(
        self,
        sentences: Sequence[tuple[str, list[int]]],
        params: SamplingParams,
        schedule: ChunkSchedule,
        deliver: Delivery,
        retries: int = 0,
    ) -> Job:
        """Queue a request of (sentence, prompt) pairs; its audio goes to `deliver`.

        With `retries`, each sentence's audio is held until the sentence is done, and one that
        looks hallucinated is generated again (with the next seed) up to that many times.
        """
        job = Job(
            next(self._numbers),
            [_Sentence(text, prompt, params) for text, prompt in sentences],
            schedule,
            retries,
            deliver,
        )
        self.jobs.append(job)
        self._release(job)
        return job

    def cancel(self, job: Job) -> None:
        """Stop a job now: its rows leave the batch, its consumer gets the end of its stream.
        From another thread, set `job.cancelled` instead: the next `step` ends it."""
        job.cancelled = True
        if not job.finished:
            _LOGGER.debug("Stopped synthesis of request %d", job.number)
        self._drop(job, JobEnd)

    @property
    def runnable(self) -> bool:
        """Whether `step` has work: a cancelled job to end, or one that may take a row."""
        return any(job.cancelled or self._may_run(job) for job in self.jobs)

    def step(self) -> None:
        """Advance the chosen sentences by one token and deliver the audio they completed."""
        for job in [job for job in self.jobs if job.cancelled]:
            self.cancel(job)
        chosen = self._choose()
        for job, sentence in chosen:
            if sentence.key is None and not job.finished:
                try:
                    sentence.key = self._batch.add(sentence.prompt, sentence.params)
                except ValueError as error:
                    self._drop(job, error)
                    continue
                sentence.decoder = StreamingDecoder(
                    self.decoder, job.schedule.first, job.schedule.largest
                )
        chosen = [(job, sentence) for job, sentence in chosen if not job.finished]
        failed = self._advance(chosen)
        if failed is not None:
            # Something in the step failed: each request tries alone, so that only the one
            # that fails again ends (rows are independent, so this changes no bits).
            for job in dict.fromkeys(job for job, _ in chosen):
                failure = self._advance([row for row in chosen if row[0] is job])
                if failure is not None:
                    _LOGGER.error("Generation failed for a request: %s", failure)
                    self._drop(job, failure)
        for job in dict.fromkeys(job for job, _ in chosen):
            if not job.finished:
                self._release(job)

    def _advance(self, rows: list[tuple[Job, _Sentence]]) -> Exception | None:
        """One LM step and decoder pass for `rows`; the exception if it failed."""
        keys = [sentence.key for _, sentence in rows if sentence.key is not None]
        try:
            steps = self._batch.step(keys)
        except Exception as error:  # the step changed nothing: sequences advance after it
            _LOGGER.debug("A step of %d rows failed", len(keys), exc_info=True)
            return error
        try:
            self._decode(rows, steps)
        except Exception as error:  # their decoders' state is lost: end those requests
            _LOGGER.exception("Decoding failed")
            for job in dict.fromkeys(job for job, _ in rows):
                self._drop(job, error)
        return None

    def _may_run(self, job: Job) -> bool:
        if job.cancelled or job.finished:
            return False
        limit = self.max_buffered_samples
        held = limit is not None and job.buffered_samples >= limit
        if held != job.paused:
            job.paused = held
            _LOGGER.debug(
                "Request %d %s", job.number, "paused: its audio waits unread" if held else "resumed"
            )
        return not held

    def _choose(self) -> list[tuple[Job, _Sentence]]:
        """The rows of this step: by depth in their request, then least served first."""
        candidates = []
        for job in self.jobs:
            if not self._may_run(job):
                continue
            waiting = (s for s in job.sentences if not s.done)
            for depth, sentence in enumerate(waiting):
                candidates.append((depth, job.served_tokens, job.number, job, sentence))
        candidates.sort(key=lambda c: c[:3])
        chosen: list[tuple[Job, _Sentence]] = []
        prefill = 0
        for *_, job, sentence in candidates:
            if len(chosen) == self.max_batch_size:
                break
            if sentence.key is None:  # it starts: its prompt joins this step's forward
                if chosen and prefill + len(sentence.prompt) > self.prefill_budget:
                    continue
                prefill += len(sentence.prompt)
            chosen.append((job, sentence))
        for job, _ in chosen:
            job.served_tokens += 1
        return chosen

    def _decode(self, chosen: list[tuple[Job, _Sentence]], steps: list[Step]) -> None:
        """Feed each token's hidden state to its sentence's decoder; decode the due chunks of all
        sentences together."""
        streams, flushes, owners = [], [], []
        for (job, sentence), step in zip(chosen, steps, strict=True):
            decoder = sentence.decoder
            assert decoder is not None
            if step.is_audio:
                decoder.add(step.hidden)
                if job.retries:
                    sentence.frames.append(step.hidden)
            if step.last or decoder.due:
                streams.append(decoder)
                flushes.append(step.last)
                owners.append((job, sentence, step))
        for (job, sentence, step), chunk in zip(
            owners, decode_streams(streams, flushes), strict=True
        ):
            if len(chunk):
                sentence.held.append(chunk)
            if step.last:
                self._end_sentence(job, sentence, step)

    def _end_sentence(self, job: Job, sentence: _Sentence, step: Step) -> None:
        sentence.key = None
        if step.is_audio:
            warn_cut(sentence.text, sentence.params.max_new_tokens)
        retry = sentence.attempts < job.retries and sentence.frames
        if retry and looks_hallucinated(torch.stack(sentence.frames)):
            sentence.attempts += 1
            _LOGGER.info("Regenerating a hallucinated sentence, try %d", sentence.attempts)
            seed = sentence.params.seed
            if seed is not None:
                sentence.params = replace(sentence.params, seed=seed + 1)
            sentence.held.clear()
            sentence.frames.clear()
            return
        sentence.frames.clear()
        sentence.done = True

    def _release(self, job: Job) -> None:
        """Deliver the audio of the job's sentences in order; end the job after the last."""
        for sentence in job.sentences:
            if sentence.released:
                continue
            if job.retries and not sentence.done:
                return
            for chunk in sentence.held:
                job._send(chunk)
            sentence.held.clear()
            if not sentence.done:
                return
            sentence.released = True
            if sentence is not job.sentences[-1]:
                job._send(SENTENCE_END)
        self._drop(job, JobEnd)

    def _drop(self, job: Job, end: BaseException | None) -> None:
        if job.finished:
            return
        job.finished = True
        for sentence in job.sentences:
            if sentence.key is not None:
                self._batch.remove(sentence.key)
                sentence.key = None
        self.jobs.remove(job)
        job._send(end)
