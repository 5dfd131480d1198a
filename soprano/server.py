"""`soprano-server`: an OpenAI-compatible speech API (FastAPI + uvicorn) on one loaded engine.

`POST /v1/audio/speech` takes OpenAI's request (plus Soprano's sampling fields) and streams the
audio while it is generated: raw bytes of the asked-for format, or OpenAI's server-sent events
with `stream_format: "sse"`. The engine is not thread-safe, so one worker thread runs every call
into it, in arrival order, while the event loop keeps serving other requests.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, TypeVar

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from soprano.constants import (
    DEFAULT_REPETITION_PENALTY,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_P,
    MAX_NEW_TOKENS,
    SAMPLE_RATE,
    TOKEN_SAMPLES,
)
from soprano.encoding import (
    FORMATS,
    AudioEncoder,
    encode_audio,
    require_encoder,
    stream_encoder,
)
from soprano.errors import SopranoError
from soprano.frontend import add_model_arguments, configure_logging, load_tts
from soprano.text import prepare_text
from soprano.tts import SopranoTTS

PROG = "soprano-server"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
MAX_INPUT_CHARS = 4096
"""OpenAI's own limit on `input`; `--max-input-chars` changes it."""
UNSUPPORTED_FORMATS = ("aac",)
"""Formats OpenAI offers that no encoder here writes."""

_LOGGER = logging.getLogger(__name__)
_T = TypeVar("_T")


class VoiceId(BaseModel):
    id: str


class SpeechRequest(BaseModel):
    """OpenAI's speech request, plus Soprano's sampling fields (send them via `extra_body`)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="Accepted for compatibility; one model serves.")
    input: str = Field(description="The text to speak.")
    voice: str | VoiceId | None = Field(None, description="Accepted; Soprano has one voice.")
    instructions: str | None = Field(None, description="Not supported: must be empty.")
    response_format: Literal["mp3", "opus", "aac", "flac", "wav", "pcm"] = Field(
        "mp3",
        description="pcm is raw 16-bit little-endian mono at 32 kHz; opus is Ogg Opus at 48 kHz. "
        "aac is not supported.",
    )
    speed: float = Field(1.0, ge=0.25, le=4.0, description="Only 1.0 can be honoured.")
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
    chunk_size: int = Field(1, description="Tokens per streamed chunk.")
    retries: int = Field(0, description="Regenerations of hallucinated sentences (stream: false).")

    def sampling(self) -> dict[str, Any]:
        return {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "repetition_penalty": self.repetition_penalty,
            "seed": self.seed,
            "max_new_tokens": self.max_new_tokens,
        }


class ApiError(Exception):
    """An error that reaches the client in OpenAI's JSON shape."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return JSONResponse(body, status_code=status)


class EngineWorker:
    """Runs every engine call on one thread, in order, without blocking the event loop."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="soprano-engine")
        self._lock = threading.Lock()
        self._jobs = 0

    @property
    def requests_in_progress(self) -> int:
        """Requests the engine is working on or that wait for it."""
        with self._lock:
            return self._jobs

    def _submit(self, job: Callable[[], _T]) -> asyncio.Future[_T]:
        def run() -> _T:
            try:
                return job()
            finally:
                with self._lock:
                    self._jobs -= 1

        with self._lock:
            self._jobs += 1
        return asyncio.get_running_loop().run_in_executor(self._executor, run)

    async def call(self, function: Callable[[], _T]) -> _T:
        return await self._submit(function)

    async def iterate(self, make_iterator: Callable[[], Iterator[_T]]) -> AsyncIterator[_T]:
        """The iterator's items as they are produced on the engine thread.

        When the consumer stops early (a client hung up), the engine stops after its next item.
        """
        loop = asyncio.get_running_loop()
        items: asyncio.Queue[tuple[bool, Any]] = asyncio.Queue()
        stop = threading.Event()

        def deliver(done: bool, value: Any) -> None:
            if not loop.is_closed():
                loop.call_soon_threadsafe(items.put_nowait, (done, value))

        def produce() -> None:
            try:
                iterator = make_iterator()
                try:
                    for item in iterator:
                        deliver(False, item)
                        if stop.is_set():
                            break
                finally:
                    getattr(iterator, "close", lambda: None)()
                deliver(True, None)
            except Exception as error:
                deliver(True, error)

        self._submit(produce)
        try:
            while True:
                done, value = await items.get()
                if done:
                    if value is not None:
                        raise value
                    return
                yield value
        finally:
            stop.set()


def create_app(tts: SopranoTTS, model_name: str, max_input_chars: int = MAX_INPUT_CHARS) -> FastAPI:
    """The API around an already loaded engine."""
    app = FastAPI(
        title="Soprano TTS",
        summary="OpenAI-compatible text-to-speech with streaming, on the Soprano model.",
        version="1",
    )
    worker = EngineWorker()
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
            "requests_in_progress": worker.requests_in_progress,
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

    audio_types: dict[str, dict[str, Any]] = {fmt.media_type: {} for fmt in FORMATS.values()}
    audio_types["text/event-stream"] = {}

    @app.post(
        "/v1/audio/speech",
        summary="Speak text",
        response_class=Response,
        responses={200: {"content": audio_types, "description": "The audio, or SSE events"}},
    )
    async def create_speech(request: SpeechRequest) -> Response:
        streamed = _check(request, max_input_chars)
        try:
            fmt = require_encoder(request.response_format)
        except SopranoError as error:
            raise ApiError(400, str(error), "response_format") from error
        headers = {"Content-Disposition": f'attachment; filename="speech.{fmt.name}"'}
        if not streamed:
            data = await _engine_call(worker, lambda: _whole_file(tts, request))
            return Response(data, media_type=fmt.media_type, headers=headers)
        if request.stream_format == "sse":
            events = worker.iterate(lambda: _sse_events(tts, request))
            first = await _first(events)
            return StreamingResponse(_resume(first, events), media_type="text/event-stream")
        pieces = worker.iterate(lambda: _audio_stream(tts, request))
        first = await _first(pieces)
        return StreamingResponse(_resume(first, pieces), media_type=fmt.media_type, headers=headers)

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
    if request.speed != 1.0:
        raise ApiError(
            400,
            f"speed {request.speed} cannot be honoured: Soprano speaks at one rate; "
            "send 1.0 or leave it out",
            "speed",
        )
    if request.instructions:
        raise ApiError(400, "instructions are not supported: Soprano has one voice", "instructions")
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


async def _engine_call(worker: EngineWorker, function: Callable[[], _T]) -> _T:
    try:
        return await worker.call(function)
    except ValueError as error:
        raise ApiError(400, str(error)) from error


async def _first(items: AsyncIterator[_T]) -> _T | None:
    """The first item, so that errors found before any audio is sent get a proper status."""
    try:
        return await anext(items)
    except StopAsyncIteration:
        return None
    except ValueError as error:
        raise ApiError(400, str(error)) from error


async def _resume(first: _T | None, rest: AsyncIterator[_T]) -> AsyncIterator[_T]:
    try:
        if first is not None:
            yield first
        async for item in rest:
            yield item
    finally:
        await rest.aclose()  # type: ignore[attr-defined]


def _whole_file(tts: SopranoTTS, request: SpeechRequest) -> bytes:
    audio = tts.infer(request.input, retries=request.retries, **request.sampling())
    return encode_audio(audio, request.response_format)


def _encoded(tts: SopranoTTS, request: SpeechRequest, encoder: AudioEncoder) -> Iterator[bytes]:
    """Encoded bytes as the engine produces audio; empty while the codec is still buffering."""
    chunks = tts.infer_stream(request.input, request.chunk_size, **request.sampling())
    try:
        for chunk in chunks:
            encoder.write(chunk)
            yield encoder.take()
    finally:
        chunks.close()
    yield encoder.finish()


def _audio_stream(tts: SopranoTTS, request: SpeechRequest) -> Iterator[bytes]:
    encoder = stream_encoder(request.response_format)
    yield from (data for data in _encoded(tts, request, encoder) if data)


def _sse_events(tts: SopranoTTS, request: SpeechRequest) -> Iterator[bytes]:
    """OpenAI's speech events: one speech.audio.delta per encoded piece, then speech.audio.done."""
    encoder = stream_encoder(request.response_format)
    for data in _encoded(tts, request, encoder):
        if data:
            yield _event({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode()})
    input_tokens = sum(len(tts.tokenizer.encode(s)) for s in prepare_text(request.input))
    output_tokens = encoder.samples_written // TOKEN_SAMPLES
    usage = {
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "total_tokens": input_tokens + output_tokens,
    }
    yield _event({"type": "speech.audio.done", "usage": usage})


def _event(payload: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(payload)}\n\n".encode()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
        "--max-input-chars",
        type=int,
        default=MAX_INPUT_CHARS,
        metavar="N",
        help=f"longest accepted input (default: {MAX_INPUT_CHARS}, as OpenAI)",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=("debug", "info", "warning", "error"),
        help="server and engine messages (default: info)",
    )
    add_model_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(getattr(logging, args.log_level.upper()))
    try:
        listener = _listen(args.host, args.port)
        tts = load_tts(args)
    except (SopranoError, ValueError, OSError) as error:
        print(f"{PROG}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    app = create_app(tts, args.model, args.max_input_chars)
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
