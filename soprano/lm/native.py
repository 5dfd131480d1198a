"""The native backend: our own Qwen3 forward (soprano.lm.qwen3) in a lean batched step loop.

Per step it runs one forward for the sequences asked for (new prompts and one token of each
running sequence, each against its own KV cache), picks tokens with the shared TokenSampler, and
drops finished sequences, so the work per step follows the number of sentences still speaking.
Sequences may join at any step: the serving layer's continuous batching rides on this.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from soprano.checkpoint import Checkpoint
from soprano.constants import STOP_ID
from soprano.cpu.kernels import cpu_kernels
from soprano.cpu.linear import (
    HalfStoredLinear,
    fbgemm_available,
    replace_linears,
    round_to_int8,
)
from soprano.cpu.threads import note_unset_wait_policy, share_cores
from soprano.lm.base import LanguageModel, SamplingParams, SequenceBatch, Step
from soprano.lm.qwen3 import Qwen3, SequenceCache
from soprano.lm.sampling import TokenSampler

_LOGGER = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "int8")


class NativeLM(LanguageModel):
    """Options (defaults measured by script/benchmark, see README "Performance"):

    - dtype: 'float32' (exact: the arithmetic of the transformers backend in fp32), 'bfloat16'
      or 'int8' (weight-only int8, a scale per output channel, fp32 arithmetic); the last two
      trade accuracy for speed. On CPUs with AVX512-BF16 the kernels run 'bfloat16' as bf16
      products summed in fp32. Without the kernels 'int8' runs the same arithmetic (to
      rounding) on the int8 weights, no faster than the exact path.
    - kernels: on CPUs, run the forward in the compiled kernels of soprano/cpu/csrc (built on
      first use; same results as without).
    - half_weights: where the kernels are off or cannot be built, on x86 CPUs, hold float32
      weights as exactly-representable fp16 for FBGEMM (same results, half the memory traffic).
    - threads: the CPU threads, for the whole process; None keeps the count (at first torch's
      default, one per core). With the kernels these run the kernels' loops, PyTorch's own
      operators run on one thread (soprano.cpu.threads.share_cores), and any count gives the
      same bits; without them, torch.set_num_threads. With more than one, OpenMP's wait policy
      decides what a busy host costs: soprano.cpu.threads sets it when soprano is imported.
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
        if threads is not None and (
            isinstance(threads, bool) or not isinstance(threads, int) or threads < 1
        ):
            raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
        config = checkpoint.config
        model = Qwen3.from_hf_state(config, checkpoint.load_lm_state())
        cpu = device.type == "cpu"
        if dtype == "bfloat16":
            if not (cpu and self._use_kernels(model, kernels, bf16_products=True)):
                model = model.to(torch.bfloat16)
        elif not (cpu and self._use_kernels(model, kernels, int8=dtype == "int8")):
            half = cpu and half_weights and fbgemm_available()
            if dtype == "int8" and half:
                replace_linears(model, HalfStoredLinear.from_int8)
            elif dtype == "int8":
                round_to_int8(model)
            elif half:
                replace_linears(model, HalfStoredLinear.from_weight)
        _LOGGER.debug("Native LM forward: %s", "compiled" if model.compiled else "PyTorch")
        if model.compiled is not None and (built := cpu_kernels()) is not None:
            threads = share_cores(built, threads)
        elif threads is not None:
            torch.set_num_threads(threads)
        if cpu and (threads or torch.get_num_threads()) > 1:
            note_unset_wait_policy()
        self.model = model.to(device)
        self.dtype = dtype
        self.device = device
        self.hidden_size = config.hidden_size
        self.vocab_size = config.vocab_size

    @staticmethod
    def _use_kernels(
        model: Qwen3, kernels: bool, bf16_products: bool = False, int8: bool = False
    ) -> bool:
        if not kernels or (built := cpu_kernels()) is None:
            return False
        if bf16_products and not built.BF16_PRODUCTS:
            return False
        return model.use_cpu_kernels(built, bf16_products, int8)

    def open_batch(self) -> NativeBatch:
        return NativeBatch(self)


class NativeBatch(SequenceBatch):
    """Continuous batching on the native model: every sequence has its own KV cache, so one
    forward takes the prompts of sequences that join together with one token of each running
    sequence, and a sequence that leaves frees its cache. With the compiled kernels every
    sequence gets the same bits whatever else shares its steps."""

    def __init__(self, lm: NativeLM) -> None:
        self._lm = lm
        self._sampler = TokenSampler(lm.vocab_size, lm.device)
        self._sequences: dict[int, _Sequence] = {}
        self._keys = itertools.count()

    def add(self, prompt: Sequence[int], params: SamplingParams) -> int:
        if len(prompt) == 0:
            raise ValueError("every prompt needs at least one token")
        key = next(self._keys)
        tokens = torch.tensor(list(prompt), dtype=torch.long)
        self._sequences[key] = _Sequence(tokens, params.max_new_tokens)
        self._sampler.add(key, prompt, params)
        return key

    @torch.inference_mode()
    def step(self, keys: Sequence[int]) -> list[Step]:
        if not keys:
            return []
        model = self._lm.model
        sequences = [self._sequences[key] for key in keys]
        for sequence in sequences:
            if sequence.cache is None:
                sequence.cache = model.new_cache(len(sequence.pending) + sequence.max_new_tokens)
        counts = [len(sequence.pending) for sequence in sequences]
        tokens = torch.cat([sequence.pending for sequence in sequences]).to(self._lm.device)
        hidden = model(tokens, [sequence.cache for sequence in sequences], counts)
        last_rows = torch.tensor(counts).cumsum(0) - 1
        hidden = hidden[last_rows.to(hidden.device)]
        chosen = self._sampler(model.logits(hidden), keys)
        frames = hidden.float().unbind()
        steps = []
        for key, sequence, token, frame in zip(
            keys, sequences, chosen.tolist(), frames, strict=True
        ):
            sequence.generated += 1
            last = token == STOP_ID or sequence.generated == sequence.max_new_tokens
            steps.append(Step(key, token, frame, last))
            if last:
                self.remove(key)
            else:
                sequence.pending = chosen.new_tensor([token]).cpu()
        return steps

    def remove(self, key: int) -> None:
        self._sequences.pop(key, None)
        self._sampler.remove(key)


@dataclass
class _Sequence:
    pending: torch.Tensor
    """Token ids for its next forward: the prompt at first, then the last chosen token."""
    max_new_tokens: int
    generated: int = 0
    cache: SequenceCache | None = None
    """Allocated on its first step, so that queued sequences hold no memory."""
