"""Many clients at once against real servers: continuous batching against batch size 1.

`script/loadtest` starts, on the full-size random checkpoint whose [STOP] never wins (every
sentence is `--tokens` tokens), a Wyoming server and an HTTP server with the default scheduler
and the same two with `--max-batch-size 1`, then, side by side in one run:

- the engine alone in a separate process first (`infer_stream` with one-token chunks, the
  serving layer's growing chunks, and `infer`), as the reference speeds;
- N Wyoming clients at once, each a one-sentence `synthesize` of its own sentence: first audio
  (median, p95), the clients whose playback would run dry (a chunk arriving later than the audio
  before it takes to play, playback starting 0.2 s after the first chunk), aggregate audio
  seconds per wall second, and whether every reply equals its solo reply byte for byte;
- N streamed `pcm` requests over HTTP at once: first byte and completion (median, p95).

Only loopback is used. Servers are idle while the other one is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchmark import ensure_checkpoint

from soprano.checkpoint import TOKENIZER_FILE
from soprano.constants import SAMPLE_RATE, SAMPLE_WIDTH, TOKENS_PER_SECOND
from soprano.serving import DEFAULT_MAX_CHUNK_TOKENS
from soprano.text import prepare_text
from soprano.tokenizer import PromptTokenizer

BUFFER_SECONDS = 0.2
"""Playback starts this long after the first chunk arrives."""
STARTUP_TIMEOUT = 300.0


def sentence(index: int) -> str:
    return f"Client number {index} asks the server to read this sentence of the load test aloud."


@dataclass
class Reply:
    sent_at: float
    arrivals: list[tuple[float, int]] = field(default_factory=list)
    """(time, bytes) of each audio chunk."""
    pcm: bytes = b""
    done_at: float = 0.0

    @property
    def first_audio(self) -> float:
        return self.arrivals[0][0] - self.sent_at

    @property
    def ran_dry(self) -> bool:
        start = self.arrivals[0][0] + BUFFER_SECONDS
        played = 0
        for arrived, size in self.arrivals:
            if arrived > start + played / SAMPLE_WIDTH / SAMPLE_RATE + 1e-3:
                return True
            played += size
        return False


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def server(command: list[str], ready: str) -> Iterator[None]:
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None
    deadline = time.monotonic() + STARTUP_TIMEOUT
    for line in process.stderr:
        if ready in line:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"{command[0]} did not start")
    else:
        raise RuntimeError(f"{' '.join(command)} exited before it was ready")
    # Keep reading its log, so that a full pipe never blocks the server.
    threading.Thread(target=process.stderr.read, daemon=True).start()
    try:
        yield
    finally:
        process.terminate()
        process.wait(timeout=60)


async def wyoming_reply(port: int, text: str) -> Reply:
    from wyoming.client import AsyncTcpClient
    from wyoming.tts import Synthesize

    client = AsyncTcpClient("127.0.0.1", port)
    await client.connect()
    reply = Reply(time.perf_counter())
    await client.write_event(Synthesize(text).event())
    chunks = []
    while (event := await client.read_event()) is not None and event.type != "audio-stop":
        if event.type == "audio-chunk":
            reply.arrivals.append((time.perf_counter(), len(event.payload or b"")))
            chunks.append(event.payload or b"")
    reply.done_at = time.perf_counter()
    reply.pcm = b"".join(chunks)
    await client.disconnect()
    return reply


async def http_reply(client: Any, port: int, text: str, tokens: int) -> Reply:
    body = {"input": text, "response_format": "pcm", "max_new_tokens": tokens}
    body["sample_rate"] = SAMPLE_RATE  # the engine's own audio, not OpenAI's 24 kHz pcm
    reply = Reply(time.perf_counter())
    async with client.stream(
        "POST", f"http://127.0.0.1:{port}/v1/audio/speech", json=body
    ) as response:
        response.raise_for_status()
        async for data in response.aiter_bytes():
            reply.arrivals.append((time.perf_counter(), len(data)))
            reply.pcm += data
    reply.done_at = time.perf_counter()
    return reply


async def http_together(port: int, count: int, tokens: int, stagger: float) -> list[Reply]:
    """`count` requests at once through one client, made before any clock starts: each new
    httpx client loads a TLS context, about 40 ms of CPU that would otherwise be taken from the
    server, and block the other requests' reading, within the burst (first bytes 0.1–0.4 s
    later than a Wyoming client's)."""
    import httpx

    limits = httpx.Limits(max_connections=count)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        return await _together(partial(http_reply, client, tokens=tokens), port, count, stagger)


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def summarise(replies: list[Reply], solo: dict[int, bytes] | None) -> dict[str, Any]:
    first = [r.first_audio * 1000 for r in replies]
    done = [(r.done_at - r.sent_at) * 1000 for r in replies]
    start = min(r.sent_at for r in replies)
    end = max(r.done_at for r in replies)
    audio = sum(len(r.pcm) for r in replies) / SAMPLE_WIDTH / SAMPLE_RATE
    summary = {
        "first_audio_median_ms": statistics.median(first),
        "first_audio_p95_ms": percentile(first, 0.95),
        "completion_median_ms": statistics.median(done),
        "completion_p95_ms": percentile(done, 0.95),
        "ran_dry": sum(r.ran_dry for r in replies),
        "audio_seconds_per_second": audio / (end - start),
    }
    if solo is not None:
        summary["identical_to_solo"] = sum(r.pcm == solo[i] for i, r in enumerate(replies))
    return summary


def prompt_tokens(checkpoint: Path, text: str) -> int:
    """How long the prompts of `text` are with the checkpoint's tokenizer."""
    tokenizer = PromptTokenizer(checkpoint / TOKENIZER_FILE)
    return sum(len(tokenizer.encode(s)) for s in prepare_text(text))


def engine_reference(
    tokens: int, repeats: int, dtype: str | None, tokenizer: Path | None
) -> dict[str, float]:
    """The engine's own speeds, measured in a process of their own before any server runs."""
    command = [sys.executable, __file__, "--engine-only", "--tokens", str(tokens)]
    command += ["--repeats", str(repeats)] + (["--dtype", dtype] if dtype else [])
    command += ["--tokenizer", str(tokenizer)] if tokenizer else []
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


def measure_engine(checkpoint: Path, tokens: int, repeats: int, dtype: str | None) -> None:
    """(`--engine-only`) Print the engine's real-time factors for one sentence as JSON."""
    import logging

    from soprano import SopranoTTS

    logging.getLogger("soprano").setLevel(logging.ERROR)  # every sentence is cut at `tokens`
    options = {"dtype": dtype} if dtype else None
    tts = SopranoTTS(device="cpu", model_path=checkpoint, backend_options=options)
    text = sentence(0)

    def real_time(make: Any) -> float:
        start = time.perf_counter()
        samples = sum(len(chunk) for chunk in make())
        return samples / SAMPLE_RATE / (time.perf_counter() - start)

    kinds = {
        "infer_stream_chunk_1": lambda: tts.infer_stream(text, max_new_tokens=tokens),
        "infer_stream_growing": lambda: tts.infer_stream(
            text, max_chunk_size=DEFAULT_MAX_CHUNK_TOKENS, max_new_tokens=tokens
        ),
        "infer": lambda: [tts.infer(text, max_new_tokens=tokens)],
    }
    runs: dict[str, list[float]] = {kind: [] for kind in kinds}
    for _ in range(repeats):
        for kind, make in kinds.items():
            runs[kind].append(real_time(make))
    print(json.dumps({kind: statistics.median(values) for kind, values in runs.items()}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=96, help="tokens per sentence")
    parser.add_argument("--wyoming-clients", default="1,4,16")
    parser.add_argument("--http-clients", default="1,4,8")
    parser.add_argument("--dtype", default=None, help="the servers' --dtype")
    parser.add_argument("--repeats", type=int, default=3, help="for the engine reference")
    parser.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="a tokenizer.json for the checkpoint (the published one gives the real prompt "
        "lengths; default: the generator's character-level one, prompts about 1.45× as long)",
    )
    parser.add_argument(
        "--stagger",
        type=float,
        default=0.0,
        help="seconds between one client's request and the next's (default 0: all at once); "
        "later clients then join streams that already play",
    )
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--engine-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.stagger >= 0:
        parser.error("--stagger must be at least 0")
    checkpoint = ensure_checkpoint(args.tokenizer)
    if args.engine_only:
        measure_engine(checkpoint, args.tokens, args.repeats, args.dtype)
        return 0
    wyoming_counts = [int(n) for n in args.wyoming_clients.split(",")]
    http_counts = [int(n) for n in args.http_clients.split(",")]
    _log("engine reference (its own process)…")
    report: dict[str, Any] = {
        "tokens": args.tokens,
        "dtype": args.dtype or "float32",
        "stagger_seconds": args.stagger,
        "load_average_at_start": os.getloadavg()[0],
        "prompt_tokens": prompt_tokens(checkpoint, sentence(0)),
        "engine": engine_reference(args.tokens, args.repeats, args.dtype, args.tokenizer),
        "wyoming": {},
        "http": {},
    }
    common = ["--model", str(checkpoint), "--device", "cpu"]
    if args.dtype:
        common += ["--dtype", args.dtype]
    modes = {"continuous batching": [], "batch size 1": ["--max-batch-size", "1"]}
    ports = {mode: (free_port(), free_port()) for mode in modes}
    with (
        server_pair(modes, ports, common, "continuous batching", args.tokens),
        server_pair(modes, ports, common, "batch size 1", args.tokens),
    ):
        most = max(wyoming_counts + http_counts)
        solo = {}
        _log("solo replies…")
        for index in range(most):
            solo[index] = asyncio.run(
                wyoming_reply(ports["continuous batching"][0], sentence(index))
            ).pcm
        for count in wyoming_counts:
            for mode in modes:
                _log(f"wyoming, {count} client(s), {mode}…")
                replies = asyncio.run(_together(wyoming_reply, ports[mode][0], count, args.stagger))
                report["wyoming"].setdefault(str(count), {})[mode] = summarise(replies, solo)
        for count in http_counts:
            for mode in modes:
                _log(f"http, {count} request(s), {mode}…")
                replies = asyncio.run(
                    http_together(ports[mode][1], count, args.tokens, args.stagger)
                )
                report["http"].setdefault(str(count), {})[mode] = summarise(replies, None)
    print(json.dumps(report, indent=2) if args.json else table(report))
    return 0


@contextmanager
def server_pair(
    modes: dict[str, list[str]],
    ports: dict[str, tuple[int, int]],
    common: list[str],
    mode: str,
    tokens: int,
) -> Iterator[None]:
    wyoming_port, http_port = ports[mode]
    wyoming = [sys.executable, "-m", "wyoming_soprano", "--uri", f"tcp://127.0.0.1:{wyoming_port}",
               "--max-new-tokens", str(tokens)]  # fmt: skip
    http = [sys.executable, "-m", "soprano.apps.http_server", "--port", str(http_port),
            "--log-level", "warning"]  # fmt: skip
    _log(f"starting the servers ({mode})…")
    with (
        server(wyoming + common + modes[mode], "Ready on"),
        server(http + common + modes[mode], "serving"),
    ):
        yield


async def _together(client: Any, port: int, count: int, stagger: float = 0.0) -> list[Reply]:
    """`count` clients, client i starting `i × stagger` seconds after the first (0: at once)."""

    async def one(index: int) -> Reply:
        await asyncio.sleep(index * stagger)
        return await client(port, sentence(index))

    return list(await asyncio.gather(*(one(i) for i in range(count))))


def table(report: dict[str, Any]) -> str:
    engine = report["engine"]
    seconds = report["tokens"] / TOKENS_PER_SECOND
    lines = [
        f"{report['tokens']} tokens a sentence ({seconds:.1f} s of audio), "
        f"the first client's prompt {report['prompt_tokens']} tokens, dtype {report['dtype']}, "
        f"load average at the start {report['load_average_at_start']:.2f}"
        + (
            f"; clients start {report['stagger_seconds']:g} s apart"
            if report["stagger_seconds"]
            else ""
        ),
        "",
        "engine alone: infer_stream × real time {:.1f} (one-token chunks), {:.1f} (growing "
        "chunks); infer {:.1f}".format(
            engine["infer_stream_chunk_1"], engine["infer_stream_growing"], engine["infer"]
        ),
    ]
    columns = {
        "wyoming": ("Wyoming clients", "first audio", "identical to solo"),
        "http": ("HTTP requests", "first byte", None),
    }
    for protocol, (clients, first, identical) in columns.items():
        heading = [clients, "scheduler", f"{first} median / p95", "completion median / p95"]
        heading += ["ran dry", "audio s per s"] + ([identical] if identical else [])
        lines += ["", "| " + " | ".join(heading) + " |", "|" + "---:|" * len(heading)]
        for count, modes in report[protocol].items():
            for mode, s in modes.items():
                row = [
                    count,
                    mode,
                    f"{s['first_audio_median_ms']:.0f} / {s['first_audio_p95_ms']:.0f} ms",
                ]
                row += [f"{s['completion_median_ms']:.0f} / {s['completion_p95_ms']:.0f} ms"]
                row += [f"{s['ran_dry']}/{count}", f"{s['audio_seconds_per_second']:.1f}"]
                if identical:
                    row.append(f"{s['identical_to_solo']}/{count}")
                lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
