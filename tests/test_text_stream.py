"""The Wyoming sentence stream cuts markdown and lists where the one-shot front end does.

A client streams an LLM answer in arbitrary fragments; whatever the fragments, the sentences
released must be exactly `prepare_text` of the whole answer (stream == one-shot, byte-exact).
"""

from __future__ import annotations

import random

import pytest
from test_text_assistant import LLM_ANSWERS

from soprano.text import prepare_text
from wyoming_soprano.sentences import SentenceStream

STREAMED_MARKDOWN = [
    *LLM_ANSWERS,
    "1. Preheat the oven to 180°C and wait until it is really hot.\n"
    "2. Mix the flour, the sugar and the eggs in a large bowl.\n"
    "3. Bake for 25 min, then let it cool down on a rack for a while.",
    "Here is a list that keeps going for a while, long enough to release:\n\n"
    "- the first item is long enough to be a sentence of its own\n"
    "- the second item is long enough to be a sentence of its own\n"
    "  and it has a lazy continuation line that is long as well\n"
    "- short one\n\nAnd a closing paragraph that is long enough to stand alone.",
    "| Day | High | Low |\n|---|---|---|\n| Monday is a long day name | 25°C | 12°C |\n"
    "| Tuesday is a long day name too | 22°C | 10°C |\n\nThat was the forecast for this week.",
    "Some intro text that is long enough to be released early.\n\n```python\n"
    "def greet(name):\n    return f'hello {name}'\n```\n\nAfter the code block, a long sentence.",
    "A title that is long enough to be its own sentence\n=====\n\n"
    "Then a paragraph with **bold text** and a [link](https://example.com/x) in it.",
]


def _stream(text: str, fragments: list[int]) -> list[str]:
    stream = SentenceStream()
    released: list[str] = []
    position = 0
    for length in fragments:
        released += stream.add(text[position : position + length])
        position += length
    released += stream.add(text[position:])
    return released + stream.finish()


@pytest.mark.parametrize("text", STREAMED_MARKDOWN)
@pytest.mark.parametrize("fragment_length", [1, 3, 7, 23, 10_000])
def test_streamed_markdown_gives_the_sentences_of_the_whole(
    text: str, fragment_length: int
) -> None:
    fragments = [fragment_length] * (len(text) // fragment_length)
    assert _stream(text, fragments) == prepare_text(text)


@pytest.mark.parametrize("seed", range(4))
def test_markdown_cut_at_random_places_gives_the_sentences_of_the_whole(seed: int) -> None:
    generator = random.Random(seed)
    for text in STREAMED_MARKDOWN:
        fragments = [generator.randint(1, 40) for _ in range(len(text) // 10)]
        assert _stream(text, fragments) == prepare_text(text), text


def test_numbers_after_a_paragraph_line_are_not_taken_for_a_list() -> None:
    text = (
        "These are the remaining steps of the long recipe:\n2) Mix the flour and the sugar well.\n"
        "3) Bake the cake for a long time, until it is golden.\n4) Let it cool down on a rack."
    )
    for fragment_length in (1, 9, 10_000):
        assert _stream(text, [fragment_length] * (len(text) // fragment_length)) == prepare_text(
            text
        )


def test_a_markdown_list_is_released_item_by_item() -> None:
    stream = SentenceStream()
    assert stream.add("- The first item of the list is long enough.\n") == []
    released = stream.add("- The second item of the list is long enough too.\n- And")
    assert released == ["the first item of the list is long enough."]
    assert stream.finish() == ["the second item of the list is long enough too. and."]
