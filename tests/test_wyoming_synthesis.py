"""The server's building blocks in-process: the sentence stream and the shared inference thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from soprano import SopranoTTS
from soprano.audio import to_pcm16
from soprano.constants import SAMPLE_WIDTH, TOKEN_SAMPLES
from soprano.lm import SamplingParams
from soprano.text import prepare_text
from wyoming_soprano.sentences import SentenceStream
from wyoming_soprano.synthesis import AudioJob, SynthesisError, Synthesizer

SAMPLING = SamplingParams(temperature=1.0, seed=5, max_new_tokens=16)
"""Sampling makes the random-weight model speak every sentence for all 16 tokens (greedy
decoding stops some sentences at once), and the seed makes it repeatable."""
STREAMED_TEXTS = [
    "Hello there, this is the first sentence of the test. Short one. And here is another "
    "sentence that is long enough! Is it? Yes it is, definitely a question long enough?",
    "Hi. Yes. No. Okay then, this one is a long one for sure, really. Done.",
    "Dr. Smith lives on St. James St. with 3.5 cats, and he has $4.20 in cash today. "
    "Meet me at 10:30 tomorrow, in the big room on the left, please. Thanks a lot for that.",
    "Line one has no period at all\nLine two also has none but it is longer than thirty\n"
    "The third line here is long as well, long enough to count.",
    "The U.S.A. is large. Visit https://example.com/x for details about everything here. "
    "Bye (really, I mean it) for now, and a few more words here. ok",
    "We met on a sunny day (a long time ago, when we were young. It was lovely, truly lovely "
    "for everyone there. Another long sentence follows right here, yes. The end is near) and "
    "we left. Then came the long evening, with music and dancing until late.",
]


@pytest.mark.parametrize("text", STREAMED_TEXTS)
@pytest.mark.parametrize("fragment_length", [1, 2, 7, 23, 10_000])
def test_streamed_fragments_give_exactly_the_sentences_of_the_whole_text(
    text: str, fragment_length: int
) -> None:
    stream = SentenceStream()
    released: list[str] = []
    for start in range(0, len(text), fragment_length):
        released += stream.add(text[start : start + fragment_length])
    early = len(released)
    released += stream.finish()
    assert released == prepare_text(text)
    assert stream.finish() == []
    if fragment_length < len(text) and len(prepare_text(text)) > 2:
        assert early > 0, "finished sentences are released before the stream ends"


def test_a_sentence_is_held_back_while_a_short_one_could_still_join_it() -> None:
    stream = SentenceStream()
    assert stream.add("This first sentence is long enough to stand alone. ") == []
    assert stream.add("Ok. ") == []  # "ok." is merged into the first sentence
    assert stream.add("And now a second sentence that is long enough") == [
        "this first sentence is long enough to stand alone. ok."
    ]
    assert stream.finish() == ["and now a second sentence that is long enough."]


def test_an_unclosed_bracket_holds_sentences_back_only_for_a_while() -> None:
    stream = SentenceStream()
    opening = (
        "That is really sad to hear, my friend :( But let us look at the bright side. "
        "Here is the first of several reasons why."
    )
    assert stream.add(opening) == []  # a closing bracket could still turn "(" into a comma
    later = "".join(f" Here is reason number {n} why tomorrow will be better." for n in range(6))
    released = stream.add(later)
    assert released, "the held sentences go out once the text after them is long"
    assert released + stream.finish() == prepare_text(opening + later)


class RecordingEngine:
    """The real engine, plus a log of which sentence yielded each chunk and who closed it.

    The events, when given, hold the inference thread before a sentence's first chunk (`start`)
    and before its second (`resume`) until the test sets them, so that the test decides what
    happens between two turns.
    """

    def __init__(
        self,
        tts: SopranoTTS,
        failing_sentence: str | None = None,
        start: threading.Event | None = None,
        resume: threading.Event | None = None,
    ) -> None:
        self.tts = tts
        self.failing_sentence = failing_sentence
        self.holds = {0: start, 1: resume}
        self.log: list[tuple[str, str]] = []

    def infer_stream(self, sentence: str, **kwargs: Any) -> Iterator[torch.Tensor]:
        try:
            if sentence == self.failing_sentence:
                raise RuntimeError("the model fell over")
            for index, chunk in enumerate(self.tts.infer_stream(sentence, **kwargs)):
                hold = self.holds.get(index)
                if hold is not None:
                    hold.wait()
                self.log.append(("chunk", sentence))
                yield chunk
        finally:
            self.log.append(("closed", threading.current_thread().name))


@pytest.fixture(scope="module")
def tts(tiny_checkpoint: Path) -> SopranoTTS:
    return SopranoTTS(device="cpu", model_path=tiny_checkpoint)


def make_synthesizer(engine: RecordingEngine) -> Synthesizer:
    return Synthesizer(engine, SAMPLING, chunk_size=1)  # type: ignore[arg-type]


def expected_pcm(tts: SopranoTTS, sentence: str) -> bytes:
    chunks = tts.infer_stream(
        sentence,
        temperature=SAMPLING.temperature,
        seed=SAMPLING.seed,
        max_new_tokens=SAMPLING.max_new_tokens,
    )
    return b"".join(to_pcm16(chunk) for chunk in chunks)


async def read_all(job: AudioJob) -> bytes:
    return b"".join([pcm async for pcm in job.pcm_chunks()])


def test_sessions_take_turns_and_each_gets_its_sentences_in_order(tts: SopranoTTS) -> None:
    start = threading.Event()
    engine = RecordingEngine(tts, start=start)
    synthesizer = make_synthesizer(engine)
    first = prepare_text(STREAMED_TEXTS[0])
    second = "A second client asks for this one sentence meanwhile."

    async def collect(jobs: list[AudioJob]) -> list[bytes]:
        return [await read_all(job) for job in jobs]

    async def scenario() -> tuple[list[bytes], list[bytes]]:
        session_a, session_b = synthesizer.open_session(), synthesizer.open_session()
        jobs_a = [session_a.submit(sentence) for sentence in first]
        jobs_b = [session_b.submit(second)]
        start.set()  # both sessions are waiting for their turns now
        results = await asyncio.gather(collect(jobs_a), collect(jobs_b))
        return results[0], results[1]

    try:
        audio_a, audio_b = asyncio.run(scenario())
    finally:
        synthesizer.close()
    assert audio_a == [expected_pcm(tts, sentence) for sentence in first]
    assert audio_b == [expected_pcm(tts, second)]
    chunks = [sentence for kind, sentence in engine.log if kind == "chunk"]
    assert chunks[:2] == [first[0], second], "the second session's first turn is the second"
    order_a = [sentence for sentence in chunks if sentence != second]
    assert order_a == sorted(order_a, key=first.index), "one session's sentences stay in order"


def test_cancelling_a_session_closes_its_generator_on_the_inference_thread(
    tts: SopranoTTS,
) -> None:
    resume = threading.Event()
    engine = RecordingEngine(tts, resume=resume)
    synthesizer = make_synthesizer(engine)
    sentences = prepare_text(STREAMED_TEXTS[2])

    async def scenario() -> tuple[int, list[bytes]]:
        session = synthesizer.open_session()
        jobs = [session.submit(sentence) for sentence in sentences]
        chunks = jobs[0].pcm_chunks()
        await anext(chunks)
        session.cancel()  # the second chunk is held back until now
        resume.set()
        rest = len([pcm async for pcm in chunks])
        later = [await read_all(job) for job in jobs[1:]]
        return rest, later

    try:
        rest, later = asyncio.run(scenario())
    finally:
        synthesizer.close()
    # The second turn may or may not have begun when the cancellation came; either way the
    # generation stops there, and nothing was generated beyond what was delivered.
    assert rest <= 1
    assert engine.log.count(("chunk", sentences[0])) == 1 + rest
    assert later == [b""] * (len(sentences) - 1), "queued sentences are never generated"
    assert ("closed", "soprano-inference") in engine.log
    assert not any(kind == "chunk" and s != sentences[0] for kind, s in engine.log)


def test_an_engine_failure_reaches_only_its_own_request(tts: SopranoTTS) -> None:
    failing = "This sentence makes the engine fail, sadly."
    healthy = "This one is synthesized as usual by the engine."
    synthesizer = make_synthesizer(RecordingEngine(tts, failing_sentence=failing))

    async def scenario() -> tuple[SynthesisError, bytes]:
        failing_job = synthesizer.open_session().submit(failing)
        healthy_job = synthesizer.open_session().submit(healthy)
        with pytest.raises(SynthesisError) as failure:
            async for _ in failing_job.pcm_chunks():
                pass
        return failure.value, await read_all(healthy_job)

    try:
        error, audio = asyncio.run(scenario())
    finally:
        synthesizer.close()
    assert (str(error), error.code) == ("the model fell over", "RuntimeError")
    assert audio == expected_pcm(tts, healthy)


def test_a_client_that_stops_reading_is_held_back_while_others_go_on(tts: SopranoTTS) -> None:
    engine = RecordingEngine(tts)
    held_chunks = 3
    synthesizer = Synthesizer(
        engine,  # type: ignore[arg-type]
        SAMPLING,
        chunk_size=1,
        max_backlog_bytes=held_chunks * TOKEN_SAMPLES * SAMPLE_WIDTH,
    )
    unread = "Nobody reads the audio of this sentence for a while."
    read = "Meanwhile another client hears the whole of this sentence."

    async def scenario() -> tuple[int, bytes, bytes]:
        unread_job = synthesizer.open_session().submit(unread)
        read_job = synthesizer.open_session().submit(read)
        read_audio = await read_all(read_job)
        made_while_unread = engine.log.count(("chunk", unread))
        return made_while_unread, read_audio, await read_all(unread_job)

    try:
        made_while_unread, read_audio, unread_audio = asyncio.run(scenario())
    finally:
        synthesizer.close()
    assert made_while_unread == held_chunks
    assert read_audio == expected_pcm(tts, read)
    assert unread_audio == expected_pcm(tts, unread), "reading again resumes the generation"


def test_closing_the_synthesizer_ends_unfinished_jobs(tts: SopranoTTS) -> None:
    engine = RecordingEngine(tts)
    synthesizer = make_synthesizer(engine)

    async def scenario() -> None:
        session = synthesizer.open_session()
        jobs = [session.submit(sentence) for sentence in prepare_text(STREAMED_TEXTS[0])]
        await asyncio.to_thread(synthesizer.close)
        for job in jobs:  # every consumer comes to an end
            async for _ in job.pcm_chunks():
                pass

    asyncio.run(scenario())
    started = {sentence for kind, sentence in engine.log if kind == "chunk"}
    closed = [thread for kind, thread in engine.log if kind == "closed"]
    assert closed == ["soprano-inference"] * len(started)
    with pytest.raises(RuntimeError, match="closed"):
        asyncio.run(_submit_after_close(synthesizer))


async def _submit_after_close(synthesizer: Synthesizer) -> None:
    synthesizer.open_session().submit("Too late for this sentence to be spoken, alas.")
