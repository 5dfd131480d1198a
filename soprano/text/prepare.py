"""`prepare_text`: the sentences the engine prompts the LM with, one prompt per sentence."""

from __future__ import annotations

from soprano.text.normalize import clean_text, end_sentence
from soprano.text.split import merge_short_sentences, split_sentences


def prepare_text(text: str) -> list[str]:
    """Normalise, split and merge text as upstream's `_preprocess_text` (docs/text.md).

    Every sentence ends with ". ! ?": a piece cut at the length cap gets a period, so the model
    closes it with a pause. Text with nothing to say (empty, blank, bare punctuation) gives [].
    """
    sentences = [end_sentence(piece) for piece in split_sentences(clean_text(text.strip()))]
    return merge_short_sentences(sentences)
