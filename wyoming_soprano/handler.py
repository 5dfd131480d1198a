"""One Wyoming connection: events in, audio out, never blocking the event loop.

Reading and answering are two tasks. The reader takes events as they come (so `describe`, text
fragments and a disconnect are seen while audio is still being produced); the speaker writes the
replies in request order. An engine failure or a malformed event is answered with `error` and
the connection is closed; a client that goes away has its synthesis stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, replace
from typing import Any

from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.error import Error
from wyoming.event import Event
from wyoming.info import Describe
from wyoming.server import AsyncEventHandler
from wyoming.tts import (
    Synthesize,
    SynthesizeChunk,
    SynthesizeStart,
    SynthesizeStop,
    SynthesizeStopped,
)

from soprano.audio import to_pcm16
from soprano.audio.pauses import AudioOptions
from soprano.constants import SAMPLE_WIDTH
from soprano.errors import SopranoError
from soprano.lm import SamplingParams
from soprano.serving import (
    ServerBusyError,
    SpeechService,
    SpeechStream,
    SynthesisError,
)
from soprano.text import prepare_text
from wyoming_soprano.framing import ProtocolError, read_event
from wyoming_soprano.sentences import SentenceStream

_LOGGER = logging.getLogger(__name__)

CHANNELS = 1
PLAIN_TEXT = "text"
"""The only `text_format` accepted (wyoming ≥ 1.10 clients may also send "ssml")."""
MAX_QUEUED_REPLIES = 4
"""Replies one connection may have waiting; past that its events are not read until one is
sent (a client pipelining requests without reading cannot queue unbounded work)."""


class ConnectionCount:
    """Connections open now, against the most the server takes (below its descriptor limit,
    so that accepting never fails for everyone)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0


@dataclass(frozen=True)
class ServerContext:
    """What every connection shares."""

    info_event: Event
    service: SpeechService
    sampling: SamplingParams
    chunk_size: int
    """Tokens in the first streamed chunk of a sentence (later ones grow)."""
    samples_per_chunk: int
    audio: AudioOptions
    """Effects and pauses of every request (Home Assistant sends no speed or volume)."""
    idle_timeout: float | None
    """Seconds a connection may take to complete an event while nothing is spoken for it
    (None: no limit, for stdio, whose one peer is the process that started the server)."""
    connections: ConnectionCount


class RequestError(Exception):
    """A request the server refuses: answered with `error`, then the connection closes."""

    def __init__(self, text: str, code: str) -> None:
        super().__init__(text)
        self.text = text
        self.code = code


@dataclass(frozen=True)
class Speech:
    """A reply of one audio cycle: the audio of some sentences, in order."""

    stream: SpeechStream
    announce_empty: bool
    """Send audio-start/audio-stop even without audio: a `synthesize` always gets one cycle."""


Reply = Speech | Event


class SopranoEventHandler(AsyncEventHandler):
    """Serves one connection (one TCP client, or the whole of stdio)."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, context: ServerContext
    ) -> None:
        super().__init__(reader, writer)
        self.context = context
        self._stream: SentenceStream | None = None
        self._stream_voice: str | None = None
        """The voice that synthesize-start asked for: the stream's sentences use it."""
        self._stream_spoken = False
        """The open stream has had sentences spoken: later ones follow a sentence pause."""
        self._replies: asyncio.Queue[Reply | None] = asyncio.Queue()
        self._room = asyncio.Semaphore(MAX_QUEUED_REPLIES)
        self._unfinished: set[SpeechStream] = set()
        """Requests whose audio is not completely sent yet."""

    async def run(self) -> None:
        """Read events until EOF; then finish the replies already asked for (unless gone)."""
        self._is_running = True
        connections = self.context.connections
        if connections.open >= connections.limit:
            _LOGGER.warning("Refusing a connection: %d are open already", connections.open)
            await self._close(
                Error(
                    text=f"the server has {connections.open} connections open; try again later",
                    code=ServerBusyError.__name__,  # as when the engine is full
                )
            )
            await self.disconnect()
            return
        connections.open += 1
        _LOGGER.debug("Connection opened (%d open)", connections.open)
        try:
            await self._serve()
        finally:
            connections.open -= 1
            _LOGGER.debug("Connection closed (%d open)", connections.open)

    async def _serve(self) -> None:
        speaker = asyncio.create_task(self._write_replies(), name="wyoming reply writer")
        try:
            refusal = await self._read_events()
            if refusal is None:
                self._replies.put_nowait(None)
                await speaker
            else:
                speaker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await speaker
                await self._close(refusal)
        finally:
            speaker.cancel()
            self._cancel_all()
            await self.disconnect()
            self.writer.close()

    async def _read_events(self) -> Error | None:
        """Handle events until EOF (None) or until a request must be refused (its `error`)."""
        while self._is_running:
            try:
                event = await self._next_event()
                if event is None:
                    return None
                _LOGGER.debug("Received %s", event.type)
                await self.handle_event(event)
                await asyncio.sleep(0)  # a flood of events must not starve other connections
            except ProtocolError as error:
                _LOGGER.warning("Closing a connection that sent a malformed event: %s", error)
                return Error(text=str(error), code="ProtocolError")
            except RequestError as error:
                _LOGGER.warning("Refused a request: %s", error.text)
                return Error(text=error.text, code=error.code)
            except ConnectionError:
                return None
        return None

    async def _next_event(self) -> Event | None:
        """The next event, or None at EOF or once the connection has idled too long: a client
        that completes no event within `idle_timeout` seconds while nothing is being spoken
        for it (an idle connection, or a header trickled byte by byte) is let go."""
        if self.context.idle_timeout is None:
            return await read_event(self.reader)
        reading = asyncio.ensure_future(read_event(self.reader))
        try:
            while True:
                done, _ = await asyncio.wait({reading}, timeout=self.context.idle_timeout)
                if done:
                    return reading.result()
                if not self._unfinished:
                    _LOGGER.info("Closing a connection idle for %g s", self.context.idle_timeout)
                    return None
        finally:
            reading.cancel()

    async def handle_event(self, event: Event) -> bool:
        if Describe.is_type(event.type):
            await self.write_event(self.context.info_event)
        elif Synthesize.is_type(event.type):
            if self._stream is not None:
                _LOGGER.debug("Ignoring the whole-text synthesize sent inside a stream")
            else:
                voice = self._check_options(event.data)
                sentences = await asyncio.to_thread(prepare_text, _text(event.data))
                await self._speak(sentences, voice, self.context.audio, announce_empty=True)
        elif SynthesizeStart.is_type(event.type):
            if self._stream is not None:
                _LOGGER.debug("synthesize-start inside a stream ends the open stream first")
                await self._end_stream()
            self._stream_voice = self._check_options(event.data)
            self._stream = SentenceStream()
            self._stream_spoken = False
        elif SynthesizeChunk.is_type(event.type):
            if self._stream is None:
                _LOGGER.debug("Ignoring synthesize-chunk outside a stream")
            else:
                sentences = await asyncio.to_thread(self._stream.add, _text(event.data))
                if sentences:
                    await self._speak_streamed(sentences, last=False)
        elif SynthesizeStop.is_type(event.type):
            await self._end_stream()
        else:
            _LOGGER.debug("Ignoring event %s", event.type)
        return True

    def _check_options(self, data: dict[str, Any]) -> str:
        """The voice to speak with; refuses what cannot be honoured."""
        text_format = data.get("text_format")
        if text_format not in (None, PLAIN_TEXT):
            raise RequestError(
                f"text_format {text_format!r} is not supported; send plain text",
                "UnsupportedTextFormat",
            )
        voice = data.get("voice")
        if voice is not None and not isinstance(voice, dict):
            raise RequestError("'voice' must be an object", "InvalidRequest")
        name = (voice or {}).get("name")
        service = self.context.service
        if name is None:
            return service.default_voice
        if name not in service.voices:
            # Home Assistant sends the voice it remembers, which may be gone from this server.
            _LOGGER.info("Unknown voice %r; speaking with %s", name, service.default_voice)
            return service.default_voice
        return str(name)

    async def _speak_streamed(self, sentences: list[str], last: bool) -> None:
        """Sentences of the open stream, each batch its own audio cycle: a sentence pause
        before all but the first, the trailing silence after the last."""
        audio = self.context.audio
        audio = replace(
            audio,
            leading_silence=audio.sentence_silence if self._stream_spoken else 0.0,
            trailing_silence=audio.trailing_silence if last else 0.0,
        )
        self._stream_spoken = True
        await self._speak(sentences, self._stream_voice, audio, announce_empty=False)

    async def _speak(
        self, sentences: list[str], voice: str | None, audio: AudioOptions, announce_empty: bool
    ) -> None:
        await self._room.acquire()
        context = self.context
        try:
            stream = context.service.submit(
                sentences, context.sampling, context.chunk_size, voice=voice, audio=audio
            )
        except (SopranoError, ValueError) as error:
            self._room.release()
            raise RequestError(str(error), type(error).__name__) from error
        self._unfinished.add(stream)
        self._replies.put_nowait(Speech(stream, announce_empty))

    def _cancel_all(self) -> None:
        for stream in self._unfinished:
            stream.cancel()

    async def _end_stream(self) -> None:
        """Speak what is left of the open stream (if any), then `synthesize-stopped`."""
        if self._stream is not None:
            rest = await asyncio.to_thread(self._stream.finish)
            self._stream = None
            if rest or (self._stream_spoken and self.context.audio.trailing_silence):
                await self._speak_streamed(rest, last=True)  # no rest: the silence alone
        self._replies.put_nowait(SynthesizeStopped().event())

    async def _write_replies(self) -> None:
        """Write the replies in order; stop everything on an engine failure or a lost client."""
        try:
            while (reply := await self._replies.get()) is not None:
                if isinstance(reply, Speech):
                    try:
                        await self._play(reply)
                    finally:
                        self._room.release()
                else:
                    await self.write_event(reply)
        except SynthesisError as error:
            await self._close(Error(text=str(error), code=error.code))
        except ConnectionError:
            if self._unfinished:
                _LOGGER.info("Client went away; stopped %d synthesis job(s)", len(self._unfinished))
            await self._close(None)

    async def _play(self, speech: Speech) -> None:
        """One audio cycle, each chunk `samples_per_chunk` long except the last."""
        chunk_bytes = self.context.samples_per_chunk * SAMPLE_WIDTH
        rate = speech.stream.sample_rate
        started = False
        if speech.announce_empty:
            await self.write_event(AudioStart(rate, SAMPLE_WIDTH, CHANNELS).event())
            started = True
        pending = bytearray()
        async for audio in speech.stream:
            if not started:
                await self.write_event(AudioStart(rate, SAMPLE_WIDTH, CHANNELS).event())
                started = True
            pending += to_pcm16(audio)
            while len(pending) >= chunk_bytes:
                await self._write_chunk(bytes(pending[:chunk_bytes]), rate)
                del pending[:chunk_bytes]
        self._unfinished.discard(speech.stream)
        if pending:
            await self._write_chunk(bytes(pending), rate)
        if started:
            await self.write_event(AudioStop().event())

    async def _write_chunk(self, pcm: bytes, rate: int) -> None:
        await self.write_event(AudioChunk(rate, SAMPLE_WIDTH, CHANNELS, pcm).event())

    async def _close(self, error: Error | None) -> None:
        """Stop this connection's synthesis, send `error` if any, and hang up."""
        self._cancel_all()
        if error is not None:
            try:
                await self.write_event(error.event())
            except ConnectionError:
                _LOGGER.debug("Client gone before the error could be sent")
        self._is_running = False
        self.writer.close()
        self.reader.feed_eof()


def _text(data: dict[str, Any]) -> str:
    text = data.get("text")
    if not isinstance(text, str):
        raise RequestError("the event needs a string 'text'", "InvalidRequest")
    return text
