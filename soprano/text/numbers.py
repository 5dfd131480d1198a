"""Spoken forms of numbers (docs/text.md): the model only knows letters, so every digit goes.

The sub-steps run in the spec's order; each one rewrites digits into a form that the later ones
(and finally the plain integer rule) turn into words. Deviations from upstream are marked "Fix:".
"""

from __future__ import annotations

import functools
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import inflect


@functools.cache
def _inflect() -> inflect.engine:
    """inflect takes seconds to import, so only text that has numbers pays for it."""
    import inflect

    return inflect.engine()


MAX_SPOKEN_DIGITS = 36
"""inflect names numbers up to 36 digits; longer digit runs are read one digit at a time."""

_NUMBER_SIGN = re.compile(r"#(\d)")
# Fix: upstream read "$5M" as "five dollars million"; the magnitude belongs to the amount.
_DOLLAR_MAGNITUDE = re.compile(
    r"\$(\d+(?:\.\d+)?)\s?([kmbt]\b|thousand|million|billion|trillion)", re.I
)
_MAGNITUDE_SUFFIX = re.compile(r"\b(\d+)([kmbt])\b", re.IGNORECASE)
_MAGNITUDES = {"k": "thousand", "m": "million", "b": "billion", "t": "trillion"}
# Fix: upstream removed every comma between digits, so "1,2,3" became "123". Only real thousands
# groups ("1,234,567") lose their commas; any other comma between digits separates a list and
# gets a space after it ("1,2,3" -> "1, 2, 3").
_THOUSANDS_GROUPS = re.compile(r"(?<!\d)(?<!\d,)\d{1,3}(?:,\d{3})+(?!\d|,\d)")
_LIST_COMMA = re.compile(r"(?<=\d),(?=\d)")
# Fix: lookarounds instead of upstream's consumed neighbours, so adjacent dates all match. Real
# dates are read before this (`dates`), and phone numbers in `phone`; what is left here, such as
# "13/13/2026", keeps upstream's "dash" reading.
_DATE = re.compile(r"(?<!/)(\d{1,2})[/-](\d{1,2})[/-](\d{4}|\d{2})(?!/)")
_TIME = re.compile(r"(\d\d?):(\d\d)(?::(\d\d))?")
# Upstream never reached this rule (see `_transliterate` in normalize.py); now that it runs,
# pence are part of the amount ("£3.50" -> "3.50 pounds"), not a stray ".50" left behind.
_POUNDS = re.compile(r"£(\d+(?:\.\d+)?)")
# Commas are settled by the thousands rule above: a comma left after "$1" separates a list.
_DOLLARS = re.compile(r"\$([\d.]*\d)")
# Fix: upstream's unidecode made "€5" "EUR5"; euros are read like dollars, with their cents.
_EUROS = re.compile(r"€([\d.]*\d)|(\d) ?€")
_DECIMAL = re.compile(r"\d+(?:\.\d+)+")
# Fix: ":" between single digits is a ratio or a score, "1:1" is "one to one", not "one.one".
_RATIO = re.compile(r"(?<![\d:])(\d+):(\d)(?![\d:])")
# Fix: upstream consumed the right-hand digit of each operation, so in chains every second
# operator was missed ("2*3*4" came out as "two times three four"). Lookarounds read them all.
_MULTIPLY = re.compile(r"(?<=\d)\s?\*\s?(?=\d)")
_ADD = re.compile(r"(?<=\d)\s?\+\s?(?=\d)")
# As upstream, the minus rule needs no digit on the left, so "-1" is " minus 1".
_SUBTRACT = re.compile(r"\s?-\s?(?=\d)")
# A run of three or more slash-separated numbers is read with "slash" (spec step 11). Fix: it is
# matched before the pairwise division rule, which upstream tore such runs apart with.
_SLASH_RUN = re.compile(r"(?<![\d/])\d+(?:/\d+){2,}(?![\d/])")
_DIVIDE = re.compile(r"(?<=\d)\s?/\s?(?=\d)")
_ORDINAL = re.compile(rf"(?<!\d)\d{{1,{MAX_SPOKEN_DIGITS}}}(?:st|nd|rd|th)")
_LETTER_DIGIT_BOUNDARY = re.compile(r"(?<=\d)(?=[a-z])|(?<=[a-z])(?=\d)", re.IGNORECASE)
_INTEGER = re.compile(r"\d+")


def normalize_numbers(text: str) -> str:
    """Rewrite every number-like pattern and then every remaining digit run as words."""
    text = _NUMBER_SIGN.sub(r"number \1", text)
    text = _DOLLAR_MAGNITUDE.sub(_expand_dollar_magnitude, text)
    text = _MAGNITUDE_SUFFIX.sub(_expand_magnitude, text)
    text = _THOUSANDS_GROUPS.sub(lambda match: match.group(0).replace(",", ""), text)
    text = _LIST_COMMA.sub(", ", text)
    text = _DATE.sub(lambda match: " dash ".join(match.groups()), text)
    text = _TIME.sub(_expand_time, text)
    text = _POUNDS.sub(r"\1 pounds", text)
    text = _DOLLARS.sub(_expand_dollars, text)
    text = _EUROS.sub(_expand_euros, text)
    text = _RATIO.sub(r"\1 to \2", text)
    text = _DECIMAL.sub(_expand_decimal, text)
    text = _MULTIPLY.sub(" times ", text)
    text = _SLASH_RUN.sub(lambda match: " slash ".join(match.group(0).split("/")), text)
    text = _DIVIDE.sub(" over ", text)
    text = _ADD.sub(" plus ", text)
    text = _SUBTRACT.sub(" minus ", text)
    text = _ORDINAL.sub(lambda match: _words(match.group(0), andword=""), text)
    # Upstream ran its consuming split twice to reach every boundary; lookarounds need one pass.
    text = _LETTER_DIGIT_BOUNDARY.sub(" ", text)
    return _INTEGER.sub(lambda match: spoken_integer(match.group(0)), text)


def _words(number: int | str, andword: str = "and", zero: str = "zero", group: int = 0) -> str:
    """inflect's number_to_words, which returns a list only when asked (wantlist=True)."""
    words = _inflect().number_to_words(str(number), andword=andword, zero=zero, group=group)
    if not isinstance(words, str):
        raise TypeError(f"inflect returned {type(words).__name__} for {number!r}")
    return words


def spoken_integer(digits: str) -> str:
    """Say a digit run the way people read it: 1999 as a year, 1100 as "eleven hundred"."""
    if len(digits) > MAX_SPOKEN_DIGITS:
        # Fix: upstream crashed here (inflect's range ends at 36 digits).
        return " ".join(_words(digit) for digit in digits)
    number = int(digits)
    if not 1000 < number < 3000:
        return _words(number, andword="")
    if number == 2000:
        return "two thousand"
    if 2000 < number < 2010:
        return "two thousand " + _words(number % 100)
    if number % 100 == 0:
        return _words(number // 100) + " hundred"
    return _words(number, andword="", zero="oh", group=2).replace(", ", " ")


def _expand_dollar_magnitude(match: re.Match[str]) -> str:
    magnitude = match.group(2).lower()
    return f"{match.group(1)} {_MAGNITUDES.get(magnitude, magnitude)} dollars"


def _expand_magnitude(match: re.Match[str]) -> str:
    return f"{match.group(1)} {_MAGNITUDES[match.group(2).lower()]}"


def _clock_field(value: str, when_zero: str) -> str:
    """Minutes and seconds as read on a clock: "05" is "oh 5"."""
    if value == "00":
        return when_zero
    if value.startswith("0"):
        return f"oh {value[1]}"
    return value


def _expand_time(match: re.Match[str]) -> str:
    hours, minutes, seconds = match.groups()
    if seconds is None:
        if minutes != "00":
            return f"{hours} {_clock_field(minutes, '')}"
        if int(hours) == 0:
            return "0"
        if int(hours) > 12:
            # Fix: upstream said "13 minutes" for "13:00"; a 24-hour time is "thirteen hundred".
            return f"{hours} hundred"
        return f"{hours} o'clock"
    # Fix: upstream rendered minutes such as "15" in "1:15:30" from a Python set literal
    # ("{'15'}"); every field now goes through the same clock reading.
    if int(hours) != 0:
        return f"{hours} {_clock_field(minutes, 'oh oh')} {_clock_field(seconds, '')}"
    if minutes != "00":
        return f"{minutes} {_clock_field(seconds, 'oh oh')}"
    return seconds


def _expand_dollars(match: re.Match[str]) -> str:
    return _spoken_amount(match.group(1), "dollar")


def _expand_euros(match: re.Match[str]) -> str:
    if match.group(1) is None:
        return f"{match.group(2)} euros"
    return _spoken_amount(match.group(1), "euro")


def _spoken_amount(amount: str, currency: str) -> str:
    parts = amount.split(".")
    # Fix: upstream read "$1.5" as "1 dollar, 5 cents" and "$2.475" as "475 cents". One digit
    # after the point is tens of cents; more than two digits are not cents, so the amount is
    # read as a decimal number of dollars, like the malformed "$1.2.3".
    if len(parts) > 2 or (len(parts) == 2 and len(parts[1]) > 2):
        return f"{amount} {currency}s"
    dollars = int(parts[0]) if parts[0] else 0
    cents = int(parts[1].ljust(2, "0")) if len(parts) == 2 else 0
    dollar_words = f"{dollars} {currency}" + ("" if dollars == 1 else "s")
    cent_words = f"{cents} cent" + ("" if cents == 1 else "s")
    if dollars and cents:
        return f"{dollar_words}, {cent_words}"
    if dollars:
        return dollar_words
    if cents:
        return cent_words
    return f"zero {currency}s"


def _expand_decimal(match: re.Match[str]) -> str:
    whole, *fractions = match.group(0).split(".")
    return whole + "".join(f" point {' '.join(fraction)}" for fraction in fractions)
