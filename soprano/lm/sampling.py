"""Token selection shared by the step-loop backends, so that they choose identical tokens.

Order as in HF `generate`: repetition penalty (over prompt and generated tokens) → temperature →
top-p → draw. temperature 0 is a true argmax after the penalty. Each sequence draws from its own
generator seeded with the request's seed, so a sentence samples the same tokens whether it is
generated alone, in a batch, or streamed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from soprano.lm.base import SamplingParams


class TokenSampler:
    """Chooses the next token of each sequence in a batch from its logits."""

    def __init__(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        vocab_size: int,
        device: torch.device,
    ) -> None:
        self.params = params
        self.seen = torch.zeros(len(prompts), vocab_size, dtype=torch.bool, device=device)
        for row, prompt in enumerate(prompts):
            self.seen[row, torch.tensor(list(prompt), dtype=torch.long, device=device)] = True
        self.generators: list[torch.Generator] = []
        if not params.greedy:
            seed = params.seed
            if seed is None:
                seed = int(torch.randint(0, 2**62, (1,)).item())
            for _ in prompts:
                self.generators.append(torch.Generator(device=device).manual_seed(seed))

    def __call__(self, logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Pick one token per row. `rows` maps each logits row to its sequence (prompt index)."""
        logits = logits.float()
        penalty = self.params.repetition_penalty
        if penalty != 1.0:
            penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
            logits = torch.where(self.seen[rows], penalised, logits)
        if self.params.greedy:
            tokens = logits.argmax(dim=-1)
        else:
            probs = top_p_filter(logits / self.params.temperature, self.params.top_p).softmax(-1)
            tokens = torch.cat(
                [
                    torch.multinomial(probs[i], 1, generator=self.generators[int(row)])
                    for i, row in enumerate(rows.tolist())
                ]
            )
        self.seen[rows, tokens] = True
        return tokens


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches top_p."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    drop_sorted = cumulative - sorted_logits.softmax(-1) >= top_p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))
