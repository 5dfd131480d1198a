"""`soprano-webui`: a Gradio page whose audio plays in the browser while it is being generated.

Pressing Speak starts a job on the shared serving layer (soprano/serving), which generates
every browser's speech together; the page gets an `<audio>` element whose
source is this server's `speech/<job>.mp3`, an MP3 stream that grows as the engine produces audio
(the browser starts playing after the first few tokens). When the job ends, the page shows how
much audio was made and how fast. No ffmpeg is needed: the MP3 is encoded with LAME in process.
"""

from __future__ import annotations

import argparse
import html
import logging
import sys
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import gradio as gr
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from soprano.apps.options import (
    add_audio_arguments,
    add_model_arguments,
    add_sampling_arguments,
    add_serving_arguments,
    add_voice_arguments,
    audio_options,
    configure_logging,
    sampling_params,
    serving_limits,
    voice_catalog,
    voice_loaders,
)
from soprano.audio.effects import MAX_SPEED, MIN_SPEED
from soprano.audio.pauses import AudioOptions
from soprano.encoding import FORMATS, require_encoder, stream_encoder
from soprano.errors import SopranoError
from soprano.lm import SamplingParams
from soprano.serving import SpeechService
from soprano.text import prepare_text

PROG = "soprano-webui"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
SPEECH_PATH = "speech"
"""Route of the MP3 streams, relative to the page so that it also works behind a path prefix."""
JOBS_KEPT = 8
"""Finished streams stay replayable until this many newer ones exist."""
STREAM_FORMAT = FORMATS["mp3"]
"""Every browser plays an MP3 that is still downloading."""

_LOGGER = logging.getLogger(__name__)

EXAMPLES = [
    "Soprano is an extremely lightweight text to speech model.",
    "The quick brown fox jumps over the lazy dog, then takes a well deserved nap.",
    "On March 3rd, 2025, the 42 runners finished the race in 3 hours and 15 minutes.",
    "Streaming starts the audio after just a few tokens, long before the text is done.",
]


class SpeechJob:
    """One generation: its MP3 bytes, readable from the start while they grow, and its figures."""

    def __init__(
        self,
        text: str,
        sampling: SamplingParams,
        chunk_size: int,
        voice: str,
        audio: AudioOptions,
    ) -> None:
        self.id = uuid.uuid4().hex
        self.text = text
        self.sampling = sampling
        self.chunk_size = chunk_size
        self.voice = voice
        self.audio = audio
        self.audio_seconds = 0.0
        self.generation_seconds = 0.0
        self.first_audio_seconds: float | None = None
        self.error: str | None = None
        self._data = bytearray()
        self._done = False
        self._stop = threading.Event()
        self._changed = threading.Condition()

    def stop(self) -> None:
        self._stop.set()

    def run(self, service: SpeechService) -> None:
        """Read the audio from the serving layer (on this job's thread), appending MP3."""
        try:
            if not self._stop.is_set():
                self._generate(service)
        except (SopranoError, ValueError) as error:
            self.error = str(error)
        except Exception as error:
            _LOGGER.exception("Generation failed")
            self.error = f"generation failed: {error}"
        finally:
            with self._changed:
                self._done = True
                self._changed.notify_all()

    def _generate(self, service: SpeechService) -> None:
        encoder = stream_encoder(STREAM_FORMAT.name, self.audio.sample_rate)
        started = time.perf_counter()
        stream = service.submit(
            prepare_text(self.text),
            self.sampling,
            self.chunk_size,
            voice=self.voice,
            audio=self.audio,
        )
        try:
            for chunk in stream:
                if self.first_audio_seconds is None:
                    self.first_audio_seconds = time.perf_counter() - started
                encoder.write(chunk)
                self._append(encoder.take())
                if self._stop.is_set():
                    break
            self._append(encoder.finish())
        finally:
            stream.cancel()
            self.generation_seconds = time.perf_counter() - started
            self.audio_seconds = encoder.samples_written / self.audio.sample_rate

    def _append(self, data: bytes) -> None:
        if data:
            with self._changed:
                self._data += data
                self._changed.notify_all()

    def wait(self) -> None:
        with self._changed:
            self._changed.wait_for(lambda: self._done)

    def read(self) -> Iterator[bytes]:
        """The MP3 from its first byte, following it until the job ends."""
        offset = 0
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._done or len(self._data) > offset)  # noqa: B023
                data = bytes(self._data[offset:])
                done = self._done
            offset += len(data)
            if data:
                yield data
            elif done:
                return

    def summary(self) -> str:
        if self.error is not None:
            return f"Error: {self.error}"
        if self._stop.is_set():
            return f"Stopped after {self.audio_seconds:.2f} s of audio."
        speed = self.audio_seconds / max(self.generation_seconds, 1e-9)
        first = (
            f"; first audio after {self.first_audio_seconds:.2f} s"
            if self.first_audio_seconds is not None
            else ""
        )
        return (
            f"{self.voice}: {self.audio_seconds:.2f} s of audio in "
            f"{self.generation_seconds:.2f} s ({speed:.1f}× real time){first}"
        )


class SpeechJobs:
    """The recent jobs the browser may fetch; each reads its audio from the shared service, so
    several browsers are served at once (continuous batching)."""

    def __init__(self, service: SpeechService) -> None:
        self.service = service
        self._jobs: OrderedDict[str, SpeechJob] = OrderedDict()
        self._lock = threading.Lock()

    def start(
        self,
        text: str,
        sampling: SamplingParams,
        chunk_size: int,
        voice: str | None = None,
        audio: AudioOptions | None = None,
    ) -> SpeechJob:
        voice = voice or self.service.default_voice
        job = SpeechJob(text, sampling, chunk_size, voice, audio or AudioOptions())
        with self._lock:
            self._jobs[job.id] = job
            while len(self._jobs) > JOBS_KEPT:
                self._jobs.popitem(last=False)[1].stop()
        threading.Thread(target=job.run, args=(self.service,), daemon=True).start()
        return job

    def get(self, job_id: str) -> SpeechJob | None:
        with self._lock:
            return self._jobs.get(job_id)

    def stream_route(self) -> Route:
        def speech(request: Request) -> Response:
            job = self.get(request.path_params["job_id"])
            if job is None:
                return PlainTextResponse("No such speech (it may have expired).", status_code=404)
            return StreamingResponse(
                job.read(),
                media_type=STREAM_FORMAT.media_type,
                headers={"Cache-Control": "no-store"},
            )

        return Route(f"/{SPEECH_PATH}/{{job_id}}.{STREAM_FORMAT.name}", speech)


def player_html(job: SpeechJob) -> str:
    source = html.escape(f"{SPEECH_PATH}/{job.id}.{STREAM_FORMAT.name}")
    return (
        f'<audio id="soprano-player" controls autoplay preload="auto" src="{source}" '
        'style="width: 100%"></audio>'
    )


def build_demo(
    jobs: SpeechJobs,
    defaults: argparse.Namespace,
    max_input_chars: int,
    default_audio: AudioOptions | None = None,
) -> gr.Blocks:
    """The page: text, voice, audio and sampling controls, examples, the streaming player and
    its figures."""
    default_audio = default_audio or AudioOptions()

    voices = jobs.service.voices

    def speak(
        text: str,
        voice: str,
        temperature: float,
        top_p: float,
        repetition_penalty: float,
        seed: float | None,
        chunk_size: float,
        speed: float,
        volume: float,
        sentence_silence: float,
        previous_id: str | None,
    ) -> tuple[str, str, str]:
        if not text.strip():
            raise gr.Error("Type some text to speak first.")
        if voice not in voices:
            raise gr.Error(f"Pick one of the voices: {', '.join(voices)}.")
        if len(text) > max_input_chars:
            raise gr.Error(
                f"The text is {len(text)} characters; at most {max_input_chars} can be spoken "
                "at once."
            )
        previous = jobs.get(previous_id) if previous_id else None
        if previous is not None:
            previous.stop()
        try:
            sampling = SamplingParams(
                temperature=float(temperature),
                top_p=float(top_p),
                repetition_penalty=float(repetition_penalty),
                seed=None if seed is None else int(seed),
                max_new_tokens=defaults.max_new_tokens,
            )
            audio = replace(
                default_audio,
                effects=replace(default_audio.effects, speed=float(speed), volume=float(volume)),
                sentence_silence=float(sentence_silence),
            )
        except ValueError as error:
            raise gr.Error(str(error)) from error
        job = jobs.start(text, sampling, int(chunk_size), voice, audio)
        return player_html(job), job.id, "Generating…"

    def report(job_id: str) -> str:
        job = jobs.get(job_id)
        if job is None:
            return ""
        job.wait()
        return job.summary()

    def stop(job_id: str | None) -> None:
        job = jobs.get(job_id) if job_id else None
        if job is not None:
            job.stop()

    with gr.Blocks(title="Soprano TTS", analytics_enabled=False) as demo:
        gr.Markdown(
            "# Soprano TTS\nType text and press **Speak**: the audio plays here while it is "
            "being generated."
        )
        text = gr.Textbox(label="Text", lines=4, placeholder="What should Soprano say?")
        voice = gr.Dropdown(
            list(voices),
            value=jobs.service.default_voice,
            label="Voice",
            elem_id="soprano-voice",
            interactive=len(voices) > 1,
        )
        with gr.Row():
            speak_button = gr.Button("Speak", variant="primary")
            stop_button = gr.Button("Stop")
        player = gr.HTML(elem_id="soprano-audio")
        status = gr.Markdown(elem_id="soprano-status")
        job_id = gr.State(None)
        with gr.Accordion("Sampling", open=False):
            temperature = gr.Slider(
                0, 1, value=defaults.temperature, step=0.05, label="Temperature (0: greedy)"
            )
            top_p = gr.Slider(0.5, 1, value=defaults.top_p, step=0.01, label="Top-p")
            repetition_penalty = gr.Slider(
                1, 2, value=defaults.repetition_penalty, step=0.05, label="Repetition penalty"
            )
            seed = gr.Number(
                value=defaults.seed, precision=0, label="Seed (empty: different every time)"
            )
            chunk_size = gr.Slider(
                1, 10, value=1, step=1, label="Streaming chunk size (tokens; 1 starts soonest)"
            )
        with gr.Accordion("Audio", open=False):
            speed = gr.Slider(
                MIN_SPEED,
                MAX_SPEED,
                value=default_audio.effects.speed,
                step=0.05,
                label="Speed (pitch kept)",
            )
            volume = gr.Slider(
                0.1, 3, value=default_audio.effects.volume, step=0.05, label="Volume"
            )
            sentence_silence = gr.Slider(
                0,
                3,
                value=default_audio.sentence_silence,
                step=0.05,
                label="Silence between sentences (seconds)",
            )
        gr.Examples(EXAMPLES, inputs=[text])
        gr.Markdown(
            "Tips: write numbers and symbols as you want them read. "
            "Model: [Soprano](https://huggingface.co/ekwek/Soprano-1.1-80M)."
        )

        inputs: list[gr.components.Component] = [text, voice, temperature, top_p]
        inputs += [repetition_penalty, seed, chunk_size, speed, volume, sentence_silence, job_id]
        speak_button.click(speak, inputs, [player, job_id, status]).then(
            report, [job_id], [status], concurrency_limit=None
        )
        stop_button.click(stop, [job_id], None, queue=False)
    return demo


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        allow_abbrev=False,
        prog=PROG,
        description="A web page that speaks with Soprano, streaming to the browser.",
    )
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"(default: {DEFAULT_HOST})")
    parser.add_argument(
        "--port",
        type=int,
        default=None,
        help=f"(default: the first free one from {DEFAULT_PORT})",
    )
    parser.add_argument("--share", action="store_true", help="also make a public gradio.live link")
    add_model_arguments(parser)
    add_voice_arguments(parser)
    add_sampling_arguments(parser)
    add_audio_arguments(parser, "initial values of the page's controls")
    add_serving_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    sampling_params(parser, args)
    limits = serving_limits(parser, args)
    catalog = voice_catalog(parser, args)
    audio = audio_options(parser, args)
    configure_logging(logging.INFO)
    try:
        require_encoder(STREAM_FORMAT.name)
        service = SpeechService(voice_loaders(args, catalog), limits, catalog.default)
    except (SopranoError, ValueError, OSError) as error:
        print(f"{PROG}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    jobs = SpeechJobs(service)
    demo = build_demo(jobs, args, limits.max_input_chars, audio)
    app_kwargs: dict[str, Any] = {"routes": [jobs.stream_route()]}
    demo.queue().launch(
        server_name=args.host,
        server_port=args.port,
        share=args.share,
        prevent_thread_lock=True,
        app_kwargs=app_kwargs,
        quiet=True,
    )
    print(f"{PROG}: serving on {demo.local_url}", file=sys.stderr)
    if demo.share_url:
        print(f"{PROG}: public link {demo.share_url}", file=sys.stderr)
    sys.stderr.flush()
    demo.block_thread()
    return 0


if __name__ == "__main__":
    sys.exit(main())
