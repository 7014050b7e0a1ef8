"""A strict NDJSON reader for the framing tests: independent of `server/framing.py`.

Strict means: the stream is UTF-8 (no replacement), lines end with LF only (a CR is an error, not whitespace),
every line is exactly one JSON object (no blank lines, no scalars, no arrays), the JSON is RFC 8259 JSON
(``NaN``/``Infinity`` are rejected), and the stream ends with LF (an unfinished last line is an error).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

__all__ = ["NDJSONDecoder", "NDJSONError", "decode_ndjson"]


class NDJSONError(ValueError):
    """The bytes are not strict NDJSON."""


def _reject_constant(name: str) -> Any:
    raise NDJSONError(f"{name} is not JSON (RFC 8259 §6)")


def _parse_line(raw: bytes) -> dict[str, Any]:
    if not raw:
        raise NDJSONError("blank line")
    if b"\r" in raw:
        raise NDJSONError("CR in a line: lines end with LF only")
    try:
        text = raw.decode("utf-8")  # strict: no BOM tolerance, no replacement
    except UnicodeDecodeError as exc:
        raise NDJSONError(f"not UTF-8: {exc}") from None
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise NDJSONError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise NDJSONError(f"a line is a JSON {type(value).__name__}, not an object")
    return value


class NDJSONDecoder:
    """Incremental: `feed` any byte chunking, then `end`. An LF byte never occurs inside a UTF-8 sequence, so
    splitting bytes on LF before decoding is exact."""

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, chunk: bytes) -> list[dict[str, Any]]:
        *lines, self._pending = (self._pending + chunk).split(b"\n")
        return [_parse_line(line) for line in lines]

    def end(self) -> list[dict[str, Any]]:
        if self._pending:
            raise NDJSONError("the stream ends inside a line (no final LF)")
        return []


def decode_ndjson(chunks: bytes | Iterable[bytes]) -> list[dict[str, Any]]:
    decoder = NDJSONDecoder()
    objects: list[dict[str, Any]] = []
    for chunk in [chunks] if isinstance(chunks, bytes) else chunks:
        objects.extend(decoder.feed(chunk))
    objects.extend(decoder.end())
    return objects
