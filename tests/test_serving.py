"""The serving layer: continuous batching that is exact, fair, bounded and isolated.

Greedy decoding on a checkpoint that never says [STOP], so every sentence has a known length and
equal inputs must give equal bits. The Scheduler is driven step by step here, so the tests decide
exactly when requests join, leave and read; `SpeechService` runs it on its own thread.

With the compiled kernels a request's audio is the same bytes whatever shares its batch. Their
PyTorch fallback (script/test-no-kernels) multiplies with GEMMs whose rounding depends on the
batch's shape, so there the audio is compared within PYTORCH_TOLERANCE instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from soprano import SopranoTTS
from soprano.audio import AudioEffects, AudioOptions, to_pcm16
from soprano.constants import SAMPLE_RATE, TOKEN_SAMPLES
from soprano.decoder import ChunkSchedule
from soprano.lm import SamplingParams, SequenceBatch, Step
from soprano.serving import (
    DEFAULT_MAX_CHUNK_TOKENS,
    ServerBusyError,
    ServingLimits,
    SpeechService,
    SynthesisError,
)
from soprano.serving.scheduler import MAX_ADMISSION_WAIT, Scheduler, SentenceEnd
from soprano.text import prepare_text

TOKENS = 24
GREEDY = SamplingParams(max_new_tokens=TOKENS)
SCHEDULE = ChunkSchedule(1, 8)
SENTENCE = "The sentence whose audio must not depend on its neighbours."
OTHERS = [f"Another request, number {n}, shares the batch for a while." for n in range(15)]


PYTORCH_TOLERANCE = 2
"""PCM steps (of 32767) a sample may move on the PyTorch path when its batch changes."""


@pytest.fixture(scope="module")
def tts(endless_checkpoint: Path) -> SopranoTTS:
    return SopranoTTS(device="cpu", model_path=endless_checkpoint)


@pytest.fixture(scope="module")
def int8_tts(endless_checkpoint: Path) -> SopranoTTS:
    """dtype 'int8' (LM and decoder on int8 panels): lossy, and just as batch-invariant."""
    return SopranoTTS(
        device="cpu", model_path=endless_checkpoint, backend_options={"dtype": "int8"}
    )


def assert_same_audio(tts: SopranoTTS, actual: bytes, expected: bytes) -> None:
    """Byte for byte on the compiled kernels; within PYTORCH_TOLERANCE on the PyTorch path."""
    if getattr(tts.lm, "model", None) is not None and tts.lm.model.compiled is not None:
        assert actual == expected
        return
    assert len(actual) == len(expected)
    difference = np.abs(
        np.frombuffer(actual, "<i2").astype(np.int32) - np.frombuffer(expected, "<i2")
    )
    assert difference.max(initial=0) <= PYTORCH_TOLERANCE


class Received:
    """What a job delivered: its chunks (and, given a clock, when), and how it ended."""

    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        self.clock = clock
        self.arrivals: list[float] = []
        self.chunks: list[torch.Tensor] = []
        self.sentence_ends: list[int] = []
        """Samples delivered before each SENTENCE_END."""
        self.ended = False
        self.error: BaseException | None = None

    def __call__(self, item: torch.Tensor | SentenceEnd | BaseException | None) -> None:
        if isinstance(item, torch.Tensor):
            self.chunks.append(item)
            if self.clock is not None:
                self.arrivals.append(self.clock())
        elif isinstance(item, SentenceEnd):
            self.sentence_ends.append(sum(len(chunk) for chunk in self.chunks))
        elif item is None:
            self.ended = True
        else:
            self.error = item

    @property
    def pcm(self) -> bytes:
        return to_pcm16(torch.cat(self.chunks)) if self.chunks else b""

    @property
    def ran_dry(self) -> bool:
        """Whether a listener who plays from the first chunk on would have waited for one."""
        played_out = self.arrivals[0]
        for arrived, chunk in zip(self.arrivals, self.chunks, strict=True):
            if arrived > played_out:
                return True
            played_out += len(chunk) / SAMPLE_RATE
        return False


def submit(scheduler: Scheduler, tts: SopranoTTS, text: str, **options: object) -> Received:
    received = Received(scheduler.clock)
    sentences = [(s, tts.tokenizer.encode(s)) for s in prepare_text(text)]
    params = options.pop("params", GREEDY)
    scheduler.submit(sentences, params, SCHEDULE, received, **options)  # type: ignore[arg-type]
    return received


def run(scheduler: Scheduler) -> None:
    while scheduler.runnable:
        scheduler.step()


def solo(tts: SopranoTTS, text: str) -> bytes:
    scheduler = Scheduler(tts.lm, tts.decoder, max_batch_size=16)
    received = submit(scheduler, tts, text)
    run(scheduler)
    return received.pcm


@pytest.mark.parametrize(
    ("engine", "neighbours"), [("tts", 1), ("tts", 3), ("tts", 15), ("int8_tts", 3)]
)
def test_a_request_gets_the_same_bytes_whatever_shares_its_batch(
    request: pytest.FixtureRequest, engine: str, neighbours: int
) -> None:
    tts: SopranoTTS = request.getfixturevalue(engine)
    alone = solo(tts, SENTENCE)
    assert len(alone) == 2 * 2048 * (TOKENS - 1)
    scheduler = Scheduler(tts.lm, tts.decoder, max_batch_size=16)
    others = [submit(scheduler, tts, OTHERS[0])]
    for _ in range(3):
        scheduler.step()
    watched = submit(scheduler, tts, SENTENCE)  # joins a running batch
    for text in OTHERS[1:neighbours]:  # and others join at later steps
        scheduler.step()
        others.append(submit(scheduler, tts, text))
    run(scheduler)
    assert watched.ended
    assert_same_audio(tts, watched.pcm, alone)
    for other, text in zip(others, OTHERS[:neighbours], strict=True):
        assert_same_audio(tts, other.pcm, solo(tts, text))


def test_infer_stream_gives_what_the_server_gives(tts: SopranoTTS) -> None:
    streamed = tts.infer_stream(SENTENCE, 1, max_chunk_size=8, sampling=GREEDY)
    assert_same_audio(tts, to_pcm16(torch.cat(list(streamed))), solo(tts, SENTENCE))


def test_a_request_joins_mid_run_and_is_heard_before_the_first_ends(tts: SopranoTTS) -> None:
    scheduler = Scheduler(tts.lm, tts.decoder, max_batch_size=16)
    first = submit(scheduler, tts, SENTENCE)
    for _ in range(8):
        scheduler.step()
    late = submit(scheduler, tts, OTHERS[0])
    while not late.chunks:
        scheduler.step()
    assert not first.ended
    run(scheduler)
    assert first.ended and late.ended


def test_cancelling_a_request_mid_batch_frees_it_and_spares_the_others(tts: SopranoTTS) -> None:
    scheduler = Scheduler(tts.lm, tts.decoder, max_batch_size=16)
    doomed = submit(scheduler, tts, OTHERS[0])
    kept = submit(scheduler, tts, SENTENCE)
    for _ in range(10):
        scheduler.step()
    job = scheduler.jobs[0]
    scheduler.cancel(job)
    assert doomed.ended and job not in scheduler.jobs
    made = len(doomed.chunks)
    run(scheduler)
    assert len(doomed.chunks) == made
    assert_same_audio(tts, kept.pcm, solo(tts, SENTENCE))


def test_a_short_request_finishes_while_a_long_one_runs(tts: SopranoTTS) -> None:
    scheduler = Scheduler(tts.lm, tts.decoder, max_batch_size=2)
    long_text = " ".join(OTHERS[:6])
    long = submit(scheduler, tts, long_text)
    for _ in range(5):
        scheduler.step()
    short = submit(scheduler, tts, SENTENCE)
    while not short.ended:
        scheduler.step()
    assert not long.ended, "the long text did not hold the short one back"
    run(scheduler)
    assert long.ended
    assert_same_audio(tts, short.pcm, solo(tts, SENTENCE))


def test_more_requests_than_rows_take_turns(tts: SopranoTTS) -> None:
    scheduler = Scheduler(tts.lm, tts.decoder, max_batch_size=2)
    received = [submit(scheduler, tts, text) for text in OTHERS[:4]]
    for _ in range(12):
        scheduler.step()
    assert all(r.chunks for r in received), "every request was served within a few steps"
    run(scheduler)
    for reply, text in zip(received, OTHERS[:4], strict=True):
        assert_same_audio(tts, reply.pcm, solo(tts, text))


def test_a_request_nobody_reads_pauses_while_others_go_on(tts: SopranoTTS) -> None:
    limit = 3 * 2048
    scheduler = Scheduler(tts.lm, tts.decoder, max_batch_size=16, max_buffered_samples=limit)
    unread = submit(scheduler, tts, OTHERS[0])
    read = submit(scheduler, tts, SENTENCE)
    unread_job, read_job = scheduler.jobs
    while not read.ended:
        scheduler.step()
        read_job.consumed_samples = read_job.produced_samples
    paused_at = unread_job.produced_samples
    assert limit <= paused_at < limit + 8 * 2048, "it stopped one chunk past its limit"
    for _ in range(5):
        scheduler.step()
    assert unread_job.produced_samples == paused_at and not scheduler.runnable
    unread_job.consumed_samples = unread_job.produced_samples
    while scheduler.runnable:
        scheduler.step()
        unread_job.consumed_samples = unread_job.produced_samples
    assert_same_audio(tts, unread.pcm, solo(tts, OTHERS[0]))  # reading again resumes it
    assert_same_audio(tts, read.pcm, solo(tts, SENTENCE))


def test_later_sentences_run_ahead_only_as_far_as_the_buffer(tts: SopranoTTS) -> None:
    """A reader that takes every chunk at once: the later sentences, whose audio waits for the
    first one's end, stop once that held audio fills the buffer (instead of all of their 23
    tokens each), and never stall the sentence being spoken."""
    limit = 6 * TOKEN_SAMPLES
    largest_chunk = SCHEDULE.largest * TOKEN_SAMPLES
    scheduler = Scheduler(tts.lm, tts.decoder, max_batch_size=16, max_buffered_samples=limit)
    text = " ".join(OTHERS[:3])
    received = submit(scheduler, tts, text)
    (job,) = scheduler.jobs
    most_held = 0
    for _ in range(3 * TOKENS):
        if received.ended:
            break
        scheduler.step()
        job.consumed_samples = job.produced_samples
        most_held = max(most_held, job.held_samples)
    assert received.ended
    assert limit <= most_held <= limit + 2 * largest_chunk < 2 * (TOKENS - 1) * TOKEN_SAMPLES
    assert_same_audio(tts, received.pcm, solo(tts, text))


class PoisonedBatch(SequenceBatch):
    """The real batch, failing every step that holds the poisoned prompt."""

    def __init__(self, inner: SequenceBatch, poison: list[int]) -> None:
        self.inner = inner
        self.poison = poison
        self.poisoned: set[int] = set()

    def add(self, prompt: Sequence[int], params: SamplingParams) -> int:
        key = self.inner.add(prompt, params)
        if list(prompt) == self.poison:
            self.poisoned.add(key)
        return key

    def step(self, keys: Sequence[int]) -> list[Step]:
        if self.poisoned & set(keys):
            raise RuntimeError("the model fell over")
        return self.inner.step(keys)

    def remove(self, key: int) -> None:
        self.inner.remove(key)


def test_a_failure_ends_only_its_own_request(tts: SopranoTTS) -> None:
    failing = "This sentence makes the engine fail, sadly."
    scheduler = Scheduler(tts.lm, tts.decoder, max_batch_size=16)
    (prompt,) = [tts.tokenizer.encode(s) for s in prepare_text(failing)]
    scheduler._batch = PoisonedBatch(scheduler._batch, prompt)
    healthy = submit(scheduler, tts, SENTENCE)
    for _ in range(4):
        scheduler.step()
    broken = submit(scheduler, tts, failing)
    run(scheduler)
    assert isinstance(broken.error, RuntimeError) and not broken.chunks
    assert healthy.ended
    assert_same_audio(tts, healthy.pcm, solo(tts, SENTENCE))


def test_retries_hold_each_sentence_until_it_is_final(tts: SopranoTTS) -> None:
    scheduler = Scheduler(tts.lm, tts.decoder, max_batch_size=16)
    received = submit(scheduler, tts, SENTENCE, retries=2)
    scheduler.step()
    for _ in range(TOKENS - 2):
        scheduler.step()
        assert not received.chunks, "no audio before the sentence is known to be good"
    run(scheduler)
    assert_same_audio(tts, received.pcm, solo(tts, SENTENCE))


def test_the_service_streams_to_threads_and_event_loops(tts: SopranoTTS) -> None:
    service = SpeechService(tts, ServingLimits(max_requests=3))
    try:
        blocking = service.submit(prepare_text(SENTENCE), GREEDY)
        pcm = to_pcm16(torch.cat(list(blocking)))

        async def read() -> bytes:
            chunks = [chunk async for chunk in service.submit(prepare_text(SENTENCE), GREEDY)]
            return to_pcm16(torch.cat(chunks))

        assert asyncio.run(read()) == pcm  # the same request, served the same way
        assert_same_audio(tts, pcm, solo(tts, SENTENCE))
        with pytest.raises(ValueError, match="max_new_tokens must be at most 1024"):
            service.submit(["too long."], SamplingParams(max_new_tokens=5000))
    finally:
        service.close()


def test_the_service_refuses_work_past_its_limit_and_frees_cancelled_requests(
    tts: SopranoTTS,
) -> None:
    service = SpeechService(tts, ServingLimits(max_requests=2))
    try:
        streams = [service.submit(prepare_text(t), GREEDY) for t in OTHERS[:2]]
        with pytest.raises(ServerBusyError, match="busy"):
            service.submit(prepare_text(SENTENCE), GREEDY)
        for stream in streams:
            stream.cancel()
        for stream in streams:  # a cancelled stream ends for its reader too
            list(stream)
        assert service.requests_in_progress == 0
        again = torch.cat(list(service.submit(prepare_text(SENTENCE), GREEDY)))
        assert_same_audio(tts, to_pcm16(again), solo(tts, SENTENCE))
    finally:
        service.close()


def test_a_failed_request_raises_in_its_reader(tts: SopranoTTS) -> None:
    service = SpeechService(tts)
    failing = "This sentence makes the engine fail, sadly."
    (prompt,) = [tts.tokenizer.encode(s) for s in prepare_text(failing)]
    scheduler = service._schedulers[service.default_voice]
    scheduler._batch = PoisonedBatch(scheduler._batch, prompt)
    try:
        with pytest.raises(SynthesisError, match="fell over") as failure:
            list(service.submit(prepare_text(failing), GREEDY))
        assert failure.value.code == "RuntimeError"
    finally:
        service.close()


def test_a_burst_of_requests_starts_in_one_step_while_nobody_plays(tts: SopranoTTS) -> None:
    scheduler = Scheduler(tts.lm, tts.decoder, max_batch_size=16)
    burst = [submit(scheduler, tts, text) for text in OTHERS[:4]]
    scheduler.step()
    assert [job.served_tokens for job in scheduler.jobs] == [1, 1, 1, 1]
    run(scheduler)
    for received, text in zip(burst, OTHERS[:4], strict=True):
        assert_same_audio(tts, received.pcm, solo(tts, text))


class SimulatedClock:
    """Time that passes only as a TimedBatch computes, so that a test decides what steps cost."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class TimedBatch(SequenceBatch):
    """The real batch on a simulated machine: a step takes `step_seconds`, and
    `prompt_token_seconds` more for each prompt token it prefills."""

    def __init__(
        self,
        inner: SequenceBatch,
        clock: SimulatedClock,
        step_seconds: float,
        prompt_token_seconds: float,
    ) -> None:
        self.inner = inner
        self.clock = clock
        self.step_seconds = step_seconds
        self.prompt_token_seconds = prompt_token_seconds
        self.prompt_tokens = 0

    def add(self, prompt: Sequence[int], params: SamplingParams) -> int:
        self.prompt_tokens += len(prompt)
        return self.inner.add(prompt, params)

    def step(self, keys: Sequence[int]) -> list[Step]:
        self.clock.now += self.step_seconds + self.prompt_tokens * self.prompt_token_seconds
        self.prompt_tokens = 0
        return self.inner.step(keys)

    def remove(self, key: int) -> None:
        self.inner.remove(key)


def simulated_scheduler(
    tts: SopranoTTS, step_seconds: float = 0.005, prompt_token_seconds: float = 0.002
) -> Scheduler:
    """By default steps of 5 ms, and 2 ms a prompt token: a prompt's prefill (about 60 tokens)
    takes longer than the first chunk (one token, 64 ms) plays."""
    clock = SimulatedClock()
    scheduler = Scheduler(tts.lm, tts.decoder, max_batch_size=16, clock=clock)
    scheduler._batch = TimedBatch(scheduler._batch, clock, step_seconds, prompt_token_seconds)
    return scheduler


def test_a_prompt_waits_until_the_playing_streams_can_afford_its_prefill(
    tts: SopranoTTS,
) -> None:
    scheduler = simulated_scheduler(tts)
    playing = submit(scheduler, tts, SENTENCE)
    while not playing.chunks:
        scheduler.step()
    late = submit(scheduler, tts, OTHERS[0])
    scheduler.step()
    assert scheduler.jobs[-1].served_tokens == 0, "its prefill would outlast the audio sent"
    while not late.chunks:
        scheduler.step()
    assert not playing.ended, "it starts while the first request still speaks"
    run(scheduler)
    assert not playing.ran_dry and not late.ran_dry
    assert_same_audio(tts, playing.pcm, solo(tts, SENTENCE))
    assert_same_audio(tts, late.pcm, solo(tts, OTHERS[0]))


def test_a_request_that_waited_long_enough_starts_anyway(tts: SopranoTTS) -> None:
    """A prefill of seconds (50 ms a prompt token): the playing request's slack would pay for it
    only after about as long, so the new one starts after MAX_ADMISSION_WAIT instead."""
    step_seconds = 0.03
    scheduler = simulated_scheduler(tts, step_seconds, prompt_token_seconds=0.05)
    long_sentence = replace(GREEDY, max_new_tokens=3 * TOKENS)
    playing = submit(scheduler, tts, SENTENCE, params=long_sentence)
    while not playing.chunks:
        scheduler.step()
    submit(scheduler, tts, OTHERS[0])
    late_job = scheduler.jobs[-1]
    submitted = scheduler.clock()
    while late_job.served_tokens == 0:
        before_step = scheduler.clock()
        scheduler.step()
    waited = before_step - submitted
    assert MAX_ADMISSION_WAIT <= waited < MAX_ADMISSION_WAIT + step_seconds + 1e-9
    assert not playing.ended
    run(scheduler)


def test_a_prompt_waits_for_work_elsewhere_unless_nothing_else_would_run(
    tts: SopranoTTS,
) -> None:
    """`allowance_elsewhere` (another voice's playing requests) holds prompts back like this
    scheduler's own, but never stalls a scheduler that has nothing else to run."""
    scheduler = simulated_scheduler(tts)
    first = submit(scheduler, tts, SENTENCE)
    scheduler.step(allowance_elsewhere=0.0)
    assert scheduler.jobs[0].served_tokens == 1, "nothing else would run: it starts anyway"
    second = submit(scheduler, tts, OTHERS[0])
    scheduler.step(allowance_elsewhere=0.0)
    assert scheduler.jobs[1].served_tokens == 0
    scheduler.step()
    assert scheduler.jobs[1].served_tokens == 1, "nothing plays here: it starts"
    run(scheduler)
    assert_same_audio(tts, first.pcm, solo(tts, SENTENCE))
    assert_same_audio(tts, second.pcm, solo(tts, OTHERS[0]))


def test_a_request_for_a_voice_the_service_lacks_is_refused(tts: SopranoTTS) -> None:
    service = SpeechService({"anna": tts}, default_voice="anna")
    try:
        with pytest.raises(ValueError, match="unknown voice 'bob'; this server has anna"):
            service.submit(prepare_text(OTHERS[0]), GREEDY, voice="bob")
        assert service.requests_in_progress == 0
    finally:
        service.close()


def test_pauses_count_as_buffered_audio_and_the_stream_equals_the_shaped_engine_stream(
    tts: SopranoTTS,
) -> None:
    """Two 5 s pauses against a 1 s buffer: the job pauses at each and resumes as the reader
    takes the silence (were pauses not counted when taken, it would never resume)."""
    text = " ".join(OTHERS[:3])
    audio = AudioOptions(AudioEffects(speed=1.5, sample_rate=24_000), sentence_silence=5.0)
    service = SpeechService(tts, ServingLimits(max_buffered_seconds=1.0))
    try:
        stream = service.submit(prepare_text(text), GREEDY, audio=audio)
        served = torch.cat(list(stream))
    finally:
        service.close()

    chunks = tts.infer_stream(
        text, max_chunk_size=DEFAULT_MAX_CHUNK_TOKENS, audio=audio, sampling=GREEDY
    )
    assert_same_audio(tts, to_pcm16(served), to_pcm16(torch.cat(list(chunks))))
    job = stream.job
    assert job is not None and stream.sample_rate == 24_000
    assert job.silence_samples == 2 * 5 * SAMPLE_RATE
    assert job.produced_samples - job.silence_samples == 3 * (TOKENS - 1) * TOKEN_SAMPLES
    assert job.consumed_samples == job.produced_samples
