"""server/stream_store.py: what the Redis store keeps, as pure values (no Redis here; tests/test_redis_streams.py
runs the store against a real redis-server)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.app import create_app
from server.config import Config, ConfigError
from server.events import Delta, Done, Error, Event, Reasoning, Refusal, ToolCallDelta, Usage
from server.stream_store import (
    DONE,
    ERROR,
    LOST,
    RUNNING,
    Entry,
    GenerationLost,
    StreamState,
    decode_entry,
    encode_batch,
    entry_id,
    events_after,
    instance_channel,
    log_key,
    parse_control,
    readers_key,
    state_key,
    status_after,
)

STREAM = "0123456789abcdef0123456789abcdef"

text = st.text(max_size=20)
progress = st.one_of(
    st.builds(Delta, text),
    st.builds(Reasoning, text),
    st.builds(Refusal, text),
    st.builds(ToolCallDelta, st.integers(0, 5), st.none() | text, st.none() | text, text),
)
terminal = st.one_of(
    st.builds(Done, st.none() | text, st.none() | st.builds(Usage, st.integers(0), st.integers(0), st.integers(0))),
    st.builds(Error, text, text),
)


@given(batch=st.lists(progress, min_size=1, max_size=10), first=st.integers(1, 10**9))
def test_a_batch_read_back_is_the_batch(batch: list[Event], first: int) -> None:
    last = first + len(batch) - 1
    entry = decode_entry(entry_id(last).encode(), {b"f": str(first).encode(), b"e": encode_batch(batch).encode()})
    assert entry == Entry(first, tuple(batch))
    assert entry.last == last


@given(batch=st.lists(progress, max_size=5), end=terminal)
def test_a_terminal_batch_read_back(batch: list[Event], end: Event) -> None:
    events = [*batch, end]
    entry = decode_entry(entry_id(len(events)), {"f": "1", "e": encode_batch(events)})
    assert entry.events[-1] == end


@pytest.mark.parametrize(
    ("entry_id_", "fields"),
    [
        ("2-0", {"f": "1", "e": '[{"kind":"delta","content":"a"}]'}),  # the id is not the last event's seq
        ("1-0", {"f": "1", "e": "[]"}),  # an empty batch
        ("1-0", {"f": "1", "e": '{"kind":"delta"}'}),  # not a list
        ("1-0", {"f": "1", "e": '[{"kind":"nope"}]'}),  # not an event
        ("1-0", {"e": '[{"kind":"delta","content":"a"}]'}),  # no first seq
        ("1-0", {"f": "x", "e": '[{"kind":"delta","content":"a"}]'}),
        ("1-0", {"f": "1", "e": "not json"}),
    ],
    ids=["id-mismatch", "empty", "not-a-list", "unknown-kind", "no-first", "bad-first", "not-json"],
)
def test_an_entry_the_relay_did_not_write_is_refused(entry_id_: str, fields: dict[bytes | str, bytes | str]) -> None:
    with pytest.raises(ValueError, match="not an entry of this relay"):
        decode_entry(entry_id_, fields)


def _entries(*sizes: int, first: int = 1) -> list[Entry]:
    entries = []
    for size in sizes:
        entries.append(Entry(first, tuple(Delta(str(first + i)) for i in range(size))))
        first += size
    return entries


@given(sizes=st.lists(st.integers(1, 4), min_size=1, max_size=6), data=st.data())
def test_events_after_any_point_are_exactly_the_rest(sizes: list[int], data: st.DataObject) -> None:
    entries = _entries(*sizes)
    total = sum(sizes)
    after = data.draw(st.integers(0, total))
    first, events = events_after(entries, after)
    assert first == after + 1
    assert [int(e.content) for e in events if isinstance(e, Delta)] == list(range(after + 1, total + 1))


def test_events_after_a_trimmed_start_begin_at_what_is_kept() -> None:
    assert events_after(_entries(2, 2, first=5), 0) == (5, [Delta("5"), Delta("6"), Delta("7"), Delta("8")])


def test_events_after_a_gap_are_refused() -> None:
    entries = [*_entries(2), *_entries(1, first=5)]
    with pytest.raises(ValueError, match="gap"):
        events_after(entries, 0)


@pytest.mark.parametrize(
    ("batch", "status"),
    [
        ([Delta("a")], RUNNING),
        ([Delta("a"), Done("stop")], DONE),
        ([Error("upstream_error", "no")], ERROR),
        ([GenerationLost("gone").to_event()], LOST),
        ([], RUNNING),
    ],
    ids=["progress", "done", "error", "lost", "empty"],
)
def test_status_after_a_batch(batch: list[Event], status: str) -> None:
    assert status_after(batch) == status


def test_state_parse_refuses_what_is_incomplete() -> None:
    assert StreamState.parse({"owner": "a", "status": "running"}) is None
    assert StreamState.parse({"owner": "a", "status": "running", "last": "x"}) is None
    assert StreamState.parse({"owner": "a", "status": "done", "last": "4"}) == StreamState("a", "done", 4)


def test_a_streams_keys_share_one_hash_tag() -> None:
    keys = [log_key(STREAM), state_key(STREAM), readers_key(STREAM)]
    assert {key[key.index("{") : key.index("}") + 1] for key in keys} == {"{" + STREAM + "}"}
    assert len(set(keys)) == 3


@pytest.mark.parametrize(
    ("message", "parsed"),
    [
        (b"stop " + STREAM.encode(), ("stop", STREAM)),
        ("left " + STREAM, ("left", STREAM)),
        (b"stop", None),
        (b"start " + STREAM.encode(), None),
    ],
    ids=["stop", "left", "no-id", "unknown-verb"],
)
def test_control_messages(message: bytes | str, parsed: tuple[str, str] | None) -> None:
    assert parse_control(message) == parsed


def test_instance_channel_names_the_instance() -> None:
    assert instance_channel("a1") != instance_channel("a2")


def test_a_stream_store_url_that_is_not_a_redis_url_is_a_startup_error() -> None:
    config = Config(stream_store="redis", redis_url="http://nope", limits_enabled=False)
    with pytest.raises(ConfigError, match="not a Redis URL") as info:
        create_app(config)
    assert "nope" not in str(info.value)  # a URL may hold a password: never echoed
