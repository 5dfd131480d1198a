"""`clean_text`: turn any text into what the Soprano LM was trained on (docs/text.md).

The published checkpoints only know lower-case letters, space and a few punctuation marks, so
everything else is spelled out or dropped. The steps follow upstream's tortoise-derived
normaliser in the spec's order. Deviations from upstream are marked "Fix:" at the rule.
"""

from __future__ import annotations

import re

from unidecode import unidecode

from soprano.text.codes import expand_codes
from soprano.text.dates import expand_dates_and_times
from soprano.text.markdown import markdown_to_text
from soprano.text.numbers import normalize_numbers
from soprano.text.phone import expand_phone_numbers
from soprano.text.units import expand_units

SENTENCE_ENDINGS = ".!?"
"""Closing punctuation: every prompt ends with one, so that the model ends it with a pause."""

_POUND_SIGN = "£"
# Fix: emoji and pictographs are silent on purpose (upstream dropped most of them only because
# unidecode had no ASCII for them, and read "™" as ", tm,"): a reader does not say "grinning
# face". Variation selectors, joiners and keycaps go with them, so "1️⃣" is "1".
_PICTOGRAPH = re.compile(
    "[\U0001f000-\U0001faff\u2300-\u23ff\u25a0-\u27bf\u2b00-\u2bff\u00a9\u00ae\u2122"
    "\ufe0e\ufe0f\u200d\u20e3\U000e0020-\U000e007f]"
)
# The heart carries meaning ("I ❤️ NY"): it is read like "<3" below, as "heart".
_HEART_SYMBOL = re.compile("\\s*[❤♥]\ufe0f?\\s*")
_ARROW = re.compile("\\s*[→⟶⇒]\\s*")
# Fix: "--" is a dash, read as a pause like "—" (upstream read it as a minus before a digit).
_DOUBLE_HYPHEN = re.compile(r"(?<=\w)-{2,}(?=\w)|(?<=[\w.,!?]) +-{2,}(?: +|$)")  # not "--flag"
_SURROGATE = re.compile("[\ud800-\udfff]")
"""Lone surrogates: undecodable input bytes (stdin's surrogateescape), which unidecode drops too,
but with a RuntimeWarning each on standard error."""
# Fix: upstream gave "<3" its heart in step 8, when digits were already words, so it never fired.
# It is read before the numbers now; "<30" stays a comparison.
_HEART = re.compile(r"(^| )<3(?!\d)")
_LINK_SCHEME = re.compile(r"https?://")
# Fix: lookarounds (upstream consumed the neighbours) so that chains such as "a - b - c" and
# "u.s.a" are handled at every mark, not at every second one.
_SPACED_HYPHEN = re.compile(r"(?<=.) - (?=.)")
_LETTER_DOT_LETTER = re.compile(r"(?<=[a-z])\.(?=[a-z])", re.IGNORECASE)
_PARENTHETICAL = re.compile(r"[(\[{].*[)\]}](?:.|$)")
_OPENING_BRACKET = re.compile(r"[(\[{]")
# Fix: upstream replaced the character after such a bracket too, so "(a)b" lost its "b".
_BRACKET_BEFORE_TEXT = re.compile(r"[)\]}](?=[^.!?,])")
_CLOSING_BRACKET = re.compile(r"[)\]}]")

_ABBREVIATIONS = {
    "mrs": "misess",
    "ms": "miss",
    "mr": "mister",
    "dr": "doctor",
    "st": "saint",
    "co": "company",
    "jr": "junior",
    "maj": "major",
    "gen": "general",
    "drs": "doctors",
    "rev": "reverend",
    "lt": "lieutenant",
    "hon": "honorable",
    "sgt": "sergeant",
    "capt": "captain",
    "esq": "esquire",
    "ltd": "limited",
    "col": "colonel",
    "ft": "fort",
}
"""Case-insensitive, only with their period, which they consume."""

_CASED_ABBREVIATIONS = {
    "Hz": "hertz",
    "kHz": "kilohertz",
    "KBs": "kilobytes",
    "KB": "kilobyte",
    "MBs": "megabytes",
    "MB": "megabyte",
    "GBs": "gigabytes",
    "GB": "gigabyte",
    "TBs": "terabytes",
    "TB": "terabyte",
    "APIs": "a p i's",
    "API": "a p i",
    "CLIs": "c l i's",
    "CLI": "c l i",
    "CPUs": "c p u's",
    "CPU": "c p u",
    "GPUs": "g p u's",
    "GPU": "g p u",
    "Ave": "avenue",
    "etc": "et cetera",
    "Mon": "monday",
    "Tues": "tuesday",
    "Tue": "tuesday",  # Fix: the short forms that calendars and tables print.
    "Thu": "thursday",
    "Wed": "wednesday",
    "Thurs": "thursday",
    "Fri": "friday",
    "Sat": "saturday",
    "Jan": "january",
    "Feb": "february",
    "Mar": "march",
    "Apr": "april",
    "Aug": "august",
    "Sept": "september",
    "Oct": "october",
    "Nov": "november",
    "Dec": "december",
    "and/or": "and or",
}
"""Case-sensitive whole words, as upstream 0.2.0 (no "Sun", "May", "Jun", "Jul", "TTS"), plus
"Tue" and "Thu"."""

_ABBREVIATION = re.compile(r"\b(" + "|".join(_ABBREVIATIONS) + r")\.", re.IGNORECASE)
_CASED_ABBREVIATION = re.compile(r"\b(" + "|".join(map(re.escape, _CASED_ABBREVIATIONS)) + r")\b")
_MIXED_CASE_WORD = re.compile(r"\b[A-Z][a-z]*(?:[A-Z][a-z]*)+\b")
_CAPITALISED_SEGMENT = re.compile(r"[A-Z][a-z]*")

_SYMBOLS = {
    "@": " at ",
    "&": " and ",
    "%": " percent ",
    ":": ".",
    ";": ",",
    "+": " plus ",
    "\\": " backslash ",
    "~": " about ",
    "<=": " less than or equal to ",
    ">=": " greater than or equal to ",
    "<": " less than ",
    ">": " greater than ",
    "=": " equals ",
    "/": " slash ",
    "_": " ",
    "*": " ",
}
_SYMBOL = re.compile("|".join(map(re.escape, _SYMBOLS)))  # "<=" is listed before "<"

# Fix: whitespace is kept for the next step; upstream deleted tabs here, gluing words together.
_UNKNOWN_CHARACTER = re.compile(r"[^a-z0-9\s!$%&'*+,\-./<>?_]")  # drops a stray "£" or "€"
_UNSPOKEN_CHARACTER = re.compile(r"[<>/_+]")
_WHITESPACE = re.compile(r"\s+")
_SPACE_BEFORE_PUNCTUATION = re.compile(r" ([.?!,])")
_ELLIPSIS = re.compile(r"\.{3,}")
_ELLIPSIS_MARK = "…"  # unidecode removed every non-ASCII character, so this cannot collide
_COMMA_RUN = re.compile(r",+")
_PERIOD_RUN = re.compile(r"[.,]*\.[.,]*")
_EXCLAMATION_RUN = re.compile(r"[.,!]*![.,!]*")
_QUESTION_RUN = re.compile(r"[.,!?]*\?[.,!?]*")
_LONG_CHARACTER_RUN = re.compile(r"(\w)\1{2,}")


def clean_text(text: str) -> str:
    """Normalise text to the lower-case, digit-free alphabet that the Soprano LM reads.

    Assistant text is read first, before transliteration flattens "°" and "–": markdown to plain
    lines, emoji out, then phone numbers, dates and times, codes and units, in that order (each
    leaves digits that only it can read in words, and the rest for the number rules).
    """
    text = markdown_to_text(text)
    text = _PICTOGRAPH.sub("", _HEART_SYMBOL.sub(" heart ", text))
    text = _ARROW.sub(" to ", text)
    text = _DOUBLE_HYPHEN.sub(" - ", text.replace("—", " - "))
    text = expand_phone_numbers(text)
    text = expand_dates_and_times(text)
    text = expand_codes(text)
    text = expand_units(text)
    text = _transliterate(text)
    text = _terminate_lines(text)
    text = _HEART.sub(" heart ", text)
    text = normalize_numbers(text)
    text = _expand_special_patterns(text)
    text = _ABBREVIATION.sub(lambda match: _ABBREVIATIONS[match.group(1).lower()], text)
    text = _CASED_ABBREVIATION.sub(lambda match: _CASED_ABBREVIATIONS[match.group(1)], text)
    text = _MIXED_CASE_WORD.sub(_split_mixed_case, text)
    text = _SYMBOL.sub(lambda match: _SYMBOLS[match.group(0)], text)
    text = text.lower()
    text = _UNKNOWN_CHARACTER.sub("", text)
    text = _UNSPOKEN_CHARACTER.sub("", text)
    text = _WHITESPACE.sub(" ", text)
    text = _SPACE_BEFORE_PUNCTUATION.sub(r"\1", text).strip()
    text = _deduplicate_punctuation(text)
    text = _LONG_CHARACTER_RUN.sub(r"\1\1", text)
    return end_sentence(text)


def end_sentence(text: str) -> str:
    """Close speakable text with a sentence ending, so that the model ends it with a pause.

    Fix: upstream could leave a sentence open, e.g. "... on St. James St." lost its last period
    to the abbreviation, and the model then voices the end oddly. A trailing comma or hyphen
    gives way to the period. Text without a letter or digit is returned unchanged.
    """
    if not any(character.isalnum() for character in text) or text.endswith(tuple(SENTENCE_ENDINGS)):
        return text
    return text.rstrip(" ,-") + "."


def _transliterate(text: str) -> str:
    text = _SURROGATE.sub("", text)
    # Fix: unidecode turns "£" into "PS", so upstream's pounds rule never saw it; the sign is
    # kept through transliteration for the number rules (and dropped later if still unused).
    # The euro sign likewise (unidecode made it "EUR").
    return "€".join(
        _POUND_SIGN.join(unidecode(part) for part in piece.split(_POUND_SIGN))
        for piece in text.split("€")
    )


def _terminate_lines(text: str) -> str:
    """A line break ends a sentence: give each line its final punctuation, then join them."""
    lines = (line.strip() for line in text.split("\n"))
    return " ".join(
        line if not line or line.endswith(tuple(SENTENCE_ENDINGS)) else line + "." for line in lines
    )


def _expand_special_patterns(text: str) -> str:
    text = _LINK_SCHEME.sub("h t t p s colon slash slash ", text)
    text = _SPACED_HYPHEN.sub(", ", text)
    text = _LETTER_DOT_LETTER.sub(" dot ", text)
    return _PARENTHETICAL.sub(_expand_parenthetical, text)


def _expand_parenthetical(match: re.Match[str]) -> str:
    """Brackets become commas, so the aside is spoken with short pauses around it."""
    text = _OPENING_BRACKET.sub(", ", match.group(0))
    text = _BRACKET_BEFORE_TEXT.sub(", ", text)
    return _CLOSING_BRACKET.sub("", text)


def _split_mixed_case(match: re.Match[str]) -> str:
    """Read "LMDeploy" as "L M Deploy" and "TPUs" as "TPU's"; plain capitals stay one word."""
    word = match.group(0)
    segments = _CAPITALISED_SEGMENT.findall(word)
    if all(len(segment) == 1 for segment in segments):
        return word
    if all(len(segment) == 1 for segment in segments[:-1]) and segments[-1][1:] == "s":
        return word[:-1] + "'s"
    return " ".join(segments)


def _deduplicate_punctuation(text: str) -> str:
    text = _ELLIPSIS.sub(_ELLIPSIS_MARK, text)
    text = _COMMA_RUN.sub(",", text)
    text = _PERIOD_RUN.sub(".", text)
    text = _EXCLAMATION_RUN.sub("!", text)
    text = _QUESTION_RUN.sub("?", text)
    return text.replace(_ELLIPSIS_MARK, "...")
