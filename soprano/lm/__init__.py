"""Language-model backends: prompts in, audio tokens and their hidden states out."""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from typing import Any

import torch

from soprano.checkpoint import Checkpoint
from soprano.errors import BackendUnavailableError
from soprano.lm.base import Generation, LanguageModel, SamplingParams, SequenceBatch, Step

__all__ = [
    "BACKENDS",
    "Generation",
    "LanguageModel",
    "SamplingParams",
    "SequenceBatch",
    "Step",
    "load_language_model",
    "select_backend",
]

BACKENDS = ("auto", "native", "transformers", "lmdeploy")


def lmdeploy_available() -> bool:
    return importlib.util.find_spec("lmdeploy") is not None


def select_backend(name: str, device: torch.device) -> str:
    """Resolve 'auto': lmdeploy on CUDA when installed, else our native backend."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    if name != "auto":
        return name
    if device.type == "cuda" and lmdeploy_available():
        return "lmdeploy"
    return "native"


def load_language_model(
    name: str,
    checkpoint: Checkpoint,
    device: torch.device,
    cache_size_mb: int,
    options: Mapping[str, Any] | None = None,
) -> LanguageModel:
    """Load the named backend ('auto' resolved) on `device`.

    `options` go to the native backend (dtype, kernels, half_weights, threads); others take none.
    """
    name = select_backend(name, device)
    if name == "native":
        from soprano.lm.native import NativeLM

        try:
            return NativeLM(checkpoint, device, **(options or {}))
        except TypeError as error:
            raise ValueError(f"bad native backend option: {error}") from error
    if options:
        raise ValueError(f"the {name} backend takes no options, got {', '.join(options)}")
    if name == "transformers":
        from soprano.lm.transformers import TransformersLM

        return TransformersLM(checkpoint, device)
    if device.type != "cuda":
        raise BackendUnavailableError(f"the lmdeploy backend needs a CUDA device, not {device}")
    if not lmdeploy_available():
        raise BackendUnavailableError(
            "the lmdeploy backend needs the lmdeploy package: "
            "pip install 'wyoming-soprano[lmdeploy]'"
        )
    from soprano.lm.lmdeploy import LMDeployLM

    return LMDeployLM(checkpoint, device, cache_size_mb)
