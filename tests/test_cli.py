"""The `soprano` command, run as a real process on the generated tiny checkpoint."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from soprano.apps import cli
from soprano.audio import AudioEffects, to_pcm16
from soprano.audio.pauses import AudioOptions
from soprano.constants import SAMPLE_RATE, TOKEN_SAMPLES
from soprano.lm.base import MAX_SEED
from soprano.serving import DEFAULT_MAX_CHUNK_TOKENS
from soprano.tts import SopranoTTS

SOPRANO = [str(Path(sys.executable).with_name("soprano"))]  # the installed console script
TEXT = "Soprano reads this sentence aloud. And then it reads a second one, which is longer."
SENTENCES = 2
MAX_NEW_TOKENS = 24
SAMPLING = {"temperature": 1.0, "seed": 1, "max_new_tokens": MAX_NEW_TOKENS}
SAMPLING_ARGS = ["--temperature", "1", "--seed", "1", "--max-new-tokens", str(MAX_NEW_TOKENS)]
# The endless checkpoint never says [STOP]: each sentence is cut at MAX_NEW_TOKENS audio tokens.
EXPECTED_SAMPLES = SENTENCES * (MAX_NEW_TOKENS - 1) * TOKEN_SAMPLES
MP3_FRAME = 1152
MP3_DELAY = 576


@pytest.fixture(scope="module")
def tts(endless_checkpoint: Path) -> SopranoTTS:
    return SopranoTTS(model_path=endless_checkpoint, device="cpu")


def pcm16(audio: torch.Tensor) -> np.ndarray:
    return np.frombuffer(to_pcm16(audio), dtype="<i2")


def run(args: list[str], **kwargs: object) -> subprocess.CompletedProcess[bytes]:
    kwargs.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.run(
        [*SOPRANO, *args], capture_output=True, timeout=120, check=False, **kwargs
    )


def model_args(checkpoint: Path) -> list[str]:
    return ["--model", str(checkpoint), "--device", "cpu"]


def run_with_terminal(args: list[str], cwd: Path, terminal: str) -> tuple[int, bytes, bytes]:
    """Run with `terminal` ('stdin', 'stdout' or 'stderr') connected to a pseudo-terminal.

    Returns the exit code, what the program wrote to the terminal, and its standard error (or,
    when standard error is the terminal, its standard output).
    """
    controller, terminal_fd = pty.openpty()
    streams = {"stdin": subprocess.DEVNULL, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    streams[terminal] = terminal_fd
    with subprocess.Popen([*SOPRANO, *args], cwd=cwd, **streams) as process:
        os.close(terminal_fd)
        seen = bytearray()
        while True:
            try:
                data = os.read(controller, 4096)
            except OSError:  # EIO: the program exited and the terminal closed
                break
            if not data:
                break
            seen += data
        stdout, stderr = process.communicate(timeout=120)
    os.close(controller)
    return process.returncode, bytes(seen), stderr if terminal != "stderr" else stdout


def test_text_arguments_to_the_default_output_wav_are_the_engines_audio(
    endless_checkpoint: Path, tts: SopranoTTS, tmp_path: Path
) -> None:
    result = run([*model_args(endless_checkpoint), *SAMPLING_ARGS, *TEXT.split()], cwd=tmp_path)

    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == b""
    assert b"sentences" not in result.stderr  # no progress bar when stderr is not a terminal
    audio, rate = soundfile.read(tmp_path / "output.wav", dtype="int16")
    assert (rate, len(audio)) == (SAMPLE_RATE, EXPECTED_SAMPLES)
    np.testing.assert_array_equal(audio, pcm16(tts.infer(TEXT, **SAMPLING)))


def test_file_input_to_flac_is_lossless(
    endless_checkpoint: Path, tts: SopranoTTS, tmp_path: Path
) -> None:
    text_file = tmp_path / "text.txt"
    text_file.write_text(TEXT, encoding="utf-8")
    out = tmp_path / "speech.flac"

    result = run([*model_args(endless_checkpoint), *SAMPLING_ARGS, "--file", str(text_file), "-o",
                  str(out)])  # fmt: skip

    assert result.returncode == 0, result.stderr.decode()
    audio, rate = soundfile.read(out, dtype="int16")
    assert (rate, len(audio)) == (SAMPLE_RATE, EXPECTED_SAMPLES)
    np.testing.assert_array_equal(audio, pcm16(tts.infer(TEXT, **SAMPLING)))


def test_stream_writes_the_engines_stream_from_stdin_as_raw_pcm(
    endless_checkpoint: Path, tts: SopranoTTS
) -> None:
    result = run(
        [*model_args(endless_checkpoint), *SAMPLING_ARGS, "--stream"],
        input=TEXT.encode(),
        stdin=None,
    )

    assert result.returncode == 0, result.stderr.decode()
    expected = torch.cat(
        list(tts.infer_stream(TEXT, max_chunk_size=DEFAULT_MAX_CHUNK_TOKENS, **SAMPLING))
    )
    assert len(result.stdout) == EXPECTED_SAMPLES * 2
    np.testing.assert_array_equal(np.frombuffer(result.stdout, "<i2"), pcm16(expected))


def test_progress_bar_on_a_terminal_counts_sentences_and_audio(
    endless_checkpoint: Path, tmp_path: Path
) -> None:
    code, terminal, _ = run_with_terminal(
        [*model_args(endless_checkpoint), *SAMPLING_ARGS, TEXT, "-o", "speech.mp3"],
        tmp_path,
        "stderr",
    )

    assert code == 0
    last_line = terminal.decode().replace("\r\n", "\n").split("\r")[-1]
    seconds = EXPECTED_SAMPLES / SAMPLE_RATE
    bar = "#" * cli.PROGRESS_BAR_WIDTH
    assert last_line.startswith(
        f"[{bar}] {SENTENCES}/{SENTENCES} sentences | {seconds:.1f} s audio | "
    )
    assert last_line.endswith("x real time\n")
    decoded, rate = soundfile.read(tmp_path / "speech.mp3", dtype="int16")
    assert rate == SAMPLE_RATE
    # MP3 (without a gapless tag) adds LAME's delay and pads to whole frames.
    assert EXPECTED_SAMPLES <= len(decoded) < EXPECTED_SAMPLES + MP3_DELAY + MP3_FRAME


def test_quiet_hides_progress_and_warnings_on_a_terminal(
    endless_checkpoint: Path, tmp_path: Path
) -> None:
    code, terminal, _ = run_with_terminal(
        [*model_args(endless_checkpoint), *SAMPLING_ARGS, "-q", TEXT, "-o", "out.wav"],
        tmp_path,
        "stderr",
    )

    assert code == 0
    assert terminal == b""


def test_stream_refuses_to_write_pcm_to_a_terminal(
    endless_checkpoint: Path, tmp_path: Path
) -> None:
    code, terminal, stderr = run_with_terminal(
        [*model_args(endless_checkpoint), "--stream", "Hello."], tmp_path, "stdout"
    )

    assert code == 1
    assert terminal == b""
    assert stderr == (
        b"soprano: error: --stream writes raw PCM; pipe it into a player, "
        b"e.g. | aplay -r 32000 -f S16_LE -c 1\n"
    )


def test_no_text_on_a_terminal_says_where_text_comes_from(tmp_path: Path) -> None:
    code, _, stderr = run_with_terminal([], tmp_path, "stdin")

    assert code == 1
    assert stderr == (
        b"soprano: error: no text: give it as arguments, with --file, or on standard input\n"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "/nonexistent/model", "Hello."],
         "soprano: error: model '/nonexistent/model' is neither an existing folder nor a repo id"),
        (["Hello.", "-o", "speech.xyz"],
         "soprano: error: cannot tell the audio format of 'speech.xyz'; "
         "use one of .wav, .pcm, .raw, .flac, .mp3, .opus, .ogg"),
        (["--file", "/nonexistent/text.txt"],
         "soprano: error: no such file: /nonexistent/text.txt"),
        (["..."], "soprano: error: the text has nothing to speak"),
        (["--stream", "--retries", "1", "Hello."],
         "soprano: error: --retries works for file output only: streamed audio cannot be taken "
         "back"),
        (["--play", "--model", "{checkpoint}", "Hello."],
         "soprano: error: --play needs the sounddevice package and the PortAudio library "
         "(pip install 'wyoming-soprano[play]'; on Debian/Ubuntu also: apt install libportaudio2): "
         "No module named 'sounddevice'"),
    ],
)  # fmt: skip
def test_errors_are_one_line_with_exit_code_1(
    args: list[str],
    message: str,
    endless_checkpoint: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    args = [arg.replace("{checkpoint}", str(endless_checkpoint)) for arg in args]

    assert cli.main(args) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == message + "\n"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--temperature", "-1"], "temperature must be a finite number >= 0, got -1.0"),
        (["--temperature", "inf"], "temperature must be a finite number >= 0, got inf"),
        (["--top-p", "0"], "top_p must be in (0, 1], got 0.0"),
        (["--repetition-penalty", "0"], "repetition_penalty must be a finite number > 0, got 0.0"),
        (["--seed", str(2**64)],
         f"seed must be an integer from 0 to {MAX_SEED - 1} or None, got {2**64}"),
        (["--max-new-tokens", "0"], "max_new_tokens must be >= 1, got 0"),
        (["--chunk-size", "1.5"], "argument --chunk-size: must be an integer >= 1, got '1.5'"),
        (["--retries", "-1"], "argument --retries: must be an integer >= 0, got '-1'"),
        (["--threads", "0"], "argument --threads: must be an integer >= 1, got '0'"),
        (["--cache-size", "x"], "argument --cache-size: must be an integer >= 1, got 'x'"),
        (["--decoder-batch-size", "0"],
         "argument --decoder-batch-size: must be an integer >= 1, got '0'"),
    ],
)  # fmt: skip
def test_bad_option_values_exit_2_before_loading_a_model(
    args: list[str], message: str, tmp_path: Path
) -> None:
    result = run([*args, "--model", str(tmp_path / "never-loaded"), "Hello."], cwd=tmp_path)

    assert result.returncode == 2
    assert result.stderr.decode().splitlines()[-1] == f"soprano: error: {message}"
    assert list(tmp_path.iterdir()) == []


def test_undecodable_bytes_on_standard_input_are_dropped_quietly(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """Standard input decodes undecodable bytes to lone surrogates (surrogateescape, as in
    the C.UTF-8 locale); unidecode warned about each of them on standard error, even with -q."""
    noise = bytes(range(0x80, 0x100)) + b" Hello there. " + bytes(range(0xFF, 0x7F, -1))
    result = run(
        [*model_args(tiny_checkpoint), "-q", "-o", "noise.wav", *SAMPLING_ARGS],
        input=noise,
        stdin=None,
        cwd=tmp_path,
        env={**os.environ, "PYTHONUTF8": "1"},
    )

    assert result.returncode == 0, result.stderr
    assert result.stderr == b""
    assert (tmp_path / "noise.wav").stat().st_size > 0


SHAPING = AudioOptions(AudioEffects(speed=2.0, volume=0.7, sample_rate=16_000), 0.25, 0.5)
SHAPING_ARGS = ["--speed", "2", "--volume", "0.7", "--sample-rate", "16000",
                "--sentence-silence", "0.25", "--trailing-silence", "0.5"]  # fmt: skip


def test_audio_options_shape_file_output(endless_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "fast.wav"
    result = run([*model_args(endless_checkpoint), *SAMPLING_ARGS, *SHAPING_ARGS, "-o", str(out),
                  TEXT])  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()

    audio, rate = soundfile.read(out, dtype="int16")
    sentence = (MAX_NEW_TOKENS - 1) * TOKEN_SAMPLES * rate / SAMPLE_RATE / 2  # at speed 2
    pause, tail = rate // 4, rate // 2
    assert rate == 16_000
    assert len(audio) == pytest.approx(2 * sentence + pause + tail, rel=0.02)
    assert not audio[-tail:].any() and audio[: int(sentence) // 2].any()
    middle = audio[int(sentence) + 100 : int(sentence) + pause - 100]  # the pause, give or take
    assert len(middle) > pause // 2 and not middle.any()


def test_audio_options_shape_the_stream_as_the_python_api_does(
    endless_checkpoint: Path, tts: SopranoTTS
) -> None:
    result = run([*model_args(endless_checkpoint), *SAMPLING_ARGS, *SHAPING_ARGS, "--stream"],
                 input=TEXT.encode(), stdin=None)  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()

    chunks = tts.infer_stream(
        TEXT, max_chunk_size=DEFAULT_MAX_CHUNK_TOKENS, audio=SHAPING, **SAMPLING
    )
    expected = pcm16(torch.cat(list(chunks)))
    np.testing.assert_array_equal(np.frombuffer(result.stdout, "<i2"), expected)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--speed", "5"], "speed must be from 0.25 to 4.0, got 5.0"),
        (["--sample-rate", "1000"], "sample_rate must be one of 8000,"),
        (["--sentence-silence", "20"], "sentence_silence must be from 0 to 10 seconds"),
    ],
)
def test_bad_audio_options_exit_2(args: list[str], message: str) -> None:
    result = run([*args, "Hello."])
    assert result.returncode == 2
    assert message in result.stderr.decode()
