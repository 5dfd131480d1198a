"""The interface every language-model backend implements.

A backend turns prompts into audio tokens and, for each token, the post-norm last-layer hidden
state whose logits produced it (docs/generation.md, alignment). Everything downstream (batching of
sentences, streaming, decoding) is written against `LanguageModel.stream`, so one step loop serves
offline and streaming inference and their outputs agree.
"""

from __future__ import annotations

import itertools
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields, replace
from typing import ClassVar, Literal

import torch

from soprano.constants import (
    DEFAULT_REPETITION_PENALTY,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_P,
    MAX_NEW_TOKENS,
    STOP_ID,
)

FinishReason = Literal["stop", "length"]

MAX_SEED = 2**63 - 16
"""Seeds fit a signed 64-bit generator seed, with room for the retries' next seeds."""


@dataclass(frozen=True)
class SamplingParams:
    """How tokens are chosen. temperature 0 is greedy; a seed makes sampling repeatable."""

    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    repetition_penalty: float = DEFAULT_REPETITION_PENALTY
    max_new_tokens: int = MAX_NEW_TOKENS
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ValueError(
                f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty}"
            )
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
            raise ValueError(f"max_new_tokens must be an integer, got {self.max_new_tokens!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.seed is not None and (
            isinstance(self.seed, bool)
            or not isinstance(self.seed, int)
            or not 0 <= self.seed < MAX_SEED
        ):
            raise ValueError(
                f"seed must be an integer from 0 to {MAX_SEED - 1} or None, got {self.seed!r}"
            )

    @classmethod
    def of(cls, source: object) -> SamplingParams:
        """The settings of anything that has them as attributes of the same names (parsed
        command-line options, an HTTP request); raises ValueError for a bad value."""
        return cls(**{field.name: getattr(source, field.name) for field in fields(cls)})

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class Step:
    """One token generated for one sequence."""

    index: int
    """Position of the sequence's prompt in the list given to `stream`."""
    token: int
    """The sampled token id; STOP_ID ends the sequence."""
    hidden: torch.Tensor
    """[hidden_size] float32: the state whose logits produced `token`."""
    last: bool
    """True when the sequence ends here, by STOP_ID or by reaching max_new_tokens."""

    @property
    def is_audio(self) -> bool:
        return self.token != STOP_ID


@dataclass
class Generation:
    """The audio-token frames of one finished sequence."""

    tokens: list[int]
    hidden: torch.Tensor
    """[n, hidden_size] float32, one frame per audio token (the STOP state dropped)."""
    finish_reason: FinishReason


class SequenceBatch(ABC):
    """Sequences generated together, which join and leave between steps (continuous batching).

    `add` queues a prompt; each `step` advances the sequences it names by one token, prefilling
    the prompts of those that have not started (in the same forward as the others' tokens). A
    sequence whose Step is `last` has left; `remove` drops one early (a cancelled request).
    """

    @abstractmethod
    def add(self, prompt: Sequence[int], params: SamplingParams) -> int:
        """Register a prompt; returns the key that its Steps carry as `index`."""

    @abstractmethod
    def step(self, keys: Sequence[int]) -> list[Step]:
        """One token for each of `keys` (added and not finished), in that order."""

    @abstractmethod
    def remove(self, key: int) -> None:
        """Forget a sequence (finished or not) and free what it holds."""


class LanguageModel(ABC):
    """A Soprano LM backend. It implements `stream` (a fixed batch), or `open_batch` (continuous
    batching), or both; each has a default built on the other."""

    name: ClassVar[str]
    device: torch.device
    hidden_size: int

    def open_batch(self) -> SequenceBatch:
        """A batch that sequences can join at any step. By default each sequence runs alone
        through `stream`, in turns: backends without continuous batching serve that way."""
        return SerialBatch(self)

    def stream(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams
    ) -> Iterator[list[Step]]:
        """Generate all prompts together, yielding one Step per active sequence per decode step.

        Each sequence ends with a Step whose `last` is True; after it the sequence yields nothing.
        """
        batch = self.open_batch()
        keys = {batch.add(prompt, params): index for index, prompt in enumerate(prompts)}
        active = list(keys)
        try:
            while active:
                steps = batch.step(active)
                yield [replace(step, index=keys[step.index]) for step in steps]
                active = [step.index for step in steps if not step.last]
        finally:
            for key in active:
                batch.remove(key)

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams
    ) -> list[Generation]:
        """Run `stream` to the end and gather each sequence's frames."""
        tokens: list[list[int]] = [[] for _ in prompts]
        frames: list[list[torch.Tensor]] = [[] for _ in prompts]
        reasons: list[FinishReason] = ["length"] * len(prompts)
        for steps in self.stream(prompts, params):
            for step in steps:
                if step.is_audio:
                    tokens[step.index].append(step.token)
                    frames[step.index].append(step.hidden)
                else:
                    reasons[step.index] = "stop"
        return [
            Generation(t, stack_frames(f, self.hidden_size, self.device), r)
            for t, f, r in zip(tokens, frames, reasons, strict=True)
        ]


class SerialBatch(SequenceBatch):
    """Continuous batching for backends that only `stream` a fixed batch: every sequence is its
    own stream of one, advanced in turns."""

    def __init__(self, lm: LanguageModel) -> None:
        self._lm = lm
        self._streams: dict[int, Iterator[list[Step]]] = {}
        self._keys = itertools.count()

    def add(self, prompt: Sequence[int], params: SamplingParams) -> int:
        key = next(self._keys)
        self._streams[key] = self._lm.stream([prompt], params)
        return key

    def step(self, keys: Sequence[int]) -> list[Step]:
        steps = []
        for key in keys:
            (step,) = next(self._streams[key])
            steps.append(replace(step, index=key))
            if step.last:
                self.remove(key)
        return steps

    def remove(self, key: int) -> None:
        stream = self._streams.pop(key, None)
        if stream is not None and hasattr(stream, "close"):
            stream.close()


def stack_frames(
    frames: Sequence[torch.Tensor], hidden_size: int, device: torch.device
) -> torch.Tensor:
    """Stack frames into [n, hidden_size], also when there are none."""
    if not frames:
        return torch.zeros(0, hidden_size, device=device)
    return torch.stack(list(frames))


def left_pad(
    prompts: Sequence[Sequence[int]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompts as one left-padded batch: token ids, a mask of real tokens, and their positions.

    Left padding lines up every prompt's last token, so one step appends to all rows at once.
    """
    longest = max(len(prompt) for prompt in prompts)
    tokens = torch.full((len(prompts), longest), STOP_ID, dtype=torch.long)
    valid = torch.zeros(len(prompts), longest, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        tokens[row, longest - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
        valid[row, longest - len(prompt) :] = True
    positions = (valid.cumsum(-1) - 1).clamp(min=0)
    return tokens.to(device), valid.to(device), positions.to(device)
