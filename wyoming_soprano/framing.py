"""Reading Wyoming events strictly, so that no client input can raise inside the server.

`wyoming.event.async_read_event` turns invalid JSON into a silent disconnect but lets other bad
input escape as exceptions (a header that is a JSON list, a non-numeric `data_length`, a
`data_length` larger than what follows) and reads lengths without bounds. This reader accepts
the same framing (docs/wyoming.md, framing: header line, `data_length` bytes of JSON merged
over the header's `data`, `payload_length` bytes of payload; inline `data` without
`data_length` too) and reports everything else as a ProtocolError that the handler answers with
an `error` event.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

from wyoming.event import Event

MAX_DATA_BYTES = 1 << 20
"""Largest data segment accepted: a TTS request carries text, never megabytes of it."""

MAX_PAYLOAD_BYTES = 1 << 20
"""Largest payload accepted; a TTS server receives none, but must read past it."""

MAX_NESTING = 32
"""Deepest JSON nesting accepted; events need a few levels, and Python's parser recurses (a
RecursionError from 30,000 levels would escape as a crash of the connection's task)."""

_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_BRACKETS = frozenset(b"[]{}")
_NOT_BRACKETS = bytes(byte for byte in range(256) if byte not in _BRACKETS)


class ProtocolError(Exception):
    """The client sent bytes that are not a Wyoming event."""


async def read_event(reader: asyncio.StreamReader) -> Event | None:
    """The next event, or None when the client has closed its side."""
    line = b""
    while not line.strip():
        try:
            line = await reader.readline()
        except ValueError as error:  # StreamReader's way of saying "line over its limit"
            raise ProtocolError("event header line too long") from error
        if not line:
            return None
    header = _parse_object(line, "event header")
    event_type = header.get("type")
    if not isinstance(event_type, str):
        raise ProtocolError("event header has no string 'type'")
    data = header.get("data") or {}
    if not isinstance(data, dict):
        raise ProtocolError("event 'data' is not a JSON object")
    data_length = _length(header, "data_length", MAX_DATA_BYTES)
    payload_length = _length(header, "payload_length", MAX_PAYLOAD_BYTES)
    try:
        if data_length:
            data = {**data, **_parse_object(await reader.readexactly(data_length), "event data")}
        payload = await reader.readexactly(payload_length) if payload_length else None
    except asyncio.IncompleteReadError:
        return None
    return Event(type=event_type, data=data, payload=payload)


def _parse_object(raw: bytes, what: str) -> dict[str, Any]:
    if _nesting(raw) > MAX_NESTING:
        raise ProtocolError(f"{what} is nested deeper than {MAX_NESTING} levels")
    try:
        value = json.loads(raw)
    except UnicodeDecodeError as error:
        raise ProtocolError(f"{what} is not valid UTF-8") from error
    except json.JSONDecodeError as error:
        raise ProtocolError(f"{what} is not valid JSON: {error}") from error
    except ValueError as error:  # the only other: an integer longer than Python converts
        detail = str(error).split(";")[0]  # "Exceeds the limit (4300 digits) ...: value has N"
        raise ProtocolError(f"{what} has an integer with too many digits ({detail})") from error
    if not isinstance(value, dict):
        raise ProtocolError(f"{what} is not a JSON object")
    return value


def _nesting(raw: bytes) -> int:
    """How deeply the JSON text's arrays and objects nest (brackets inside strings aside), or 0
    where it has too few brackets to nest deeper than MAX_NESTING (the usual case: no scan)."""
    if raw.count(b"[") + raw.count(b"{") <= MAX_NESTING:
        return 0
    depth = deepest = 0
    for bracket in _JSON_STRING.sub(b"", raw).translate(None, _NOT_BRACKETS):
        depth += 1 if bracket in b"[{" else -1
        deepest = max(deepest, depth)
    return deepest


def _length(header: dict[str, Any], key: str, limit: int) -> int:
    value = header.get(key)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
        raise ProtocolError(f"'{key}' must be an integer from 0 to {limit}, got {value!r}")
    return value
