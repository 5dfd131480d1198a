"""Dates, clock times, ranges and decades, rewritten into forms the number rules read aloud.

"12/25/2026" is "december 25th, 2026" (then "december twenty-fifth, twenty twenty-six"), never
"twelve dash twenty-five". Numeric dates are read month first, as in American English, unless
the first field cannot be a month (25/12/2026); "3:30pm" is "3:30 p m", a range "9–5" or
"10:00-11:30" is read with "to". Runs before transliteration, which would flatten "–" to "-".
"""

from __future__ import annotations

import calendar
import re

from soprano.text.numbers import spoken_integer

_MONTHS = [name.lower() for name in calendar.month_name[1:]]
_MONTH_BY_NAME = {name: index for index, name in enumerate(_MONTHS, 1)}
_MONTH_BY_NAME.update({name[:3]: index for index, name in enumerate(_MONTHS, 1)})
_MONTH_BY_NAME["sept"] = 9
_MONTH_NAME = "|".join(
    f"{name[0].upper()}{name[1:]}" for name in sorted(_MONTH_BY_NAME, key=len, reverse=True)
)
_DAYS_IN_MONTH = [31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]

_ISO_DATE = re.compile(r"(?<![\d-])(\d{4})-(\d{2})-(\d{2})(?![\d-])")
_NUMERIC_DATE = re.compile(
    r"(?<![\d/.-])(\d{1,2})([/-])(\d{1,2})\2(\d{4}|\d{2})(?![\d/-])"
    r"|(?<![\d/.-])(\d{1,2})(\.)(\d{1,2})\.(\d{4})(?![\d.])"
)
_MONTH_DAY = re.compile(
    rf"\b({_MONTH_NAME})\.? (\d{{1,2}})(?:st|nd|rd|th)?\b(?!:\d|[.,]\d)(?:,? (\d{{4}})\b)?"
)
_DAY_MONTH = re.compile(
    rf"(?<![\d.,])(\d{{1,2}})(?:st|nd|rd|th)? (?:of )?({_MONTH_NAME})\b\.?(?:,? (\d{{4}})\b)?"
)
# Fix: upstream read "1990s" as "nineteen ninety s".
_DECADE = re.compile(r"(?<![\w.,])(?:(\d{3}0)|['’](\d0)|(?<=the )(\d0))s\b")
"""1990s, '90s, the 90s; a bare "30s" is left to the units (thirty seconds)."""

_MERIDIEM = r"\s?(?:[aApP]\.?\s?[mM]\b\.?)"
_CLOCK = rf"\d{{1,2}}(?::[0-5]\d)?(?:{_MERIDIEM})?"
_TIME_RANGE = re.compile(rf"(?<![\d:.])({_CLOCK})\s?[-–]\s?({_CLOCK})(?![\d:])")
_NUMBER_RANGE = re.compile(r"(?<=\d)\s?–\s?(?=[-−]?\d)")
# Fix: upstream read a hyphen between numbers as a minus: "20-25 minutes" was "twenty minus
# twenty-five minutes", "2020-2024" "twenty twenty minus twenty twenty-four". Between two years,
# or before a counted plural noun, it is a range; "10-3" and "5-3 is 2" stay arithmetic.
_YEAR_RANGE = re.compile(r"(?<![\d.,-])([12]\d{3})-([12]\d{3})(?![\d.,-])")
_COUNTED_RANGE = re.compile(
    r"(?<![\d.,:-])(\d+(?:\.\d+)?)-(\d+(?:\.\d+)?)(?= (?:[a-z]{2,}s|people|feet|percent)\b)"
)
_WORD_RANGE = re.compile(r"(?<=[A-Za-z])–(?=[A-Z])")
# Fix: upstream left "pm" a word ("three thirty pm"), which the model says as one syllable; the
# letters are spelled, "p m". A hyphen between clock times is a range, not upstream's minus.
_MERIDIEM_TIME = re.compile(
    r"(?<![\d:.])(\d{1,2})(?::([0-5]\d))?\s?([aApP])\.?\s?[mM]\b(\.(?!\s+[A-Z]|\s*$))?"
    r"(?: ([ECMP][SD]T|UTC|GMT|CET|CEST|BST)\b)?"
)
"""A 12-hour time, maybe with a time zone, whose letters are spelled ("p m e s t")."""


def expand_dates_and_times(text: str) -> str:
    """Dates to "month day, year", ranges to "a to b", and 12-hour times to "h:mm a m"."""
    text = _ISO_DATE.sub(_expand_iso_date, text)
    text = _NUMERIC_DATE.sub(_expand_numeric_date, text)
    text = _MONTH_DAY.sub(_expand_month_day, text)
    text = _DAY_MONTH.sub(_expand_day_month, text)
    text = _DECADE.sub(_expand_decade, text)
    text = _TIME_RANGE.sub(_expand_time_range, text)
    text = _NUMBER_RANGE.sub(" to ", text)
    text = _YEAR_RANGE.sub(r"\1 to \2", text)
    text = _COUNTED_RANGE.sub(r"\1 to \2", text)
    text = _WORD_RANGE.sub(" to ", text)
    return _MERIDIEM_TIME.sub(_expand_meridiem_time, text)


def _valid(month: int, day: int) -> bool:
    return 1 <= month <= 12 and 1 <= day <= _DAYS_IN_MONTH[month - 1]


def _month_first(month: int, day: int, year: str | None) -> str:
    return f"{_MONTHS[month - 1]} {day}{_ordinal_suffix(day)}" + (f", {year}" if year else "")


def _day_first(day: int, month: int, year: str | None) -> str:
    spoken = f"the {day}{_ordinal_suffix(day)} of {_MONTHS[month - 1]}"
    return spoken + (f", {year}" if year else "")


def _ordinal_suffix(day: int) -> str:
    if 10 < day % 100 < 14:
        return "th"
    return {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")


def _expand_iso_date(match: re.Match[str]) -> str:
    year, month, day = match.group(1), int(match.group(2)), int(match.group(3))
    return _month_first(month, day, year) if _valid(month, day) else match.group(0)


def _expand_numeric_date(match: re.Match[str]) -> str:
    groups = match.groups()
    first, _, second, year = groups[:4] if groups[0] is not None else groups[4:]
    a, b = int(first), int(second)
    # Fix: upstream read every such date as "a dash b dash year".
    if _valid(a, b):
        return _month_first(a, b, year)
    if _valid(b, a):
        return _day_first(a, b, year)
    return match.group(0)


def _expand_month_day(match: re.Match[str]) -> str:
    month = _MONTH_BY_NAME[match.group(1).lower()]
    day = int(match.group(2))
    if not _valid(month, day):
        return match.group(0)
    return _month_first(month, day, match.group(3))


def _expand_day_month(match: re.Match[str]) -> str:
    day = int(match.group(1))
    month = _MONTH_BY_NAME[match.group(2).lower()]
    if not _valid(month, day):
        return match.group(0)
    spoken = _day_first(day, month, match.group(3))
    # "the 3rd of May" has its article already.
    return spoken[4:] if match.string[: match.start()].lower().endswith("the ") else spoken


def _expand_decade(match: re.Match[str]) -> str:
    """ "1990s" as "nineteen nineties": the spoken year, made plural."""
    digits = match.group(1) or match.group(2) or match.group(3)
    words = spoken_integer(digits)
    return words[:-1] + "ies" if words.endswith("y") else words + "s"


def _expand_time_range(match: re.Match[str]) -> str:
    start, end = match.groups()
    # A hyphen between bare numbers stays arithmetic ("10-3"); a clock on either side is a range.
    if not any(":" in part or re.search(_MERIDIEM, part) for part in (start, end)):
        return match.group(0)
    return f"{start} to {end}"


def _expand_meridiem_time(match: re.Match[str]) -> str:
    hours, minutes, half, _, zone = match.groups()
    if not 1 <= int(hours) <= 12:
        return match.group(0)
    clock = hours if minutes in (None, "00") else f"{hours}:{minutes}"
    return f"{clock} {half.lower()} m" + (f" {' '.join(zone.lower())}" if zone else "")
