"""Spotting generations stuck on one sound ("aaah") or silence, from their hidden states (§3.8).

Consecutive frames that barely change, for long enough, mean the LM is looping.
"""

from __future__ import annotations

import logging

import torch

_LOGGER = logging.getLogger("soprano")

MIN_FRAMES = 16
"""Sentences this short are never flagged."""

SIMILAR_FRAMES_L1 = 300.0
"""Two consecutive frames closer than this (L1 over the hidden dimensions) look alike."""

MAX_SIMILAR_RUN = 16
"""A run score above this flags the sentence."""


def looks_hallucinated(hidden: torch.Tensor) -> bool:
    """True when a [n, hidden_size] frame sequence holds a long run of near-identical frames."""
    if len(hidden) <= MIN_FRAMES:
        return False
    distances = (hidden[1:] - hidden[:-1]).abs().sum(dim=-1).tolist()
    run = 0
    for distance in distances:
        if distance < SIMILAR_FRAMES_L1:
            run += 1
            if run > MAX_SIMILAR_RUN:
                return True
        elif run > 0:
            run -= 1
    return False


def warn_cut(sentence: str, max_new_tokens: int) -> None:
    """Log a sentence that reached max_new_tokens: it was cut, and is most likely a loop."""
    _LOGGER.warning(
        "A sentence did not finish within %d tokens and was cut (likely a hallucination): %r",
        max_new_tokens,
        sentence,
    )
