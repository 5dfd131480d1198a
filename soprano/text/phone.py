"""Phone numbers, read digit by digit in their groups: "555-1234" is never a subtraction.

Callers dictate numbers as groups of digits, so each group is read one digit at a time and the
groups are separated by a short pause ("five five five, one two three four").
"""

from __future__ import annotations

import re

DIGIT_WORDS = {
    digit: word
    for digit, word in zip(
        "0123456789",
        ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"],
        strict=True,
    )
}

_PHONE_NUMBERS = [
    # International: +1 555 123 4567, +44 20 7946 0958, +1-555-123-4567.
    re.compile(r"(?<![\w+])\+\d{1,3}(?:[ .-]\(?\d{1,4}\)?){2,5}(?![\d.-]\d)"),
    # North American: (555) 123-4567, 555-123-4567, 555.123.4567, 1-800-555-0199.
    re.compile(r"(?<![\w(.-])(?:1[-. ])?(?:\(\d{3}\) ?|\d{3}[-. ])\d{3}[-. ]\d{4}(?![\w.-]\d|\d)"),
    # National with a trunk zero: 0800 123 456, 020 7946 0958.
    re.compile(r"(?<![\w.,-])0\d{2,4}(?:[ -]\d{3,4}){1,3}(?![\w.-]\d|\d)"),
    # Local: 555-1234.
    re.compile(r"(?<![\w.-])\d{3}-\d{4}(?![\w.-]\d|\d)"),
]


def spoken_digits(digits: str) -> str:
    """ "042" as "zero four two"."""
    return " ".join(DIGIT_WORDS[digit] for digit in digits)


def expand_phone_numbers(text: str) -> str:
    """Rewrite every phone number into its groups of spoken digits."""
    for pattern in _PHONE_NUMBERS:
        text = pattern.sub(_expand_phone_number, text)
    return text


def _expand_phone_number(match: re.Match[str]) -> str:
    number = match.group(0)
    groups = ", ".join(spoken_digits(group) for group in re.findall(r"\d+", number))
    return f"plus {groups}" if number.startswith("+") else groups
