"""The strict Wyoming reader: every malformed input is a ProtocolError that says what is wrong.

Each case is fed through `read_event` on a real asyncio StreamReader, as the server reads.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from wyoming.event import Event

from wyoming_soprano.framing import MAX_NESTING, ProtocolError, read_event

STREAM_LIMIT = 1 << 16
"""asyncio's default line limit, as the server's connections have."""


def read(raw: bytes) -> Event | None:
    async def scenario() -> Event | None:
        reader = asyncio.StreamReader(limit=STREAM_LIMIT)
        reader.feed_data(raw)
        reader.feed_eof()
        return await read_event(reader)

    return asyncio.run(scenario())


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def with_data(data: bytes) -> bytes:
    return b'{"type": "synthesize", "data_length": %d}\n' % len(data) + data


BAD_INPUT = {
    "header nested 30,000 deep": (
        b'{"type": "describe", "data": {"a": ' + nested(30_000) + b"}}\n",
        "event header is nested deeper than 32 levels",
    ),
    "data nested 100,000 deep": (
        with_data(b'{"a": ' + nested(100_000) + b"}"),
        "event data is nested deeper than 32 levels",
    ),
    "header one level too deep": (
        b'{"type": "describe", "data": {"a": ' + nested(MAX_NESTING - 1) + b"}}\n",
        "event header is nested deeper than 32 levels",
    ),
    "a 5000-digit number": (
        b'{"type": "synthesize", "data": {"text": "hi", "n": ' + b"9" * 5000 + b"}}\n",
        "event header has an integer with too many digits (Exceeds the limit (4300 digits)",
    ),
    "a 5000-digit number in the data": (
        with_data(b'{"n": ' + b"1" * 5000 + b"}"),
        "event data has an integer with too many digits",
    ),
    "invalid UTF-8": (b'{"type": "describe\xff"}\n', "event header is not valid UTF-8"),
    "invalid JSON": (
        b'{"type": "describe",}\n',
        "event header is not valid JSON: Expecting property name enclosed in double quotes",
    ),
}


@pytest.mark.parametrize(("raw", "message"), BAD_INPUT.values(), ids=BAD_INPUT.keys())
def test_bad_input_is_a_protocol_error_that_says_why(raw: bytes, message: str) -> None:
    with pytest.raises(ProtocolError) as raised:
        read(raw)
    assert str(raised.value).startswith(message)


def test_nesting_up_to_the_bound_and_brackets_in_strings_are_accepted() -> None:
    value = nested(MAX_NESTING - 2)  # inside the header object and its data object
    event = read(b'{"type": "describe", "data": {"a": ' + value + b"}}\n")
    assert event is not None
    assert json.dumps(event.data["a"], separators=(",", ":")).encode() == value

    text = '[{"' * 100 + "\\"
    event = read(with_data(json.dumps({"text": text}).encode()))
    assert event is not None and event.data == {"text": text}
