"""Measures after a number: "25°C" is "25 degrees celsius", "10 km/h" "10 kilometers per hour".

Weather, timer and device answers are full of unit symbols that the model cannot read. Each is
named after its number, singular only for exactly one ("1 degree", "1.5 degrees"), with a minus
for a negative value and "to" in a range ("5-10°C"). The digits are left for the number rules.
Runs before transliteration, which would turn "°" into "deg".
"""

from __future__ import annotations

import re

_UNITS: dict[str, tuple[str, str]] = {
    # Temperature ("°" alone is an angle or a temperature: "degrees" either way).
    "°C": ("degree celsius", "degrees celsius"),
    "ºC": ("degree celsius", "degrees celsius"),
    "℃": ("degree celsius", "degrees celsius"),
    "°F": ("degree fahrenheit", "degrees fahrenheit"),
    "ºF": ("degree fahrenheit", "degrees fahrenheit"),
    "℉": ("degree fahrenheit", "degrees fahrenheit"),
    "°": ("degree", "degrees"),
    "º": ("degree", "degrees"),
    # Speed.
    "km/h": ("kilometer per hour", "kilometers per hour"),
    "kmh": ("kilometer per hour", "kilometers per hour"),
    "kph": ("kilometer per hour", "kilometers per hour"),
    "mph": ("mile per hour", "miles per hour"),
    "m/s": ("meter per second", "meters per second"),
    "ft/s": ("foot per second", "feet per second"),
    "kn": ("knot", "knots"),
    # Distance and area.
    "mm": ("millimeter", "millimeters"),
    "cm": ("centimeter", "centimeters"),
    "km": ("kilometer", "kilometers"),
    "m": ("meter", "meters"),
    "mi": ("mile", "miles"),
    "ft": ("foot", "feet"),
    "yd": ("yard", "yards"),
    "m²": ("square meter", "square meters"),
    "km²": ("square kilometer", "square kilometers"),
    "ft²": ("square foot", "square feet"),
    "sq ft": ("square foot", "square feet"),
    # Weight.
    "mg": ("milligram", "milligrams"),
    "g": ("gram", "grams"),
    "kg": ("kilogram", "kilograms"),
    "lb": ("pound", "pounds"),
    "lbs": ("pound", "pounds"),
    "oz": ("ounce", "ounces"),
    # Volume.
    "ml": ("milliliter", "milliliters"),
    "mL": ("milliliter", "milliliters"),
    "l": ("liter", "liters"),
    "L": ("liter", "liters"),
    "gal": ("gallon", "gallons"),
    "fl oz": ("fluid ounce", "fluid ounces"),
    "tsp": ("teaspoon", "teaspoons"),
    "tbsp": ("tablespoon", "tablespoons"),
    # Pressure.
    "hPa": ("hectopascal", "hectopascals"),
    # Share.
    "%": ("percent", "percent"),
    # Data.
    "KB": ("kilobyte", "kilobytes"),
    "kB": ("kilobyte", "kilobytes"),
    "MB": ("megabyte", "megabytes"),
    "GB": ("gigabyte", "gigabytes"),
    "TB": ("terabyte", "terabytes"),
    "KiB": ("kibibyte", "kibibytes"),
    "MiB": ("mebibyte", "mebibytes"),
    "GiB": ("gibibyte", "gibibytes"),
    "kbps": ("kilobit per second", "kilobits per second"),
    "Mbps": ("megabit per second", "megabits per second"),
    "Gbps": ("gigabit per second", "gigabits per second"),
    # Power, energy, electricity, frequency.
    "W": ("watt", "watts"),
    "kW": ("kilowatt", "kilowatts"),
    "MW": ("megawatt", "megawatts"),
    "Wh": ("watt hour", "watt hours"),
    "kWh": ("kilowatt hour", "kilowatt hours"),
    "MWh": ("megawatt hour", "megawatt hours"),
    "mAh": ("milliamp hour", "milliamp hours"),
    "V": ("volt", "volts"),
    "mA": ("milliamp", "milliamps"),
    "Hz": ("hertz", "hertz"),
    "kHz": ("kilohertz", "kilohertz"),
    "MHz": ("megahertz", "megahertz"),
    "GHz": ("gigahertz", "gigahertz"),
    # Time.
    "ms": ("millisecond", "milliseconds"),
    "s": ("second", "seconds"),
    "sec": ("second", "seconds"),
    "secs": ("second", "seconds"),
    "min": ("minute", "minutes"),
    "mins": ("minute", "minutes"),
    "h": ("hour", "hours"),
    "hr": ("hour", "hours"),
    "hrs": ("hour", "hours"),
    "yr": ("year", "years"),
    "yrs": ("year", "years"),
}
"""Case-sensitive symbols after a number.

Fix: upstream read "100m" as "one hundred million" and "5s", "2h", "10 km" with the letters;
after a number a lower-case "m" is meters now (a capital "M" stays million), and "GB" is plural
where the number is not one ("8 GB" was "eight gigabyte")."""

_BARE_TEMPERATURE = {"C": _UNITS["°C"], "F": _UNITS["°F"]}
"""Weather shorthand "25C", "77F": only glued to the number, as "5 C" is too often not a unit."""

_NUMBER = r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?"
_UNIT_NAMES = "|".join(re.escape(unit) for unit in sorted(_UNITS, key=len, reverse=True))
# The sign is a minus only where it cannot be a hyphen or a subtraction ("5-3", "x-5").
_MEASURE = re.compile(
    rf"(?P<sign>(?<![\w.)])[-−])?(?<![\w.,$£€¥])(?<!\w-)(?P<low>{_NUMBER})"
    rf"(?:\s?[-–]\s?(?P<high>{_NUMBER}))?"
    rf"(?:\s?(?P<unit>{_UNIT_NAMES})|(?P<bare>[CF]))(?![\w²])"
)
_DURATION = re.compile(
    r"(?<![\w.])(?P<hours>\d+)\s?h(?:rs?)?\s?(?P<minutes>\d+)\s?m(?:ins?)?"
    r"(?:\s?(?P<seconds>\d+)\s?s(?:ecs?)?)?(?!\w)"
    r"|(?<![\w.])(?P<min>\d+)\s?m(?:ins?)?\s?(?P<sec>\d+)\s?s(?:ecs?)?(?!\w)"
)
"""Compound durations ("1h 30m", "5m30s"), where a lone "m" is minutes, not meters."""


_ARTICLE = re.compile(r"\b(?:[Aa]n?|[Tt]he|[Yy]our|[Mm]y) $")
_ATTRIBUTIVE = re.compile(
    r" (?:timer|alarm|countdown|battery|bulb|charger|heater|walk|drive|break)\b"
)
"""Before such a noun a measure is an adjective, singular: "a 30s timer", "a 9 V battery"."""


def expand_units(text: str) -> str:
    """Name the unit after every measured number; the number itself stays digits."""
    text = _DURATION.sub(_expand_duration, text)
    return _MEASURE.sub(_expand_measure, text)


def _counted(number: str, singular: str, plural: str) -> str:
    return f"{number} {singular if number == '1' else plural}"


def _expand_duration(match: re.Match[str]) -> str:
    hours, minutes, seconds = match.group("hours", "minutes", "seconds")
    if hours is None:
        minutes, seconds = match.group("min", "sec")
    parts = [] if hours is None else [_counted(hours, "hour", "hours")]
    parts.append(_counted(minutes, "minute", "minutes"))
    if seconds is not None:
        parts.append(_counted(seconds, "second", "seconds"))
    return " ".join(parts)


def _expand_measure(match: re.Match[str]) -> str:
    sign, low, high, unit, bare = match.group("sign", "low", "high", "unit", "bare")
    singular, plural = _UNITS[unit] if unit is not None else _BARE_TEMPERATURE[bare]
    amount = ("minus " if sign else "") + low + ("" if high is None else f" to {high}")
    attributive = _ATTRIBUTIVE.match(match.string, match.end()) and _ARTICLE.search(
        match.string, 0, match.start()
    )
    return f"{amount} {singular if (high or low) == '1' or attributive else plural}"
