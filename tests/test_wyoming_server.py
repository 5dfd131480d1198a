"""The Wyoming server end to end: subprocess servers, real sockets, the real `wyoming` client.

Servers run on a generated random-weight checkpoint. The main server decodes greedily, so its
audio can be compared byte for byte with the engine's `infer` in this process; the busy server
samples (temperature 1, 400 tokens a sentence) so that a request is certainly still generating
while other clients talk to the server.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import wave
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch
from wyoming.audio import AudioChunk, AudioStart
from wyoming.client import AsyncTcpClient
from wyoming.error import Error
from wyoming.event import Event, async_read_event, async_write_event, read_event, write_event
from wyoming.info import Describe, Info
from wyoming.tts import (
    Synthesize,
    SynthesizeChunk,
    SynthesizeStart,
    SynthesizeStop,
    SynthesizeVoice,
)

from soprano import SopranoTTS
from soprano.audio import AudioEffects, to_pcm16
from soprano.audio.pauses import AudioOptions
from soprano.constants import SAMPLE_RATE, SAMPLE_WIDTH, TOKEN_SAMPLES
from soprano.serving import DEFAULT_MAX_CHUNK_TOKENS
from soprano.text import prepare_text
from wyoming_soprano import __version__
from wyoming_soprano.__main__ import RateLimitedErrors, main
from wyoming_soprano.handler import MAX_QUEUED_REPLIES
from wyoming_soprano.info import PROGRAM_NAME

REPO_ROOT = Path(__file__).resolve().parents[1]
MAX_NEW_TOKENS = 24
SAMPLES_PER_CHUNK = 1000
"""Not a multiple of the engine's 2048-sample chunks, so the server must re-cut its audio."""

STARTUP_TIMEOUT = 180.0
EVENT_TIMEOUT = 60.0
"""Generous bounds for a loaded machine; they only turn a hang into a failure."""

DESCRIBE_DEADLINE = 1.0
"""Home Assistant gives each describe attempt one second (docs/wyoming.md, Home Assistant)."""

TEXT = (
    "Hello there, this is the first sentence of our test. Here comes a second sentence "
    "that is long enough! And a third one, to finish the whole test nicely?"
)
OTHER_TEXTS = [
    "A different request arrives on another connection at the same time.",
    "Yet another client wants to hear this sentence, spoken right away!",
]
LONG_TEXT = " ".join(
    f"This is sentence number {number} of a long announcement for everybody." for number in range(6)
)
AUDIO_FORMAT = (SAMPLE_RATE, SAMPLE_WIDTH, 1)
IDLE_TIMEOUT = 1.0
MAX_CONNECTIONS = 3
SECOND_VOICE = "zweite"
BUSY_BUFFERED_SECONDS = 5.0
"""The busy server's backpressure bound: small, so that a reader that stops is paused after
little work even on a loaded machine."""
SHAPED = AudioOptions(AudioEffects(speed=1.5, volume=0.8, sample_rate=22_050), 0.3, 0.5)
"""The audio options of the server that shapes its audio."""

T = TypeVar("T")


class ServerProcess:
    """`python -m wyoming_soprano` as a subprocess; its stderr is kept for log assertions.

    On TCP it listens on a free loopback port; with `stdio` its stdin and stdout are the pipes.
    """

    def __init__(self, *args: str, stdio: bool = False) -> None:
        self.port = 0 if stdio else free_port()
        uri = "stdio://" if stdio else f"tcp://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "wyoming_soprano", "--uri", uri, *args],
            cwd=REPO_ROOT,
            stdin=subprocess.PIPE if stdio else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self._lines: list[str] = []
        self._log_ended = False
        self._log_changed = threading.Condition()
        threading.Thread(target=self._collect_log, daemon=True).start()

    def _collect_log(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            with self._log_changed:
                self._lines.append(line.decode(errors="replace").rstrip("\n"))
                self._log_changed.notify_all()
        with self._log_changed:
            self._log_ended = True
            self._log_changed.notify_all()

    @property
    def log(self) -> str:
        with self._log_changed:
            return "\n".join(self._lines)

    def wait_for_log(self, text: str, count: int = 1, timeout: float = EVENT_TIMEOUT) -> None:
        """Block until `text` has appeared in `count` log lines."""

        def seen() -> bool:
            return sum(text in line for line in self._lines) >= count or self._log_ended

        with self._log_changed:
            self._log_changed.wait_for(seen, timeout)
            found = sum(text in line for line in self._lines)
        assert found >= count, f"{text!r} logged {found}×, expected {count}×:\n{self.log}"

    def wait_until_idle(self, timeout: float = EVENT_TIMEOUT) -> None:
        """Block until the server's last log of its connection count says none is open (it
        logs each opened and closed connection with --debug)."""

        def idle() -> bool:
            counts = [line for line in self._lines if "open)" in line and "Connection " in line]
            return not counts or "(0 open)" in counts[-1] or self._log_ended

        with self._log_changed:
            assert self._log_changed.wait_for(idle, timeout), self.log

    def stop(self) -> tuple[int, bytes]:
        """SIGTERM, as Docker sends it, unless it has exited; returns exit code and stdout."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        assert self.process.stdout is not None
        stdout = self.process.stdout.read()
        if self.process.stdin is not None:
            self.process.stdin.close()
        return self.process.wait(timeout=EVENT_TIMEOUT), stdout


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coroutine)


@pytest.fixture(scope="module")
def servers(
    tiny_checkpoint: Path, endless_checkpoint: Path, voice_data_dir: Path
) -> Iterator[dict[str, ServerProcess]]:
    """The servers, started together so that their imports and model loads overlap.

    The busy one never says [STOP], so each of its sentences certainly runs 400 tokens.
    """
    model = ["--model", str(tiny_checkpoint), "--device", "cpu"]
    started = {
        "main": ServerProcess(
            *model,
            *("--max-new-tokens", str(MAX_NEW_TOKENS)),
            *("--samples-per-chunk", str(SAMPLES_PER_CHUNK)),
        ),
        "busy": ServerProcess(
            *("--model", str(endless_checkpoint), "--device", "cpu"),
            *("--temperature", "1.0", "--seed", "3", "--max-new-tokens", "400", "--debug"),
            *("--max-buffered-seconds", str(BUSY_BUFFERED_SECONDS)),
        ),
        "guarded": ServerProcess(
            *model,
            *("--idle-timeout", str(IDLE_TIMEOUT), "--max-connections", str(MAX_CONNECTIONS)),
            "--debug",
        ),
        "voices": ServerProcess(
            *("--voice", str(tiny_checkpoint), "--device", "cpu"),
            *("--voice", f"{SECOND_VOICE}={voice_data_dir / 'second'},language=de_DE"),
            *("--max-new-tokens", str(MAX_NEW_TOKENS)),
            *("--samples-per-chunk", str(SAMPLES_PER_CHUNK)),
        ),
        "shaped": ServerProcess(
            *model,
            *("--max-new-tokens", str(MAX_NEW_TOKENS)),
            *("--samples-per-chunk", str(SAMPLES_PER_CHUNK)),
            *("--speed", str(SHAPED.effects.speed), "--volume", str(SHAPED.effects.volume)),
            *("--sample-rate", str(SHAPED.sample_rate)),
            *("--sentence-silence", str(SHAPED.sentence_silence)),
            *("--trailing-silence", str(SHAPED.trailing_silence)),
        ),
        "stdio": ServerProcess(
            *model,
            *("--max-new-tokens", str(MAX_NEW_TOKENS), "--no-streaming"),
            *("--idle-timeout", str(IDLE_TIMEOUT)),
            stdio=True,
        ),
    }
    try:
        for server in started.values():
            server.wait_for_log("Ready on ", timeout=STARTUP_TIMEOUT)
        yield started
    finally:
        for name, server in started.items():
            returncode, stdout = server.stop()
            assert returncode == 0, f"{name} server exited with {returncode}:\n{server.log}"
            assert stdout == b"", "logs belong on stderr, events were all read"
            assert "Traceback" not in server.log, server.log


@pytest.fixture(scope="module")
def server(servers: dict[str, ServerProcess]) -> ServerProcess:
    return servers["main"]


@pytest.fixture(scope="module")
def busy_server(servers: dict[str, ServerProcess]) -> ServerProcess:
    return servers["busy"]


@pytest.fixture(scope="module")
def guarded_server(servers: dict[str, ServerProcess]) -> ServerProcess:
    return servers["guarded"]


@pytest.fixture(scope="module")
def voices_server(servers: dict[str, ServerProcess]) -> ServerProcess:
    return servers["voices"]


@pytest.fixture(scope="module")
def shaped_server(servers: dict[str, ServerProcess]) -> ServerProcess:
    return servers["shaped"]


@pytest.fixture(scope="module")
def second_engine(voice_data_dir: Path) -> SopranoTTS:
    return SopranoTTS(device="cpu", model_path=voice_data_dir / "second")


@pytest.fixture(scope="module")
def stdio_server(servers: dict[str, ServerProcess]) -> ServerProcess:
    return servers["stdio"]


@pytest.fixture(scope="module")
def engine(tiny_checkpoint: Path) -> SopranoTTS:
    return SopranoTTS(device="cpu", model_path=tiny_checkpoint)


def reference_pcm(engine: SopranoTTS, text: str) -> bytes:
    """What the server must send for `text`: the engine's streamed audio of each sentence.

    The server batches requests continuously, and a sentence's audio does not depend on what
    shares its batch (soprano/serving), so this is exact to the byte whatever else the server
    does; its length equals `infer(text)`'s, which one test checks as well.
    """
    return b"".join(
        to_pcm16(chunk)
        for sentence in prepare_text(text)
        for chunk in engine.infer_stream(
            sentence, max_chunk_size=DEFAULT_MAX_CHUNK_TOKENS, max_new_tokens=MAX_NEW_TOKENS
        )
    )


async def connect(server: ServerProcess) -> AsyncTcpClient:
    client = AsyncTcpClient("127.0.0.1", server.port)
    await client.connect()
    return client


async def next_event(client: AsyncTcpClient) -> Event:
    event = await asyncio.wait_for(client.read_event(), EVENT_TIMEOUT)
    assert event is not None, "the server closed the connection"
    return event


async def events_through(client: AsyncTcpClient, last_type: str) -> list[Event]:
    """Every event up to and including the first one of `last_type`."""
    events = [await next_event(client)]
    while events[-1].type != last_type:
        events.append(await next_event(client))
    return events


def audio_cycles(
    events: list[Event], samples_per_chunk: int, audio_format: tuple[int, int, int] = AUDIO_FORMAT
) -> list[bytes]:
    """The PCM of each audio-start … audio-stop cycle, checking order, format and chunk sizes."""
    cycles: list[bytes] = []
    chunks: list[bytes] | None = None
    for event in events:
        if event.type == "audio-start":
            assert chunks is None, "audio-start inside a cycle"
            start = AudioStart.from_event(event)
            assert (start.rate, start.width, start.channels) == audio_format
            chunks = []
        elif event.type == "audio-chunk":
            assert chunks is not None, "audio-chunk outside a cycle"
            chunk = AudioChunk.from_event(event)
            assert (chunk.rate, chunk.width, chunk.channels) == audio_format
            chunks.append(chunk.audio)
        elif event.type == "audio-stop":
            assert chunks is not None, "audio-stop without audio-start"
            assert all(len(c) == samples_per_chunk * SAMPLE_WIDTH for c in chunks[:-1])
            assert all(0 < len(c) <= samples_per_chunk * SAMPLE_WIDTH for c in chunks[-1:])
            cycles.append(b"".join(chunks))
            chunks = None
    assert chunks is None, "a cycle was not closed"
    return cycles


def test_describe_returns_one_tts_program_with_an_english_voice(
    server: ServerProcess, tiny_checkpoint: Path
) -> None:
    async def scenario() -> Event:
        client = await connect(server)
        for ignored in ("select-program", "ping", "some-future-event"):
            await client.write_event(Event(type=ignored, data={"name": "x"}))
        await client.write_event(Describe().event())
        event = await next_event(client)
        await client.disconnect()
        return event

    event = run(scenario())
    assert event.type == "info"
    info = Info.from_event(event)
    assert info.satellite is None
    assert [program.name for program in info.tts] == [PROGRAM_NAME]
    program = info.tts[0]
    assert program.installed and program.description and program.attribution.url
    assert program.version == __version__
    assert program.supports_synthesize_streaming is True
    [voice] = program.voices
    assert voice.installed and voice.languages == ["en_US"]
    assert voice.name == tiny_checkpoint.name


def test_synthesize_sends_one_cycle_of_the_engines_audio(
    server: ServerProcess, engine: SopranoTTS
) -> None:
    async def scenario() -> tuple[list[Event], Event]:
        client = await connect(server)
        await client.write_event(Synthesize(TEXT).event())
        events = await events_through(client, "audio-stop")
        await client.write_event(Describe().event())
        after = await next_event(client)
        await client.disconnect()
        return events, after

    events, after = run(scenario())
    assert events[0].type == "audio-start"
    assert [event.type for event in events[1:-1]] == ["audio-chunk"] * (len(events) - 2)
    [pcm] = audio_cycles(events, SAMPLES_PER_CHUNK)
    assert pcm == reference_pcm(engine, TEXT)
    assert len(pcm) == len(engine.infer(TEXT, max_new_tokens=MAX_NEW_TOKENS)) * SAMPLE_WIDTH
    assert len(pcm) % (TOKEN_SAMPLES * SAMPLE_WIDTH) == 0
    assert after.type == "info", "nothing may follow audio-stop"


def test_stream_speaks_finished_sentences_before_stop_and_equals_one_shot(
    server: ServerProcess, engine: SopranoTTS
) -> None:
    async def scenario() -> tuple[Event, list[Event]]:
        client = await connect(server)
        await client.write_event(SynthesizeStart().event())
        for start in range(0, len(TEXT), 5):
            await client.write_event(SynthesizeChunk(TEXT[start : start + 5]).event())
        first = await next_event(client)  # arrives while the stream is still open
        await client.write_event(SynthesizeStop().event())
        rest = await events_through(client, "synthesize-stopped")
        await client.disconnect()
        return first, rest

    first, rest = run(scenario())
    assert first.type == "audio-start"
    events = [first, *rest]
    assert [event.type for event in events].count("synthesize-stopped") == 1
    cycles = audio_cycles(events, SAMPLES_PER_CHUNK)
    assert len(cycles) >= 2
    assert b"".join(cycles) == reference_pcm(engine, TEXT)


def test_home_assistant_stream_gets_no_duplicate_audio_and_the_connection_stays_usable(
    server: ServerProcess, engine: SopranoTTS, tiny_checkpoint: Path
) -> None:
    """Home Assistant's client: chunks cut inside words, then the whole text, then stop."""
    voice = SynthesizeVoice(name=tiny_checkpoint.name, speaker="default")
    chunks = [TEXT[:3], TEXT[3:17], TEXT[17:60], TEXT[60:61], TEXT[61:]]

    async def send_like_home_assistant(client: AsyncTcpClient) -> None:
        await client.write_event(SynthesizeStart(voice=voice).event())
        for chunk in chunks:
            await client.write_event(SynthesizeChunk(chunk).event())
        await client.write_event(Synthesize(TEXT, voice=voice).event())
        await client.write_event(SynthesizeStop().event())

    async def scenario() -> tuple[list[Event], list[Event]]:
        client = await connect(server)
        writer = asyncio.create_task(send_like_home_assistant(client))
        events = await events_through(client, "synthesize-stopped")
        await writer
        await client.write_event(Synthesize(OTHER_TEXTS[0]).event())
        plain = await events_through(client, "audio-stop")
        await client.disconnect()
        return events, plain

    events, plain = run(scenario())
    expected = reference_pcm(engine, TEXT)
    with wave.open(io.BytesIO(home_assistant_wav(events))) as wav_file:
        assert (wav_file.getframerate(), wav_file.getsampwidth()) == (SAMPLE_RATE, SAMPLE_WIDTH)
        assert wav_file.readframes(wav_file.getnframes()) == expected
    assert b"".join(audio_cycles(events, SAMPLES_PER_CHUNK)) == expected
    assert audio_cycles(plain, SAMPLES_PER_CHUNK) == [reference_pcm(engine, OTHER_TEXTS[0])]


def home_assistant_wav(events: list[Event]) -> bytes:
    """As Home Assistant's stream reader: WAV format from the first audio-start, then chunks."""
    start = AudioStart.from_event(next(e for e in events if e.type == "audio-start"))
    wav_io = io.BytesIO()
    with wave.open(wav_io, "wb") as wav_file:
        wav_file.setframerate(start.rate)
        wav_file.setsampwidth(start.width)
        wav_file.setnchannels(start.channels)
        for event in events:
            if event.type == "audio-chunk":
                wav_file.writeframes(AudioChunk.from_event(event).audio)
    return wav_io.getvalue()


def test_second_synthesize_start_finishes_the_open_stream_first(
    server: ServerProcess, engine: SopranoTTS
) -> None:
    """Defined behaviour: the open stream is spoken and stopped, then the new one begins."""

    async def scenario() -> list[Event]:
        client = await connect(server)
        for text in OTHER_TEXTS:
            await client.write_event(SynthesizeStart().event())
            await client.write_event(SynthesizeChunk(text).event())
        await client.write_event(SynthesizeStop().event())
        first = await events_through(client, "synthesize-stopped")
        second = await events_through(client, "synthesize-stopped")
        await client.disconnect()
        return [first, second]

    first, second = run(scenario())
    assert audio_cycles(first, SAMPLES_PER_CHUNK) == [reference_pcm(engine, OTHER_TEXTS[0])]
    assert audio_cycles(second, SAMPLES_PER_CHUNK) == [reference_pcm(engine, OTHER_TEXTS[1])]


def test_empty_text_gets_an_empty_cycle_and_an_empty_stream_just_stops(
    server: ServerProcess,
) -> None:
    async def scenario() -> tuple[list[Event], list[Event]]:
        client = await connect(server)
        await client.write_event(Synthesize("").event())
        one_shot = await events_through(client, "audio-stop")
        await client.write_event(SynthesizeStart().event())
        await client.write_event(SynthesizeChunk(" ... ").event())
        await client.write_event(SynthesizeStop().event())
        stream = await events_through(client, "synthesize-stopped")
        await client.disconnect()
        return one_shot, stream

    one_shot, stream = run(scenario())
    assert [event.type for event in one_shot] == ["audio-start", "audio-stop"]
    assert [event.type for event in stream] == ["synthesize-stopped"]


def test_several_clients_at_once_are_all_served(server: ServerProcess, engine: SopranoTTS) -> None:
    async def synthesize(text: str) -> bytes:
        client = await connect(server)
        await client.write_event(Synthesize(text).event())
        [pcm] = audio_cycles(await events_through(client, "audio-stop"), SAMPLES_PER_CHUNK)
        await client.disconnect()
        return pcm

    async def scenario() -> list[bytes]:
        return list(await asyncio.gather(*(synthesize(text) for text in [TEXT, *OTHER_TEXTS])))

    results = run(scenario())
    assert results == [reference_pcm(engine, text) for text in [TEXT, *OTHER_TEXTS]]


MALFORMED_INPUT = {
    "garbage bytes": b"\x00\xff\xfe garbage, not JSON\n",
    "a JSON array": b"[1, 2, 3]\n",
    "no type": b'{"data": {"text": "hi"}}\n',
    "non-numeric data_length": b'{"type": "synthesize", "data_length": "lots"}\n',
    "negative payload_length": b'{"type": "synthesize", "payload_length": -4}\n',
    "data that is not an object": b'{"type": "synthesize", "data_length": 4}\n"hi"',
    "a header nested 30,000 deep": b'{"type": "describe", "data": ' + b"[" * 30_000 + b"\n",
    "data nested 100,000 deep": b'{"type": "synthesize", "data_length": 100000}\n' + b"[" * 100_000,
}


@pytest.mark.parametrize("raw", MALFORMED_INPUT.values(), ids=MALFORMED_INPUT.keys())
def test_malformed_event_gets_an_error_and_closes_only_that_connection(
    server: ServerProcess, raw: bytes
) -> None:
    async def scenario() -> tuple[Event | None, Event | None, Event]:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(raw)
        await writer.drain()
        error = await asyncio.wait_for(async_read_event(reader), EVENT_TIMEOUT)
        after = await asyncio.wait_for(async_read_event(reader), EVENT_TIMEOUT)
        writer.close()
        return error, after, await describe(server)

    error, after, info = run(scenario())
    assert error is not None and Error.from_event(error).code == "ProtocolError"
    assert after is None, "the connection must be closed after the error"
    assert info.type == "info"


def test_oversized_header_and_a_client_that_leaves_mid_event_do_not_harm_others(
    server: ServerProcess,
) -> None:
    async def oversized() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b'{"type": "describe", "padding": "' + b"x" * 200_000 + b'"}\n')
        try:
            await writer.drain()
            while await asyncio.wait_for(reader.read(65536), EVENT_TIMEOUT):
                pass  # an error event may arrive before the close
        except ConnectionError:
            pass  # the server may reset a connection whose bytes it refuses to read
        writer.close()

    async def leaves_mid_event() -> None:
        _, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b'{"type": "synthesize", "data_length": 100}\n{"text": "Hel')
        await writer.drain()
        writer.close()

    async def scenario() -> Event:
        await oversized()
        await leaves_mid_event()
        return await describe(server)

    assert run(scenario()).type == "info"


@pytest.mark.parametrize(
    ("data", "code"),
    [
        ({"voice": {"name": "x"}}, "InvalidRequest"),
        ({"text": 42}, "InvalidRequest"),
        ({"text": "<speak>Hi</speak>", "text_format": "ssml"}, "UnsupportedTextFormat"),
    ],
)
def test_refused_request_gets_an_error_event_then_the_connection_closes(
    server: ServerProcess, data: dict[str, Any], code: str
) -> None:
    async def scenario() -> tuple[Event, Event | None]:
        client = await connect(server)
        await client.write_event(Event(type="synthesize", data=data))
        error = await next_event(client)
        after = await asyncio.wait_for(client.read_event(), EVENT_TIMEOUT)
        await client.disconnect()
        return error, after

    error, after = run(scenario())
    assert error.type == "error" and Error.from_event(error).code == code
    assert after is None


async def describe(server: ServerProcess) -> Event:
    client = await connect(server)
    await client.write_event(Describe().event())
    event = await next_event(client)
    await client.disconnect()
    return event


def test_netcat_style_describe_is_answered(server: ServerProcess) -> None:
    """`echo '{"type":"describe"}' | nc -w 1 localhost 10200`: inline header, no data_length."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=DESCRIBE_DEADLINE) as conn:
        conn.sendall(b'{"type":"describe"}\n')
        received = b""
        while b"\n" not in received:
            received += conn.recv(65536)
        header_line, data = received.split(b"\n", 1)
        header = json.loads(header_line)
        while len(data) < header["data_length"]:
            data += conn.recv(65536)
    assert header["type"] == "info"
    assert json.loads(data)["tts"][0]["name"] == PROGRAM_NAME


def test_health_check_passes_against_the_server_and_fails_without_one(
    server: ServerProcess,
) -> None:
    def health_check(port: int) -> subprocess.CompletedProcess[str]:
        uri = f"tcp://127.0.0.1:{port}"
        return subprocess.run(
            [sys.executable, "-m", "wyoming_soprano.health_check", "--uri", uri, "--timeout", "20"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=EVENT_TIMEOUT,
        )

    healthy = health_check(server.port)
    assert healthy.returncode == 0, healthy.stderr
    unhealthy = health_check(free_port())
    assert unhealthy.returncode == 1
    assert unhealthy.stderr.startswith("unhealthy: ")


def test_describe_is_answered_within_a_second_while_another_client_synthesizes(
    busy_server: ServerProcess,
) -> None:
    async def scenario() -> tuple[Event, float]:
        speaking = await connect(busy_server)
        await speaking.write_event(Synthesize(LONG_TEXT).event())
        assert (await next_event(speaking)).type == "audio-start"
        assert (await next_event(speaking)).type == "audio-chunk"
        asking = await connect(busy_server)
        started = time.monotonic()
        await asking.write_event(Describe().event())
        info = await asyncio.wait_for(asking.read_event(), EVENT_TIMEOUT)
        elapsed = time.monotonic() - started
        await asking.disconnect()
        await speaking.disconnect()
        assert info is not None
        return info, elapsed

    stopped_before = busy_server.log.count("Stopped synthesis")
    info, elapsed = run(scenario())
    assert info.type == "info"
    assert elapsed < DESCRIBE_DEADLINE
    # The synthesis was still generating after describe was answered: leaving stopped it.
    busy_server.wait_for_log("Stopped synthesis", count=stopped_before + 1)


def test_client_leaving_mid_stream_stops_its_generation_and_others_are_served(
    busy_server: ServerProcess,
) -> None:
    async def leave_mid_stream() -> None:
        client = await connect(busy_server)
        await client.write_event(SynthesizeStart().event())
        await client.write_event(SynthesizeChunk(LONG_TEXT).event())
        await client.write_event(SynthesizeStop().event())
        assert (await next_event(client)).type == "audio-start"
        assert (await next_event(client)).type == "audio-chunk"
        await client.disconnect()

    async def next_client() -> list[Event]:
        client = await connect(busy_server)
        await client.write_event(Synthesize(OTHER_TEXTS[0]).event())
        events = await events_through(client, "audio-stop")
        await client.disconnect()
        return events

    stopped_before = busy_server.log.count("Stopped synthesis")
    gone_before = busy_server.log.count("Client went away")
    run(leave_mid_stream())
    busy_server.wait_for_log("Stopped synthesis", count=stopped_before + 1)
    busy_server.wait_for_log("Client went away", count=gone_before + 1)
    events = run(next_client())
    assert len(audio_cycles(events, TOKEN_SAMPLES)) == 1


def test_stdio_server_without_streaming_flag_still_handles_streams(
    stdio_server: ServerProcess, engine: SopranoTTS
) -> None:
    """stdio:// with --no-streaming: streaming is not advertised, but a stream still works;
    and its one connection is never closed for idling (its peer started the server)."""
    process = stdio_server.process
    assert process.stdin is not None and process.stdout is not None

    def read_through(last_type: str) -> list[Event]:
        events: list[Event] = []
        while not events or events[-1].type != last_type:
            event = read_event(process.stdout)
            assert event is not None, stdio_server.log
            events.append(event)
        return events

    write_event(Describe().event(), process.stdin)
    [info] = read_through("info")
    time.sleep(2 * IDLE_TIMEOUT)  # idle past --idle-timeout, which TCP connections would not be
    write_event(Synthesize(TEXT).event(), process.stdin)
    one_shot = read_through("audio-stop")
    for event in (SynthesizeStart(), SynthesizeChunk(TEXT), SynthesizeStop()):
        write_event(event.event(), process.stdin)
    stream = read_through("synthesize-stopped")
    process.stdin.close()  # the end of stdin ends the server
    assert process.wait(timeout=EVENT_TIMEOUT) == 0, stdio_server.log

    assert Info.from_event(info).tts[0].supports_synthesize_streaming is False
    expected = reference_pcm(engine, TEXT)
    assert audio_cycles(one_shot, TOKEN_SAMPLES) == [expected]
    assert b"".join(audio_cycles(stream, TOKEN_SAMPLES)) == expected


def test_startup_log_names_model_device_backend_and_ready(
    server: ServerProcess, tiny_checkpoint: Path
) -> None:
    server.wait_for_log(f"Model {tiny_checkpoint} on device cpu with the native backend")
    server.wait_for_log(f"Ready on tcp://127.0.0.1:{server.port}")


def test_version_flag_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == __version__


def test_missing_model_offline_is_one_clear_error_and_a_nonzero_exit(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            *(sys.executable, "-m", "wyoming_soprano", "--uri", "stdio://"),
            *("--model", "ekwek/Soprano-1.1-80M", "--download-dir", str(tmp_path)),
        ],
        cwd=REPO_ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=STARTUP_TIMEOUT,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR:")]
    assert len(errors) == 1, result.stderr
    assert "Cannot load the model" in errors[0] and "ekwek/Soprano-1.1-80M" in errors[0]
    assert result.stdout == ""


def test_a_connection_that_completes_no_event_is_let_go(guarded_server: ServerProcess) -> None:
    async def scenario() -> tuple[bytes, Event]:
        reader, writer = await asyncio.open_connection("127.0.0.1", guarded_server.port)
        writer.write(b'{"type": "desc')  # and never the rest, as a trickling client
        await writer.drain()
        rest = await asyncio.wait_for(reader.read(), EVENT_TIMEOUT)  # EOF: the server hung up
        writer.close()
        return rest, await describe(guarded_server)

    rest, info = run(scenario())
    assert rest == b"" and info.type == "info"
    guarded_server.wait_for_log("Closing a connection idle for 1 s")


def test_connections_past_the_limit_get_an_error_and_the_rest_are_served(
    guarded_server: ServerProcess,
) -> None:
    guarded_server.wait_until_idle()  # connections of earlier tests are gone

    async def scenario() -> tuple[Event | None, Event | None, list[Event]]:
        clients = [await connect(guarded_server) for _ in range(MAX_CONNECTIONS)]
        for client in clients:  # each is being served now
            await client.write_event(Describe().event())
            assert (await next_event(client)).type == "info"
        reader, writer = await asyncio.open_connection("127.0.0.1", guarded_server.port)
        refusal = await asyncio.wait_for(async_read_event(reader), EVENT_TIMEOUT)
        after = await asyncio.wait_for(async_read_event(reader), EVENT_TIMEOUT)
        writer.close()
        served = []
        for client in clients:
            await client.write_event(Describe().event())
            served.append(await next_event(client))
            await client.disconnect()
        return refusal, after, served

    refusal, after, served = run(scenario())
    assert refusal is not None and Error.from_event(refusal).code == "ServerBusyError"
    assert after is None
    assert [event.type for event in served] == ["info"] * MAX_CONNECTIONS
    guarded_server.wait_until_idle()
    assert run(describe(guarded_server)).type == "info", "closed connections free their places"


def test_a_flood_of_events_does_not_starve_other_connections(server: ServerProcess) -> None:
    async def flood() -> None:
        _, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b'{"type": "ping"}\n' * 20_000 + b"\n" * 20_000)
        await writer.drain()
        writer.close()

    async def scenario() -> float:
        floods = [asyncio.create_task(flood()) for _ in range(3)]
        started = time.perf_counter()
        info = await describe(server)
        elapsed = time.perf_counter() - started
        await asyncio.gather(*floods)
        assert info.type == "info"
        return elapsed

    assert run(scenario()) < DESCRIBE_DEADLINE


def test_a_client_that_stops_reading_pauses_its_generation_and_others_are_served(
    busy_server: ServerProcess,
) -> None:
    """Backpressure: once its socket buffers are full and 5 s of its audio wait unread, the
    request gets no more rows (memory stays bounded), while other clients are served."""

    async def stop_reading() -> asyncio.StreamWriter:
        _, writer = await asyncio.open_connection("127.0.0.1", busy_server.port)
        await async_write_event(Synthesize(LONG_TEXT).event(), writer)
        return writer  # and never read

    async def scenario() -> list[Event]:
        paused_before = busy_server.log.count("paused: its audio waits unread")
        writer = await stop_reading()
        await asyncio.to_thread(
            busy_server.wait_for_log, "paused: its audio waits unread", paused_before + 1
        )
        client = await connect(busy_server)
        await client.write_event(Synthesize(OTHER_TEXTS[0]).event())
        events = await events_through(client, "audio-stop")
        await client.disconnect()
        writer.close()
        return events

    events = run(scenario())
    assert len(audio_cycles(events, TOKEN_SAMPLES)) == 1


def test_a_connection_that_pipelines_requests_without_reading_is_not_read_further(
    busy_server: ServerProcess,
) -> None:
    """Twenty whole-text requests sent at once, none read: the server takes the replies it may
    queue (MAX_QUEUED_REPLIES) and one more that waits for a place, and reads no further while
    the first reply's audio backs up, so the client cannot queue unbounded work."""
    sent = 20

    async def scenario() -> int:
        received_before = busy_server.log.count("Received synthesize")
        paused_before = busy_server.log.count("paused: its audio waits unread")
        _, writer = await asyncio.open_connection("127.0.0.1", busy_server.port)
        for _ in range(sent):
            await async_write_event(Synthesize(LONG_TEXT).event(), writer)
        await asyncio.to_thread(
            busy_server.wait_for_log, "paused: its audio waits unread", paused_before + 1
        )
        received = busy_server.log.count("Received synthesize") - received_before
        writer.close()
        return received

    assert run(scenario()) <= MAX_QUEUED_REPLIES + 1 < sent


def test_repeated_event_loop_errors_are_logged_once_per_interval() -> None:
    """A full descriptor table makes accept() fail hundreds of times a second; the log gets the
    error once per interval, not once per failure."""

    class CountingLoop:
        logged = 0

        def default_exception_handler(self, context: dict[str, Any]) -> None:
            self.logged += 1

    loop = CountingLoop()
    handler = RateLimitedErrors(interval=3600)
    for _ in range(1000):
        handler(loop, {"message": "socket.accept() out of system resource"})  # type: ignore[arg-type]
    handler(loop, {"message": "another error"})  # type: ignore[arg-type]
    assert loop.logged == 2


def test_describe_lists_every_voice_with_its_language(
    voices_server: ServerProcess, tiny_checkpoint: Path
) -> None:
    [program] = Info.from_event(run(describe(voices_server))).tts
    assert [(voice.name, voice.languages) for voice in program.voices] == [
        (tiny_checkpoint.name, ["en_US"]),
        (SECOND_VOICE, ["de_DE"]),
    ]
    assert all(voice.installed and voice.description for voice in program.voices)


async def synthesize_pcm(server: ServerProcess, text: str, voice: str | None) -> bytes:
    client = await connect(server)
    chosen = SynthesizeVoice(name=voice) if voice is not None else None
    await client.write_event(Synthesize(text, voice=chosen).event())
    events = await events_through(client, "audio-stop")
    await client.disconnect()
    [pcm] = audio_cycles(events, SAMPLES_PER_CHUNK)
    return pcm


def test_synthesize_speaks_with_the_voice_it_names_and_others_at_the_same_time(
    voices_server: ServerProcess, engine: SopranoTTS, second_engine: SopranoTTS
) -> None:
    async def scenario() -> list[bytes]:
        return await asyncio.gather(
            synthesize_pcm(voices_server, TEXT, SECOND_VOICE),
            synthesize_pcm(voices_server, TEXT, None),
            synthesize_pcm(voices_server, OTHER_TEXTS[0], SECOND_VOICE),
        )

    second, default, other = run(scenario())
    assert second == reference_pcm(second_engine, TEXT)
    assert default == reference_pcm(engine, TEXT)
    assert other == reference_pcm(second_engine, OTHER_TEXTS[0])
    assert second != default


def test_an_unknown_voice_falls_back_to_the_default_with_a_log_line(
    voices_server: ServerProcess, engine: SopranoTTS, tiny_checkpoint: Path
) -> None:
    pcm = run(synthesize_pcm(voices_server, OTHER_TEXTS[1], "forgotten-voice"))
    assert pcm == reference_pcm(engine, OTHER_TEXTS[1])
    voices_server.wait_for_log(
        f"Unknown voice 'forgotten-voice'; speaking with {tiny_checkpoint.name}"
    )


def test_a_stream_speaks_with_the_voice_of_its_start(
    voices_server: ServerProcess, second_engine: SopranoTTS
) -> None:
    async def scenario() -> list[Event]:
        client = await connect(voices_server)
        await client.write_event(SynthesizeStart(voice=SynthesizeVoice(SECOND_VOICE)).event())
        for start in range(0, len(TEXT), 7):
            await client.write_event(SynthesizeChunk(TEXT[start : start + 7]).event())
        await client.write_event(SynthesizeStop().event())
        events = await events_through(client, "synthesize-stopped")
        await client.disconnect()
        return events

    cycles = audio_cycles(run(scenario()), SAMPLES_PER_CHUNK)
    assert b"".join(cycles) == reference_pcm(second_engine, TEXT)


def shaped_reference(engine: SopranoTTS, text: str, audio: AudioOptions) -> bytes:
    """The engine's stream of `text` through the same effects and pauses."""
    chunks = engine.infer_stream(
        text, max_chunk_size=DEFAULT_MAX_CHUNK_TOKENS, max_new_tokens=MAX_NEW_TOKENS, audio=audio
    )
    return to_pcm16(torch.cat(list(chunks)))


def test_server_wide_speed_volume_rate_and_pauses_shape_every_reply(
    shaped_server: ServerProcess, engine: SopranoTTS
) -> None:
    """Home Assistant sends no speed or volume: --speed and the rest apply to everything. With
    a sentence pause, a stream (a request per sentence) equals the one-shot reply."""

    async def scenario() -> tuple[list[Event], list[Event]]:
        client = await connect(shaped_server)
        await client.write_event(Synthesize(TEXT).event())
        one_shot = await events_through(client, "audio-stop")
        await client.write_event(SynthesizeStart().event())
        for start in range(0, len(TEXT), 9):
            await client.write_event(SynthesizeChunk(TEXT[start : start + 9]).event())
        await client.write_event(SynthesizeStop().event())
        streamed = await events_through(client, "synthesize-stopped")
        await client.disconnect()
        return one_shot, streamed

    one_shot, streamed = run(scenario())
    shaped_format = (SHAPED.sample_rate, SAMPLE_WIDTH, 1)
    [pcm] = audio_cycles(one_shot, SAMPLES_PER_CHUNK, shaped_format)
    cycles = audio_cycles(streamed, SAMPLES_PER_CHUNK, shaped_format)

    expected = shaped_reference(engine, TEXT, SHAPED)
    assert pcm == expected
    assert len(cycles) >= 2 and b"".join(cycles) == expected
    tail = round(SHAPED.trailing_silence * SHAPED.sample_rate) * SAMPLE_WIDTH
    assert not any(pcm[-tail:]) and any(pcm[-tail - 2 * SAMPLE_WIDTH : -tail])
    plain = len(reference_pcm(engine, TEXT)) // SAMPLE_WIDTH
    pauses = (len(prepare_text(TEXT)) - 1) * SHAPED.sentence_silence + SHAPED.trailing_silence
    speech = len(pcm) // SAMPLE_WIDTH / SHAPED.sample_rate - pauses
    assert speech == pytest.approx(plain / SAMPLE_RATE / SHAPED.effects.speed, rel=0.03)
