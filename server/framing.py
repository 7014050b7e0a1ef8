"""Wire framings: turn the event model into bytes. Pure functions, no IO (see h11's writers).

Two framings share one shape (`Framing`): `encode(stream_id, seq, event) -> bytes`, a keep-alive frame, an
opening frame and a reconnection hint.

* `SSEFraming`, ``text/event-stream`` (WHATWG HTML §9.2 "Server-sent events"): every event carries
  ``id: <stream-id>/<seq>`` so a reconnecting browser sends ``Last-Event-ID`` and resumes after that event;
  deltas are default ``message`` events with JSON data ``{"content": ...}``; the end is ``event: done``; failures
  are ``event: error`` with ``{"error": {...}}``.
* `NDJSONFraming`, ``application/x-ndjson``: one compact JSON object per line, ``{"type": "delta" | "done" |
  "error", "seq": n, ...}``; the stream's id is the response's ``X-Stream-Id``.
* The framings that keep state per response, made per reader by their endpoints: `OpenAIChunkFraming` and
  `OpenAICompletionFraming` (`server/openai_chunks.py`, ``/v1/chat/completions``) and `UIMessageStreamFraming`
  (`server/ui_stream.py`, ``/api/ui-chat``), re-exported here.

The general SSE encoder `encode_sse` refuses input that would change the framing (a line break in an event name or
id, a NUL in an id, a ``retry`` that is not a non-negative integer) instead of silently altering it: a caller that
passes such a value has a bug, and a quiet fix would hide an injection. Data is split on CR, LF and CRLF into
several ``data:`` lines, which a spec decoder joins back with LF.
"""

from __future__ import annotations

import re
from typing import Final, Protocol

from .events import Delta, Done, Error, Event, Reasoning, Refusal, ToolCallDelta
from .json_wire import json_bytes
from .json_wire import json_str as _json_str

# The framings that keep state per response live in modules of their own; this module is still the one to import
# framings from. A handler makes one of these per reader (they are not in FRAMINGS, which holds shared instances).
from .openai_chunks import OpenAIChunkFraming, OpenAICompletionFraming
from .ui_stream import UIMessageStreamFraming

__all__ = [
    "FRAMINGS",
    "NDJSONFraming",
    "OpenAIChunkFraming",
    "OpenAICompletionFraming",
    "SSEFieldError",
    "SSEFraming",
    "UIMessageStreamFraming",
    "encode_sse",
    "encode_sse_comment",
    "json_bytes",
]


class SSEFieldError(ValueError):
    """A value that cannot be written as the SSE field it was meant for."""


def _split_lines(text: str) -> list[str]:
    # WHATWG HTML §9.2.5: a line ends at CRLF, a lone LF or a lone CR. str.splitlines() would also split on
    # U+2028, VT, FF and others, which SSE treats as ordinary characters, so do it by hand.
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


_SURROGATES: Final = re.compile("[\ud800-\udfff]")


def _utf8(text: str) -> bytes:
    # SSE streams are always UTF-8 (§9.2.5); a lone surrogate becomes U+FFFD, which is what a decoder would
    # produce from any invalid sequence, rather than crashing the stream. (str.encode's "replace" writes "?".)
    try:
        return text.encode()
    except UnicodeEncodeError:
        return _SURROGATES.sub("\ufffd", text).encode()


def encode_sse(
    data: str | None = None,
    *,
    event: str | None = None,
    id: str | None = None,
    retry: int | None = None,
) -> bytes:
    """Encode one SSE event block, terminated by a blank line.

    >>> encode_sse("line one\\nline two", event="note", id="7")
    b'event: note\\nid: 7\\ndata: line one\\ndata: line two\\n\\n'
    >>> encode_sse(retry=3000)
    b'retry: 3000\\n\\n'
    """
    parts: list[str] = []
    if event is not None:
        if "\r" in event or "\n" in event:
            raise SSEFieldError("an SSE event name cannot contain a line break")
        parts.append(f"event: {event}\n")
    if id is not None:
        if "\r" in id or "\n" in id:
            raise SSEFieldError("an SSE id cannot contain a line break")
        if "\0" in id:
            # §9.2.6: an id field whose value contains NUL is ignored by the browser, so it would never
            # come back as Last-Event-ID.
            raise SSEFieldError("an SSE id cannot contain NUL")
        parts.append(f"id: {id}\n")
    if retry is not None:
        # §9.2.6: retry is honoured only when it consists of ASCII digits.
        if isinstance(retry, bool) or not isinstance(retry, int) or retry < 0:
            raise SSEFieldError("an SSE retry must be a non-negative integer of milliseconds")
        parts.append(f"retry: {retry}\n")
    if data is not None:
        parts.extend(f"data: {line}\n" for line in _split_lines(data))
    if not parts:
        raise SSEFieldError("an SSE event needs at least one field")
    parts.append("\n")
    return _utf8("".join(parts))


def encode_sse_comment(text: str = "") -> bytes:
    """A comment block (ignored by decoders): used as a heartbeat. Each line of `text` becomes its own comment.

    >>> encode_sse_comment("ping")
    b': ping\\n\\n'
    """
    lines = _split_lines(text)
    return _utf8("".join(f": {line}\n" if line else ":\n" for line in lines) + "\n")


class Framing(Protocol):
    """How one stream's events become bytes on the wire."""

    name: str
    content_type: str

    def encode(self, stream_id: str, seq: int, event: Event) -> bytes:
        """The frame for `event`, the `seq`-th event (1-based) of stream `stream_id`."""
        ...

    def keepalive(self) -> bytes:
        """A frame that standard readers of this format skip, to keep idle connections open."""
        ...

    def opening(self, stream_id: str, retry_ms: int | None = None) -> bytes:
        """What a resumable stream sends at once, before any event (may be empty)."""
        ...

    def reconnect_hint(self, retry_ms: int) -> bytes:
        """A frame asking the client to wait `retry_ms` before reconnecting (may be empty)."""
        ...


def _done_payload(event: Done) -> dict[str, object]:
    payload: dict[str, object] = {"finish_reason": event.finish_reason}
    if event.usage is not None:
        payload["usage"] = event.usage.as_dict()
    return payload


def _error_payload(event: Error) -> dict[str, object]:
    return {"error": {"type": event.type, "message": event.message}}


def _tool_call_payload(event: ToolCallDelta) -> dict[str, object]:
    return {"index": event.index, "id": event.id, "name": event.name, "arguments": event.arguments}


# The SSE event name and NDJSON type of each kind of progress other than answer text.
_PROGRESS_NAMES: Final = {Reasoning: "reasoning", Refusal: "refusal", ToolCallDelta: "tool_call"}


class SSEFraming:
    """``text/event-stream``: deltas as default events, then ``done`` or ``error``. Every event has an id."""

    name = "sse"
    content_type = "text/event-stream; charset=utf-8"

    def encode(self, stream_id: str, seq: int, event: Event) -> bytes:
        # The id is "<stream-id>/<seq>": stream ids are hex (new_stream_id) and seq an int, so the field can hold
        # no line break or NUL (§9.2.6), and Last-Event-ID names both the stream and the place in it.
        if isinstance(event, Delta):
            # JSON never contains a raw CR or LF, so the payload is always exactly one data line and this
            # is the spec's framing without a split.
            return b'id: %s/%d\ndata: {"content":%s}\n\n' % (stream_id.encode(), seq, _json_str(event.content))
        if isinstance(event, (Reasoning, Refusal)):
            return b'id: %s/%d\nevent: %s\ndata: {"content":%s}\n\n' % (
                stream_id.encode(),
                seq,
                _PROGRESS_NAMES[type(event)].encode(),
                _json_str(event.content),
            )
        if isinstance(event, ToolCallDelta):
            return b"id: %s/%d\nevent: tool_call\ndata: %s\n\n" % (
                stream_id.encode(),
                seq,
                json_bytes(_tool_call_payload(event)),
            )
        if isinstance(event, Done):
            return b"id: %s/%d\nevent: done\ndata: %s\n\n" % (
                stream_id.encode(),
                seq,
                json_bytes(_done_payload(event)),
            )
        return b"id: %s/%d\nevent: error\ndata: %s\n\n" % (
            stream_id.encode(),
            seq,
            json_bytes(_error_payload(event)),
        )

    def keepalive(self) -> bytes:
        return b": ping\n\n"

    def opening(self, stream_id: str, retry_ms: int | None = None) -> bytes:
        """The first block of a resumable stream, before any token: ``event: stream`` with the stream's id.

        Its ``id`` sets the browser's last event id as it is dispatched (§9.2.6 "dispatch the event", step 1), so a
        connection cut before the first token reconnects with ``Last-Event-ID`` too; its data gives a page the id
        it needs to stop the stream (``DELETE /api/streams/{id}``); ``retry`` sets the reconnection delay. A client
        listening only for ``message`` events never sees it.
        """
        return encode_sse(
            json_bytes({"stream_id": stream_id}).decode(), event="stream", id=f"{stream_id}/0", retry=retry_ms
        )

    def reconnect_hint(self, retry_ms: int) -> bytes:
        """A block that only sets the browser's reconnection delay (§9.2.6 ``retry``)."""
        return encode_sse(retry=retry_ms)


class NDJSONFraming:
    """``application/x-ndjson``: one JSON object per line with a ``type`` of delta, done or error."""

    name = "ndjson"
    content_type = "application/x-ndjson; charset=utf-8"

    def encode(self, stream_id: str, seq: int, event: Event) -> bytes:
        if isinstance(event, Delta):
            return b'{"type":"delta","seq":%d,"content":%s}\n' % (seq, _json_str(event.content))
        if isinstance(event, (Reasoning, Refusal)):
            return b'{"type":"%s","seq":%d,"content":%s}\n' % (
                _PROGRESS_NAMES[type(event)].encode(),
                seq,
                _json_str(event.content),
            )
        if isinstance(event, ToolCallDelta):
            return json_bytes({"type": "tool_call", "seq": seq, **_tool_call_payload(event)}) + b"\n"
        if isinstance(event, Done):
            return json_bytes({"type": "done", "seq": seq, **_done_payload(event)}) + b"\n"
        return json_bytes({"type": "error", "seq": seq, **_error_payload(event)}) + b"\n"

    def opening(self, stream_id: str, retry_ms: int | None = None) -> bytes:
        return b""  # the response's X-Stream-Id names the stream; seq starts at 1

    def reconnect_hint(self, retry_ms: int) -> bytes:
        return b""

    def keepalive(self) -> bytes:
        # A documented no-op object rather than a blank line: strict NDJSON readers reject empty lines, while
        # every reader of this API already switches on "type".
        return b'{"type":"ping"}\n'


FRAMINGS: Final[dict[str, Framing]] = {"sse": SSEFraming(), "ndjson": NDJSONFraming()}
