"""Prompt construction: `[STOP][TEXT]<normalised sentence>[START]` (docs/checkpoint.md, prompt)."""

from __future__ import annotations

import logging
from pathlib import Path

from soprano.constants import START_ID, STOP_ID, TEXT_ID, UNK_ID
from soprano.errors import ModelLoadError

_LOGGER = logging.getLogger(__name__)


class PromptTokenizer:
    """Encodes normalised sentences into LM prompts with the checkpoint's tokenizer.json."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer

        try:
            self._tokenizer = Tokenizer.from_file(str(path))
        except Exception as error:  # tokenizers raises a bare Exception for bad files
            raise ModelLoadError(f"cannot read tokenizer {path}: {error}") from error

    def encode(self, sentence: str) -> list[int]:
        ids = self._tokenizer.encode(sentence, add_special_tokens=False).ids
        if UNK_ID in ids:
            _LOGGER.warning("Sentence has characters outside the vocabulary: %r", sentence)
        return [STOP_ID, TEXT_ID, *ids, START_ID]
