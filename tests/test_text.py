"""The text front end: normalisation, splitting and merging (docs/text.md)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from soprano.text import (
    MAX_SENTENCE_LENGTH,
    MIN_SENTENCE_LENGTH,
    clean_text,
    prepare_text,
    split_sentences,
)
from soprano.text.split import merge_short_sentences

TOKENIZER_PATH = (
    Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "soprano-tokenizer.json"
)
SPOKEN_CHARACTERS = set("abcdefghijklmnopqrstuvwxyz !$',-.?")
"""What normalised text may contain: a subset of the tokenizer's 53 single-character pieces."""

CLEAN_TEXT_CASES = [
    # Integers, digit runs, suffixes and letter-digit boundaries.
    ("I have 42 cats", "i have forty-two cats."),
    ("101 dalmatians", "one hundred one dalmatians."),
    ("0", "zero."),
    ("1000", "one thousand."),
    ("3000", "three thousand."),
    ("1,234,567", "one million, two hundred thirty-four thousand, five hundred sixty-seven."),
    ("1,2,3", "one, two, three."),
    ("12,34", "twelve, thirty-four."),
    ("#1 fan", "number one fan."),
    ("100k views", "one hundred thousand views."),
    ("2B users", "two billion users."),
    ("100x1", "one hundred x one."),
    ("mp3", "mp three."),
    ("1" + "0" * 36, " ".join(["one"] + ["zero"] * 36) + "."),
    # Years.
    ("1999", "nineteen ninety-nine."),
    ("In 1905 it rained", "in nineteen oh five it rained."),
    ("2000", "two thousand."),
    ("2007", "two thousand seven."),
    ("2024", "twenty twenty-four."),
    ("1100", "eleven hundred."),
    ("1001", "ten oh one."),
    # Money.
    ("$2.47", "two dollars, forty-seven cents."),
    ("$1", "one dollar."),
    ("$0.01", "one cent."),
    ("$0.00", "zero dollars."),
    ("$1,000,000", "one million dollars."),
    ("$1.5", "one dollar, fifty cents."),
    ("$1.2.3", "one point two point three dollars."),
    ("£20", "twenty pounds."),
    ("£3.50", "three point five zero pounds."),
    # Times.
    ("8:00", "eight o'clock."),
    ("8:05", "eight oh five."),
    ("11:59", "eleven fifty-nine."),
    ("13:00", "thirteen hundred."),
    ("0:00", "zero."),
    ("1:15:30", "one fifteen thirty."),
    ("1:05:09", "one oh five oh nine."),
    ("00:10:01", "ten oh one."),
    ("Meet at 3:30pm", "meet at three thirty p m."),
    # Dates and phone numbers.
    ("1/1/2025", "january first, twenty twenty-five."),
    ("13/13/2025", "thirteen dash thirteen dash twenty twenty-five."),
    ("12-25-99", "december twenty-fifth, ninety-nine."),
    ("Call 555-123-4567", "call five five five, one two three, four five six seven."),
    ("(800) 555 0199", "eight zero zero, five five five, zero one nine nine."),
    # Ordinals and decimals.
    ("1st 2nd 3rd 4th", "first second third fourth."),
    ("the 21st century", "the twenty-first century."),
    ("1,000th", "one thousandth."),
    ("3.14", "three point one four."),
    ("version 1.17.1", "version one point seventeen point one."),
    # Arithmetic and fractions.
    ("2 + 2 = 4", "two plus two equals four."),
    ("6*7", "six times seven."),
    ("2*3*4", "two times three times four."),
    ("10 - 3", "ten minus three."),
    ("-5 degrees", "minus five degrees."),
    ("1/2", "one over two."),
    ("11/1/1/10", "eleven slash one slash one slash ten."),
    # Links and dotted letters.
    ("Visit https://example.com now", "visit h t t p s colon slash slash example dot com now."),
    ("see http://a.io/docs", "see h t t p s colon slash slash a dot io slash docs."),
    ("e.g. this", "e dot g. this."),
    ("u.s.a", "u dot s dot a."),
    ("me@home.com", "me at home dot com."),
    # Abbreviations.
    ("Dr. Smith lives on St. James St.", "doctor smith lives on saint james saint."),
    ("Mrs. Jones and Mr. Brown", "misess jones and mister brown."),
    ("Acme Co. Ltd.", "acme company limited."),
    ("Sgt. Capt. Lt. Col. Gen.", "sergeant captain lieutenant colonel general."),
    ("a 2.4 kHz tone", "a two point four kilohertz tone."),
    ("8 GB of RAM", "eight gigabytes of ram."),
    ("a GB is plenty", "a gigabyte is plenty."),
    ("two APIs and a CPU", "two a p i's and a c p u."),
    ("Mon, Tues and Sat", "monday, tuesday and saturday."),
    ("Jan and Sept", "january and september."),
    ("Sun and May", "sun and may."),
    ("apples, pears, etc", "apples, pears, et cetera."),
    ("cats and/or dogs", "cats and or dogs."),
    # Mixed case.
    ("LMDeploy is fast", "l m deploy is fast."),
    ("TPUs", "tpu's."),
    ("UPPERCASE Test", "uppercase test."),
    ("YouTube and iPhone", "you tube and iphone."),
    # Symbols.
    ("50% & more", "fifty percent and more."),
    ("Note: this; that", "note. this, that."),
    ("a<=b", "a less than or equal to b."),
    ("x > y", "x greater than y."),
    ("C:\\temp", "c. backslash temp."),
    ("~5 km", "about five kilometers."),
    ("snake_case", "snake case."),
    ("I <3 you", "i heart you."),
    ("a/b", "a slash b."),
    ("*bold*", "bold."),
    # Transliteration and the character whitelist.
    ('He said "hello there." Then left.', "he said hello there. then left."),
    ("Café naïve Ångström", "cafe naive angstrom."),
    ("Привет мир", "privet mir."),
    ("中文", "zhong wen."),
    ("I 😀 emoji", "i emoji."),
    ("#hashtag", "hashtag."),
    ("Hello\tworld", "hello world."),
    # Punctuation clean-up, brackets, dashes, letter runs, lines.
    ("Wait... what?!", "wait... what?"),
    ("Stop!!!", "stop!"),
    ("No,,, really..", "no, really."),
    ("Hello , world .", "hello, world."),
    ("a (small) test.", "a, small, test."),
    ("word(aside)word", "word, aside, word."),
    ("one—two", "one, two."),
    ("a - b - c", "a, b, c."),
    ("sooo goood", "soo good."),
    ("First line\nsecond line", "first line. second line."),
    ("Hello,", "hello."),
    ("", ""),
    ("!!!", "!"),
]


@pytest.mark.parametrize(("raw", "expected"), CLEAN_TEXT_CASES)
def test_clean_text(raw: str, expected: str) -> None:
    assert clean_text(raw) == expected


CORPUS = [
    "Hello world!",
    "On 12/25/2023 at 13:00, we paid $1,234.56 for 3 items (about £20 each).",
    "Call me at (555) 123-4567 or +1 555 987 6543.",
    "The meeting is at 9:05am; bring 2.5kg of flour & 1/2 cup of sugar.",
    "Visit https://www.example.com/path?q=1&x=2#anchor for details.",
    "Email support@soprano.ai — we reply within 24h.",
    "Naïve café owners in Zürich served crème brûlée.",
    "日本語のテキストと中文字符 mixed with English.",
    "Emoji test 😀🎉👍 and symbols ™ © ® ° ± × ÷.",
    "def f(x): return x**2 + 3*x - 1  # a polynomial",
    "if (a <= b && c >= d) { print('ok'); }",
    "C:\\Users\\admin\\file_name.txt was 4.2 MB.",
    "Dr. Smith, Mr. Jones and Mrs. Brown met on St. Patrick's Day.",
    "The 21st century began in 2001, not 2000.",
    "LMDeploy, PyTorch and HuggingFace run on GPUs and TPUs.",
    "Wait... what?!?! No way!!!",
    "He said, “It’s ‘fine’,” and left — quickly.",
    "Temperatures ranged from -40°C to +50°C.",
    "The ratio was 3:2, and 7 × 8 = 56.",
    "Version 1.17.1.1 fixes bug #1234.",
    "Revenue grew 15% to $5M in Q3 2024.",
    "She ran 100m in 9.58s; he ran 1,2,3 laps.",
    "Hmmmmm, sooooo coooool!!!",
    "Ελληνικά και русский текст.",
    "العربية و עברית",
    "한국어 텍스트입니다.",
    "<html><body>Hello & welcome</body></html>",
    "`code` ~tilde~ ^caret^ |pipe| [bracket] {brace}",
    "I <3 NY; 1 < 2 > 0 = true.",
    "Tabs\tand\nnewlines\r\nand   spaces.",
    "The year 1066, 1492 and 1999 were famous; so was 2010.",
    "It costs $0.99, £3.50, €4 or ¥500.",
    "Jan 1st, Feb 2nd, Mar 3rd, Apr 4th, Sept 5th.",
    "Mon–Fri 9:00–17:00, Sat 10:00:30.",
    "e.g., i.e., etc. and U.S.A. or u.k.",
    "100k followers, 2B views, 3T dollars.",
    "Math: 2+2=4, 10/5=2, 3*3=9, 7-3=4.",
    "Long number 123456789012345678901234567890123456789012 here.",
    "\"Quoted\" text with 'single' quotes and `backticks`.",
    "Ünïcödé ŝtrîñgs ånd ligatures ﬁ ﬂ, ½ ¼ ¾ and ².",
    "Path /usr/local/bin and snake_case_names.",
    "!!! ??? ... ,,, ;;; :::",
]


def test_normalised_text_uses_only_spoken_characters() -> None:
    for raw in CORPUS:
        cleaned = clean_text(raw)
        assert set(cleaned) <= SPOKEN_CHARACTERS, (raw, cleaned)


def test_normalised_text_never_tokenizes_to_unknown() -> None:
    if not TOKENIZER_PATH.is_file():
        pytest.skip(f"the Soprano tokenizer fixture is absent ({TOKENIZER_PATH})")
    from tokenizers import Tokenizer

    from soprano.constants import UNK_ID

    tokenizer = Tokenizer.from_file(str(TOKENIZER_PATH))
    for raw in CORPUS:
        for text in [clean_text(raw), *prepare_text(raw)]:
            ids = tokenizer.encode(text, add_special_tokens=False).ids
            assert UNK_ID not in ids, (raw, text)
            assert tokenizer.decode(ids, skip_special_tokens=False).replace(" ", "") == (
                text.replace(" ", "")
            )


def test_split_sentences_ends_sentences_at_punctuation() -> None:
    text = "One. Two! Three?! Four... five. six"
    assert split_sentences(text) == ["One.", "Two!", "Three?!", "Four...", "five.", "six"]


def test_split_sentences_ignores_boundaries_inside_quotes() -> None:
    assert split_sentences("He said “Stop. Now.” Then left.") == ['He said "Stop. Now." Then left.']


def test_split_sentences_drops_pieces_without_letters() -> None:
    assert split_sentences("Hi. ... ! - ! Bye.") == ["Hi.", "Bye."]


def test_split_sentences_forces_a_split_at_the_last_space() -> None:
    words = [f"word{index}" for index in range(120)]
    pieces = split_sentences(" ".join(words))
    assert len(pieces) == 3
    assert all(len(piece) <= MAX_SENTENCE_LENGTH for piece in pieces)
    assert " ".join(pieces).split() == words
    assert len(pieces[0]) > MAX_SENTENCE_LENGTH - len("word99 ")


def test_split_sentences_forces_a_split_at_the_last_boundary() -> None:
    assert split_sentences("abcd.efgh", max_length=7) == ["abcd.", "efgh"]
    assert split_sentences('"Ab. Cd. Ef."', max_length=8) == ['"Ab. Cd.', 'Ef."']


def test_split_sentences_cuts_a_run_without_breaks() -> None:
    assert split_sentences("abcdefghij", max_length=4) == ["abc", "def", "ghi", "j"]


def test_split_sentences_rejects_a_bad_max_length() -> None:
    with pytest.raises(ValueError, match="max_length"):
        split_sentences("text", max_length=0)


@pytest.mark.parametrize("text", ["", "   \n\t ", "!!! ... ???", "---", '"()"', "*** ___"])
def test_prepare_text_of_nothing_to_say_is_empty(text: str) -> None:
    assert prepare_text(text) == []


LONG_ENOUGH = "this sentence is long enough to stand alone."


def test_prepare_text_merges_a_short_first_sentence_into_the_next() -> None:
    assert prepare_text(f"Hi. {LONG_ENOUGH}") == [f"hi. {LONG_ENOUGH}"]


def test_prepare_text_merges_a_short_middle_sentence_into_the_previous() -> None:
    text = f"{LONG_ENOUGH} Ok. And {LONG_ENOUGH}"
    assert prepare_text(text) == [f"{LONG_ENOUGH} ok.", f"and {LONG_ENOUGH}"]


def test_prepare_text_merges_a_short_last_sentence_into_the_previous() -> None:
    assert prepare_text(f"{LONG_ENOUGH} Bye!") == [f"{LONG_ENOUGH} bye!"]


def test_prepare_text_keeps_short_sentences_when_there_is_nothing_to_merge_with() -> None:
    assert prepare_text("Hi.") == ["hi."]
    assert prepare_text("Hi. Yo. Ok.") == ["hi. yo. ok."]


def test_prepare_text_closes_the_sentence_an_abbreviation_ended() -> None:
    text = "Dr. Smith lives on St. James St."
    assert prepare_text(text) == ["doctor smith lives on saint james saint."]


def test_prepare_text_closes_a_forced_split_with_a_period() -> None:
    words = ["word"] * 100
    sentences = prepare_text(" ".join(words))
    assert sentences == [" ".join(["word"] * 60) + ".", " ".join(["word"] * 40) + "."]


def test_prepare_text_keeps_the_length_cap_and_sentence_endings() -> None:
    text = " ".join(CORPUS * 3) + " " + "abc" * 150
    sentences = prepare_text(text)
    assert len(sentences) > 3
    for sentence in sentences:
        assert len(sentence) <= MAX_SENTENCE_LENGTH
        assert sentence[-1] in ".!?"
        assert not re.search(r"\d", sentence)
    assert all(len(sentence) >= MIN_SENTENCE_LENGTH for sentence in sentences[1:-1])


def test_merge_never_exceeds_the_length_cap() -> None:
    long = "x" * (MAX_SENTENCE_LENGTH - 2) + "."
    other = "y" * 40 + "."
    assert merge_short_sentences([long, "ok."]) == [long, "ok."]
    assert merge_short_sentences(["ok.", long]) == ["ok.", long]
    assert merge_short_sentences([long, "ok.", other]) == [long, f"ok. {other}"]
