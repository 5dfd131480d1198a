"""Sentence splitting and the minimum-length merge (docs/text.md).

The LM is prompted one sentence at a time: the length cap bounds each prompt and its generation,
and the merge spares the model prompts of only a word or two.
"""

from __future__ import annotations

import re

from soprano.text.normalize import SENTENCE_ENDINGS

MAX_SENTENCE_LENGTH = 300
"""Characters after which the splitter forces a break (upstream `max_length`)."""

MIN_SENTENCE_LENGTH = 30
"""Sentences shorter than this are merged with a neighbour (upstream `min_length`)."""

_SENTENCE_MARKS = "!?"
_FORCED_BREAK_CHARACTERS = "!?. "
_WHITESPACE = re.compile(r"\s+")
_CURLY_DOUBLE_QUOTE = re.compile(r"[“”]")


def split_sentences(text: str, max_length: int = MAX_SENTENCE_LENGTH) -> list[str]:
    """Split (normalised) text into sentences of at most `max_length` characters.

    A sentence ends at "!" or "?", or at "." followed by a space, together with any directly
    following ". ! ?". Boundaries inside double quotes do not count. A sentence that reaches
    `max_length` is cut after its last ". ! ?" or space. Pieces are stripped; pieces without a
    letter or digit are dropped.

    Fix: a run of `max_length` characters without any such break is cut one character short;
    upstream (with `desired_length` 1) backed off to single characters and then merged them
    into one unbounded sentence. Pieces of bare punctuation such as "-" are dropped too, where
    upstream dropped only those made of ". , ; : ! ?".
    """
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1, got {max_length}")
    text = _CURLY_DOUBLE_QUOTE.sub('"', _WHITESPACE.sub(" ", text))
    pieces: list[str] = []
    start = 0
    position = 0
    in_quote = False
    while position < len(text):
        character = text[position]
        if character == '"':
            in_quote = not in_quote
        if position + 1 - start >= max_length:
            end = _forced_break(text, start, position + 1)
            pieces.append(text[start:end])
            start = position = end
            in_quote = text.count('"', 0, start) % 2 == 1
            continue
        if not in_quote and _is_boundary(text, position):
            while (
                position + 1 < len(text)
                and position + 1 - start < max_length
                and text[position + 1] in SENTENCE_ENDINGS
            ):
                position += 1
            pieces.append(text[start : position + 1])
            start = position + 1
        position += 1
    pieces.append(text[start:])
    stripped = (piece.strip() for piece in pieces)
    return [piece for piece in stripped if any(character.isalnum() for character in piece)]


def _is_boundary(text: str, position: int) -> bool:
    character = text[position]
    if character in _SENTENCE_MARKS:
        return True
    return character == "." and text[position + 1 : position + 2] in ("", " ")


def _forced_break(text: str, start: int, end: int) -> int:
    """Where a piece that reached `end` is cut: after its last break character.

    Without one, the cut leaves room for the period that `prepare_text` closes the piece with.
    """
    for index in range(end - 1, start, -1):
        if text[index] in _FORCED_BREAK_CHARACTERS:
            return index + 1
    return max(end - 1, start + 1)


def merge_short_sentences(
    sentences: list[str],
    min_length: int = MIN_SENTENCE_LENGTH,
    max_length: int = MAX_SENTENCE_LENGTH,
) -> list[str]:
    """Join sentences shorter than `min_length` to a neighbour (docs/text.md, merging).

    A short sentence is appended to the previous one; the first one is put in front of the
    next one; a short last sentence with nothing before it stays alone.

    Fix: a join never makes a sentence longer than `max_length`; upstream could grow one
    without bound (a long sentence followed by many short ones). Where the previous sentence has
    no room, the short one joins the next instead, or, failing that too, stays alone.
    """
    merged: list[str] = []
    waiting = ""
    for index, sentence in enumerate(sentences):
        if waiting:
            if len(waiting) + 1 + len(sentence) <= max_length:
                sentence = f"{waiting} {sentence}"
            else:
                merged.append(waiting)
            waiting = ""
        if len(sentence) >= min_length:
            merged.append(sentence)
        elif merged and len(merged[-1]) + 1 + len(sentence) <= max_length:
            merged[-1] = f"{merged[-1]} {sentence}"
        elif index + 1 < len(sentences):
            waiting = sentence
        else:
            merged.append(sentence)
    return merged
