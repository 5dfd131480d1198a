"""Continuous batching: many requests' sentences share every step of the LM and the decoder.

Each `step` picks up to `max_batch_size` sentences, advances each by one token in one forward of
the LM (a sentence that starts brings its prompt into that same forward), and decodes, in one
pass of the decoder, the streamed chunks that those tokens completed. Sentences join and leave
between any two steps; a sentence that is not picked keeps its KV cache and waits.

Admission keeps playing streams playing: a sentence's prompt is prefilled in the step it starts,
and a step that carries prompts takes longer (prefill is compute-bound). So a step admits prompts
only as far as every request that is playing can afford: each is assumed to play its audio in
real time from its first chunk, and its next chunk must still arrive before the audio so far has
played out (`StepCosts` learns what a step and a prompt token cost here). While nobody is playing
(a burst of requests), every waiting prompt starts at once: nobody hears the prefill, and the
whole burst gets its first audio soonest. A request that has waited MAX_ADMISSION_WAIT starts
anyway.

Who gets a row (fairness): a request's sentences are spoken in order, so the sentence each
request is speaking now comes first, then the next sentence of each, and so on; between
requests at the same depth, the one served least so far goes first (a deficit round robin), so a
long text cannot starve a short one, and more requests than rows take turns. A request whose
consumer has not taken `max_buffered_samples` of its audio gets no rows until it does
(backpressure: a client that stops reading stops its generation). A request's later sentences
run ahead while it speaks, their audio held until their turn, only until that held audio and its
unread audio fill the same buffer; the sentence it is speaking never waits for them.

Exactness: the rows of a step are computed independently of each other (soprano/cpu/csrc, and
`decode_streams`), and each sentence's chunks follow its own `ChunkSchedule`, never the load.
So under greedy decoding a sentence's audio is the same bits whatever shares its steps.

Not thread-safe: `SpeechService` drives it from its engine thread; `SopranoTTS.infer_stream`
drives one inline.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

from soprano.constants import RECEPTIVE_FIELD, SAMPLE_RATE
from soprano.decoder import ChunkSchedule, SopranoDecoder, StreamingDecoder, decode_streams
from soprano.hallucination import looks_hallucinated, warn_cut
from soprano.lm import LanguageModel, SamplingParams, SequenceBatch, Step

_LOGGER = logging.getLogger(__name__)

MAX_ADMISSION_WAIT = 0.5
"""Seconds a request that has not started speaking waits at most for the playing requests to
afford its prefill. Then it starts anyway: on a machine at its limit their slack may never grow,
and one prefill's pause (70 ms for a typical prompt on 2 cores) is better than a new request
waiting as long as the running sentences last. Half a second: with 16 bf16 clients arriving 0.1 s
apart none ran dry, and their first audio p95 was 0.3–0.6 s (0.7–0.9 s with a 1 s bound)."""

COST_SMOOTHING = 0.25
"""Weight of the newest step in StepCosts' running averages: they follow a change of load within
a few steps, and one slow step (another process took a core) moves them only a quarter."""

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


@dataclass
class StepCosts:
    """What a step costs on this machine, learnt from the steps so far: the running rows' own
    step (one token each and the decoder chunks that fall due) and each prompt token that a
    starting sentence brings. None until measured."""

    step_seconds: float | None = None
    prompt_token_seconds: float | None = None

    def observe(self, prompt_tokens: int, running_rows: int, seconds: float) -> None:
        if not prompt_tokens:
            self.step_seconds = _average(self.step_seconds, seconds)
            return
        rows_seconds = (self.step_seconds or 0.0) if running_rows else 0.0
        per_token = max(0.0, seconds - rows_seconds) / prompt_tokens
        self.prompt_token_seconds = _average(self.prompt_token_seconds, per_token)

    def prefill_seconds(self, prompt_tokens: int) -> float:
        return prompt_tokens * (self.prompt_token_seconds or 0.0)


def _average(average: float | None, value: float) -> float:
    return value if average is None else average + COST_SMOOTHING * (value - average)


class Job:
    """One request: sentences spoken in order as one stream of audio chunks."""

    def __init__(
        self,
        number: int,
        sentences: list[_Sentence],
        schedule: ChunkSchedule,
        retries: int,
        deliver: Delivery,
        clock: Callable[[], float],
        speed: float = 1.0,
    ) -> None:
        self.number = number
        self.sentences = sentences
        self.schedule = schedule
        self.retries = retries
        self._deliver = deliver
        self._clock = clock
        self.speed = speed
        """How fast its consumer plays the engine's audio (effects may stretch it)."""
        self.submitted_at = clock()
        self.playing_since: float | None = None
        """When its first audio was delivered: a listener is assumed to play from then on."""
        self.played_seconds = 0.0
        """Playing time of the audio delivered so far."""
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
    def held_samples(self) -> int:
        """Made but not yet delivered: later sentences wait for the ones before them."""
        return sum(len(chunk) for sentence in self.sentences for chunk in sentence.held)

    @property
    def buffered_samples(self) -> int:
        """Delivered and not yet taken by the consumer."""
        return self.produced_samples - self.consumed_samples

    def slack(self, now: float) -> float | None:
        """Seconds until a listener who plays in real time has heard everything delivered;
        None before the first audio."""
        if self.playing_since is None:
            return None
        return self.playing_since + self.played_seconds - now

    def add_silence(self, samples: int) -> None:
        """Count a pause of `samples` engine samples that the serving layer delivered itself: it
        plays like audio and counts toward backpressure."""
        self._produced(samples, samples / SAMPLE_RATE)
        self.silence_samples += samples

    def _produced(self, samples: int, seconds: float) -> None:
        if self.playing_since is None:
            self.playing_since = self._clock()
        self.produced_samples += samples
        self.played_seconds += seconds

    def _send(self, item: torch.Tensor | SentenceEnd | BaseException | None) -> None:
        if isinstance(item, torch.Tensor) and len(item):
            self._produced(len(item), len(item) / (SAMPLE_RATE * self.speed))
        self._deliver(item)

    def steps_to_next_chunk(self) -> int:
        """Steps until the sentence it is speaking delivers its next chunk (a sentence that has
        yet to start needs its first chunk's tokens; one held for retries is taken as ready
        at its next chunk too)."""
        for sentence in self.sentences:
            if sentence.released:
                continue
            if sentence.key is None or sentence.decoder is None:
                return RECEPTIVE_FIELD + self.schedule.first
            return max(1, sentence.decoder.frames_until_due)
        return 0


class Scheduler:
    """Owns the LM batch and every job's decoding state; see the module docstring."""

    def __init__(
        self,
        lm: LanguageModel,
        decoder: SopranoDecoder,
        max_batch_size: int,
        max_buffered_samples: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.lm = lm
        self.decoder = decoder
        self.max_batch_size = max_batch_size
        self.max_buffered_samples = max_buffered_samples
        self.clock = clock
        self.costs = StepCosts()
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
        speed: float = 1.0,
    ) -> Job:
        """Queue a request of (sentence, prompt) pairs; its audio goes to `deliver`, to be
        played at `speed`.

        With `retries`, each sentence's audio is held until the sentence is done, and one that
        looks hallucinated is generated again (with the next seed) up to that many times.
        """
        job = Job(
            next(self._numbers),
            [_Sentence(text, prompt, params) for text, prompt in sentences],
            schedule,
            retries,
            deliver,
            self.clock,
            speed,
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

    def prefill_allowance(self) -> float:
        """Seconds that prompts may add to the next step before a playing request would run
        dry: each must get its next chunk, `steps_to_next_chunk` steps away, before its audio
        so far has played out. Unbounded while nobody plays. A request already behind (its
        listener would have run dry, or its reader lags) has nothing left to keep and does not
        count; one paused for backpressure has audio enough."""
        now = self.clock()
        step_seconds = self.costs.step_seconds or 0.0
        allowance = math.inf
        for job in self.jobs:
            slack = job.slack(now)
            if slack is None or slack <= 0 or job.paused:
                continue
            allowance = min(allowance, slack - job.steps_to_next_chunk() * step_seconds)
        return allowance

    def step(self, allowance_elsewhere: float = math.inf) -> None:
        """Advance the chosen sentences by one token and deliver the audio they completed.

        `allowance_elsewhere`: the prefill allowance of other work that waits for this step
        (another voice's requests on the same engine thread).
        """
        started = self.clock()
        for job in [job for job in self.jobs if job.cancelled]:
            self.cancel(job)
        chosen = self._choose(min(self.prefill_allowance(), allowance_elsewhere), started)
        starting = [sentence for _, sentence in chosen if sentence.key is None]
        prompt_tokens = sum(len(sentence.prompt) for sentence in starting)
        running_rows = len(chosen) - len(starting)
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
        if chosen and failed is None:
            self.costs.observe(prompt_tokens, running_rows, self.clock() - started)

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

    def _ran_ahead(self, job: Job) -> bool:
        """Whether the audio of its later sentences, held until their turn, and its unread audio
        fill the buffer: then only the sentence it is speaking may go on (held audio counts,
        so sentences cannot run ahead without bound; it never stops the sentence the consumer
        waits for)."""
        limit = self.max_buffered_samples
        return limit is not None and job.buffered_samples + job.held_samples >= limit

    def _choose(self, allowance: float, now: float) -> list[tuple[Job, _Sentence]]:
        """The rows of this step: by depth in their request, then least served first; prompts
        within `allowance` seconds of prefill, and those of requests that have waited
        MAX_ADMISSION_WAIT (and the first waiting one anyway if nothing else would run)."""
        candidates = []
        for job in self.jobs:
            if not self._may_run(job):
                continue
            unfinished = [s for s in job.sentences if not s.done]
            if self._ran_ahead(job):
                unfinished = unfinished[:1]
            for depth, sentence in enumerate(unfinished):
                candidates.append((depth, job.served_tokens, job.number, job, sentence))
        candidates.sort(key=lambda c: c[:3])
        chosen: list[tuple[Job, _Sentence]] = []
        first_waiting: tuple[Job, _Sentence] | None = None
        prefill = 0
        for *_, job, sentence in candidates:
            if len(chosen) == self.max_batch_size:
                break
            if sentence.key is None:  # it starts: its prompt joins this step's forward
                tokens = prefill + len(sentence.prompt)
                overdue = job.playing_since is None and now - job.submitted_at >= MAX_ADMISSION_WAIT
                if not overdue and self.costs.prefill_seconds(tokens) > allowance:
                    first_waiting = first_waiting or (job, sentence)
                    continue
                prefill = tokens
            chosen.append((job, sentence))
        if not chosen and first_waiting is not None:
            chosen.append(first_waiting)
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
