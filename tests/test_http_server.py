"""`soprano-server` as a real process on loopback, called with the official openai client."""

from __future__ import annotations

import base64
import io
import json
import sys
import wave
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import soundfile
import torch
from processes import serving_process
from starlette.testclient import TestClient

from soprano.apps.http_server import create_app
from soprano.audio import AudioEffects, to_pcm16
from soprano.audio.pauses import AudioOptions
from soprano.constants import SAMPLE_RATE, TOKEN_SAMPLES
from soprano.encoding import OPUS_SAMPLE_RATE, encode_audio
from soprano.serving import DEFAULT_MAX_CHUNK_TOKENS, ServingLimits
from soprano.tts import SopranoTTS

SERVER = str(Path(sys.executable).with_name("soprano-server"))  # the installed console script
TEXT = "Hello there, this is one short test sentence."
MAX_NEW_TOKENS = 24
SAMPLING = {"temperature": 1.0, "seed": 1, "max_new_tokens": MAX_NEW_TOKENS}
NATIVE = {**SAMPLING, "sample_rate": SAMPLE_RATE}
"""Request fields for the engine's own audio: pcm, too, at 32 kHz (its default is 24 kHz)."""
# The endless checkpoint never says [STOP]: the sentence is cut at MAX_NEW_TOKENS audio tokens.
EXPECTED_SAMPLES = (MAX_NEW_TOKENS - 1) * TOKEN_SAMPLES
MP3_FRAME = 1152
MP3_DELAY = 576
LONG_GENERATION = {"temperature": 1.0, "seed": 2, "max_new_tokens": 900}
LONG_TEXT = " ".join(["Keep on talking for a while now."] * 6)
"""Six sentences (within the server's 200 characters) of a minute each: thousands of tokens, far
more than the engine makes before its client hangs up (it stops then), so it is still generating
when the test looks."""
OPENAI_FIELDS = {"input", "response_format", "speed", "instructions", "stream_format"}
"""Request fields the openai client takes as arguments; others go in extra_body."""
FLAC_STREAMINFO_END = 42
"""'fLaC' marker (4 bytes), STREAMINFO block header (4) and body (34)."""


@pytest.fixture(scope="module")
def tts(endless_checkpoint: Path) -> SopranoTTS:
    return SopranoTTS(model_path=endless_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def streamed(tts: SopranoTTS) -> torch.Tensor:
    """What a response carries, streamed or not: the engine's stream, with the serving
    layer's growing chunks."""
    chunks = tts.infer_stream(TEXT, max_chunk_size=DEFAULT_MAX_CHUNK_TOKENS, **SAMPLING)
    return torch.cat(list(chunks))


@pytest.fixture(scope="module")
def whole(streamed: torch.Tensor) -> torch.Tensor:
    """What a `stream: false` response carries: the same audio, sent as one file."""
    return streamed


@pytest.fixture(scope="module")
def server(endless_checkpoint: Path, voice_data_dir: Path) -> Iterator[str]:
    """The server's base URL, once it prints that it serves. Its default voice is the endless
    checkpoint; it finds a second voice in its data folder."""
    command = [SERVER, "--model", str(endless_checkpoint), "--device", "cpu", "--port", "0",
               "--log-level", "warning", "--max-input-chars", "200",
               "--data-dir", str(voice_data_dir)]  # fmt: skip
    with serving_process(command, "soprano-server: serving ", timeout=120) as ready:
        yield ready.rsplit(" ", 1)[-1]


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="not-needed", max_retries=0)


def pcm16(audio: torch.Tensor) -> np.ndarray:
    return np.frombuffer(to_pcm16(audio), dtype="<i2")


def decode(data: bytes, response_format: str) -> tuple[int, np.ndarray]:
    if response_format == "pcm":
        return SAMPLE_RATE, np.frombuffer(data, dtype="<i2")
    audio, rate = soundfile.read(io.BytesIO(data), dtype="int16")
    return rate, audio


def speak(client: openai.OpenAI, response_format: str, **extra: object) -> bytes:
    response = client.audio.speech.create(
        model="tts-1",
        voice="alloy",
        input=TEXT,
        response_format=response_format,  # type: ignore[arg-type]
        extra_body={**NATIVE, **extra},
    )
    return response.content


def check_audio(data: bytes, response_format: str, expected: torch.Tensor) -> None:
    """Lossless formats carry exactly the expected samples; lossy ones the expected length."""
    rate, audio = decode(data, response_format)
    if response_format in ("wav", "pcm", "flac"):
        assert rate == SAMPLE_RATE
        np.testing.assert_array_equal(audio, pcm16(expected))
    elif response_format == "mp3":
        assert rate == SAMPLE_RATE
        # Without a gapless tag, MP3 adds LAME's delay and pads to whole frames.
        assert EXPECTED_SAMPLES <= len(audio) < EXPECTED_SAMPLES + MP3_DELAY + MP3_FRAME
    else:
        assert rate == OPUS_SAMPLE_RATE
        assert len(audio) == EXPECTED_SAMPLES * OPUS_SAMPLE_RATE // SAMPLE_RATE


@pytest.mark.parametrize("response_format", ["wav", "pcm", "mp3", "opus"])
def test_create_streams_each_format_by_default(
    client: openai.OpenAI, response_format: str, streamed: torch.Tensor
) -> None:
    check_audio(speak(client, response_format), response_format, streamed)


def test_create_flac_is_one_exact_file(client: openai.OpenAI, whole: torch.Tensor) -> None:
    data = speak(client, "flac")

    assert len(whole) == EXPECTED_SAMPLES
    check_audio(data, "flac", whole)
    assert soundfile.info(io.BytesIO(data)).frames == EXPECTED_SAMPLES


def test_stream_false_sends_offline_audio_with_exact_headers(
    server: str, whole: torch.Tensor
) -> None:
    response = httpx.post(
        f"{server}/v1/audio/speech",
        json={"input": TEXT, "response_format": "wav", "stream": False, **SAMPLING},
        timeout=60,
    )

    assert response.status_code == 200
    assert response.headers["content-type"] == "audio/wav"
    assert response.headers["content-length"] == str(len(response.content))
    assert response.headers["content-disposition"] == 'attachment; filename="speech.wav"'
    with wave.open(io.BytesIO(response.content)) as wav:
        assert (wav.getframerate(), wav.getnframes()) == (SAMPLE_RATE, EXPECTED_SAMPLES)
    check_audio(response.content, "wav", whole)


@pytest.mark.parametrize(
    ("response_format", "media_type"),
    [("wav", "audio/wav"), ("pcm", "audio/pcm"), ("mp3", "audio/mpeg"), ("opus", "audio/ogg")],
)
def test_streaming_response_is_chunked_audio(
    client: openai.OpenAI, response_format: str, media_type: str, streamed: torch.Tensor
) -> None:
    with client.audio.speech.with_streaming_response.create(
        model="tts-1",
        voice="alloy",
        input=TEXT,
        response_format=response_format,  # type: ignore[arg-type]
        extra_body=NATIVE,
    ) as response:
        assert response.headers["content-type"] == media_type
        assert response.headers["transfer-encoding"] == "chunked"
        assert "content-length" not in response.headers
        data = b"".join(response.iter_bytes())

    check_audio(data, response_format, streamed)


def test_streamed_flac_is_the_exact_file_with_its_length_left_unknown(
    client: openai.OpenAI, streamed: torch.Tensor
) -> None:
    with client.audio.speech.with_streaming_response.create(
        model="tts-1", voice="alloy", input=TEXT, response_format="flac",
        extra_body={**SAMPLING, "stream": True},
    ) as response:  # fmt: skip
        assert response.headers["transfer-encoding"] == "chunked"
        data = b"".join(response.iter_bytes())

    exact = encode_audio(streamed, "flac")
    assert data[:4] == b"fLaC"
    # STREAMINFO: 20-bit rate, 3-bit channels-1, 5-bit bits-1, then a 36-bit sample count.
    fields = int.from_bytes(data[18:26], "big")
    assert fields >> 44 == SAMPLE_RATE
    assert (fields >> 41) & 0x7 == 0
    assert (fields >> 36) & 0x1F == 15
    assert fields & (2**36 - 1) == 0  # "unknown": a stream cannot know its length up front
    assert data[FLAC_STREAMINFO_END:] == exact[FLAC_STREAMINFO_END:]
    check_audio(exact, "flac", streamed)


def test_sse_sends_one_delta_per_generated_chunk_then_usage(
    server: str, tts: SopranoTTS, streamed: torch.Tensor
) -> None:
    chunks = list(tts.infer_stream(TEXT, max_chunk_size=DEFAULT_MAX_CHUNK_TOKENS, **SAMPLING))
    body = {"input": TEXT, "response_format": "pcm", "stream_format": "sse", **NATIVE}

    with httpx.stream("POST", f"{server}/v1/audio/speech", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [
            json.loads(line.removeprefix("data: "))
            for line in response.iter_lines()
            if line.startswith("data: ")
        ]

    deltas = [event for event in events[:-1] if event["type"] == "speech.audio.delta"]
    assert len(deltas) == len(events) - 1 == len(chunks)
    for delta, chunk in zip(deltas, chunks, strict=True):
        np.testing.assert_array_equal(
            np.frombuffer(base64.b64decode(delta["audio"]), "<i2"), pcm16(chunk)
        )
    done = events[-1]
    assert done["type"] == "speech.audio.done"
    assert done["usage"]["output_tokens"] == len(streamed) // TOKEN_SAMPLES
    assert done["usage"]["total_tokens"] == (
        done["usage"]["input_tokens"] + done["usage"]["output_tokens"]
    )
    assert done["usage"]["input_tokens"] > len(TEXT.split())


@pytest.mark.parametrize(
    ("request_fields", "message", "param"),
    [
        ({"speed": 9.0}, "speed must be from 0.25 to 4.0, got 9.0", "speed"),
        ({"volume": 0}, "volume must be above 0 and at most 10.0, got 0.0", "volume"),
        ({"sample_rate": 12345},
         "sample_rate must be one of 8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000 (Hz), "
         "got 12345", "sample_rate"),
        ({"sentence_silence": 11},
         "sentence_silence must be from 0 to 10 seconds, got 11.0", "sentence_silence"),
        ({"trailing_silence": -1},
         "trailing_silence must be from 0 to 10 seconds, got -1.0", "trailing_silence"),
        ({"response_format": "aac"},
         "response_format 'aac' is not supported; use wav, pcm, flac, mp3, opus",
         "response_format"),
        ({"response_format": "ogg"},
         "response_format: Input should be 'mp3', 'opus', 'aac', 'flac', 'wav' or 'pcm', "
         "got 'ogg'", "response_format"),
        ({"instructions": "Whisper."},
         "instructions are not supported: Soprano cannot be directed; choose a voice instead",
         "instructions"),
        ({"input": " "}, "input is empty: give the text to speak", "input"),
        ({"input": "x" * 201},
         "input is 201 characters; this server accepts at most 200 per request", "input"),
        ({"temprature": 0.5}, "Unrecognized request argument supplied: temprature", "temprature"),
        ({"temperature": -1}, "temperature must be a finite number >= 0, got -1.0", None),
        ({"retries": 2},
         "retries needs stream: false, because streamed audio cannot be taken back", "retries"),
        ({"stream_format": "sse", "stream": False},
         "stream_format 'sse' always streams; drop stream: false", "stream"),
    ],
)  # fmt: skip
def test_bad_requests_get_openai_shaped_400s(
    client: openai.OpenAI, request_fields: dict[str, object], message: str, param: str | None
) -> None:
    fields: dict[str, object] = {"model": "tts-1", "voice": "alloy", "input": TEXT}
    fields.update({k: v for k, v in request_fields.items() if k in OPENAI_FIELDS})
    extra = {k: v for k, v in request_fields.items() if k not in OPENAI_FIELDS}

    with pytest.raises(openai.BadRequestError) as raised:
        client.audio.speech.create(**fields, extra_body=extra)  # type: ignore[arg-type]

    assert raised.value.status_code == 400
    assert raised.value.body == {
        "message": message,
        "type": "invalid_request_error",
        "param": param,
        "code": None,
    }


def test_malformed_json_and_unknown_paths_get_openai_shaped_errors(server: str) -> None:
    malformed = httpx.post(
        f"{server}/v1/audio/speech",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    missing = httpx.get(f"{server}/v1/voices")

    assert malformed.status_code == 400
    assert malformed.json()["error"]["message"].startswith("The request body is not valid JSON")
    assert missing.status_code == 404
    assert missing.json() == {
        "error": {"message": "Not Found", "type": "invalid_request_error", "param": None,
                  "code": None}
    }  # fmt: skip


def test_models_health_and_openapi(
    client: openai.OpenAI, server: str, endless_checkpoint: Path
) -> None:
    models = client.models.list()
    health = httpx.get(f"{server}/health").json()
    schema = httpx.get(f"{server}/openapi.json").json()

    assert [model.id for model in models.data] == [str(endless_checkpoint)]
    assert client.models.retrieve(str(endless_checkpoint)).owned_by == "soprano"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("tts-1")
    assert health == {
        "status": "ok",
        "model": str(endless_checkpoint),
        "backend": "native",
        "device": "cpu",
        "sample_rate": SAMPLE_RATE,
        "voices": [endless_checkpoint.name, "second"],
        "default_voice": endless_checkpoint.name,
        "requests_in_progress": 0,
    }
    assert set(schema["paths"]) == {"/health", "/v1/models", "/v1/models/{model_id}",
                                    "/v1/audio/speech", "/v1/audio/voices"}  # fmt: skip
    speech_fields = schema["components"]["schemas"]["SpeechRequest"]["properties"]
    assert {"input", "response_format", "stream_format", "seed", "max_new_tokens"} <= set(
        speech_fields
    )


def test_the_event_loop_serves_while_the_engine_is_busy_and_requests_queue(
    client: openai.OpenAI, server: str, whole: torch.Tensor
) -> None:
    with ThreadPoolExecutor(1) as pool:
        with client.audio.speech.with_streaming_response.create(
            model="tts-1", voice="alloy", input=LONG_TEXT, response_format="pcm",
            extra_body=LONG_GENERATION,
        ) as long_response:  # fmt: skip
            pieces = long_response.iter_bytes()  # kept: dropping it would hang up
            first_piece = next(pieces)
            queued = pool.submit(speak, client, "wav", stream=False)
            health = httpx.get(f"{server}/health", timeout=10).json()
        # Leaving the block hung up on the long stream: the engine drops it and moves on.
        queued_audio = queued.result(timeout=120)

    assert first_piece
    assert health["requests_in_progress"] >= 1  # answered while the engine was generating
    check_audio(queued_audio, "wav", whole)
    assert httpx.get(f"{server}/health").json()["requests_in_progress"] == 0


def test_requests_at_once_are_generated_together_and_each_gets_its_own_audio(
    client: openai.OpenAI, tts: SopranoTTS
) -> None:
    """Continuous batching: every stream starts before any ends, and each carries what it
    would carry alone (the audio does not depend on what shares the batch)."""
    texts = [f"Request number {n} of several that arrive at the same time." for n in range(3)]
    with ExitStack() as responses:
        streams = [
            responses.enter_context(
                client.audio.speech.with_streaming_response.create(
                    model="tts-1", voice="alloy", input=text, response_format="pcm",
                    extra_body=NATIVE,
                )
            )
            for text in texts
        ]  # fmt: skip
        pieces = [stream.iter_bytes() for stream in streams]
        first = [next(piece) for piece in pieces]  # all started while none has ended
        audio = [head + b"".join(rest) for head, rest in zip(first, pieces, strict=True)]
    for text, data in zip(texts, audio, strict=True):
        alone = tts.infer_stream(text, max_chunk_size=DEFAULT_MAX_CHUNK_TOKENS, **SAMPLING)
        assert data == to_pcm16(torch.cat(list(alone)))


@pytest.mark.parametrize("response_format", ["mp3", "opus", "aac", "flac", "wav", "pcm"])
@pytest.mark.parametrize("text", ["!!!", "---", "🙂🙂"])
def test_text_with_nothing_to_say_is_a_400_in_every_format(
    server: str, response_format: str, text: str
) -> None:
    for stream in (True, False):
        body = {"input": text, "response_format": response_format, "stream": stream}
        response = httpx.post(f"{server}/v1/audio/speech", json=body, timeout=30)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] in ("input", "response_format")


@pytest.mark.parametrize(
    "fields",
    [{"temperature": 1e-300}, {"temperature": 1e-320}, {"top_p": 1e-300, "temperature": 0.7}],
)
def test_extreme_but_valid_sampling_values_still_speak(server: str, fields: dict) -> None:
    body = {"input": TEXT, "response_format": "pcm", "sample_rate": SAMPLE_RATE, **fields}
    body["max_new_tokens"] = 8
    response = httpx.post(f"{server}/v1/audio/speech", json=body, timeout=60)
    assert response.status_code == 200, response.text
    assert len(response.content) == 7 * TOKEN_SAMPLES * 2


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"max_new_tokens": 2_000_000}, "max_new_tokens must be at most 1024 on this server"),
        ({"retries": 1_000_000, "stream": False}, "retries must be an integer from 0 to 10"),
        ({"seed": 2**70}, "seed must be an integer from 0 to"),
    ],
)
def test_out_of_range_values_are_400s_that_say_the_limit(
    server: str, fields: dict, message: str
) -> None:
    body = {"input": TEXT, "response_format": "pcm", **fields}
    response = httpx.post(f"{server}/v1/audio/speech", json=body, timeout=30)
    assert response.status_code == 400
    assert response.json()["error"]["message"].startswith(message)


def test_an_oversize_body_is_refused_before_it_is_read(server: str) -> None:
    huge = json.dumps({"input": "x" * 2_000_000}).encode()
    declared = httpx.post(f"{server}/v1/audio/speech", content=huge, timeout=30)

    def pieces() -> Iterator[bytes]:  # no Content-Length: a chunked body
        for start in range(0, len(huge), 65536):
            yield huge[start : start + 65536]

    chunked = httpx.post(f"{server}/v1/audio/speech", content=pieces(), timeout=30)
    for response in (declared, chunked):
        assert response.status_code == 413
        assert "larger than this server accepts" in response.json()["error"]["message"]
    assert httpx.get(f"{server}/health").json()["status"] == "ok"


class FailingService:
    """A serving layer whose every request fails unexpectedly (a 500)."""

    def __init__(self, tts: SopranoTTS) -> None:
        self.tts = tts
        self.limits = ServingLimits()
        self.requests_in_progress = 0
        self.voices = ("default",)
        self.default_voice = "default"

    def submit(self, *args: object, **kwargs: object) -> None:
        raise RuntimeError("the engine is on fire")


def test_a_server_error_closes_the_connection(tts: SopranoTTS) -> None:
    """After a 500 the server says Connection: close, so a keep-alive client does not send its
    next request on a connection the server is about to drop."""
    app = create_app(FailingService(tts), "m")  # type: ignore[arg-type]
    with TestClient(app, raise_server_exceptions=False) as http:
        failed = http.post("/v1/audio/speech", json={"input": TEXT})
        fine = http.get("/health")
    assert failed.status_code == 500
    assert failed.headers["connection"] == "close"
    assert "the engine is on fire" in failed.json()["error"]["message"]
    assert fine.status_code == 200 and "connection" not in fine.headers


def test_voices_are_listed_as_open_webui_reads_them_and_each_speaks_as_itself(
    client: openai.OpenAI, server: str, endless_checkpoint: Path, voice_data_dir: Path
) -> None:
    listed = httpx.get(f"{server}/v1/audio/voices").json()
    second = SopranoTTS(model_path=voice_data_dir / "second", device="cpu")
    expected = torch.cat(
        list(second.infer_stream(TEXT, max_chunk_size=DEFAULT_MAX_CHUNK_TOKENS, **SAMPLING))
    )

    assert listed == {
        "voices": [
            {"id": endless_checkpoint.name, "name": endless_checkpoint.name},
            {"id": "second", "name": "second"},
        ],
        "default": endless_checkpoint.name,
    }
    check_audio(speak(client, "wav", voice="second"), "wav", expected)
    check_audio(speak(client, "wav", voice={"id": "second"}), "wav", expected)


def test_an_unknown_voice_is_a_400_that_lists_the_voices(
    client: openai.OpenAI, endless_checkpoint: Path, whole: torch.Tensor
) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        client.audio.speech.create(model="tts-1", voice="nobody", input=TEXT)

    assert raised.value.body == {
        "message": f"voice 'nobody' does not exist; this server has {endless_checkpoint.name}, "
        "second",
        "type": "invalid_request_error",
        "param": "voice",
        "code": None,
    }
    check_audio(speak(client, "wav", voice=endless_checkpoint.name), "wav", whole)


def shaped_pcm(tts: SopranoTTS, audio: AudioOptions, text: str = TEXT) -> np.ndarray:
    """What a request with these effects and pauses must carry: the engine's stream through
    the same shaping (the Python API's `infer_stream(audio=...)`)."""
    chunks = tts.infer_stream(
        text, max_chunk_size=DEFAULT_MAX_CHUNK_TOKENS, audio=audio, **SAMPLING
    )
    return pcm16(torch.cat(list(chunks)))


def pcm_of(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<i2")


def test_pcm_is_24_khz_as_openai_clients_play_it_unless_sample_rate_says_otherwise(
    client: openai.OpenAI, tts: SopranoTTS, streamed: torch.Tensor
) -> None:
    openai_pcm = client.audio.speech.create(
        model="tts-1", voice="alloy", input=TEXT, response_format="pcm", extra_body=SAMPLING
    ).content
    wav_rate, _ = decode(speak(client, "wav", sample_rate=16_000), "wav")

    expected = shaped_pcm(tts, AudioOptions(AudioEffects(sample_rate=24_000)))
    assert abs(len(expected) - EXPECTED_SAMPLES * 3 // 4) <= 1
    np.testing.assert_array_equal(pcm_of(openai_pcm), expected)
    np.testing.assert_array_equal(pcm_of(speak(client, "pcm")), pcm16(streamed))  # 32000 asked
    assert wav_rate == 16_000


@pytest.mark.parametrize("speed", [0.5, 1.5, 4.0])
def test_speed_is_honoured_while_streaming(
    client: openai.OpenAI, tts: SopranoTTS, speed: float
) -> None:
    response = client.audio.speech.create(
        model="tts-1", voice="alloy", input=TEXT, response_format="wav", speed=speed,
        extra_body=NATIVE,
    )  # fmt: skip
    _, audio = decode(response.content, "wav")

    expected = shaped_pcm(tts, AudioOptions(AudioEffects(speed=speed)))
    np.testing.assert_array_equal(audio, expected)
    assert len(audio) == pytest.approx(EXPECTED_SAMPLES / speed, rel=0.02)


def test_volume_and_pauses_shape_the_audio(
    client: openai.OpenAI, tts: SopranoTTS, streamed: torch.Tensor
) -> None:
    two_sentences = f"{TEXT} {TEXT}"
    options = {"volume": 0.5, "sentence_silence": 0.25, "trailing_silence": 0.5}
    data = client.audio.speech.create(
        model="tts-1", voice="alloy", input=two_sentences, response_format="pcm",
        extra_body={**NATIVE, **options},
    ).content  # fmt: skip

    audio = pcm_of(data)
    expected = shaped_pcm(tts, AudioOptions(AudioEffects(volume=0.5), 0.25, 0.5), two_sentences)
    np.testing.assert_array_equal(audio, expected)
    pause, tail = SAMPLE_RATE // 4, SAMPLE_RATE // 2
    assert len(audio) == 2 * EXPECTED_SAMPLES + pause + tail
    assert not audio[EXPECTED_SAMPLES : EXPECTED_SAMPLES + pause].any()
    assert not audio[-tail:].any()
    assert audio[:EXPECTED_SAMPLES].any()
