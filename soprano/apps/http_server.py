"""`soprano-server`: an OpenAI-compatible speech API (FastAPI + uvicorn) on one loaded engine.

`POST /v1/audio/speech` takes OpenAI's request (plus Soprano's sampling fields) and streams the
audio while it is generated: raw bytes of the asked-for format, or OpenAI's server-sent events
with `stream_format: "sse"`. Every request goes to the shared serving layer (soprano/serving),
which batches all requests' sentences together on its engine thread, so the event loop only
parses, encodes and sends.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import socket
import sys
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from soprano.apps.options import (
    add_audio_arguments,
    add_model_arguments,
    add_serving_arguments,
    add_voice_arguments,
    audio_options,
    configure_logging,
    serving_limits,
    voice_catalog,
    voice_loaders,
)
from soprano.audio.effects import AudioEffects
from soprano.audio.pauses import AudioOptions
from soprano.constants import (
    DEFAULT_REPETITION_PENALTY,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_P,
    MAX_NEW_TOKENS,
    SAMPLE_RATE,
    TOKEN_SAMPLES,
)
from soprano.encoding import FORMATS, encode_audio, require_encoder, stream_encoder
from soprano.errors import SopranoError
from soprano.lm import SamplingParams
from soprano.serving import (
    ServerBusyError,
    SpeechService,
    SpeechStream,
    SynthesisError,
)
from soprano.text import prepare_text
from soprano.tts import SopranoTTS

PROG = "soprano-server"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
FORMAT_SAMPLE_RATES = {"pcm": 24_000}
"""Rates of formats that OpenAI's clients play at a fixed rate: raw pcm has no header."""
UNSUPPORTED_FORMATS = ("aac",)
"""Formats OpenAI offers that no encoder here writes."""
OPENAI_VOICES = (
    "alloy", "ash", "ballad", "cedar", "coral", "echo", "fable", "marin", "nova", "onyx",
    "sage", "shimmer", "verse",
)  # fmt: skip
"""OpenAI's built-in voice names, which stock clients send by default: they speak with the
default voice unless this server has a voice of that name."""

_LOGGER = logging.getLogger(__name__)


class VoiceId(BaseModel):
    id: str


class SpeechRequest(BaseModel):
    """OpenAI's speech request, plus Soprano's sampling fields (send them via `extra_body`)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="Accepted for compatibility; one model serves.")
    input: str = Field(description="The text to speak.")
    voice: str | VoiceId | None = Field(
        None,
        description="A voice of GET /v1/audio/voices; OpenAI's own names (alloy, ...) and "
        "none speak with the default voice.",
    )
    instructions: str | None = Field(None, description="Not supported: must be empty.")
    response_format: Literal["mp3", "opus", "aac", "flac", "wav", "pcm"] = Field(
        "mp3",
        description="pcm is raw 16-bit little-endian mono, at 24 kHz as OpenAI's unless "
        "sample_rate says otherwise; opus is Ogg Opus at 48 kHz. aac is not supported.",
    )
    speed: float | None = Field(
        None, description="0.25 to 4, pitch kept (default: the server's --speed, 1)."
    )
    volume: float | None = Field(
        None, description="Soprano: loudness factor up to 10, peaks limited (default: 1)."
    )
    sample_rate: int | None = Field(
        None,
        description="Soprano: output rate in Hz, 8000 to 48000 (default: 24000 for pcm, as "
        "OpenAI; else the server's --sample-rate, 32000 native).",
    )
    sentence_silence: float | None = Field(
        None, description="Soprano: seconds of silence between sentences (default: 0)."
    )
    trailing_silence: float | None = Field(
        None, description="Soprano: seconds of silence after the last sentence (default: 0)."
    )
    stream_format: Literal["audio", "sse"] = Field(
        "audio", description="audio: the file's bytes; sse: speech.audio.delta/done events."
    )
    stream: bool | None = Field(
        None,
        description="Send audio while it is generated (default: yes, except flac, whose "
        "streamed form cannot state its length). false sends one file with exact headers.",
    )
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    repetition_penalty: float = DEFAULT_REPETITION_PENALTY
    seed: int | None = None
    max_new_tokens: int = Field(MAX_NEW_TOKENS, description="Longest audio per sentence, tokens.")
    chunk_size: int = Field(
        1, description="Tokens in the first streamed chunk; later chunks grow to 8."
    )
    retries: int = Field(0, description="Regenerations of hallucinated sentences (stream: false).")

    def voice_name(self) -> str | None:
        return self.voice.id if isinstance(self.voice, VoiceId) else self.voice

    def sampling(self) -> SamplingParams:
        """Raises ValueError for values out of range."""
        return SamplingParams.of(self)

    def audio(self, defaults: AudioOptions, sample_rate: int | None) -> AudioOptions:
        """The request's effects and pauses, the server's where it sets none (`sample_rate`:
        the server's --sample-rate, if given); raises ValueError for values out of range."""
        rate = self.sample_rate or sample_rate
        if rate is None:
            rate = FORMAT_SAMPLE_RATES.get(self.response_format, SAMPLE_RATE)
        effects = AudioEffects(
            speed=_given(self.speed, defaults.effects.speed),
            volume=_given(self.volume, defaults.effects.volume),
            sample_rate=rate,
        )
        return AudioOptions(
            effects,
            sentence_silence=_given(self.sentence_silence, defaults.sentence_silence),
            trailing_silence=_given(self.trailing_silence, defaults.trailing_silence),
        )


def _given(value: float | None, default: float) -> float:
    return default if value is None else value


class ApiError(Exception):
    """An error that reaches the client in OpenAI's JSON shape."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    """OpenAI's error shape. After a server error the connection is closed, so that a
    keep-alive client starts the next request on a clean one."""
    kind = "server_error" if status >= 500 else "invalid_request_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    headers = {"Connection": "close"} if status >= 500 else None
    return JSONResponse(body, status_code=status, headers=headers)


def max_body_bytes(max_input_chars: int) -> int:
    """The largest request body worth reading: the longest input written as JSON escapes
    (6 bytes a character) and room for the other fields."""
    return 6 * max_input_chars + 16_384


class BodyLimit:
    """Refuses a request body over `max_bytes` with 413 before it is read or parsed whole:
    at once by its Content-Length, or as soon as a chunked body passes the limit (uvicorn
    itself cuts a body longer than its Content-Length)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit() or int(declared) > self.max_bytes:
                await self._refuse(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        # No length given (a chunked body): read it here, up to the limit, then replay it.
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            if message["type"] != "http.request" or not message.get("more_body", False):
                break
        replay = iter(messages)

        async def replayed() -> Message:
            return next(replay, None) or await receive()

        await self.app(scope, replayed, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(
            413, f"the request body is larger than this server accepts ({self.max_bytes} bytes)"
        )
        response.headers["Connection"] = "close"
        await response(scope, receive, send)


def create_app(
    service: SpeechService,
    model_name: str,
    audio: AudioOptions | None = None,
    sample_rate: int | None = None,
) -> FastAPI:
    """The API around an already loaded engine and its serving layer. `audio` holds the
    defaults of requests' effect fields, `sample_rate` the server's rate for every format
    (None: 24 kHz for pcm, else 32 kHz)."""
    audio = audio or AudioOptions()
    app = FastAPI(
        title="Soprano TTS",
        summary="OpenAI-compatible text-to-speech with streaming, on the Soprano model.",
        version="1",
    )
    tts = service.tts
    limits = service.limits
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes(limits.max_input_chars))
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def api_error(_: Request, error: ApiError) -> JSONResponse:
        return error_response(error.status, error.message, error.param)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        if first["type"] == "json_invalid":
            reason = first.get("ctx", {}).get("error", "")
            return error_response(400, f"The request body is not valid JSON: {reason}")
        param = ".".join(str(part) for part in first["loc"] if part != "body") or None
        if first["type"] == "extra_forbidden":
            return error_response(400, f"Unrecognized request argument supplied: {param}", param)
        message = f"{param}: {first['msg']}" if param else first["msg"]
        if not isinstance(first.get("input"), dict | list):
            message += f", got {first.get('input')!r}"
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        return error_response(error.status_code, str(error.detail))

    @app.exception_handler(Exception)
    async def server_error(_: Request, error: Exception) -> JSONResponse:
        _LOGGER.exception("Request failed")
        return error_response(500, f"speech generation failed: {error}")

    @app.get("/health", summary="Whether the model is loaded, and how busy it is")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": model_name,
            "backend": tts.backend,
            "device": str(tts.device),
            "sample_rate": SAMPLE_RATE,
            "voices": list(service.voices),
            "default_voice": service.default_voice,
            "requests_in_progress": service.requests_in_progress,
        }

    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "soprano"}

    @app.get("/v1/models", summary="The one model this server speaks with")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}", summary="The model, by id")
    async def get_model(model_id: str) -> dict[str, Any]:
        if model_id != model_name:
            raise ApiError(404, f"The model '{model_id}' does not exist", "model")
        return model_card()

    @app.get("/v1/audio/voices", summary="The voices this server speaks with")
    async def list_voices() -> dict[str, Any]:
        """In the shape Open WebUI and AnythingLLM read."""
        voices = [{"id": name, "name": name} for name in service.voices]
        return {"voices": voices, "default": service.default_voice}

    audio_types: dict[str, dict[str, Any]] = {fmt.media_type: {} for fmt in FORMATS.values()}
    audio_types["text/event-stream"] = {}

    @app.post(
        "/v1/audio/speech",
        summary="Speak text",
        response_class=Response,
        responses={200: {"content": audio_types, "description": "The audio, or SSE events"}},
    )
    async def create_speech(request: SpeechRequest) -> Response:
        streamed = _check(request, limits.max_input_chars)
        voice = _voice(request.voice_name(), service)
        try:
            fmt = require_encoder(request.response_format)
        except SopranoError as error:
            raise ApiError(400, str(error), "response_format") from error
        sentences = await asyncio.to_thread(prepare_text, request.input)
        if not sentences:
            raise ApiError(
                400,
                "input has nothing to speak: no words remain after normalisation "
                "(Soprano reads English letters, numbers and common symbols)",
                "input",
            )
        try:
            stream = service.submit(
                sentences,
                request.sampling(),
                request.chunk_size,
                retries=request.retries,
                voice=voice,
                audio=request.audio(audio, sample_rate),
            )
        except ServerBusyError as error:
            raise ApiError(503, str(error)) from error
        except ValueError as error:
            raise ApiError(400, str(error), _field_named(str(error))) from error
        headers = {"Content-Disposition": f'attachment; filename="speech.{fmt.name}"'}
        if not streamed:
            audio_pieces = [chunk async for chunk in _read(stream)]
            whole = torch.cat(audio_pieces) if audio_pieces else torch.zeros(0)
            data = encode_audio(whole, fmt.name, stream.sample_rate)
            return Response(data, media_type=fmt.media_type, headers=headers)
        if request.stream_format == "sse":
            usage = _usage(service.engines[voice], sentences)
            events = _sse_events(stream, fmt.name, usage)
            return StreamingResponse(events, media_type="text/event-stream")
        pieces = _audio_stream(stream, fmt.name)
        return StreamingResponse(pieces, media_type=fmt.media_type, headers=headers)

    return app


def _check(request: SpeechRequest, max_input_chars: int) -> bool:
    """Refuse what cannot be honoured; whether the response is streamed."""
    if not request.input.strip():
        raise ApiError(400, "input is empty: give the text to speak", "input")
    if len(request.input) > max_input_chars:
        raise ApiError(
            400,
            f"input is {len(request.input)} characters; this server accepts at most "
            f"{max_input_chars} per request",
            "input",
        )
    if request.response_format in UNSUPPORTED_FORMATS:
        supported = ", ".join(FORMATS)
        raise ApiError(
            400,
            f"response_format '{request.response_format}' is not supported; use {supported}",
            "response_format",
        )
    if request.instructions:
        raise ApiError(
            400,
            "instructions are not supported: Soprano cannot be directed; choose a voice instead",
            "instructions",
        )
    if request.stream_format == "sse" and request.stream is False:
        raise ApiError(400, "stream_format 'sse' always streams; drop stream: false", "stream")
    streamed = request.stream_format == "sse" or (
        request.stream if request.stream is not None else request.response_format != "flac"
    )
    if streamed and request.retries:
        raise ApiError(
            400,
            "retries needs stream: false, because streamed audio cannot be taken back",
            "retries",
        )
    return streamed


AUDIO_FIELDS = ("speed", "volume", "sample_rate", "sentence_silence", "trailing_silence")


def _field_named(message: str) -> str | None:
    """The request field an engine or effects error names (its message starts with it)."""
    return next((name for name in AUDIO_FIELDS if message.startswith(f"{name} ")), None)


def _voice(name: str | None, service: SpeechService) -> str:
    """The voice a request names: one of the server's, else OpenAI's names or none mean the
    default; anything else is refused with the list."""
    if name in service.voices:
        return name
    if name is None or name in OPENAI_VOICES:
        return service.default_voice
    raise ApiError(
        400, f"voice '{name}' does not exist; this server has {', '.join(service.voices)}", "voice"
    )


async def _read(stream: SpeechStream) -> AsyncIterator[torch.Tensor]:
    """The request's audio; a generation failure becomes a 500 before any byte is sent."""
    try:
        async for chunk in stream:
            yield chunk
    except SynthesisError as error:
        raise ApiError(500, f"speech generation failed: {error}") from error


async def _encoded(stream: SpeechStream, format_name: str) -> AsyncIterator[bytes]:
    """Encoded bytes as the engine produces audio (empty while the codec is still buffering).

    The body is produced only as fast as the client reads it, so a client that stops reading
    pauses its generation (the serving layer's backpressure), and one that hangs up ends it.
    """
    encoder = stream_encoder(format_name, stream.sample_rate)
    try:
        async for chunk in stream:
            encoder.write(chunk)
            yield encoder.take()
    except SynthesisError:
        _LOGGER.exception("Generation failed while streaming; the response is cut short")
        return
    finally:
        stream.cancel()
    yield encoder.finish()


async def _audio_stream(stream: SpeechStream, format_name: str) -> AsyncIterator[bytes]:
    async for data in _encoded(stream, format_name):
        if data:
            yield data


async def _sse_events(
    stream: SpeechStream, format_name: str, usage: dict[str, int]
) -> AsyncIterator[bytes]:
    """OpenAI's speech events: one speech.audio.delta per encoded piece, then speech.audio.done."""
    samples = 0
    async for data in _encoded(stream, format_name):
        if data:
            yield _event({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode()})
    if stream.job is not None:
        samples = stream.job.produced_samples - stream.job.silence_samples
    output_tokens = samples // TOKEN_SAMPLES
    usage = usage | {
        "output_tokens": output_tokens,
        "total_tokens": usage["input_tokens"] + output_tokens,
    }
    yield _event({"type": "speech.audio.done", "usage": usage})


def _usage(tts: SopranoTTS, sentences: list[str]) -> dict[str, int]:
    return {"input_tokens": sum(len(tts.tokenizer.encode(s)) for s in sentences)}


def _event(payload: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(payload)}\n\n".encode()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        allow_abbrev=False,
        prog=PROG,
        description="Serve Soprano through an OpenAI-compatible speech API "
        "(POST /v1/audio/speech, GET /v1/models, GET /health, OpenAPI at /docs).",
    )
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"(default: {DEFAULT_HOST})")
    parser.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help=f"0 picks a free one (default: {DEFAULT_PORT})",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=("debug", "info", "warning", "error"),
        help="server and engine messages (default: info)",
    )
    add_model_arguments(parser)
    add_voice_arguments(parser)
    add_audio_arguments(parser, "defaults of the request fields")
    add_serving_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    limits = serving_limits(parser, args)
    catalog = voice_catalog(parser, args)
    audio = audio_options(parser, args)
    configure_logging(getattr(logging, args.log_level.upper()))
    try:
        listener = _listen(args.host, args.port)
        service = SpeechService(voice_loaders(args, catalog), limits, catalog.default)
    except (SopranoError, ValueError, OSError) as error:
        print(f"{PROG}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    app = create_app(service, args.model, audio, args.sample_rate)
    host, port = listener.getsockname()[:2]
    server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level))
    print(f"{PROG}: serving {args.model} on http://{_url_host(host)}:{port}", file=sys.stderr)
    sys.stderr.flush()
    server.run(sockets=[listener])
    return 0


def _listen(host: str, port: int) -> socket.socket:
    """Bind before loading the model, so a taken port fails fast; clients queue until ready."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


if __name__ == "__main__":
    sys.exit(main())
