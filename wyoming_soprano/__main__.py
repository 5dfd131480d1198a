"""`python -m wyoming_soprano`: load the model once, then serve Wyoming clients until stopped."""

from __future__ import annotations

import argparse
import asyncio
import logging
import resource
import signal
import sys
import time
from functools import partial
from typing import Any

from wyoming.event import async_get_stdin, async_get_stdout
from wyoming.server import AsyncServer, AsyncStdioServer, AsyncTcpServer, HandlerFactory

from soprano.apps.options import (
    add_audio_arguments,
    add_model_arguments,
    add_sampling_arguments,
    add_serving_arguments,
    add_voice_arguments,
    audio_options,
    sampling_params,
    serving_limits,
    voice_catalog,
    voice_loaders,
)
from soprano.audio.pauses import AudioOptions
from soprano.constants import TOKEN_SAMPLES
from soprano.errors import SopranoError
from soprano.lm import SamplingParams
from soprano.serving import SpeechService
from soprano.serving.voices import VoiceCatalog
from wyoming_soprano import __version__
from wyoming_soprano.handler import ConnectionCount, ServerContext, SopranoEventHandler
from wyoming_soprano.info import PROGRAM_NAME, build_info
from wyoming_soprano.zeroconf import AnnouncementError, ZeroconfAnnouncer, advertised_address

_LOGGER = logging.getLogger("wyoming_soprano")

DEFAULT_URI = "stdio://"
DEFAULT_IDLE_TIMEOUT = 60.0
ERROR_LOG_INTERVAL = 10.0
"""Seconds between two logs of the same event-loop error (accept failures repeat fast)."""
DESCRIPTORS_KEPT = 64
"""Open files kept free of connections: the model, logs, zeroconf's sockets."""


def default_max_connections() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(1, min(1024, soft - DESCRIPTORS_KEPT))


class RateLimitedErrors:
    """An event-loop exception handler that logs each kind of error at most once per
    `interval` seconds (a full descriptor table makes accept fail hundreds of times a second)."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        message = str(context.get("message", ""))
        now = time.monotonic()
        if now - self._last.get(message, -self.interval) >= self.interval:
            self._last[message] = now
            loop.default_exception_handler(context)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        allow_abbrev=False,
        prog="wyoming-soprano",
        description="Wyoming text-to-speech server for Soprano.",
    )
    parser.add_argument(
        "--uri", default=DEFAULT_URI, help="tcp://HOST:PORT, unix:///PATH or stdio:// (default)"
    )
    add_model_arguments(parser)
    add_voice_arguments(parser)
    add_audio_arguments(parser, "every request: Home Assistant sends none")
    add_sampling_arguments(parser, "sampling for every request")
    add_serving_arguments(parser)
    parser.add_argument(
        "--samples-per-chunk",
        type=int,
        default=TOKEN_SAMPLES,
        help="Samples per audio-chunk event; the last chunk of a cycle may be shorter "
        "(default: %(default)s, one token of audio)",
    )
    parser.add_argument(
        "--idle-timeout",
        type=float,
        default=DEFAULT_IDLE_TIMEOUT,
        metavar="SECONDS",
        help="close a connection that completes no event for this long while nothing is "
        "being spoken for it; stdio has no limit (default: %(default)s)",
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        default=default_max_connections(),
        metavar="N",
        help="connections served at once; more get an error (default: %(default)s, below the "
        "open-file limit)",
    )
    parser.add_argument(
        "--no-streaming",
        action="store_true",
        help="Do not advertise streaming text input (streaming events are still handled)",
    )
    parser.add_argument(
        "--zeroconf",
        nargs="?",
        const=PROGRAM_NAME,
        metavar="NAME",
        help=f"Announce the server over zeroconf/mDNS as NAME (default: {PROGRAM_NAME}); "
        "needs a tcp:// URI",
    )
    parser.add_argument(
        "--zeroconf-host",
        help="Address to announce (default: the bound address, or the detected LAN address "
        "when bound to all interfaces)",
    )
    parser.add_argument("--debug", action="store_true", help="Log DEBUG messages")
    parser.add_argument(
        "--log-format", default=logging.BASIC_FORMAT, help="Format of log messages (stderr)"
    )
    parser.add_argument("--version", action="version", version=__version__)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format=args.log_format,
        stream=sys.stderr,
    )
    try:
        server = AsyncServer.from_uri(args.uri)
    except ValueError as error:
        parser.error(f"--uri {args.uri}: {error}")
    if args.zeroconf and not isinstance(server, AsyncTcpServer):
        parser.error("--zeroconf needs a tcp:// --uri")
    if args.samples_per_chunk < 1:
        parser.error("--samples-per-chunk must be at least 1")
    if not args.idle_timeout > 0:
        parser.error("--idle-timeout must be positive")
    if args.max_connections < 1:
        parser.error("--max-connections must be at least 1")

    sampling = sampling_params(parser, args)
    limits = serving_limits(parser, args)
    audio = audio_options(parser, args)

    catalog = voice_catalog(parser, args)
    try:
        service = SpeechService(voice_loaders(args, catalog), limits, catalog.default)
    except (SopranoError, ValueError) as error:  # one line for a missing model, no traceback
        _LOGGER.error("Cannot load the model: %s", error)
        return 1
    except KeyboardInterrupt:
        return 130
    try:
        return asyncio.run(serve(args, server, service, catalog, sampling, audio))
    except (AnnouncementError, OSError) as error:
        _LOGGER.error("Cannot serve: %s", error)
        return 1


async def serve(
    args: argparse.Namespace,
    server: AsyncServer,
    service: SpeechService,
    catalog: VoiceCatalog,
    sampling: SamplingParams,
    audio: AudioOptions,
) -> int:
    """Serve until SIGTERM/SIGINT (or, on stdio, until stdin closes)."""
    context = ServerContext(
        info_event=build_info(catalog, streaming=not args.no_streaming).event(),
        service=service,
        sampling=sampling,
        chunk_size=max(1, args.samples_per_chunk // TOKEN_SAMPLES),
        samples_per_chunk=args.samples_per_chunk,
        audio=audio,
        idle_timeout=None if isinstance(server, AsyncStdioServer) else args.idle_timeout,
        connections=ConnectionCount(args.max_connections),
    )
    handler_factory = partial(SopranoEventHandler, context=context)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(RateLimitedErrors(ERROR_LOG_INTERVAL))
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signal_number, stop.set)
    try:
        if isinstance(server, AsyncStdioServer):
            await serve_stdio(handler_factory, stop)
        else:
            await serve_sockets(args, server, handler_factory, stop)
    finally:
        await asyncio.to_thread(service.close)
    _LOGGER.info("Stopped")
    return 0


async def serve_sockets(
    args: argparse.Namespace, server: AsyncServer, factory: HandlerFactory, stop: asyncio.Event
) -> None:
    announcer = None
    if args.zeroconf:
        assert isinstance(server, AsyncTcpServer)
        address = advertised_address(server.host, args.zeroconf_host)
        announcer = ZeroconfAnnouncer(args.zeroconf, address, server.port)
    await server.start(factory)
    if announcer is not None:
        await announcer.register()
    _LOGGER.info("Ready on %s", args.uri)
    try:
        await stop.wait()
    finally:
        if announcer is not None:
            await announcer.unregister()
        await server.stop()


async def serve_stdio(factory: HandlerFactory, stop: asyncio.Event) -> None:
    """One connection over stdin/stdout; wyoming's stdio server would bypass the handler's run."""
    handler = factory(await async_get_stdin(), await async_get_stdout())
    _LOGGER.info("Ready on stdio://")
    connection = asyncio.create_task(handler.run())
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({connection, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if not connection.done():
        await handler.stop()
    await connection


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    run()
