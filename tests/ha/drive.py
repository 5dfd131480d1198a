"""Drive a real Home Assistant against our Wyoming server, as a user's setup would.

script/test-ha runs this with Home Assistant's own Python (it imports aiohttp and wyoming from
Home Assistant's venv) and passes the project's Python for our server. It starts our server on
two tiny random checkpoints (two voices) and Home Assistant on loopback with a throwaway config,
onboards a user over REST, adds the server through the wyoming config flow, and asks for speech
four ways for each voice: tts_get_url as MP3 (ffmpeg converts) and as WAV (passed through), and
assist pipelines from the tts stage and from the intent stage with an agent that streams its
answer (which is what makes Home Assistant stream text: synthesize-start/-chunk/-stop). Every
answer is checked against what our server sends a plain Wyoming client for the same text.

    python tests/ha/drive.py --soprano-python .venv/bin/python [--keep DIR]
    python tests/ha/drive.py --print-requirements   # what Home Assistant must have installed
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import math
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from array import array
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CUSTOM_COMPONENTS = HERE / "custom_components"
AGENT_DOMAIN = "soprano_test_agent"

CONFIGURED_INTEGRATIONS = (
    "http",
    "api",
    "websocket_api",
    "onboarding",
    "assist_pipeline",
    "conversation",
    "tts",
    "wyoming",
)
"""Set up besides Home Assistant's defaults; their requirements are installed beforehand."""

PR_SET_PDEATHSIG = 1
HOST = "127.0.0.1"
SAMPLE_RATE = 32000
SAMPLE_BYTES = 2
MAX_NEW_TOKENS = 40
"""Tokens per sentence: the checkpoints never stop, so every sentence is about this long (2.5 s)."""
MP3_SLACK_SECONDS = 0.15
"""MP3 adds encoder delay and pads its last frame (1152 samples); a pipe gets no LAME tag."""
SILENT_RMS = 30.0
"""16-bit RMS below which audio counts as silence."""

RECEIVED_CHUNK = "Received synthesize-chunk"
"""What our server logs at --debug for each streamed text piece."""
MIN_STREAMED_CHUNKS = 3
"""Home Assistant sends the first 60 characters as one chunk, then each later piece."""

SERVER_START_SECONDS = 300.0
HA_START_SECONDS = 600.0
STEP_SECONDS = 120.0
LOG_TAIL_LINES = 80

TEXTS = {
    "tts_get_url mp3": "Hello from Soprano, through Home Assistant.",
    "tts_get_url wav": "A second request, passed through as a wave file.",
    "pipeline tts": "An assist pipeline speaks this, from its text to speech stage.",
    "pipeline intent": (
        "This answer arrives in small pieces, as a language model writes it. "
        "Each sentence is spoken as soon as it is complete."
    ),
}
"""One text per path: Home Assistant caches speech by text and options."""


class DriveError(Exception):
    """A check failed; the message says which."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise DriveError(message)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


@dataclass
class Process:
    """A child in its own process group, its output in a log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def count(self, text: str) -> int:
        return self.log.read_text(errors="replace").count(text)

    def tail(self) -> str:
        lines = self.log.read_text(errors="replace").splitlines()
        return "\n".join(lines[-LOG_TAIL_LINES:])

    def stop(self) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout=10)


def die_with_parent() -> None:
    """In the child: SIGTERM when the driver dies, even by SIGKILL (Linux's PR_SET_PDEATHSIG)."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def start(name: str, command: list[str], log: Path) -> Process:
    with log.open("wb") as output:
        popen = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
    return Process(name, popen, log)


async def wait_for_line(process: Process, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in process.log.read_text(errors="replace"):
        check(process.popen.poll() is None, f"{process.name} exited: {process.popen.returncode}")
        check(time.monotonic() < deadline, f"{process.name} did not log {text!r} in {timeout} s")
        await asyncio.sleep(0.5)


# Audio


@dataclass
class Audio:
    samples: array  # 16-bit mono at SAMPLE_RATE

    @property
    def seconds(self) -> float:
        return len(self.samples) / SAMPLE_RATE

    @property
    def rms(self) -> float:
        if not self.samples:
            return 0.0
        return math.sqrt(sum(s * s for s in self.samples) / len(self.samples))


def pcm_audio(pcm: bytes) -> Audio:
    samples = array("h")
    samples.frombytes(pcm)
    if sys.byteorder != "little":
        samples.byteswap()
    return Audio(samples)


def decode(data: bytes) -> Audio:
    """Any format ffmpeg reads, as 16-bit mono PCM at our rate."""
    result = subprocess.run(
        [
            "ffmpeg",
            "-v",
            "error",
            "-i",
            "pipe:0",
            "-f",
            "s16le",
            "-ac",
            "1",
            "-ar",
            str(SAMPLE_RATE),
            "pipe:1",
        ],
        input=data,
        capture_output=True,
        timeout=STEP_SECONDS,
        check=False,
    )
    check(result.returncode == 0, f"ffmpeg cannot decode the audio: {result.stderr[-500:]!r}")
    return pcm_audio(result.stdout)


def streamed_wav_pcm(data: bytes) -> bytes:
    """The PCM of a WAV whose header says 'length unknown' (Home Assistant's streamed WAV)."""
    check(data[:4] == b"RIFF" and data[8:12] == b"WAVE", "not a WAV file")
    position, fmt = 12, None
    while position + 8 <= len(data):
        chunk_id, size = (
            data[position : position + 4],
            int.from_bytes(data[position + 4 : position + 8], "little"),
        )
        if chunk_id == b"fmt ":
            fmt = data[position + 8 : position + 8 + size]
        if chunk_id == b"data":
            check(fmt is not None, "WAV without a fmt chunk")
            assert fmt is not None
            channels = int.from_bytes(fmt[2:4], "little")
            rate = int.from_bytes(fmt[4:8], "little")
            bits = int.from_bytes(fmt[14:16], "little")
            check(
                (channels, rate, bits) == (1, SAMPLE_RATE, 16),
                f"WAV format {channels=} {rate=} {bits=}",
            )
            return data[position + 8 :]
        position += 8 + size + (size & 1)
    raise DriveError("WAV without a data chunk")


def same_length(audio: Audio, reference: Audio, slack: float, what: str) -> None:
    check(
        abs(audio.seconds - reference.seconds) <= slack,
        f"{what}: {audio.seconds:.3f} s of audio, our server sent {reference.seconds:.3f} s",
    )


def loud_like(audio: Audio, reference: Audio, what: str) -> None:
    check(audio.rms > SILENT_RMS, f"{what}: silent (RMS {audio.rms:.1f})")
    ratio = audio.rms / reference.rms
    check(0.5 < ratio < 2.0, f"{what}: RMS {audio.rms:.1f} against {reference.rms:.1f} sent")


def differ(first: Audio, second: Audio, what: str) -> None:
    """Not the same sound: the sample-wise difference is a good part of the signal."""
    count = min(len(first.samples), len(second.samples))
    check(count > 0, f"{what}: no audio")
    difference = math.sqrt(
        sum(
            (a - b) ** 2 for a, b in zip(first.samples[:count], second.samples[:count], strict=True)
        )
        / count
    )
    check(difference > 0.25 * min(first.rms, second.rms), f"{what}: the two voices sound the same")


# Our server


async def wyoming_reference(port: int, text: str, voice: str | None) -> tuple[Audio, Audio]:
    """What our server sends a plain client: (audio, and the same as streamed text)."""
    from wyoming.audio import AudioChunk, AudioStart, AudioStop
    from wyoming.client import AsyncTcpClient
    from wyoming.tts import (
        Synthesize,
        SynthesizeChunk,
        SynthesizeStart,
        SynthesizeStop,
        SynthesizeStopped,
        SynthesizeVoice,
    )

    chosen = SynthesizeVoice(name=voice) if voice else None

    async def collect(events: list[Any], until: str) -> bytes:
        pcm = bytearray()
        async with AsyncTcpClient(HOST, port) as client:
            for event in events:
                await client.write_event(event.event())
            while (event := await client.read_event()) is not None:
                if AudioStart.is_type(event.type):
                    start = AudioStart.from_event(event)
                    check(
                        (start.rate, start.width, start.channels) == (SAMPLE_RATE, SAMPLE_BYTES, 1),
                        f"format {start}",
                    )
                elif AudioChunk.is_type(event.type):
                    pcm += AudioChunk.from_event(event).audio
                if event.type == until:
                    return bytes(pcm)
        raise DriveError("our server closed the connection")

    async with asyncio.timeout(STEP_SECONDS):
        whole = await collect([Synthesize(text=text, voice=chosen)], AudioStop().event().type)
        pieces = [text[i : i + 5] for i in range(0, len(text), 5)]
        streamed = await collect(
            [
                SynthesizeStart(voice=chosen),
                *(SynthesizeChunk(text=piece) for piece in pieces),
                Synthesize(text=text, voice=chosen),
                SynthesizeStop(),
            ],
            SynthesizeStopped().event().type,
        )
    return pcm_audio(whole), pcm_audio(streamed)


# Home Assistant


def write_config(config_dir: Path, port: int) -> None:
    shutil.copytree(CUSTOM_COMPONENTS, config_dir / "custom_components")
    lines = [
        "homeassistant:",
        "  name: Soprano test",
        "  latitude: 52.37",
        "  longitude: 4.89",
        "  elevation: 0",
        "  unit_system: metric",
        "  currency: EUR",
        "  country: NL",
        "  time_zone: UTC",
        f"  internal_url: http://{HOST}:{port}",
        "http:",
        f"  server_host: {HOST}",
        f"  server_port: {port}",
        "logger:",
        "  default: info",
        "  logs:",
        "    homeassistant.components.wyoming: debug",
        "    homeassistant.components.tts: debug",
    ]
    lines += [f"{domain}:" for domain in CONFIGURED_INTEGRATIONS if domain not in ("http",)]
    (config_dir / "configuration.yaml").write_text("\n".join(lines) + "\n")


class HomeAssistant:
    """REST and websocket access as an onboarded user."""

    def __init__(self, session: Any, base: str) -> None:
        self.session = session
        self.base = base
        self.token = ""
        self._websocket: Any = None
        self._next_id = 1

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    async def request(self, method: str, path: str, **kwargs: Any) -> Any:
        async with self.session.request(
            method, self.base + path, headers=self.headers, **kwargs
        ) as response:
            body = await response.read()
            check(response.status < 300, f"{method} {path}: HTTP {response.status} {body[:500]!r}")
            return json.loads(body) if body else None

    async def fetch(self, path: str) -> bytes:
        async with self.session.get(self.base + path, headers=self.headers) as response:
            body = await response.read()
            check(response.status == 200, f"GET {path}: HTTP {response.status} {body[:300]!r}")
            return bytes(body)

    async def wait_until_up(self, ha: Process) -> None:
        deadline = time.monotonic() + HA_START_SECONDS
        while True:
            check(ha.popen.poll() is None, f"Home Assistant exited: {ha.popen.returncode}")
            with contextlib.suppress(OSError, asyncio.TimeoutError):
                async with self.session.get(self.base + "/api/onboarding") as response:
                    if response.status == 200:
                        return
            check(time.monotonic() < deadline, f"Home Assistant not up in {HA_START_SECONDS} s")
            await asyncio.sleep(1)

    async def onboard(self) -> None:
        client_id = self.base + "/"
        user = await self.request(
            "POST",
            "/api/onboarding/users",
            json={
                "client_id": client_id,
                "name": "Soprano Test",
                "username": "soprano",
                "password": secrets.token_urlsafe(16),
                "language": "en",
            },
        )
        tokens = await self.request(
            "POST",
            "/auth/token",
            data={
                "grant_type": "authorization_code",
                "code": user["auth_code"],
                "client_id": client_id,
            },
        )
        self.token = tokens["access_token"]

    async def config_flow(self, handler: str, answers: dict[str, Any] | None) -> dict[str, Any]:
        step = await self.request(
            "POST", "/api/config/config_entries/flow", json={"handler": handler}
        )
        if step["type"] == "form":
            step = await self.request(
                "POST", f"/api/config/config_entries/flow/{step['flow_id']}", json=answers or {}
            )
        check(step["type"] == "create_entry", f"{handler} config flow: {step}")
        return dict(step["result"])

    async def entity(self, domain: str, exclude: set[str]) -> str:
        deadline = time.monotonic() + STEP_SECONDS
        while True:
            states = await self.request("GET", "/api/states")
            found = [s["entity_id"] for s in states if s["entity_id"].startswith(domain + ".")]
            found = [entity for entity in found if entity not in exclude]
            if found:
                check(len(found) == 1, f"several {domain} entities: {found}")
                return found[0]
            check(time.monotonic() < deadline, f"no {domain} entity after {STEP_SECONDS} s")
            await asyncio.sleep(0.5)

    @contextlib.asynccontextmanager
    async def websocket(self) -> AsyncIterator[None]:
        async with self.session.ws_connect(self.base + "/api/websocket") as websocket:
            check((await websocket.receive_json())["type"] == "auth_required", "websocket auth")
            await websocket.send_json({"type": "auth", "access_token": self.token})
            check((await websocket.receive_json())["type"] == "auth_ok", "websocket auth failed")
            self._websocket = websocket
            try:
                yield
            finally:
                self._websocket = None

    async def command(self, message: dict[str, Any]) -> tuple[int, Any]:
        message_id = self._next_id
        self._next_id += 1
        await self._websocket.send_json({"id": message_id, **message})
        while True:
            reply = await self._websocket.receive_json()
            if reply.get("id") == message_id and reply["type"] == "result":
                check(reply["success"], f"{message['type']}: {reply.get('error')}")
                return message_id, reply["result"]

    async def pipeline_events(self, message: dict[str, Any]) -> list[dict[str, Any]]:
        """Run an assist pipeline; its events up to run-end."""
        message_id, _ = await self.command(message)
        events = []
        while True:
            reply = await self._websocket.receive_json()
            if reply.get("id") != message_id or reply["type"] != "event":
                continue
            event = reply["event"]
            events.append(event)
            check(event["type"] != "error", f"pipeline error: {event.get('data')}")
            if event["type"] == "run-end":
                return events


@dataclass
class Voice:
    name: str
    folder: Path
    seed: int
    requested: str | None  # the name Home Assistant asks for; None: the default voice


async def check_voice(
    ha: HomeAssistant, tts_entity: str, agent: str, server: Process, port: int, voice: Voice
) -> dict[str, Audio]:
    """Speech through every path for one voice; what Home Assistant gave, per path."""
    sent: dict[str, Audio] = {}
    for path, text in TEXTS.items():
        whole, streamed = await wyoming_reference(port, text, voice.requested)
        check(whole.samples == streamed.samples, f"{voice.name}: streamed text sounds different")
        check(whole.rms > SILENT_RMS, f"{voice.name}: our server sent silence")
        sent[path] = whole
    heard: dict[str, Audio] = {}
    options: dict[str, Any] = {"voice": voice.requested} if voice.requested else {}

    for path, extra in (("tts_get_url mp3", {}), ("tts_get_url wav", {"preferred_format": "wav"})):
        async with asyncio.timeout(STEP_SECONDS):
            url = await ha.request(
                "POST",
                "/api/tts_get_url",
                json={
                    "engine_id": tts_entity,
                    "message": TEXTS[path],
                    "language": "en_US",
                    "options": {**options, **extra},
                },
            )
            data = await ha.fetch(url["path"])
        heard[path] = pcm_audio(streamed_wav_pcm(data)) if extra else decode(data)

    async with ha.websocket(), asyncio.timeout(STEP_SECONDS):
        _, pipeline = await ha.command(
            {
                "type": "assist_pipeline/pipeline/create",
                "name": f"Soprano {voice.name}",
                "language": "en",
                "conversation_engine": agent,
                "conversation_language": "en",
                "stt_engine": None,
                "stt_language": None,
                "tts_engine": tts_entity,
                "tts_language": "en_US",
                "tts_voice": voice.requested,
                "wake_word_entity": None,
                "wake_word_id": None,
            }
        )
        for stage in ("tts", "intent"):
            path = f"pipeline {stage}"
            chunks_before = server.count(RECEIVED_CHUNK)
            events = await ha.pipeline_events(
                {
                    "type": "assist_pipeline/run",
                    "pipeline": pipeline["id"],
                    "start_stage": stage,
                    "end_stage": "tts",
                    "input": {"text": TEXTS[path]},
                    "timeout": STEP_SECONDS,
                }
            )
            types = [event["type"] for event in events]
            check("tts-end" in types, f"{voice.name}, {path}: no tts-end in {types}")
            output = next(e for e in events if e["type"] == "tts-end")["data"]["tts_output"]
            heard[path] = decode(await ha.fetch(output["url"]))
            if stage == "intent":
                streaming = [e for e in events if (e.get("data") or {}).get("tts_start_streaming")]
                check(bool(streaming), f"{voice.name}: Home Assistant did not stream the text")
                chunks = server.count(RECEIVED_CHUNK) - chunks_before
                check(chunks >= MIN_STREAMED_CHUNKS, f"{voice.name}: {chunks} synthesize-chunks")

    for path, audio in heard.items():
        what = f"{voice.name}, {path}"
        if path == "tts_get_url wav":
            check(audio.samples == sent[path].samples, f"{what}: not the audio our server sent")
        else:
            same_length(audio, sent[path], MP3_SLACK_SECONDS, what)
            loud_like(audio, sent[path], what)
    return heard


def voices_for(work: Path) -> list[Voice]:
    """Two checkpoints: `alpha` found in a data dir (the default), `beta` given by --voice."""
    return [
        Voice("alpha", work / "voices" / "alpha", seed=11, requested=None),
        Voice("beta", work / "extra" / "beta", seed=12, requested="beta"),
    ]


def server_command(python: str, port: int, voices: list[Voice]) -> list[str]:
    alpha, beta = voices
    return [
        *(python, "-m", "wyoming_soprano", "--uri", f"tcp://{HOST}:{port}"),
        *("--data-dir", str(alpha.folder.parent), "--default-voice", alpha.name),
        *("--voice", f"{beta.name}={beta.folder}"),
        *("--max-new-tokens", str(MAX_NEW_TOKENS), "--threads", "1", "--debug"),
    ]


async def drive(args: argparse.Namespace, work: Path) -> None:
    import aiohttp

    voices = voices_for(work)
    for voice in voices:
        subprocess.run(
            [
                *(args.soprano_python, "-m", "soprano.testing.make_checkpoint", str(voice.folder)),
                *("--seed", str(voice.seed), "--stop-scale", "0"),
            ],
            check=True,
            timeout=STEP_SECONDS,
            capture_output=True,
        )

    server_port = free_port()
    while (ha_port := free_port()) == server_port:
        pass
    processes: list[Process] = []
    try:
        server = start(
            "our Wyoming server",
            server_command(args.soprano_python, server_port, voices),
            work / "soprano.log",
        )
        processes.append(server)
        config_dir = work / "config"
        config_dir.mkdir()
        write_config(config_dir, ha_port)
        ha_started = time.monotonic()
        ha_process = start(
            "Home Assistant",
            [sys.executable, "-m", "homeassistant", "--config", str(config_dir), "--skip-pip"],
            work / "homeassistant.out",
        )
        processes.append(ha_process)
        await wait_for_line(server, "Ready on", SERVER_START_SECONDS)

        timeout = aiohttp.ClientTimeout(total=STEP_SECONDS)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            ha = HomeAssistant(session, f"http://{HOST}:{ha_port}")
            await ha.wait_until_up(ha_process)
            print(
                f"test-ha: Home Assistant up in {time.monotonic() - ha_started:.0f} s",
                file=sys.stderr,
            )
            await ha.onboard()
            await ha.config_flow("wyoming", {"host": HOST, "port": server_port})
            await ha.config_flow(AGENT_DOMAIN, None)
            tts_entity = await ha.entity("tts", exclude=set())
            agent = await ha.entity("conversation", exclude={"conversation.home_assistant"})
            async with ha.websocket(), asyncio.timeout(STEP_SECONDS):
                _, listed = await ha.command(
                    {"type": "tts/engine/voices", "engine_id": tts_entity, "language": "en_US"}
                )
            names = sorted(voice["voice_id"] for voice in listed["voices"])
            check(
                names == sorted(v.name for v in voices), f"Home Assistant lists the voices {names}"
            )

            heard = {
                voice.name: await check_voice(ha, tts_entity, agent, server, server_port, voice)
                for voice in voices
            }
            first, second = (heard[voice.name] for voice in voices)
            for path in first:
                differ(first[path], second[path], path)
            log = (config_dir / "home-assistant.log").read_text(errors="replace")
            errors = [line for line in log.splitlines() if " ERROR (" in line]
            check(not errors, "Home Assistant logged errors:\n" + "\n".join(errors[:10]))
        print(
            f"test-ha: Home Assistant spoke both voices through tts_get_url (mp3, wav) and "
            f"assist pipelines (tts, streamed intent) with {tts_entity}",
            file=sys.stderr,
        )
    except BaseException:
        for process in processes:
            print(
                f"--- {process.name}, last {LOG_TAIL_LINES} lines ---\n{process.tail()}",
                file=sys.stderr,
            )
        ha_log = work / "config" / "home-assistant.log"
        if ha_log.exists():
            lines = ha_log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
            print("--- home-assistant.log ---\n" + "\n".join(lines), file=sys.stderr)
        raise
    finally:
        for process in reversed(processes):
            process.stop()


def print_requirements() -> None:
    """Pinned requirements of the integrations Home Assistant sets up here, with their
    dependencies: its defaults (bootstrap) and ours."""
    from homeassistant import bootstrap, components

    folder = Path(components.__path__[0])
    pending = [
        *bootstrap.CORE_INTEGRATIONS,
        *bootstrap.DEFAULT_INTEGRATIONS,
        *CONFIGURED_INTEGRATIONS,
    ]
    seen: set[str] = set()
    requirements: set[str] = set()
    while pending:
        domain = pending.pop()
        if domain in seen:
            continue
        seen.add(domain)
        manifest = json.loads((folder / domain / "manifest.json").read_text())
        requirements.update(manifest.get("requirements", []))
        pending.extend(manifest.get("dependencies", []))
    print("\n".join(sorted(requirements)))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--soprano-python", help="the Python with this project installed")
    parser.add_argument("--keep", type=Path, help="work in this (new) folder and keep it")
    parser.add_argument("--print-requirements", action="store_true")
    args = parser.parse_args()
    if args.print_requirements:
        print_requirements()
        return 0
    if not args.soprano_python:
        parser.error("--soprano-python is required")
    # SIGTERM (timeout, CI) unwinds like Ctrl-C, so the servers are stopped on the way out.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with contextlib.ExitStack() as stack:
        if args.keep:
            args.keep.mkdir(parents=True)
            work = args.keep
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="soprano-test-ha-")))
        try:
            asyncio.run(drive(args, work))
        except DriveError as error:
            print(f"test-ha: FAILED: {error}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
