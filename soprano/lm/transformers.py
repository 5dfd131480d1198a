"""The reference backend: Hugging Face transformers' Qwen3ForCausalLM in a plain step loop.

It does not call `generate()`: one hand-written loop shared with streaming keeps the token
choice (TokenSampler) and the hidden-state alignment identical in every path.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence

import torch

from soprano.checkpoint import Checkpoint
from soprano.constants import STOP_ID
from soprano.errors import ModelLoadError
from soprano.lm.base import LanguageModel, SamplingParams, Step, left_pad
from soprano.lm.sampling import TokenSampler


class TransformersLM(LanguageModel):
    name = "transformers"

    def __init__(self, checkpoint: Checkpoint, device: torch.device) -> None:
        from transformers import AutoModelForCausalLM

        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        try:
            model = AutoModelForCausalLM.from_pretrained(checkpoint.path, dtype=dtype)
        except (OSError, ValueError, RuntimeError) as error:
            raise ModelLoadError(f"transformers cannot load {checkpoint.path}: {error}") from error
        # transformers types `to` by functools.wraps(nn.Module.to), which mypy reads as unbound.
        self.model = model.to(device).eval()  # type: ignore[arg-type]
        self.device = device
        self.hidden_size = checkpoint.config.hidden_size
        self.vocab_size = checkpoint.config.vocab_size
        # transformers 5 renamed the KV-cache argument; older releases only know the old name.
        forward_parameters = inspect.signature(self.model.model.forward).parameters
        self._cache_argument = "cache" if "cache" in forward_parameters else "past_key_values"

    @torch.inference_mode()
    def stream(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams
    ) -> Iterator[list[Step]]:
        from transformers import DynamicCache

        if not prompts:
            return
        sampler = TokenSampler(self.vocab_size, self.device)
        for row, prompt in enumerate(prompts):
            sampler.add(row, prompt, params)
        input_ids, valid, positions = left_pad(prompts, self.device)
        attention_mask = valid.long()
        cache = DynamicCache()
        rows = list(range(len(prompts)))
        active = [True] * len(prompts)
        for step in range(params.max_new_tokens):
            output = self.model.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=positions,
                use_cache=True,
                **{self._cache_argument: cache},
            )
            hidden = output.last_hidden_state[:, -1]
            tokens = sampler(self.model.lm_head(hidden), rows)
            steps = []
            for row, token in enumerate(tokens.tolist()):
                if not active[row]:
                    continue
                last = token == STOP_ID or step == params.max_new_tokens - 1
                steps.append(Step(row, token, hidden[row].float(), last))
                active[row] = not last
            yield steps
            if not any(active):
                return
            input_ids = tokens.unsqueeze(1)
            attention_mask = torch.cat(
                [attention_mask, attention_mask.new_ones(len(prompts), 1)], 1
            )
            positions = positions[:, -1:] + 1
