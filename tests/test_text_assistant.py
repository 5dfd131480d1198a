"""What assistants and LLMs say: units, dates, times, phone numbers, codes, markdown and emoji.

Every case is input -> the spoken text that reaches the model (`clean_text`), so each one fails
on any change of reading. The corpus in text_corpus.py is the same kind of table, larger.
"""

from __future__ import annotations

import re
import statistics
import time
from pathlib import Path

import pytest
from text_corpus import CORPUS

from soprano.text import clean_text, prepare_text
from soprano.text.markdown import markdown_to_text

TOKENIZER_PATH = (
    Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "soprano-tokenizer.json"
)

ISSUE_TABLE = [
    ("Sunny, 25°C", "sunny, twenty-five degrees celsius."),
    ("Wind 10 km/h", "wind ten kilometers per hour."),
    ("Call 555-1234", "call five five five, one two three four."),
    ("on 12/25/2026", "on december twenty-fifth, twenty twenty-six."),
    ("1. Preheat the oven.", "preheat the oven."),
    ("Check [the docs](https://example.com/docs)", "check the docs."),
    ("**Note:** Bring water.", "note. bring water."),
]

NEW_CASES = [
    # Units: singular only for exactly one, negatives, ranges, glued or spaced.
    ("1 degree", "one degree."),
    ("2°", "two degrees."),
    ("-1°C", "minus one degree celsius."),
    ("−3 °F", "minus three degrees fahrenheit."),
    ("1.0 km", "one point zero kilometers."),
    ("from -40°C to +50°C", "from minus forty degrees celsius to plus fifty degrees celsius."),
    ("5-10 mph", "five to ten miles per hour."),
    ("model-80m", "model minus eighty million."),
    ("1,500 km", "fifteen hundred kilometers."),
    ("1 kW and 2 kWh", "one kilowatt and two kilowatt hours."),
    ("a 9 V battery", "a nine volt battery."),
    ("10 GB", "ten gigabytes."),
    ("5M users", "five million users."),
    ("$5M and $2.5B", "five million dollars and two point five billion dollars."),
    ("in 5 minutes", "in five minutes."),
    ("€4.50", "four euros, fifty cents."),
    ("€1 or 5 €", "one euro or five euros."),
    ("a 1:1 ratio, 3:2 win", "a one to one ratio, three to two win."),
    ("5 mins", "five minutes."),
    ("1h 30m", "one hour thirty minutes."),
    ("2h15m10s", "two hours fifteen minutes ten seconds."),
    ("5 C", "five c."),
    # Dates: month first unless it cannot be, ordinals, decades; invalid ones stay numbers.
    ("1/2/2027", "january second, twenty twenty-seven."),
    ("13/2/2027", "the thirteenth of february, twenty twenty-seven."),
    ("2/30/2027", "two dash thirty dash twenty twenty-seven."),
    ("25.12.2026", "the twenty-fifth of december, twenty twenty-six."),
    ("2026-02-29", "february twenty-ninth, twenty twenty-six."),
    ("2026-13-01", "twenty twenty-six dash thirteen dash one."),
    ("Dec 25th, 2026", "december twenty-fifth, twenty twenty-six."),
    ("May 2026", "may twenty twenty-six."),
    ("the 11th of March", "the eleventh of march."),
    ("1990s and '80s", "nineteen nineties and eighties."),
    # Times and ranges.
    ("7 a.m.", "seven a m."),
    ("7 a.m. Then 8 p.m. today", "seven a m. then eight p m today."),
    ("3:05PM", "three oh five p m."),
    ("13 pm", "thirteen pm."),
    ("9–5", "nine to five."),
    ("10:00-11:30", "ten o'clock to eleven thirty."),
    ("10-3", "ten minus three."),
    ("Bake for 20-25 minutes", "bake for twenty to twenty-five minutes."),
    ("2-3 people", "two to three people."),
    ("5-3 is 2", "five minus three is two."),
    ("2020-2024", "twenty twenty to twenty twenty-four."),
    ("Mon–Fri", "monday to friday."),
    # Phone numbers are digits in groups, never arithmetic.
    ("(555) 123-4567", "five five five, one two three, four five six seven."),
    ("+1 555 123 4567", "plus one, five five five, one two three, four five six seven."),
    ("0800 123 456", "zero eight zero zero, one two three, four five six."),
    ("555.123.4567", "five five five, one two three, four five six seven."),
    # Versions, codes and IDs.
    ("v2.1.3", "version two point one point three."),
    ("1.17.1", "one point seventeen point one."),
    ("10.0.0.1", "one zero dot zero dot zero dot one."),
    ("ABC-123", "a b c one two three."),
    ("Order #98765", "order number nine eight seven six five."),
    ("NY 10001-1234", "n y one zero zero zero one, one two three four."),
    ("zip code 94103", "zip code nine four one zero three."),
    ("Room 10001", "room ten thousand one."),
    ("See <https://help.example.com/a_b?x=1>", "see help dot example dot com."),
    ("Mail <me@example.com>", "mail me at example dot com."),
    # Markdown: markers silent, each block a sentence.
    ("- one\n- two", "one. two."),
    ("1. a\n   1. nested\n2. b", "a. nested. b."),
    ("> *quoted*", "quoted."),
    ("# Heading", "heading."),
    ("Text\n\n***\n\nMore", "text. more."),
    ("`a_b` code", "a b code."),
    ("```python\nx = 1\n```", "x equals one."),
    ("![alt text](a.png)", "alt text."),
    ("[a link](http://x.y/z?q=1)", "a link."),
    ("| a | b |\n|---|---|\n| 1 | 2 |", "a, b. one, two."),
    ("| a | b |", "a, b."),
    ("2026. What a year.", "twenty twenty-six. what a year."),
    ("5. Fifth only", "five. fifth only."),
    ("a *b* c", "a b c."),
    ("2*3", "two times three."),
    # Emoji silent (a heart is read, as "<3" is), punctuation runs and dashes as pauses.
    ("Nice 👍🏽!", "nice!"),
    ("🇫🇷 France", "france."),
    ("I ❤️ NY", "i heart ny."),
    ("Trade™ mark", "trade mark."),
    ("So... yes", "so... yes."),
    ("What?!?!", "what?"),
    ("well -- maybe", "well, maybe."),
    ("good--really", "good, really."),
    ("use --help", "use --help."),
    ("A → B", "a to b."),
]


@pytest.mark.parametrize(("raw", "expected"), ISSUE_TABLE + NEW_CASES)
def test_assistant_text_is_read_as_a_careful_reader_would(raw: str, expected: str) -> None:
    assert clean_text(raw) == expected


@pytest.mark.parametrize(("raw", "expected"), CORPUS)
def test_corpus_sentence(raw: str, expected: str) -> None:
    assert clean_text(raw) == expected


def test_the_corpus_is_large_enough_to_compare_normalisers() -> None:
    assert len(CORPUS) >= 200
    assert len({raw for raw, _ in CORPUS}) == len(CORPUS)


PLAIN_TEXTS = [
    "Hello world.",
    "It costs $5 - or less.",
    "Call 555-1234 at 3:30pm.",
    "She said: no way!\nThen she left.",
    "a - b - c",
    "2 + 2 = 4, 10 / 5 = 2",
    "Temperatures ranged from -40°C to +50°C.",
    "Wait... what?! No.",
    "e.g. this (and that)",
]


@pytest.mark.parametrize("text", PLAIN_TEXTS)
def test_plain_text_passes_the_markdown_step_unchanged(text: str) -> None:
    assert markdown_to_text(text) == text


LLM_ANSWERS = [
    "## Recipe\n\nHere's how to make **pancakes**:\n\n1. Mix 200 g of flour with 2 eggs.\n"
    "2. Add 300 ml of milk and *whisk*.\n3. Fry for 2 min per side.\n\n> Tip: serve warm!",
    "Sure! Here are the options:\n\n- **Option A:** cheaper, see [pricing](https://ex.com/p?a=1)\n"
    "- **Option B:** faster (see the [docs](https://docs.example.org/v2/guide#speed))\n\n---\n\n"
    "Let me know which one you prefer 😊",
    "| City | Temp | Wind |\n|------|-----:|:----:|\n| Paris | 18°C | 12 km/h |\n"
    "| Berlin | -2°C | 30 km/h |\n\nSource: [Met Office](https://www.metoffice.gov.uk/).",
    "To list files run `ls -la docs` or:\n\n```bash\nfind . -name '*.py' | xargs wc -l\n```\n\n"
    "Then check ![the chart](https://img.example.com/chart_1.png) for details.",
    "### Steps\n\n* Open **Settings** → *Devices*\n* Tap `Add` and enter code ABC-123\n"
    "* Call +1 555 123 4567 if it fails\n\n#### Notes\n1) It takes ~5 min\n2) Works on v2.1.3+",
    "Your schedule for **Dec 25**:\n\n- 9:00–10:30 — Breakfast\n- 12pm: Lunch at [Joe's](https://joes.example.com)\n"
    "- 3:30pm: Call mom (555) 987-6543\n\n_Have a great day!_ 🎄",
    "> **Warning:** the battery is at 5%.\n> Charge it to 100% before 2026-12-24.\n\n"
    "~~Old advice~~ **New:** use the 65 W charger. See <https://help.example.com/battery>.",
    "Here's a summary:\n\n1. **Revenue** rose 15% to $5M in Q3 2024.\n2. **Costs** fell by 3.5%.\n"
    '3. See [the full report](https://investors.example.com/q3_2024.pdf "Q3 report").',
]
_MARKDOWN_CHARACTERS = re.compile(r"[*_`#>\[\]()|~]")
_URL_PIECES = re.compile(r"h ?t ?t ?p|www|colon|slash|\bpdf\b|\bpng\b|\bio\b")
"""A scheme, a path or a query of the answers' links: the words that only the URL has."""


@pytest.mark.parametrize("answer", LLM_ANSWERS)
def test_markdown_answers_reach_the_model_without_markup_or_urls(answer: str) -> None:
    for text in [clean_text(answer), *prepare_text(answer)]:
        assert not _MARKDOWN_CHARACTERS.search(text), text
        assert not _URL_PIECES.search(text), text
        assert not re.search(r"\d", text), text


def test_markdown_answers_never_tokenize_to_unknown() -> None:
    if not TOKENIZER_PATH.is_file():
        pytest.skip(f"the Soprano tokenizer fixture is absent ({TOKENIZER_PATH})")
    from tokenizers import Tokenizer

    from soprano.constants import UNK_ID

    tokenizer = Tokenizer.from_file(str(TOKENIZER_PATH))
    for raw in LLM_ANSWERS + [raw for raw, _ in CORPUS]:
        for text in prepare_text(raw):
            ids = tokenizer.encode(text, add_special_tokens=False).ids
            assert UNK_ID not in ids, (raw, text)


def test_a_typical_sentence_is_normalised_well_under_five_milliseconds() -> None:
    for raw, _ in CORPUS:  # warm up: inflect and markdown-it are imported on first use
        clean_text(raw)
    timings = []
    for raw, _ in CORPUS:
        start = time.perf_counter()
        clean_text(raw)
        timings.append(time.perf_counter() - start)
    assert statistics.median(timings) < 0.005 / 5, statistics.median(timings)
