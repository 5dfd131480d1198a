"""The text front end: raw text in, normalised sentences for the LM out (docs/text.md)."""

from soprano.text.normalize import clean_text
from soprano.text.prepare import prepare_text
from soprano.text.split import MAX_SENTENCE_LENGTH, MIN_SENTENCE_LENGTH, split_sentences

__all__ = [
    "MAX_SENTENCE_LENGTH",
    "MIN_SENTENCE_LENGTH",
    "clean_text",
    "prepare_text",
    "split_sentences",
]
