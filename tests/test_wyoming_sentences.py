"""The Wyoming server's sentence stream: streamed text cut exactly where the whole text is cut."""

from __future__ import annotations

import pytest

from soprano.text import prepare_text
from wyoming_soprano.sentences import MAX_PENDING, SentenceStream

STREAMED_TEXTS = [
    "Hello there, this is the first sentence of the test. Short one. And here is another "
    "sentence that is long enough! Is it? Yes it is, definitely a question long enough?",
    "Hi. Yes. No. Okay then, this one is a long one for sure, really. Done.",
    "Dr. Smith lives on St. James St. with 3.5 cats, and he has $4.20 in cash today. "
    "Meet me at 10:30 tomorrow, in the big room on the left, please. Thanks a lot for that.",
    "Line one has no period at all\nLine two also has none but it is longer than thirty\n"
    "The third line here is long as well, long enough to count.",
    "The U.S.A. is large. Visit https://example.com/x for details about everything here. "
    "Bye (really, I mean it) for now, and a few more words here. ok",
    "We met on a sunny day (a long time ago, when we were young. It was lovely, truly lovely "
    "for everyone there. Another long sentence follows right here, yes. The end is near) and "
    "we left. Then came the long evening, with music and dancing until late.",
]


@pytest.mark.parametrize("text", STREAMED_TEXTS)
@pytest.mark.parametrize("fragment_length", [1, 2, 7, 23, 10_000])
def test_streamed_fragments_give_exactly_the_sentences_of_the_whole_text(
    text: str, fragment_length: int
) -> None:
    stream = SentenceStream()
    released: list[str] = []
    for start in range(0, len(text), fragment_length):
        released += stream.add(text[start : start + fragment_length])
    early = len(released)
    released += stream.finish()
    assert released == prepare_text(text)
    assert stream.finish() == []
    if fragment_length < len(text) and len(prepare_text(text)) > 2:
        assert early > 0, "finished sentences are released before the stream ends"


def test_a_sentence_is_held_back_while_a_short_one_could_still_join_it() -> None:
    stream = SentenceStream()
    assert stream.add("This first sentence is long enough to stand alone. ") == []
    assert stream.add("Ok. ") == []  # "ok." is merged into the first sentence
    assert stream.add("And now a second sentence that is long enough") == [
        "this first sentence is long enough to stand alone. ok."
    ]
    assert stream.finish() == ["and now a second sentence that is long enough."]


def test_an_unclosed_bracket_holds_sentences_back_only_for_a_while() -> None:
    stream = SentenceStream()
    opening = (
        "That is really sad to hear, my friend :( But let us look at the bright side. "
        "Here is the first of several reasons why."
    )
    assert stream.add(opening) == []  # a closing bracket could still turn "(" into a comma
    later = "".join(f" Here is reason number {n} why tomorrow will be better." for n in range(6))
    released = stream.add(later)
    assert released, "the held sentences go out once the text after them is long"
    assert released + stream.finish() == prepare_text(opening + later)


def test_text_without_a_sentence_end_is_cut_and_spoken_once_it_runs_on_too_long() -> None:
    stream = SentenceStream()
    vocabulary = ["river", "stone", "green", "light", "window", "garden", "morning", "quiet"]
    words = " ".join(vocabulary[n % len(vocabulary)] for n in range(2000))  # no sentence end
    released: list[str] = []
    for start in range(0, len(words), 7):
        released += stream.add(words[start : start + 7])
        assert len(stream._pending) <= MAX_PENDING
    released += stream.finish()
    assert released, "the text was spoken"
    spoken = " ".join(released).replace(".", "").split()
    assert len(spoken) == 2000, "every word once, none cut in two"


def test_a_huge_fragment_costs_work_bounded_by_the_held_back_text() -> None:
    stream = SentenceStream()
    released = stream.add("x" * 200_000)
    assert len(stream._pending) <= MAX_PENDING
    assert released + stream.finish()
