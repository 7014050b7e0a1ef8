"""Streams shared between instances: what a store keeps, and how, as pure values and functions. No IO.

A generation's log has one interface in two stores:

    append a batch      memory: `EventLog.append`        Redis: one XADD of the whole batch (`encode_batch`)
    read from an offset memory: `EventLog.since(seq)`    Redis: XRANGE from `entry_id(seq + 1)`
    follow              memory: `Generation.add_waiter`  Redis: XREAD BLOCK from the last entry read
    state               memory: `Generation.outcome`     Redis: a small hash (owner, status, last)
    expire              memory: the registry's retention Redis: PEXPIRE (the retention) on both keys

Readers on the producing instance always follow memory; the Redis store (`server/redis_streams.py`) is written for
the readers of other instances, which replay and follow it into a local *replica* generation of their own.

One Redis Stream entry holds one batch: its id is ``<last seq>-0`` and its fields are ``f`` (the batch's first
sequence number) and ``e`` (a JSON list of `server.events.to_dict` values). Entry ids are therefore the sequence
numbers themselves: ``XRANGE key <after + 1>-0 +`` returns every entry that holds an event after `after`, and an
append's id can only grow, so Redis itself refuses a batch that would go back.

The state hash's ``status``:

    running   the owner appends (its liveness key says whether it is still there)
    done      ended with `Done`          error   ended with any other terminal `Error`
    lost      its owner died mid-generation: the log ends with a `generation_lost` error
    degraded  its owner could not write every batch (Redis was unreachable): the log has a gap, never read again
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from .errors import RelayError
from .events import Done, Error, Event, from_dict, to_dict

# One hash tag per stream (the braces), so that a stream's keys live in one Redis Cluster slot and a script may
# touch them all.
KEY_PREFIX: Final = "llm-relay"

RUNNING: Final = "running"
DONE: Final = "done"
ERROR: Final = "error"
LOST: Final = "lost"
DEGRADED: Final = "degraded"
ENDED_STATUSES: Final = frozenset({DONE, ERROR, LOST})


class GenerationLost(RelayError):
    """The instance that ran the generation died (or lost Redis for longer than its lease) before it ended."""

    status = 502
    type = "generation_lost"


def log_key(stream_id: str) -> str:
    return f"{KEY_PREFIX}:stream:{{{stream_id}}}:log"


def state_key(stream_id: str) -> str:
    return f"{KEY_PREFIX}:stream:{{{stream_id}}}:state"


def readers_key(stream_id: str) -> str:
    """A sorted set of the instances reading the stream: member = instance id, score = lease expiry (ms)."""
    return f"{KEY_PREFIX}:stream:{{{stream_id}}}:readers"


def instance_key(instance_id: str) -> str:
    """The owner's liveness lease: exists while the instance refreshes it."""
    return f"{KEY_PREFIX}:instance:{instance_id}"


def instance_channel(instance_id: str) -> str:
    """The pub/sub channel an instance listens on for stops and departures of its streams' remote readers."""
    return f"{KEY_PREFIX}:instance:{instance_id}:control"


def entry_id(seq: int) -> str:
    """The Redis Stream entry id of the batch whose last event is `seq` (also: the least id holding `seq`).

    >>> entry_id(7)
    '7-0'
    """
    return f"{seq}-0"


def status_after(batch: Sequence[Event]) -> str:
    """The state's status once `batch` is appended: a terminal event ends it."""
    last = batch[-1] if batch else None
    if isinstance(last, Done):
        return DONE
    if isinstance(last, Error):
        return LOST if last.type == GenerationLost.type else ERROR
    return RUNNING


# One encoder, made once: `json.dumps` with options builds a new encoder per call, which costs more than the
# encoding of a token.
_ENCODE = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def encode_batch(batch: Sequence[Event]) -> str:
    """The ``e`` field of one entry.

    >>> from server.events import Delta
    >>> encode_batch([Delta("Hi"), Done("stop")])
    '[{"kind":"delta","content":"Hi"},{"kind":"done","finish_reason":"stop","usage":null}]'
    """
    return _ENCODE([to_dict(event) for event in batch])


def flush_record(stream_id: str, *, new: bool, first: int, events: Sequence[Event], ttl_ms: int) -> bytes:
    """One stream's part of a flush (what the flush script of `server/redis_link.py` reads): a header line, then
    the events' JSON, whose length in bytes the header gives. No events: the state alone (a new stream).

    >>> from server.events import Delta
    >>> flush_record("ab", new=True, first=1, events=[Delta("é")], ttl_ms=5000)
    b'ab 1 1 1 running 5000 33\\n[{"kind":"delta","content":"\\xc3\\xa9"}]'
    """
    payload = encode_batch(events).encode() if events else b""
    last = first + len(events) - 1
    header = f"{stream_id} {int(new)} {first} {last} {status_after(events)} {ttl_ms} {len(payload)}\n"
    return header.encode() + payload


@dataclass(frozen=True, slots=True)
class Entry:
    """One batch read back from a Redis Stream: its events numbered `first`, `first + 1`, ..."""

    first: int
    events: tuple[Event, ...]

    @property
    def last(self) -> int:
        return self.first + len(self.events) - 1


def decode_entry(entry_id_: bytes | str, fields: Mapping[bytes | str, bytes | str]) -> Entry:
    """An entry as XRANGE / XREAD return it. Raises ValueError on anything a relay did not write.

    >>> decode_entry(b"2-0", {b"f": b"1", b"e": b'[{"kind":"delta","content":"a"},{"kind":"delta","content":"b"}]'})
    Entry(first=1, events=(Delta(content='a'), Delta(content='b')))
    """
    try:
        first = int(_text(fields.get(b"f", fields.get("f"))))
        raw = json.loads(_text(fields.get(b"e", fields.get("e"))))
        if not isinstance(raw, list) or not raw:
            raise ValueError("it holds no list of events")
        entry = Entry(first, tuple(from_dict(item) for item in raw))
        if entry_id(entry.last) != _text(entry_id_):
            raise ValueError("its id is not its last event's sequence number")
    except (ValueError, KeyError, TypeError) as exc:  # from_dict's errors, json's (a ValueError) and ours
        raise ValueError(f"not an entry of this relay: {exc}") from None
    return entry


def events_after(entries: Sequence[Entry], after: int) -> tuple[int, list[Event]]:
    """The events of consecutive `entries` that follow `after`, and the sequence number of the first of them.

    Raises ValueError when the entries leave a gap after `after` (never silently skip an event).

    >>> from server.events import Delta
    >>> events_after([Entry(1, (Delta("a"), Delta("b"))), Entry(3, (Delta("c"),))], 1)
    (2, [Delta(content='b'), Delta(content='c')])
    """
    events: list[Event] = []
    expected = after + 1
    first = expected
    for entry in entries:
        if entry.last < expected:
            continue
        if entry.first > expected:
            if events:
                raise ValueError(f"entries leave a gap before event {entry.first}")
            first = expected = entry.first
        events.extend(entry.events[expected - entry.first :])
        expected = entry.last + 1
    return first, events


@dataclass(frozen=True, slots=True)
class StreamState:
    """The state hash of one stream, as read."""

    owner: str
    status: str
    last: int

    @classmethod
    def parse(cls, raw: Mapping[bytes | str, bytes | str]) -> StreamState | None:
        """From HGETALL; None when the hash is absent (expired, never written, or Redis lost it).

        >>> StreamState.parse({b"owner": b"a1", b"status": b"running", b"last": b"3"})
        StreamState(owner='a1', status='running', last=3)
        >>> StreamState.parse({}) is None
        True
        """
        if not raw:
            return None
        text = {_text(k): _text(v) for k, v in raw.items()}
        try:
            return cls(text["owner"], text["status"], int(text["last"]))
        except (KeyError, ValueError):
            return None


def control_message(verb: str, stream_id: str) -> str:
    """A message on an instance's control channel: ``stop <id>`` or ``left <id>``."""
    return f"{verb} {stream_id}"


def parse_control(message: bytes | str) -> tuple[str, str] | None:
    """(verb, stream id) of a control message, or None for anything else.

    >>> parse_control(b"stop 0123456789abcdef0123456789abcdef")
    ('stop', '0123456789abcdef0123456789abcdef')
    >>> parse_control(b"reboot") is None
    True
    """
    verb, _, stream_id = _text(message).partition(" ")
    if verb not in ("stop", "left") or not stream_id:
        return None
    return verb, stream_id


def _text(value: bytes | str | None) -> str:
    if value is None:
        raise ValueError("missing field")
    return value.decode() if isinstance(value, bytes) else value
