"""The native backend: our own Qwen3 forward (soprano.lm.qwen3) in a lean batched step loop.

Per step it runs one forward for all active sequences against a preallocated KV cache, picks
tokens with the shared TokenSampler, and drops finished sequences from the batch, so the work per
step follows the number of sentences still speaking.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import torch

from soprano.checkpoint import Checkpoint
from soprano.constants import STOP_ID
from soprano.errors import BackendUnavailableError
from soprano.lm.base import LanguageModel, SamplingParams, Step, left_pad
from soprano.lm.kernels import cpu_kernels
from soprano.lm.linear import (
    DynamicInt8Linear,
    HalfStoredLinear,
    fbgemm_available,
    replace_linears,
)
from soprano.lm.qwen3 import Qwen3
from soprano.lm.sampling import TokenSampler

_LOGGER = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "int8")


class NativeLM(LanguageModel):
    """Options (defaults measured by script/benchmark, see README "Performance"):

    - dtype: 'float32' (exact: the arithmetic of the transformers backend in fp32), 'bfloat16'
      or 'int8' (dynamic int8 quantisation, CPU only); the last two trade accuracy for speed.
      On CPUs with AVX512-BF16 the kernels run 'bfloat16' as bf16 products summed in fp32.
    - kernels: on CPUs, run the forward in the compiled kernels of soprano/lm/csrc (built on
      first use; same results as without).
    - half_weights: where the kernels are off or cannot be built, on x86 CPUs, hold float32
      weights as exactly-representable fp16 for FBGEMM (same results, half the memory traffic).
    - threads: torch's intra-op threads (None leaves torch's default, one per core).
    """

    name = "native"

    def __init__(
        self,
        checkpoint: Checkpoint,
        device: torch.device,
        *,
        dtype: str = "float32",
        kernels: bool = True,
        half_weights: bool = True,
        threads: int | None = None,
    ) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if dtype == "int8" and (device.type != "cpu" or not fbgemm_available()):
            raise BackendUnavailableError("dtype 'int8' needs an x86 CPU (FBGEMM)")
        if threads is not None:
            if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
                raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
            torch.set_num_threads(threads)
        config = checkpoint.config
        model = Qwen3.from_hf_state(config, checkpoint.load_lm_state())
        if dtype == "int8":
            replace_linears(model, DynamicInt8Linear)
        elif dtype == "bfloat16":
            if not (device.type == "cpu" and self._use_kernels(model, kernels, bf16_products=True)):
                model = model.to(torch.bfloat16)
        elif device.type == "cpu":
            compiled = self._use_kernels(model, kernels)
            if not compiled and half_weights and fbgemm_available():
                replace_linears(model, HalfStoredLinear.from_weight)
        _LOGGER.debug("Native LM forward: %s", "compiled" if model.compiled else "PyTorch")
        self.model = model.to(device)
        self.dtype = dtype
        self.device = device
        self.hidden_size = config.hidden_size
        self.vocab_size = config.vocab_size

    @staticmethod
    def _use_kernels(model: Qwen3, kernels: bool, bf16_products: bool = False) -> bool:
        if not kernels or (built := cpu_kernels()) is None:
            return False
        if bf16_products and not built.BF16_PRODUCTS:
            return False
        return model.use_cpu_kernels(built, bf16_products)

    @torch.inference_mode()
    def stream(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams
    ) -> Iterator[list[Step]]:
        if not prompts:
            return
        if any(len(prompt) == 0 for prompt in prompts):
            raise ValueError("every prompt needs at least one token")
        count = len(prompts)
        tokens, valid, positions = left_pad(prompts, self.device)

        sampler = TokenSampler(prompts, params, self.vocab_size, self.device)
        cache = self.model.new_cache(count, tokens.shape[1] + params.max_new_tokens)
        hidden = self.model(tokens, positions, cache, valid)[:, -1]
        logits = self.model.logits(hidden)
        next_positions = positions[:, -1] + 1
        rows = torch.arange(count, device=self.device)
        indices = list(range(count))
        for step in range(1, params.max_new_tokens + 1):
            chosen = sampler(logits, rows)
            frames = hidden.float().unbind()
            at_limit = step == params.max_new_tokens
            steps = []
            kept: list[int] = []
            for row, (index, token) in enumerate(zip(indices, chosen.tolist(), strict=True)):
                last = at_limit or token == STOP_ID
                steps.append(Step(index, token, frames[row], last))
                if not last:
                    kept.append(row)
            yield steps
            if not kept:
                return
            if len(kept) < len(indices):
                first_moved = next((pos for pos, row in enumerate(kept) if row != pos), len(kept))
                keep = torch.tensor(kept, device=self.device)
                cache.keep(keep, first_moved)
                chosen, next_positions, rows = chosen[keep], next_positions[keep], rows[keep]
                indices = [indices[row] for row in kept]
            hidden = self.model(chosen[:, None], next_positions[:, None], cache)[:, -1]
            logits = self.model.logits(hidden)
            next_positions = next_positions + 1
