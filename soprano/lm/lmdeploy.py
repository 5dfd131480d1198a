"""The lmdeploy (TurboMind, CUDA) backend, for the highest GPU throughput.

lmdeploy runs its own sampler, so its tokens can differ from the step-loop backends under sampling;
under greedy decoding they agree up to bf16 rounding. Hidden states come from
`output_last_hidden_state="generation"`: one post-norm state per generated token, the state that
produced it (docs/generation.md), including the one that produced [STOP], dropped downstream.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from soprano.checkpoint import Checkpoint
from soprano.constants import START_ID, STOP_ID, TEXT_ID
from soprano.errors import BackendUnavailableError
from soprano.lm.base import LanguageModel, SamplingParams, Step

MEBIBYTE = 2**20


class LMDeployLM(LanguageModel):
    name = "lmdeploy"

    def __init__(self, checkpoint: Checkpoint, device: torch.device, cache_size_mb: int) -> None:
        from lmdeploy import TurbomindEngineConfig, pipeline

        if device.type != "cuda":
            raise BackendUnavailableError(f"the lmdeploy backend needs a CUDA device, not {device}")
        total = torch.cuda.get_device_properties(device).total_memory
        config = TurbomindEngineConfig(cache_max_entry_count=cache_size_mb * MEBIBYTE / total)
        self.pipe = pipeline(str(checkpoint.path), backend_config=config, log_level="ERROR")
        self.device = device
        self.hidden_size = checkpoint.config.hidden_size

    def stream(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams
    ) -> Iterator[list[Step]]:
        from lmdeploy import GenerationConfig

        if not prompts:
            return
        for prompt in prompts:
            if prompt[:2] != [STOP_ID, TEXT_ID] or prompt[-1] != START_ID:
                raise ValueError("lmdeploy prompts must be [STOP][TEXT] ... [START] token ids")
        config = GenerationConfig(
            do_sample=not params.greedy,
            temperature=params.temperature if not params.greedy else 1.0,
            top_k=1 if params.greedy else 0,
            top_p=params.top_p,
            repetition_penalty=params.repetition_penalty,
            max_new_tokens=params.max_new_tokens,
            random_seed=params.seed,
            output_last_hidden_state="generation",
        )
        counts = [0] * len(prompts)
        requests = [{"input_ids": list(prompt)} for prompt in prompts]
        for response in self.pipe.stream_infer(requests, gen_config=config, do_preprocess=False):
            index = response.index
            hidden = response.last_hidden_state
            steps = []
            for offset, token in enumerate(response.token_ids):
                counts[index] += 1
                last = token == STOP_ID or counts[index] == params.max_new_tokens
                state = hidden[offset].to(self.device, torch.float32)
                steps.append(Step(index, int(token), state, last))
                if last:
                    break
            if response.finish_reason is not None and steps and not steps[-1].last:
                final = steps[-1]
                steps[-1] = Step(final.index, final.token, final.hidden, True)
            if steps:
                yield steps
