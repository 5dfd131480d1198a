"""End-to-end engine tests on generated checkpoints: alignment, streaming, batching, errors."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import wave
from pathlib import Path

import pytest
import torch

from soprano import ModelLoadError, SopranoTTS
from soprano.constants import RECEPTIVE_FIELD, SAMPLE_RATE, TOKEN_SAMPLES
from soprano.hallucination import looks_hallucinated
from soprano.lm import Generation, SamplingParams
from soprano.text import prepare_text

MAX_TOKENS = 40
TEXTS = [
    "Hello there, this is a sentence that is long enough to stand alone.",
    "The second text has two sentences of decent length here. And this is the other one, see?",
    "Good morning! How are you today, my friend?",
]


@pytest.fixture(scope="module")
def tts(tiny_checkpoint: Path) -> SopranoTTS:
    return SopranoTTS(backend="transformers", device="cpu", model_path=tiny_checkpoint)


def test_both_decoder_variants_load_and_run(tiny_checkpoint: Path, tiny_checkpoint_80m: Path):
    for path, kernel in ((tiny_checkpoint, 1), (tiny_checkpoint_80m, 3)):
        engine = SopranoTTS(device="cpu", model_path=path, warmup=False)
        assert engine.decoder.embed_kernel == kernel
        audio = engine.infer(TEXTS[2], max_new_tokens=12)
        assert audio.dtype == torch.float32 and audio.ndim == 1
        assert len(audio) % TOKEN_SAMPLES == 0 and len(audio) > 0


def test_frames_are_the_states_that_produced_each_token(tts: SopranoTTS):
    """Decision (a): frame k is the post-norm state whose logits gave token k; STOP's is dropped."""
    (sentence,) = prepare_text(TEXTS[0])
    prompt = tts.tokenizer.encode(sentence)
    (generation,) = tts.lm.generate([prompt], SamplingParams(max_new_tokens=MAX_TOKENS))
    n = len(generation.tokens)
    assert n > 1 and generation.hidden.shape == (n, tts.checkpoint.config.hidden_size)
    with torch.inference_mode():
        ids = torch.tensor([prompt + generation.tokens])
        states = tts.lm.model.model(input_ids=ids).last_hidden_state[0]
    producing = states[len(prompt) - 1 : len(prompt) - 1 + n]
    torch.testing.assert_close(generation.hidden, producing, atol=1e-4, rtol=0)
    expected = tts.decoder.decode([producing])[0]
    audio = tts.infer(TEXTS[0], max_new_tokens=MAX_TOKENS)
    assert len(audio) == (n - 1) * TOKEN_SAMPLES
    torch.testing.assert_close(audio, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("chunk_size", [1, 2, 5])
def test_stream_equals_offline(tts: SopranoTTS, chunk_size: int):
    for text in TEXTS:
        offline = tts.infer(text, max_new_tokens=MAX_TOKENS)
        chunks = list(tts.infer_stream(text, chunk_size=chunk_size, max_new_tokens=MAX_TOKENS))
        assert len(offline) > RECEPTIVE_FIELD * TOKEN_SAMPLES
        assert all(chunk.dtype == torch.float32 and chunk.ndim == 1 for chunk in chunks)
        torch.testing.assert_close(torch.cat(chunks), offline, atol=1e-5, rtol=0)


def test_first_chunk_after_receptive_field_plus_chunk(tts: SopranoTTS):
    """The first chunk is exactly chunk_size tokens of audio, once RF + chunk tokens exist."""
    for chunk_size in (1, 3):
        stream = tts.infer_stream(TEXTS[0], chunk_size=chunk_size, max_new_tokens=MAX_TOKENS)
        first = next(stream)
        stream.close()
        assert len(first) == chunk_size * TOKEN_SAMPLES
    assert RECEPTIVE_FIELD == 4


def test_batch_equals_single_calls(tts: SopranoTTS, tmp_path: Path):
    batch = tts.infer_batch(TEXTS, out_dir=tmp_path, max_new_tokens=MAX_TOKENS)
    assert len(batch) == len(TEXTS)
    for index, (text, audio) in enumerate(zip(TEXTS, batch, strict=True)):
        torch.testing.assert_close(
            audio, tts.infer(text, max_new_tokens=MAX_TOKENS), atol=1e-4, rtol=0
        )
        with wave.open(str(tmp_path / f"{index}.wav")) as wav:
            assert wav.getframerate() == SAMPLE_RATE and wav.getsampwidth() == 2
            assert wav.getnchannels() == 1 and wav.getnframes() == len(audio)


def test_sentences_are_concatenated_in_order(tts: SopranoTTS):
    first = "A quick test of the streaming engine."
    second = "It is twenty degrees outside and sunny."
    assert len(prepare_text(f"{first} {second}")) == 2
    whole = tts.infer(f"{first} {second}", max_new_tokens=MAX_TOKENS)
    parts = [tts.infer(text, max_new_tokens=MAX_TOKENS) for text in (first, second)]
    torch.testing.assert_close(whole, torch.cat(parts), atol=1e-4, rtol=0)


def test_greedy_is_deterministic_and_seed_makes_sampling_repeatable(tts: SopranoTTS):
    text = TEXTS[0]
    greedy = tts.infer(text, max_new_tokens=20)
    assert len(greedy) > 0 and torch.equal(greedy, tts.infer(text, max_new_tokens=20))
    sampled = {
        seed: tts.infer(text, temperature=1.0, top_p=1.0, seed=seed, max_new_tokens=20)
        for seed in (1, 2)
    }
    again = tts.infer(text, temperature=1.0, top_p=1.0, seed=1, max_new_tokens=20)
    assert torch.equal(sampled[1], again)
    assert not torch.equal(sampled[1][: len(sampled[2])], sampled[2][: len(sampled[1])])
    streamed = tts.infer_stream(text, temperature=1.0, top_p=1.0, seed=1, max_new_tokens=20)
    torch.testing.assert_close(torch.cat(list(streamed)), sampled[1], atol=1e-5, rtol=0)


def test_wav_file_is_16_bit_pcm(tts: SopranoTTS, tmp_path: Path):
    path = tmp_path / "out.wav"
    audio = tts.infer(TEXTS[2], out_path=path, max_new_tokens=MAX_TOKENS)
    with wave.open(str(path)) as wav:
        assert (wav.getframerate(), wav.getsampwidth(), wav.getnchannels()) == (SAMPLE_RATE, 2, 1)
        assert wav.getnframes() == len(audio)


@pytest.mark.parametrize("text", ["", "   ", "?!...", "\n\n"])
def test_text_without_words_gives_empty_audio(tts: SopranoTTS, text: str):
    assert tts.infer(text).shape == (0,)
    assert list(tts.infer_stream(text)) == []
    assert [a.shape for a in tts.infer_batch([text, text])] == [(0,), (0,)]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -1},
        {"temperature": float("nan")},
        {"top_p": 0},
        {"top_p": 1.5},
        {"repetition_penalty": 0},
        {"max_new_tokens": 0},
        {"seed": "x"},
        {"retries": -1},
    ],
)
def test_bad_sampling_arguments(tts: SopranoTTS, kwargs: dict):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        tts.infer("Some text.", **kwargs)


def test_bad_call_arguments(tts: SopranoTTS):
    with pytest.raises(ValueError, match="chunk_size"):
        tts.infer_stream("Some text.", chunk_size=0)
    with pytest.raises(ValueError, match="texts"):
        tts.infer_batch("not a list")
    with pytest.raises(ValueError, match="text"):
        tts.infer_stream(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="backend"):
        SopranoTTS(backend="onnx", device="cpu", model_path="unused")
    with pytest.raises(ValueError, match="device"):
        SopranoTTS(device="tpu")
    with pytest.raises(ValueError, match="decoder_batch_size"):
        SopranoTTS(decoder_batch_size=0)


def test_backend_options(tiny_checkpoint: Path, tts: SopranoTTS):
    """Options reach the native backend; its fp32 paths give the transformers backend's audio."""
    exact = SopranoTTS(
        device="cpu",
        model_path=tiny_checkpoint,
        backend_options={"dtype": "float32", "half_weights": False},
        warmup=False,
    )
    assert exact.backend == "native"
    torch.testing.assert_close(
        exact.infer(TEXTS[1], max_new_tokens=MAX_TOKENS),
        tts.infer(TEXTS[1], max_new_tokens=MAX_TOKENS),
        atol=1e-4,
        rtol=0,
    )
    with pytest.raises(ValueError, match="native backend option"):
        SopranoTTS(device="cpu", model_path=tiny_checkpoint, backend_options={"colour": 1})
    with pytest.raises(ValueError, match="the transformers backend takes no options"):
        SopranoTTS(
            backend="transformers",
            device="cpu",
            model_path=tiny_checkpoint,
            backend_options={"dtype": "int8"},
        )


def test_length_limit_is_logged(tts: SopranoTTS, caplog: pytest.LogCaptureFixture):
    caplog.set_level("WARNING")
    audio = tts.infer(TEXTS[0], max_new_tokens=3)
    assert len(audio) <= 2 * TOKEN_SAMPLES
    assert "did not finish within 3 tokens" in caplog.text


class _ScriptedLM:
    """Stands in for a backend: returns queued generations, recording each call."""

    def __init__(self, hidden_size: int, queue: list[list[Generation]]) -> None:
        self.hidden_size = hidden_size
        self.queue = queue
        self.calls: list[int] = []

    def generate(self, prompts, params):
        self.calls.append(len(prompts))
        return self.queue.pop(0)


def test_retries_regenerate_only_hallucinated_sentences(tiny_checkpoint: Path):
    engine = SopranoTTS(device="cpu", model_path=tiny_checkpoint, warmup=False)
    size = engine.checkpoint.config.hidden_size
    stuck = Generation(list(range(30)), torch.zeros(30, size), "stop")
    varied = Generation(list(range(30)), torch.randn(30, size) * 1000, "stop")
    assert looks_hallucinated(stuck.hidden) and not looks_hallucinated(varied.hidden)
    fixed = Generation(list(range(20)), torch.randn(20, size) * 1000, "stop")
    scripted = _ScriptedLM(size, [[varied, stuck], [fixed]])
    engine.lm = scripted  # type: ignore[assignment]
    text = "A first sentence that is long enough here. A second sentence, also long enough."
    audio = engine.infer(text, retries=2)
    assert scripted.calls == [2, 1]
    assert len(audio) == (30 - 1 + 20 - 1) * TOKEN_SAMPLES


def _copy(checkpoint: Path, tmp_path: Path) -> Path:
    target = tmp_path / "model"
    shutil.copytree(checkpoint, target)
    return target


@pytest.mark.parametrize(
    "missing", ["config.json", "model.safetensors", "tokenizer.json", "decoder.pth"]
)
def test_missing_file(tiny_checkpoint: Path, tmp_path: Path, missing: str):
    folder = _copy(tiny_checkpoint, tmp_path)
    (folder / missing).unlink()
    with pytest.raises(ModelLoadError, match=re.escape(missing)):
        SopranoTTS(device="cpu", model_path=folder, warmup=False)


@pytest.mark.parametrize(
    "name", ["decoder.pth", "model.safetensors", "tokenizer.json", "config.json"]
)
def test_corrupt_file(tiny_checkpoint: Path, tmp_path: Path, name: str):
    folder = _copy(tiny_checkpoint, tmp_path)
    (folder / name).write_bytes(b"\x00garbage\xff" * 10)
    with pytest.raises(ModelLoadError, match=re.escape(str(folder))):
        SopranoTTS(device="cpu", model_path=folder, warmup=False)


def test_wrong_shape(tiny_checkpoint: Path, tmp_path: Path):
    folder = _copy(tiny_checkpoint, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] += 1
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=re.escape("mlp.gate_proj.weight")):
        SopranoTTS(device="cpu", model_path=folder, warmup=False)


def test_not_a_folder_or_repo_id(tmp_path: Path):
    with pytest.raises(ModelLoadError, match="neither an existing folder nor a repo id"):
        SopranoTTS(device="cpu", model_path=str(tmp_path / "no" / "such" / "folder"), warmup=False)


def _load_in_subprocess(model: str, cache: Path, **env: str) -> subprocess.CompletedProcess:
    code = (
        "import sys\nfrom soprano import SopranoTTS, ModelLoadError\n"
        "try:\n"
        f"    SopranoTTS(device='cpu', model_path={model!r}, cache_dir={str(cache)!r},"
        " warmup=False)\n"
        "except ModelLoadError as error:\n"
        "    sys.exit(f'ModelLoadError: {error}')\n"
        "print('loaded')\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=120,
    )


def test_offline_hub_without_cache_is_a_clear_error(tmp_path: Path):
    result = _load_in_subprocess("ekwek/Soprano-1.1-80M", tmp_path / "cache", HF_HUB_OFFLINE="1")
    assert result.returncode != 0
    assert "ModelLoadError: cannot get model 'ekwek/Soprano-1.1-80M'" in result.stderr


def test_unreachable_hub_is_a_clear_error(tmp_path: Path):
    result = _load_in_subprocess(
        "ekwek/Soprano-1.1-80M", tmp_path / "cache", HF_ENDPOINT="http://127.0.0.1:9"
    )
    assert result.returncode != 0
    assert "ModelLoadError: cannot get model" in result.stderr


def test_cached_repo_loads_offline(tiny_checkpoint: Path, tmp_path: Path):
    """A repo id already in the HF cache loads with HF_HUB_OFFLINE=1."""
    cache = tmp_path / "cache"
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--someone--soprano-test"
    shutil.copytree(tiny_checkpoint, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    result = _load_in_subprocess("someone/soprano-test", cache, HF_HUB_OFFLINE="1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "loaded"


def test_bfloat16_also_runs_the_decoder_on_bf16_products_where_the_cpu_has_them(
    tiny_checkpoint: Path,
):
    """dtype 'bfloat16' rounds the decoder's weights to bf16 on CPUs with AVX512-BF16 (pair
    panels, int32 words), keeps them exact elsewhere, and stays within 1% of the exact audio."""
    from soprano.cpu.kernels import cpu_kernels
    from soprano.cpu.linear import PanelLinear

    lossy = SopranoTTS(
        device="cpu",
        model_path=tiny_checkpoint,
        backend_options={"dtype": "bfloat16"},
        warmup=False,
    )
    exact = SopranoTTS(device="cpu", model_path=tiny_checkpoint, warmup=False)
    head = lossy.decoder.head.out
    kernels = cpu_kernels()
    if kernels is None:
        assert not isinstance(head, PanelLinear)
    else:
        expected = torch.int32 if kernels.BF16_PRODUCTS else torch.float32
        assert isinstance(head, PanelLinear) and head.panels.dtype == expected
    frames = torch.randn(40, lossy.decoder.input_channels) * 3
    (ours,) = lossy.decoder.decode([frames])
    (reference,) = exact.decoder.decode([frames])
    relative = (ours - reference).pow(2).mean().sqrt() / reference.pow(2).mean().sqrt()
    assert relative < 0.01


def test_a_generated_checkpoint_takes_a_given_tokenizer(tiny_checkpoint: Path, tmp_path: Path):
    """A tokenizer with merges (as the published one has) makes shorter prompts; one whose
    token ids are not Soprano's is refused (by the CLI with argparse's usage and one error line)."""
    from soprano.testing.make_checkpoint import make_checkpoint

    merged = json.loads((tiny_checkpoint / "tokenizer.json").read_text())
    merged["model"]["vocab"]["th"] = 8191
    merged["model"]["merges"] = [["t", "h"]]
    (tmp_path / "merged.json").write_text(json.dumps(merged))
    folder = make_checkpoint(tmp_path / "merged", tokenizer=tmp_path / "merged.json")
    text = "the weather there."
    characters = SopranoTTS(device="cpu", model_path=tiny_checkpoint, warmup=False)
    pieces = SopranoTTS(device="cpu", model_path=folder, warmup=False)
    assert len(pieces.tokenizer.encode(text)) == len(characters.tokenizer.encode(text)) - 3

    del merged["model"]["vocab"]["[STOP]"]  # a tokenizer of another model
    merged["added_tokens"] = [t for t in merged["added_tokens"] if t["content"] != "[STOP]"]
    (tmp_path / "wrong.json").write_text(json.dumps(merged))
    with pytest.raises(ValueError, match=r"\[STOP\] must have id 3"):
        make_checkpoint(tmp_path / "wrong", tokenizer=tmp_path / "wrong.json")
    with pytest.raises(ValueError, match=r"is not a tokenizer\.json"):
        make_checkpoint(tmp_path / "text", tokenizer=tiny_checkpoint / "config.json")
    command = [sys.executable, "-m", "soprano.testing.make_checkpoint", str(tmp_path / "cli")]
    result = subprocess.run(
        [*command, "--tokenizer", str(tmp_path / "wrong.json")], capture_output=True, text=True
    )
    assert result.returncode == 2
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.endswith("[STOP] must have id 3 as in Soprano's vocabulary")
