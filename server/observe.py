"""What the core tells observers (metrics, logs), at a few well-defined points, and the request id. No IO.

    registry ─ stream_started(g, framing) · stream_ended(g) ─────┐
    registry ─ stream_closed(generation, seconds) ───────────────┤
    reader ─ reader_started(reader, resumed) · reader_ended ─────┼─▶ StreamObserver (Observers fans out)
    access middleware ─ request_refused(type, status) ───────────┘     ├─ server.metrics.RelayMetrics
                                                                       └─ server.logs.FailureLog

Each call is once per stream, per reader or per refused request, never per token: what happens per token
(events appended, bytes written) is counted on the generation and the reader as plain integers and read at the
end. An observer must not raise and must not block; the default `StreamObserver` does nothing.

The request id (``X-Request-Id``) travels in a context variable: the access middleware sets it in the handler's
task, and a generation's task, created from that task, starts with a copy of its context, so the provider sends
it upstream and the generation's log lines carry it without either being told.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from contextvars import ContextVar
from typing import TYPE_CHECKING

from .events import Done, Usage

if TYPE_CHECKING:
    from .generation import Generation
    from .reader import Reader

# Bounded and made of characters that are safe in a header, a log line and a JSON string without escaping: what
# common tracing ids use (UUIDs, W3C trace ids, ULIDs, AWS "Root=1-..." style ids without ';').
REQUEST_ID_MAX = 128
_REQUEST_ID = re.compile(rf"[A-Za-z0-9._:@/+=-]{{1,{REQUEST_ID_MAX}}}")

current_request_id: ContextVar[str | None] = ContextVar("llm_relay_request_id", default=None)


def accepted_request_id(header: str | None) -> str | None:
    """A client's ``X-Request-Id`` if it is well-formed (bounded, safe characters), else None.

    >>> accepted_request_id("3f2c-11ef.a"), accepted_request_id("a b"), accepted_request_id("x" * 129)
    ('3f2c-11ef.a', None, None)
    >>> accepted_request_id("line\\nbreak"), accepted_request_id("")
    (None, None)
    """
    if header is None or _REQUEST_ID.fullmatch(header) is None:
        return None
    return header


def new_request_id() -> str:
    """A fresh request id: 128 random bits, as hex."""
    return secrets.token_hex(16)


def request_id_for(header: str | None) -> str:
    """The client's well-formed ``X-Request-Id``, or a new one."""
    return accepted_request_id(header) or new_request_id()


def reported_usage(generation: Generation) -> Usage | None:
    """The token usage the upstream reported in its `Done`, if the generation ended so and its end is retained."""
    log = generation.log
    try:
        tail = log.since(log.last_seq - 1)
    except LookupError:
        return None
    end = tail[-1] if tail else None
    return end.usage if isinstance(end, Done) else None


class StreamObserver:
    """Told of streams, readers and refusals. Every method does nothing here; subclasses override what they need.

    `stream_started` and `stream_ended` come once per generation; `stream_closed` when its task has ended (the
    upstream closed) with the seconds since it ended, which for a cancelled generation (its last reader left, a
    stop, shutdown) is how long closing the upstream took. `reader_started` and `reader_ended` come once per client
    connection that reads a stream (`resumed`: it joined an existing generation).
    """

    def stream_started(self, generation: Generation, framing: str) -> None:
        return None

    def stream_ended(self, generation: Generation) -> None:
        return None

    def stream_closed(self, generation: Generation, seconds: float) -> None:
        return None

    def reader_started(self, reader: Reader, resumed: bool) -> None:
        return None

    def reader_ended(self, reader: Reader, resumed: bool) -> None:
        return None

    def request_refused(self, error_type: str, status: int) -> None:
        return None


class Observers(StreamObserver):
    """Several observers, told in order."""

    def __init__(self, observers: Sequence[StreamObserver]) -> None:
        self._observers = tuple(observers)

    def stream_started(self, generation: Generation, framing: str) -> None:
        for observer in self._observers:
            observer.stream_started(generation, framing)

    def stream_ended(self, generation: Generation) -> None:
        for observer in self._observers:
            observer.stream_ended(generation)

    def stream_closed(self, generation: Generation, seconds: float) -> None:
        for observer in self._observers:
            observer.stream_closed(generation, seconds)

    def reader_started(self, reader: Reader, resumed: bool) -> None:
        for observer in self._observers:
            observer.reader_started(reader, resumed)

    def reader_ended(self, reader: Reader, resumed: bool) -> None:
        for observer in self._observers:
            observer.reader_ended(reader, resumed)

    def request_refused(self, error_type: str, status: int) -> None:
        for observer in self._observers:
            observer.request_refused(error_type, status)


__all__ = [
    "REQUEST_ID_MAX",
    "Observers",
    "StreamObserver",
    "accepted_request_id",
    "current_request_id",
    "new_request_id",
    "reported_usage",
    "request_id_for",
]
