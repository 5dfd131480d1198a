"""Versions, codes and IDs, read the way people read them out rather than as quantities.

"v2.1.3" is "version two point one point three", "ABC-123" "a b c one two three", an IP address
goes digit by digit with "dot", and a ZIP code or a long "#" number is read digit by digit.
"""

from __future__ import annotations

import re

from soprano.text.phone import spoken_digits

_VERSION = re.compile(r"(?<![\w.])v(\d+(?:\.\d+)+)(?![\w]|\.\d)")
# Fix: upstream read "1.17.1" as a decimal ("one point one seven point one"); a number with two
# or more points is a version or a code, whose parts are whole numbers.
_DOTTED_PARTS = re.compile(r"(?<![\w.$£€])\d+(?:\.\d+){2,}(?![\w]|\.\d)")
_CODE = re.compile(r"(?<![\w-])([A-Z]{1,5})-(\d+)(?![\w]|[-.]\d)")
_ZIP_CODE = re.compile(
    r"\b(?:([A-Z]{2})|((?:ZIP|[Zz]ip)(?: [Cc]ode)?(?: is)?:?)) (\d{5})(?:-(\d{4}))?\b"
)
"""After a state ("CA 90210") or the word zip; any other five digits stay a number."""
# Fix: upstream read "#1234" as "number twelve thirty-four" and "CA 90210" as "ninety thousand,
# two hundred ten"; an ID or a ZIP code is read digit by digit.
_LONG_NUMBER_SIGN = re.compile(r"#(\d{4,})\b")


def expand_codes(text: str) -> str:
    """Rewrite versions, IP addresses, letter-number codes and ZIP codes into spoken parts."""
    text = _VERSION.sub(lambda match: "version " + _dotted(match.group(1)), text)
    text = _DOTTED_PARTS.sub(lambda match: _dotted(match.group(0)), text)
    text = _ZIP_CODE.sub(_expand_zip_code, text)
    text = _LONG_NUMBER_SIGN.sub(lambda match: "number " + spoken_digits(match.group(1)), text)
    return _CODE.sub(_expand_code, text)


def _dotted(number: str) -> str:
    parts = number.split(".")
    if len(parts) == 4 and len(parts[0]) > 1 and all(int(part) < 256 for part in parts):
        return " dot ".join(spoken_digits(part) for part in parts)
    return " point ".join(parts)


def _expand_code(match: re.Match[str]) -> str:
    """ "ABC-123": short letter runs are spelled, three or more digits read one by one."""
    letters, digits = match.groups()
    letters = " ".join(letters.lower()) if len(letters) <= 4 else letters.lower()
    return f"{letters} {spoken_digits(digits) if len(digits) >= 3 else digits}"


def _expand_zip_code(match: re.Match[str]) -> str:
    state, label, digits, extension = match.groups()
    spoken = spoken_digits(digits) + (f", {spoken_digits(extension)}" if extension else "")
    if label:
        return f"{label} {spoken}"
    return f"{' '.join(state.lower())} {spoken}"
