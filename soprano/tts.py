"""SopranoTTS: the engine that every frontend shares.

text → `soprano.text.prepare_text` (normalised sentences) → prompts → LM backend (audio tokens and
their hidden states) → decoder → 32 kHz float audio. All sentences of a call are generated in one
batch; streaming runs the same step loop and decodes each sentence incrementally.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Generator, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from soprano.audio import write_wav
from soprano.audio.pauses import AudioOptions, AudioShaper
from soprano.checkpoint import resolve_checkpoint
from soprano.constants import (
    DEFAULT_REPETITION_PENALTY,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_P,
    MAX_NEW_TOKENS,
    SAMPLE_RATE,
)
from soprano.cpu.kernels import cpu_kernels
from soprano.cpu.linear import round_to_int8, use_panels
from soprano.decoder import ChunkSchedule, SopranoDecoder, WindowProduct
from soprano.device import select_device
from soprano.errors import ModelLoadError
from soprano.hallucination import looks_hallucinated, warn_cut
from soprano.lm import Generation, SamplingParams, load_language_model, select_backend
from soprano.serving.scheduler import Scheduler, SentenceEnd
from soprano.text import prepare_text
from soprano.tokenizer import PromptTokenizer

_LOGGER = logging.getLogger(__name__)

WARMUP_TEXT = "Hello world, it is 2026!"
"""Its number also loads the number speller, so no first request waits for that."""
WARMUP_TOKENS = 8
"""Enough steps to warm every kernel of the step loop and the decoder."""


def store_decoder_weights(
    decoder: SopranoDecoder, device: torch.device, options: Mapping[str, Any]
) -> None:
    """Hold the decoder's weights as the native backend `options` ask: on the CPU kernels
    where they run, and with dtype 'int8' as int8 values on every path (the PyTorch one too)."""
    dtype = options.get("dtype", "float32")
    on_kernels = device.type == "cpu" and options.get("kernels", True)
    if not (on_kernels and decode_on_cpu_kernels(decoder, dtype)) and dtype == "int8":
        round_to_int8(decoder)


def decode_on_cpu_kernels(decoder: SopranoDecoder, dtype: str) -> bool:
    """Give the decoder's channel MLPs the native kernels' fp32 panels: a streaming chunk is
    a few frames, whose products stream every decoder weight, and the kernels do that at
    memory speed where PyTorch's GEMM is several times slower. Same fp32 arithmetic. Its embed
    conv becomes a product of windows on exact fp32 panels (whatever the dtype, as on the
    PyTorch path), so that the audio is the same bits for any thread count.

    With dtype 'bfloat16' (lossy, CPUs with AVX512-BF16) the weights are rounded to bf16 and
    multiplied as the LM's are: per token the decoder does more work than the LM (4 frames
    through 30 M parameters), so it halves most of what is left. With 'int8' they are int8
    panels (a quarter of the bytes of fp32): a streaming chunk, which reads every weight for a
    few frames, takes about half the time (docs/kernels.md). Returns whether the kernels run it.
    """
    kernels = cpu_kernels()
    if kernels is None:
        return False
    if dtype == "bfloat16" and kernels.BF16_PRODUCTS:
        moved = use_panels(decoder, kernels, torch.bfloat16, True, rounded=True)
    elif dtype == "int8":
        moved = use_panels(decoder, kernels, torch.int8, rounded=True)
    else:
        moved = use_panels(decoder, kernels, torch.float32)
    backbone = decoder.decoder
    backbone.embed = WindowProduct(backbone.embed)
    moved += use_panels(backbone.embed, kernels, torch.float32)
    _LOGGER.debug("Decoder layers on the CPU kernels: %d", moved)
    return True


class SopranoTTS:
    """Load a Soprano checkpoint once and synthesize speech from text.

    `backend_options` tune the native backend: dtype ('float32' exact, 'bfloat16', 'int8'),
    kernels (the compiled CPU forward), half_weights (exact fp16 storage of the bf16 weights where
    the kernels are off) and threads.

    Not thread-safe: callers that serve several clients serialise their calls.
    """

    sample_rate = SAMPLE_RATE

    def __init__(
        self,
        backend: str = "auto",
        device: str = "auto",
        cache_size_mb: int = 100,
        decoder_batch_size: int = 1,
        model_path: str | os.PathLike[str] | None = None,
        *,
        cache_dir: str | os.PathLike[str] | None = None,
        backend_options: Mapping[str, Any] | None = None,
        warmup: bool = True,
    ) -> None:
        _require_int("decoder_batch_size", decoder_batch_size, minimum=1)
        _require_int("cache_size_mb", cache_size_mb, minimum=1)
        self.device = select_device(device)
        backend = select_backend(backend, self.device)
        self.decoder_batch_size = decoder_batch_size
        self.checkpoint = resolve_checkpoint(model_path, cache_dir)
        self.tokenizer = PromptTokenizer(self.checkpoint.tokenizer_path)
        self.decoder = SopranoDecoder.from_state_dict(self.checkpoint.load_decoder_state())
        self.decoder.to(self.device).eval()
        if self.decoder.input_channels != self.checkpoint.config.hidden_size:
            raise ModelLoadError(
                f"{self.checkpoint.path}: decoder.pth expects {self.decoder.input_channels} "
                f"input channels but the LM's hidden_size is {self.checkpoint.config.hidden_size}"
            )
        self.lm = load_language_model(
            backend, self.checkpoint, self.device, cache_size_mb, backend_options
        )
        store_decoder_weights(self.decoder, self.device, backend_options or {})
        _LOGGER.info(
            "Loaded %s on %s with the %s backend", self.checkpoint.path, self.device, self.lm.name
        )
        if warmup:
            self.infer(WARMUP_TEXT, max_new_tokens=WARMUP_TOKENS)

    @property
    def backend(self) -> str:
        return self.lm.name

    def infer(
        self,
        text: str,
        out_path: str | os.PathLike[str] | None = None,
        top_p: float = DEFAULT_TOP_P,
        temperature: float = DEFAULT_TEMPERATURE,
        repetition_penalty: float = DEFAULT_REPETITION_PENALTY,
        retries: int = 0,
        seed: int | None = None,
        max_new_tokens: int = MAX_NEW_TOKENS,
        *,
        sampling: SamplingParams | None = None,
    ) -> torch.Tensor:
        """Speech for `text` as a 1-D float32 CPU tensor at 32 kHz (empty for text with no words).

        `out_path` also writes it as a 16-bit WAV file. Sampling is set by `sampling` or by the
        loose keyword arguments (upstream Soprano's signature), not both.
        """
        params = _sampling(sampling, temperature, top_p, repetition_penalty, seed, max_new_tokens)
        (audio,) = self.infer_batch([text], retries=retries, sampling=params)
        if out_path is not None:
            write_wav(out_path, audio)
        return audio

    def infer_batch(
        self,
        texts: Sequence[str],
        out_dir: str | os.PathLike[str] | None = None,
        top_p: float = DEFAULT_TOP_P,
        temperature: float = DEFAULT_TEMPERATURE,
        repetition_penalty: float = DEFAULT_REPETITION_PENALTY,
        retries: int = 0,
        seed: int | None = None,
        max_new_tokens: int = MAX_NEW_TOKENS,
        *,
        sampling: SamplingParams | None = None,
    ) -> list[torch.Tensor]:
        """One tensor per text; every sentence of every text is generated in one batch.

        `out_dir` also writes `{out_dir}/{i}.wav` for text i.
        """
        if isinstance(texts, str) or not all(isinstance(text, str) for text in texts):
            raise ValueError("texts must be a list of strings")
        _require_int("retries", retries, minimum=0)
        params = _sampling(sampling, temperature, top_p, repetition_penalty, seed, max_new_tokens)
        sentences = [prepare_text(text) for text in texts]
        generations = self._generate([s for text in sentences for s in text], params, retries)
        pieces = iter(self.decoder.decode([g.hidden for g in generations], self.decoder_batch_size))
        audios = [_concatenate([next(pieces).cpu() for _ in text]) for text in sentences]
        if out_dir is not None:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            for index, audio in enumerate(audios):
                write_wav(Path(out_dir) / f"{index}.wav", audio)
        return audios

    def infer_stream(
        self,
        text: str,
        chunk_size: int = 1,
        top_p: float = DEFAULT_TOP_P,
        temperature: float = DEFAULT_TEMPERATURE,
        repetition_penalty: float = DEFAULT_REPETITION_PENALTY,
        seed: int | None = None,
        max_new_tokens: int = MAX_NEW_TOKENS,
        *,
        max_chunk_size: int | None = None,
        sampling: SamplingParams | None = None,
        audio: AudioOptions | None = None,
    ) -> Generator[torch.Tensor, None, None]:
        """Yield audio as it is generated; the chunks concatenate to `infer(text)` (to float
        rounding), or, with `audio`, to that audio with its effects and pauses (at
        `audio.sample_rate`).

        The first chunk follows RECEPTIVE_FIELD + chunk_size tokens of the first sentence; later
        chunks hold chunk_size tokens (TOKEN_SAMPLES samples each), or, with `max_chunk_size`,
        grow up to that many as the audio already sent allows (ChunkSchedule). Later sentences
        are generated in the same batch and their audio follows in order. Close the generator
        to stop early.
        """
        if not isinstance(text, str):
            raise ValueError("text must be a string")
        schedule = ChunkSchedule(chunk_size, max_chunk_size)
        params = _sampling(sampling, temperature, top_p, repetition_penalty, seed, max_new_tokens)
        items = self._stream(prepare_text(text), schedule, params)
        if audio is None or audio.identity:
            return _audio_only(items)
        return _shaped(items, AudioShaper(audio))

    def _stream(
        self, sentences: list[str], schedule: ChunkSchedule, params: SamplingParams
    ) -> Generator[torch.Tensor | SentenceEnd, None, None]:
        """Drive a Scheduler of our own on this thread, all sentences in one batch; yield
        their chunks with SENTENCE_END between two sentences."""
        scheduler = Scheduler(self.lm, self.decoder, max_batch_size=max(1, len(sentences)))
        ready: deque[torch.Tensor | SentenceEnd | BaseException | None] = deque()
        prompts = [(sentence, self.tokenizer.encode(sentence)) for sentence in sentences]
        job = scheduler.submit(prompts, params, schedule, ready.append)
        try:
            while True:
                while ready:
                    item = ready.popleft()
                    if item is None:
                        return
                    if isinstance(item, BaseException):
                        raise item
                    yield item.cpu() if isinstance(item, torch.Tensor) else item
                scheduler.step()
        finally:
            if not job.finished:
                scheduler.cancel(job)

    def _generate(
        self, sentences: list[str], params: SamplingParams, retries: int
    ) -> list[Generation]:
        """Generate all sentences; regenerate those that look hallucinated up to `retries` times."""
        prompts = [self.tokenizer.encode(sentence) for sentence in sentences]
        generations = self.lm.generate(prompts, params)
        for attempt in range(1, retries + 1):
            flagged = [i for i, g in enumerate(generations) if looks_hallucinated(g.hidden)]
            if not flagged:
                break
            _LOGGER.info("Regenerating %d hallucinated sentence(s), try %d", len(flagged), attempt)
            if params.seed is not None:
                params = replace(params, seed=params.seed + 1)
            regenerated = self.lm.generate([prompts[i] for i in flagged], params)
            for index, generation in zip(flagged, regenerated, strict=True):
                generations[index] = generation
        for sentence, generation in zip(sentences, generations, strict=True):
            if generation.finish_reason == "length":
                warn_cut(sentence, params.max_new_tokens)
        return generations


def _concatenate(pieces: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(pieces) if pieces else torch.zeros(0)


def _sampling(
    sampling: SamplingParams | None,
    temperature: float,
    top_p: float,
    repetition_penalty: float,
    seed: int | None,
    max_new_tokens: int,
) -> SamplingParams:
    """The one SamplingParams of a call, from `sampling` or from the loose arguments."""
    loose = SamplingParams(temperature, top_p, repetition_penalty, max_new_tokens, seed)
    if sampling is None:
        return loose
    if loose != SamplingParams():
        raise ValueError("give sampling settings as `sampling` or as keyword arguments, not both")
    return sampling


def _require_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


StreamItems = Generator[torch.Tensor | SentenceEnd, None, None]


def _audio_only(items: StreamItems) -> Generator[torch.Tensor, None, None]:
    try:
        for item in items:
            if isinstance(item, torch.Tensor):
                yield item
    finally:
        items.close()


def _shaped(items: StreamItems, shaper: AudioShaper) -> Generator[torch.Tensor, None, None]:
    """The stream through the shaper: effects on every chunk, pauses where they belong."""

    def pieces() -> Iterator[np.ndarray]:
        yield shaper.start().audio
        for item in items:
            if isinstance(item, torch.Tensor):
                yield shaper.audio(item)
            else:
                yield shaper.sentence_end().audio
        yield shaper.end().audio

    try:
        for piece in pieces():
            if len(piece):
                yield torch.from_numpy(piece)
    finally:
        items.close()
