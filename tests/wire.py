"""Small helpers to read our two wire formats in HTTP tests (the framing tests use a full spec decoder)."""

from __future__ import annotations

import json
from typing import Any


def sse_events(body: bytes) -> list[tuple[str, Any, str | None]]:
    """(event type, decoded JSON data, id) for each event of an SSE body; comments are skipped."""
    events: list[tuple[str, Any, str | None]] = []
    for block in body.decode("utf-8").split("\n\n"):
        kind, data, event_id = "message", [], None
        for line in block.split("\n"):
            if not line or line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "event":
                kind = value
            elif name == "data":
                data.append(value)
            elif name == "id":
                event_id = value
        if data:
            events.append((kind, json.loads("\n".join(data)), event_id))
    return events


def sse_text(body: bytes) -> str:
    return "".join(data["content"] for kind, data, _ in sse_events(body) if kind == "message")


def ndjson_objects(body: bytes) -> list[dict[str, Any]]:
    text = body.decode("utf-8")
    assert text.endswith("\n") or not text
    return [json.loads(line) for line in text.split("\n")[:-1]]


def ndjson_text(body: bytes) -> str:
    return "".join(obj["content"] for obj in ndjson_objects(body) if obj["type"] == "delta")
