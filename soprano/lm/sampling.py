"""Token selection shared by the step-loop backends, so that they choose identical tokens.

Order as in HF `generate`: repetition penalty (over prompt and generated tokens) → temperature →
top-p → draw. temperature 0 is a true argmax after the penalty. Every sequence keeps its own
sampling parameters, the tokens it has seen, and a generator seeded with its seed, so a sentence
samples the same tokens whether it is generated alone, in a batch, or streamed, and whatever
joins or leaves the batch around it. Every operation is row by row, so under greedy decoding the
choice for one row never depends on the other rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from soprano.lm.base import SamplingParams


@dataclass
class _Row:
    params: SamplingParams
    seen: torch.Tensor
    """[vocab] bool: the prompt's and the generated tokens, for the repetition penalty."""
    generator: torch.Generator | None


class TokenSampler:
    """Chooses the next token of each sequence in a batch; sequences come and go by key."""

    def __init__(self, vocab_size: int, device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.device = device
        self._rows: dict[int, _Row] = {}

    def add(self, key: int, prompt: Sequence[int], params: SamplingParams) -> None:
        seen = torch.zeros(self.vocab_size, dtype=torch.bool, device=self.device)
        seen[torch.tensor(list(prompt), dtype=torch.long, device=self.device)] = True
        generator = None
        if not params.greedy:
            seed = params.seed
            if seed is None:
                seed = int(torch.randint(0, 2**62, (1,)).item())
            generator = torch.Generator(device=self.device).manual_seed(seed)
        self._rows[key] = _Row(params, seen, generator)

    def remove(self, key: int) -> None:
        self._rows.pop(key, None)

    def __call__(self, logits: torch.Tensor, keys: Sequence[int]) -> torch.Tensor:
        """Pick one token per logits row; row i belongs to the sequence `keys[i]`."""
        rows = [self._rows[key] for key in keys]
        logits = logits.float()
        seen = torch.stack([row.seen for row in rows])
        penalty = torch.tensor(
            [[row.params.repetition_penalty] for row in rows], device=logits.device
        )
        penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(seen & (penalty != 1.0), penalised, logits)
        tokens = logits.argmax(dim=-1)
        for i, row in enumerate(rows):
            if row.generator is not None:
                # Shifted by the maximum first, a tiny temperature cannot overflow to inf − inf;
                # one that rounds to 0 in float32 leaves the maximum at 0/0, which means 0.
                scaled = (logits[i] - logits[i].max()) / row.params.temperature
                scaled = torch.nan_to_num(scaled, nan=0.0)
                probs = top_p_filter(scaled, row.params.top_p).softmax(-1)
                tokens[i] = torch.multinomial(probs, 1, generator=row.generator)[0]
        for row, token in zip(rows, tokens.tolist(), strict=True):
            row.seen[token] = True
        return tokens


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches top_p."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    drop_sorted = cumulative - sorted_logits.softmax(-1) >= top_p
    drop_sorted[..., 0] = False  # the most likely token always stays, however small top_p is
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))
