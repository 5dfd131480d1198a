"""`soprano-webui` as a real process, driven in headless Debian chromium with Playwright."""

from __future__ import annotations

import io
import re
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile
from playwright.sync_api import Browser, Page, expect, sync_playwright
from processes import serving_process

from soprano.constants import SAMPLE_RATE, TOKEN_SAMPLES

WEBUI = str(Path(sys.executable).with_name("soprano-webui"))  # the installed console script
CHROMIUM = "/usr/bin/chromium"  # Debian's, installed by script/setup-browser
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TEXT = "Soprano reads this sentence aloud. And then it reads a second one, which is longer."
SENTENCES = 2
MAX_NEW_TOKENS = 200
"""Long enough (25 s of audio) that the browser plays well before the stream ends."""
# The endless checkpoint never says [STOP]: each sentence is cut at MAX_NEW_TOKENS.
EXPECTED_SECONDS = SENTENCES * (MAX_NEW_TOKENS - 1) * TOKEN_SAMPLES / SAMPLE_RATE
MP3_FRAME = 1152
MP3_DELAY = 576
TIMEOUT_MS = 120_000
SUMMARY = re.compile(
    r"(\S+): (\d+\.\d\d) s of audio in \d+\.\d\d s \(\d+\.\d× real time\); "
    r"first audio after \d+\.\d\d s"
)
AUDIO_EVENTS = ("canplay", "playing", "error")
RECORD_AUDIO_EVENTS = f"""
for (const name of {list(AUDIO_EVENTS)!r}) {{
  document.addEventListener(name, (event) => {{
    if (event.target.tagName === "AUDIO") window.audioEvent(name, event.target.currentSrc);
  }}, true);
}}
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def webui(endless_checkpoint: Path, voice_data_dir: Path) -> Iterator[str]:
    """The page's URL, once the process says it serves. A second voice is in its data folder."""
    port = free_port()
    command = [
        *(WEBUI, "--model", str(endless_checkpoint), "--device", "cpu", "--port", str(port)),
        *("--data-dir", str(voice_data_dir)),
        *("--temperature", "1", "--seed", "2", "--max-new-tokens", str(MAX_NEW_TOKENS)),
    ]
    with serving_process(command, "soprano-webui: serving on ", timeout=180):
        yield f"http://127.0.0.1:{port}/"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser, webui: str) -> Iterator[Page]:
    page = browser.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(webui)
    yield page
    page.close()


def test_audio_plays_in_the_browser_while_it_is_streamed(
    page: Page, webui: str, endless_checkpoint: Path
) -> None:
    """Order of events as the browser reports them: the audio element can play before the
    download of the stream finishes, and it does play."""
    events: list[tuple[str, str]] = []
    page.expose_function("audioEvent", lambda name, src: events.append((name, src)))
    page.evaluate(RECORD_AUDIO_EVENTS)
    page.on("requestfinished", lambda request: events.append(("downloaded", request.url)))

    page.get_by_label("Text").fill(TEXT)
    page.get_by_role("button", name="Speak").click()
    summary = page.locator("#soprano-status").get_by_text(SUMMARY)
    summary.wait_for()

    source = page.locator("audio#soprano-player").evaluate("audio => audio.currentSrc")
    assert source.startswith(f"{webui}speech/") and source.endswith(".mp3")
    names = [name for name, url in events if url == source]
    assert "error" not in names
    assert "downloaded" in names
    assert names.index("canplay") < names.index("downloaded")
    assert "playing" in names
    match = SUMMARY.search(summary.inner_text())
    assert match is not None
    assert match.group(1) == endless_checkpoint.name  # the default voice
    assert float(match.group(2)) == pytest.approx(EXPECTED_SECONDS, abs=0.005)

    replay = httpx.get(source, timeout=60)  # the same stream, finished, fetched again
    assert replay.headers["content-type"] == "audio/mpeg"
    audio, rate = soundfile.read(io.BytesIO(replay.content), dtype="int16")
    expected_samples = round(EXPECTED_SECONDS * SAMPLE_RATE)
    assert rate == SAMPLE_RATE
    assert expected_samples <= len(audio) < expected_samples + MP3_DELAY + MP3_FRAME


def test_stop_ends_the_generation_early(page: Page) -> None:
    page.get_by_label("Text").fill(TEXT)
    page.get_by_role("button", name="Speak").click()
    page.locator("audio#soprano-player").wait_for()
    page.get_by_role("button", name="Stop").click()

    status = page.locator("#soprano-status").get_by_text(re.compile(r"^Stopped after"))
    status.wait_for()
    seconds = float(re.findall(r"\d+\.\d\d", status.inner_text())[0])
    assert 0 <= seconds < EXPECTED_SECONDS


def test_empty_text_is_refused_with_a_message(page: Page) -> None:
    page.get_by_role("button", name="Speak").click()

    page.get_by_text("Type some text to speak first.").first.wait_for()
    assert page.locator("audio#soprano-player").count() == 0


def test_text_past_the_input_limit_is_refused_with_a_message(page: Page) -> None:
    page.get_by_label("Text").fill("Far too long a text. " * 300)  # 6300 characters
    page.get_by_role("button", name="Speak").click()

    page.get_by_text("at most 4096 can be spoken at once").first.wait_for()
    assert page.locator("audio#soprano-player").count() == 0


def test_examples_fill_the_text_box(page: Page) -> None:
    page.get_by_text("The quick brown fox jumps over the lazy dog", exact=False).first.click()

    expect(page.get_by_label("Text")).to_have_value(
        re.compile(r"^The quick brown fox jumps over the lazy dog"), timeout=TIMEOUT_MS
    )


def spoken_mp3(page: Page) -> np.ndarray:
    """Speak the text box and return the finished MP3's samples."""
    page.get_by_role("button", name="Speak").click()
    page.locator("#soprano-status").get_by_text(SUMMARY).wait_for()
    source = page.locator("audio#soprano-player").evaluate("audio => audio.currentSrc")
    audio, _ = soundfile.read(io.BytesIO(httpx.get(source, timeout=60).content), dtype="int16")
    return audio


def test_the_voice_picker_speaks_with_the_chosen_voice(
    page: Page, endless_checkpoint: Path
) -> None:
    page.get_by_label("Text").fill(TEXT)
    default = spoken_mp3(page)
    picker = page.get_by_label("Voice")
    picker.click()
    page.get_by_role("option", name="second").click()
    expect(picker).to_have_value("second", timeout=TIMEOUT_MS)
    second = spoken_mp3(page)

    status = page.locator("#soprano-status").inner_text()
    assert status.startswith("second: ")
    assert len(default) != len(second) or not np.array_equal(default, second)
