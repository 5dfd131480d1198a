"""Choosing the torch device: CUDA, then Apple's MPS, then the CPU."""

from __future__ import annotations

import torch

from soprano.errors import BackendUnavailableError

DEVICES = ("auto", "cuda", "mps", "cpu")


def select_device(name: str = "auto") -> torch.device:
    """Resolve 'auto' and check that an explicitly requested device exists."""
    kind = name.split(":", 1)[0]
    if kind not in DEVICES or (kind != "cuda" and ":" in name):
        raise ValueError(f"device must be one of {', '.join(DEVICES)} (or cuda:N), got {name!r}")
    if kind == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailableError("device 'cuda' was requested but CUDA is not available")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise BackendUnavailableError("device 'mps' was requested but MPS is not available")
    return torch.device(name)
