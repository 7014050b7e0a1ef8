"""server/framing.py against independent readers: tests/sse_decoder.py (WHATWG HTML §9.2.6) and a strict NDJSON
reader. Expected values are written from the documented wire format (README "SSE, byte by byte"), never computed
by the code under test."""

from __future__ import annotations

import doctest
import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import server.framing
from server.events import Delta, Done, Error, Event, Reasoning, Refusal, ToolCallDelta, Usage
from server.framing import (
    FRAMINGS,
    NDJSONFraming,
    SSEFieldError,
    SSEFraming,
    encode_sse,
    encode_sse_comment,
    json_bytes,
)

from .ndjson_decoder import NDJSONError, decode_ndjson
from .sse_decoder import SSEEvent, decode_sse

# --- strategies -------------------------------------------------------------------------------------------------

# Pieces that would break a naive framing: line ends of every kind, field names, blank lines, NUL, lone surrogates,
# characters that other line splitters (str.splitlines, JavaScript) treat as line breaks, emoji, a BOM, JSON syntax.
_TRICKY = [
    "\r", "\n", "\r\n", "\n\n", "\r\r", "\r\n\r\n", "data:", "data: x", "event: done", "id: 9", "retry: 1", ":",
    " ", "\x00", "\ud800", "\udfff", "\udbff\udc00", "\u2028", "\u2029", "\x85", "\x0b", "😀", "\ufeff", '"', "\\",
    "é", "{}",
]  # fmt: skip
_ANY_CHAR = st.characters(exclude_categories=())  # every code point, lone surrogates included
texts = st.lists(st.one_of(st.text(_ANY_CHAR, max_size=6), st.sampled_from(_TRICKY)), max_size=10).map("".join)
# The same without lone surrogates (which UTF-8 cannot carry) for the general encoder's round trip.
_NO_SURROGATE_TRICKY = [t for t in _TRICKY if not re.search("[\ud800-\udfff]", t)]
utf8_texts = st.lists(
    st.one_of(st.text(st.characters(codec="utf-8"), max_size=6), st.sampled_from(_NO_SURROGATE_TRICKY)), max_size=10
).map("".join)

usages = st.builds(Usage, st.integers(0, 2**40), st.integers(0, 2**40), st.integers(0, 2**40))
events: st.SearchStrategy[Event] = st.one_of(
    st.builds(Delta, texts),
    st.builds(Reasoning, texts),
    st.builds(Refusal, texts),
    st.builds(ToolCallDelta, st.integers(0, 255), st.none() | texts, st.none() | texts, texts),
    st.builds(Done, st.none() | texts, st.none() | usages),
    st.builds(Error, texts, texts),
)
seqs = st.integers(1, 2**53)

SID = "0123456789abcdef0123456789abcdef"  # a stream id as new_stream_id() makes them


def chunked(blob: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted(cuts)
    return [blob[a:b] for a, b in zip([0, *points], [*points, len(blob)], strict=True)]


def as_js(value: Any) -> Any:
    """`value` as a JavaScript reader holds it: strings are UTF-16 code units, so a high surrogate followed by a
    low one *is* the astral character (JSON's ``"\\ud800\\udc00"`` means U+10000, RFC 8259 §7). Python keeps the
    pair as two code points; comparing after this mapping asks the right question for lone surrogates."""
    if isinstance(value, str):
        return value.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "surrogatepass")
    if isinstance(value, list):
        return [as_js(item) for item in value]
    if isinstance(value, dict):
        return {as_js(key): as_js(item) for key, item in value.items()}
    return value


def usage_dict(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def expected_sse(event: Event) -> tuple[str, dict[str, Any]]:
    """(event type, JSON data) as README "SSE, byte by byte" documents them."""
    if isinstance(event, Delta):
        return "message", as_js({"content": event.content})
    if isinstance(event, Reasoning):
        return "reasoning", as_js({"content": event.content})
    if isinstance(event, Refusal):
        return "refusal", as_js({"content": event.content})
    if isinstance(event, ToolCallDelta):
        call = {"index": event.index, "id": event.id, "name": event.name, "arguments": event.arguments}
        return "tool_call", as_js(call)
    if isinstance(event, Done):
        done: dict[str, Any] = {"finish_reason": event.finish_reason}
        if event.usage is not None:
            done["usage"] = usage_dict(event.usage)
        return "done", as_js(done)
    return "error", as_js({"error": {"type": event.type, "message": event.message}})


def expected_ndjson(seq: int, event: Event) -> dict[str, Any]:
    """The object README "NDJSON, byte by byte" documents."""
    if isinstance(event, Delta):
        return as_js({"type": "delta", "seq": seq, "content": event.content})
    if isinstance(event, Reasoning):
        return as_js({"type": "reasoning", "seq": seq, "content": event.content})
    if isinstance(event, Refusal):
        return as_js({"type": "refusal", "seq": seq, "content": event.content})
    if isinstance(event, ToolCallDelta):
        call = {"index": event.index, "id": event.id, "name": event.name, "arguments": event.arguments}
        return as_js({"type": "tool_call", "seq": seq, **call})
    if isinstance(event, Done):
        done: dict[str, Any] = {"type": "done", "seq": seq, "finish_reason": event.finish_reason}
        if event.usage is not None:
            done["usage"] = usage_dict(event.usage)
        return as_js(done)
    return as_js({"type": "error", "seq": seq, "error": {"type": event.type, "message": event.message}})


def spec_normalised(text: str) -> str:
    """What a spec decoder gives back for data sent as several data lines: every CRLF, CR or LF becomes LF."""
    return re.sub("\r\n|\r", "\n", text)


def json_data(event: SSEEvent) -> Any:
    return json.loads(event.data)


# --- SSEFraming ---------------------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(seq=seqs, event=events)
def test_sse_frame_decodes_to_exactly_that_event(seq: int, event: Event) -> None:
    frame = SSEFraming().encode(SID, seq, event)
    frame.decode("utf-8")  # strict: the frame is valid UTF-8 even for lone surrogates
    decoded, retry = decode_sse(frame)
    kind, payload = expected_sse(event)
    assert [(e.type, e.last_event_id) for e in decoded] == [(kind, f"{SID}/{seq}")]
    assert json_data(decoded[0]) == payload
    assert retry is None


@settings(max_examples=150, deadline=None)
@given(
    stream=st.lists(st.tuples(events, st.sampled_from(["", "keepalive", "comment"]), texts), max_size=8),
    data=st.data(),
)
def test_sse_stream_decodes_the_same_in_any_chunking(stream: list[tuple[Event, str, str]], data: st.DataObject) -> None:
    framing = SSEFraming()
    blob = b""
    expected: list[tuple[str, str, Any]] = []
    for seq, (event, extra, comment) in enumerate(stream, start=1):
        if extra == "keepalive":
            blob += framing.keepalive()
        elif extra == "comment":
            blob += encode_sse_comment(comment)
        blob += framing.encode(SID, seq, event)
        kind, payload = expected_sse(event)
        expected.append((kind, f"{SID}/{seq}", payload))
    cuts = data.draw(st.lists(st.integers(0, len(blob)), max_size=12))
    decoded, retry = decode_sse(chunked(blob, cuts))
    assert [(e.type, e.last_event_id, json_data(e)) for e in decoded] == expected
    assert retry is None


_README_SSE = (
    b'id: 0123456789abcdef0123456789abcdef/1\ndata: {"content":"You"}\n\n'
    b'id: 0123456789abcdef0123456789abcdef/2\ndata: {"content":" asked:"}\n\n'
    b"id: 0123456789abcdef0123456789abcdef/3\nevent: done\n"
    b'data: {"finish_reason":"stop","usage":{"prompt_tokens":1,"completion_tokens":2,'
    b'"total_tokens":3}}\n\n'
)


def test_sse_readme_example_byte_for_byte() -> None:
    framing = SSEFraming()
    stream = [Delta("You"), Delta(" asked:"), Done("stop", Usage(1, 2, 3))]
    assert b"".join(framing.encode(SID, seq, event) for seq, event in enumerate(stream, start=1)) == _README_SSE


@pytest.mark.parametrize(
    ("seq", "event", "frame"),
    [
        (1, Delta("Hi"), b'id: 0123456789abcdef0123456789abcdef/1\ndata: {"content":"Hi"}\n\n'),
        (1, Delta(""), b'id: 0123456789abcdef0123456789abcdef/1\ndata: {"content":""}\n\n'),
        (7, Delta("é😀"), 'id: 0123456789abcdef0123456789abcdef/7\ndata: {"content":"é😀"}\n\n'.encode()),
        (2, Delta("a\r\nb"), b'id: 0123456789abcdef0123456789abcdef/2\ndata: {"content":"a\\r\\nb"}\n\n'),
        (3, Delta("\u2028"), 'id: 0123456789abcdef0123456789abcdef/3\ndata: {"content":"\u2028"}\n\n'.encode()),
        (4, Delta("\x00"), b'id: 0123456789abcdef0123456789abcdef/4\ndata: {"content":"\\u0000"}\n\n'),
        (5, Delta("x\ud800y"), b'id: 0123456789abcdef0123456789abcdef/5\ndata: {"content":"x\\ud800y"}\n\n'),
        (
            2,
            Done("stop", Usage(10, 20, 30)),
            b'id: 0123456789abcdef0123456789abcdef/2\nevent: done\ndata: {"finish_reason":"stop",'
            b'"usage":{"prompt_tokens":10,"completion_tokens":20,"total_tokens":30}}\n\n',
        ),
        (9, Done("length"), b'id: %s/9\nevent: done\ndata: {"finish_reason":"length"}\n\n' % SID.encode()),
        (9, Done(), b'id: 0123456789abcdef0123456789abcdef/9\nevent: done\ndata: {"finish_reason":null}\n\n'),
        (
            4,
            Error("upstream_unavailable", "the connection to the model provider was lost"),
            b'id: 0123456789abcdef0123456789abcdef/4\nevent: error\ndata: {"error":{"type":"upstream_unavailable",'
            b'"message":"the connection to the model provider was lost"}}\n\n',
        ),
        (3, Reasoning("Let me\nthink"),
         b'id: 0123456789abcdef0123456789abcdef/3\nevent: reasoning\ndata: {"content":"Let me\\nthink"}\n\n'),
        (4, Refusal("I can't"),
         b'id: 0123456789abcdef0123456789abcdef/4\nevent: refusal\ndata: {"content":"I can\'t"}\n\n'),
        (5, ToolCallDelta(0, "call_1", "get_weather"),
         b'id: 0123456789abcdef0123456789abcdef/5\nevent: tool_call\n'
         b'data: {"index":0,"id":"call_1","name":"get_weather","arguments":""}\n\n'),
        (6, ToolCallDelta(0, None, None, '{"city":"\n'),
         b'id: 0123456789abcdef0123456789abcdef/6\nevent: tool_call\n'
         b'data: {"index":0,"id":null,"name":null,"arguments":"{\\"city\\":\\"\\n"}\n\n'),
    ],
    ids=["delta", "empty-delta", "utf8-raw", "line-breaks-escaped", "line-separator-raw", "nul-escaped",
         "lone-surrogate-escaped", "done-usage", "done-no-usage", "done-no-reason", "error-readme", "reasoning",
         "refusal", "tool-call-first-piece", "tool-call-arguments"],
)  # fmt: skip
def test_sse_exact_bytes(seq: int, event: Event, frame: bytes) -> None:
    assert SSEFraming().encode(SID, seq, event) == frame


def test_sse_keepalive_is_a_comment() -> None:
    framing = SSEFraming()
    assert framing.keepalive() == b": ping\n\n"
    assert decode_sse(framing.keepalive()) == ([], None)
    # ...and does not disturb the event after it.
    assert decode_sse(framing.keepalive() + framing.encode(SID, 1, Delta("a")))[0] == [
        SSEEvent("message", '{"content":"a"}', f"{SID}/1")
    ]


@pytest.mark.parametrize("retry_ms", [0, 1, 3000, 2**40])
def test_sse_reconnect_hint_only_sets_retry(retry_ms: int) -> None:
    assert decode_sse(SSEFraming().reconnect_hint(retry_ms)) == ([], retry_ms)


def test_framings_table() -> None:
    assert FRAMINGS["sse"].content_type == "text/event-stream; charset=utf-8"
    assert FRAMINGS["ndjson"].content_type == "application/x-ndjson; charset=utf-8"
    assert {name: framing.name for name, framing in FRAMINGS.items()} == {"sse": "sse", "ndjson": "ndjson"}


# --- NDJSONFraming ------------------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(seq=seqs, event=events)
def test_ndjson_frame_is_one_strict_line(seq: int, event: Event) -> None:
    frame = NDJSONFraming().encode(SID, seq, event)
    assert frame.endswith(b"\n")
    assert frame.count(b"\n") == 1
    assert decode_ndjson(frame) == [expected_ndjson(seq, event)]


@settings(max_examples=150, deadline=None)
@given(stream=st.lists(st.tuples(events, st.booleans()), max_size=8), data=st.data())
def test_ndjson_stream_decodes_the_same_in_any_chunking(stream: list[tuple[Event, bool]], data: st.DataObject) -> None:
    framing = NDJSONFraming()
    blob = b""
    expected: list[dict[str, Any]] = []
    for seq, (event, keepalive) in enumerate(stream, start=1):
        if keepalive:
            blob += framing.keepalive()
            expected.append({"type": "ping"})
        blob += framing.encode(SID, seq, event)
        expected.append(expected_ndjson(seq, event))
    cuts = data.draw(st.lists(st.integers(0, len(blob)), max_size=12))
    assert decode_ndjson(chunked(blob, cuts)) == expected


def test_ndjson_readme_example_byte_for_byte() -> None:
    framing = NDJSONFraming()
    stream = [Delta("You"), Delta(" asked:"), Done("stop", Usage(1, 2, 3))]
    assert b"".join(framing.encode(SID, seq, event) for seq, event in enumerate(stream, start=1)) == (
        b'{"type":"delta","seq":1,"content":"You"}\n'
        b'{"type":"delta","seq":2,"content":" asked:"}\n'
        b'{"type":"done","seq":3,"finish_reason":"stop","usage":{"prompt_tokens":1,"completion_tokens":2,'
        b'"total_tokens":3}}\n'
    )


@pytest.mark.parametrize(
    ("event", "line"),
    [
        (Delta("Hi"), b'{"type":"delta","seq":1,"content":"Hi"}\n'),
        (Delta("a\nb\u2028"), '{"type":"delta","seq":1,"content":"a\\nb\u2028"}\n'.encode()),
        (Delta("\udc80"), b'{"type":"delta","seq":1,"content":"\\udc80"}\n'),
        (Done(), b'{"type":"done","seq":1,"finish_reason":null}\n'),
        (Done("stop"), b'{"type":"done","seq":1,"finish_reason":"stop"}\n'),
        (
            Error("timeout", "no first token"),
            b'{"type":"error","seq":1,"error":{"type":"timeout","message":"no first token"}}\n',
        ),
        (Reasoning("hm\n"), b'{"type":"reasoning","seq":1,"content":"hm\\n"}\n'),
        (Refusal("No."), b'{"type":"refusal","seq":1,"content":"No."}\n'),
        (
            ToolCallDelta(1, "call_2", "get_time", "{}"),
            b'{"type":"tool_call","seq":1,"index":1,"id":"call_2","name":"get_time","arguments":"{}"}\n',
        ),
        (
            ToolCallDelta(1, arguments='"x"'),
            b'{"type":"tool_call","seq":1,"index":1,"id":null,"name":null,"arguments":"\\"x\\""}\n',
        ),
    ],
    ids=[
        "delta",
        "line-breaks",
        "lone-surrogate",
        "done-null",
        "done",
        "error",
        "reasoning",
        "refusal",
        "tool-call",
        "tool-call-arguments",
    ],
)
def test_ndjson_exact_bytes(event: Event, line: bytes) -> None:
    assert NDJSONFraming().encode(SID, 1, event) == line


def test_ndjson_keepalive_is_a_ping_object() -> None:
    assert decode_ndjson(NDJSONFraming().keepalive()) == [{"type": "ping"}]


@pytest.mark.parametrize(
    "blob",
    [b"\n", b'{"a":1}', b'{"a":1}\r\n', b"[1]\n", b'{"a":NaN}\n', b'"x"\n', b"\xff\n"],
    ids=["blank-line", "no-final-lf", "crlf", "array", "nan", "scalar", "not-utf8"],
)
def test_the_strict_ndjson_reader_rejects(blob: bytes) -> None:
    # The reader must be able to say no, or the NDJSON properties above prove nothing.
    with pytest.raises(NDJSONError):
        decode_ndjson(blob)


def test_json_bytes_never_writes_nan() -> None:
    with pytest.raises(ValueError, match="JSON compliant"):
        json_bytes({"x": float("nan")})


@settings(max_examples=200, deadline=None)
@given(value=st.recursive(st.none() | st.booleans() | st.integers() | texts, lambda inner: st.lists(inner, max_size=3)
                          | st.dictionaries(texts, inner, max_size=3), max_leaves=10))  # fmt: skip
def test_json_bytes_round_trips_as_strict_utf8(value: Any) -> None:
    raw = json_bytes(value)
    assert b"\n" not in raw
    assert b"\r" not in raw
    assert json.loads(raw.decode("utf-8")) == as_js(value)


# --- encode_sse -------------------------------------------------------------------------------------------------

event_names = utf8_texts.filter(lambda t: "\r" not in t and "\n" not in t)
ids = event_names.filter(lambda t: "\0" not in t)


@settings(max_examples=300, deadline=None)
@given(
    data=utf8_texts, event=st.none() | event_names, event_id=st.none() | ids, retry=st.none() | st.integers(0, 2**63)
)
def test_encode_sse_round_trips(data: str, event: str | None, event_id: str | None, retry: int | None) -> None:
    block = encode_sse(data, event=event, id=event_id, retry=retry)
    block.decode("utf-8")
    decoded, decoded_retry = decode_sse(block)
    assert decoded == [SSEEvent(event or "message", spec_normalised(data), event_id or "")]
    assert decoded_retry == retry


@settings(max_examples=100, deadline=None)
@given(blocks=st.lists(st.tuples(utf8_texts, st.none() | event_names), min_size=1, max_size=6), data=st.data())
def test_encode_sse_blocks_cannot_forge_events(blocks: list[tuple[str, str | None]], data: st.DataObject) -> None:
    blob = b"".join(encode_sse(text, event=name) for text, name in blocks)
    cuts = data.draw(st.lists(st.integers(0, len(blob)), max_size=8))
    decoded, _ = decode_sse(chunked(blob, cuts))
    assert decoded == [SSEEvent(name or "message", spec_normalised(text), "") for text, name in blocks]


@pytest.mark.parametrize(
    ("data", "decoded"),
    [
        ("a\nb", "a\nb"),
        ("a\rb", "a\nb"),
        ("a\r\nb", "a\nb"),
        ("a\n\nb", "a\n\nb"),
        ("a\r\rb", "a\n\nb"),
        ("\n", "\n"),
        ("x\n", "x\n"),
        ("", ""),
        ("data: x\n\nevent: y", "data: x\n\nevent: y"),
        (" lead", " lead"),
        ("a\u2028b", "a\u2028b"),
    ],
    ids=["lf", "cr", "crlf", "blank-line", "cr-cr", "only-lf", "trailing-lf", "empty", "forgery", "leading-space",
         "line-separator"],
)  # fmt: skip
def test_encode_sse_data_line_breaks(data: str, decoded: str) -> None:
    assert decode_sse(encode_sse(data)) == ([SSEEvent("message", decoded, "")], None)


def test_encode_sse_multi_line_exact_bytes() -> None:
    assert encode_sse("one\r\ntwo\rthree", event="note", id="7") == (
        b"event: note\nid: 7\ndata: one\ndata: two\ndata: three\n\n"
    )


@pytest.mark.parametrize(
    ("kwargs", "decoded"),
    [
        ({"data": "a\ud800b"}, [SSEEvent("message", "a\ufffdb", "")]),
        ({"data": "x", "event": "e\udfff"}, [SSEEvent("e\ufffd", "x", "")]),
        ({"data": "x", "id": "\udbff"}, [SSEEvent("message", "x", "\ufffd")]),
    ],
    ids=["data", "event", "id"],
)
def test_encode_sse_lone_surrogate_becomes_replacement_character(
    kwargs: dict[str, str], decoded: list[SSEEvent]
) -> None:
    # framing._utf8 promises: "a lone surrogate becomes U+FFFD, which is what a decoder would produce from any
    # invalid sequence". str.encode(..., "replace") writes "?" instead, which no reader can tell from a real "?".
    block = encode_sse(**kwargs)
    block.decode("utf-8")
    assert decode_sse(block) == (decoded, None)


@settings(max_examples=200, deadline=None)
@given(data=texts, event=st.none() | texts.filter(lambda t: "\r" not in t and "\n" not in t))
def test_encode_sse_is_strict_utf8_and_one_event_even_with_lone_surrogates(data: str, event: str | None) -> None:
    block = encode_sse(data, event=event)
    block.decode("utf-8")
    decoded, _ = decode_sse(block)
    assert len(decoded) == 1
    assert decoded[0].data.count("\n") == spec_normalised(data).count("\n")


@pytest.mark.parametrize("name", ["a\nb", "a\rb", "a\r\nb", "\n", "\r", "done\n\ndata: forged"])
def test_encode_sse_refuses_line_break_in_event_name(name: str) -> None:
    with pytest.raises(SSEFieldError):
        encode_sse("x", event=name)


@pytest.mark.parametrize("event_id", ["1\n2", "1\r2", "1\r\n", "\n", "\r"])
def test_encode_sse_refuses_line_break_in_id(event_id: str) -> None:
    with pytest.raises(SSEFieldError):
        encode_sse("x", id=event_id)


@pytest.mark.parametrize("event_id", ["\0", "1\x002", "1\0"])
def test_encode_sse_refuses_nul_in_id(event_id: str) -> None:
    # A browser ignores an id field holding NUL (§9.2.6), so it would never come back as Last-Event-ID.
    with pytest.raises(SSEFieldError):
        encode_sse("x", id=event_id)


@pytest.mark.parametrize(
    "retry",
    [True, False, -1, -(2**70), 1.5, 3000.0, float("nan"), "3000", b"3000"],
    ids=["true", "false", "negative", "very-negative", "fraction", "integral-float", "nan", "str", "bytes"],
)
def test_encode_sse_refuses_retry_that_is_not_a_non_negative_int(retry: object) -> None:
    with pytest.raises(SSEFieldError):
        encode_sse("x", retry=retry)  # type: ignore[arg-type]


@pytest.mark.parametrize("retry", [0, 1, 3000, 2**70])
def test_encode_sse_retry_is_ascii_digits(retry: int) -> None:
    assert encode_sse(retry=retry) == b"retry: %d\n\n" % retry
    assert decode_sse(encode_sse(retry=retry)) == ([], retry)


def test_encode_sse_needs_a_field() -> None:
    with pytest.raises(SSEFieldError):
        encode_sse()


def test_encode_sse_none_data_is_no_field() -> None:
    with pytest.raises(SSEFieldError):
        encode_sse(None)


@pytest.mark.parametrize(
    ("kwargs", "block"),
    [
        ({"event": "e"}, b"event: e\n\n"),
        ({"id": "5"}, b"id: 5\n\n"),
        ({"id": ""}, b"id: \n\n"),
        ({"data": ""}, b"data: \n\n"),
        ({"data": "x", "event": "", "id": ""}, b"event: \nid: \ndata: x\n\n"),
    ],
    ids=["event-only", "id-only", "empty-id", "empty-data", "empty-event-and-id"],
)
def test_encode_sse_exact_bytes(kwargs: dict[str, str], block: bytes) -> None:
    assert encode_sse(**kwargs) == block


def test_encode_sse_id_only_block_sets_last_event_id_for_the_next_event() -> None:
    decoded, _ = decode_sse(encode_sse(id="42") + encode_sse("x"))
    assert decoded == [SSEEvent("message", "x", "42")]


# --- encode_sse_comment ---------------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(text=texts, data=st.data())
def test_encode_sse_comment_decodes_to_nothing(text: str, data: st.DataObject) -> None:
    block = encode_sse_comment(text)
    block.decode("utf-8")
    # Followed by a real event, the comment neither hides it nor adds one, in any chunking.
    blob = block + encode_sse("after", id="1")
    cuts = data.draw(st.lists(st.integers(0, len(blob)), max_size=6))
    assert decode_sse(chunked(blob, cuts)) == ([SSEEvent("message", "after", "1")], None)


@pytest.mark.parametrize(
    ("text", "block"),
    [("ping", b": ping\n\n"), ("", b":\n\n"), ("a\nb", b": a\n: b\n\n"), ("a\r\n\rb", b": a\n:\n: b\n\n")],
    ids=["ping", "empty", "two-lines", "blank-middle-line"],
)
def test_encode_sse_comment_exact_bytes(text: str, block: bytes) -> None:
    assert encode_sse_comment(text) == block


def test_module_docstring_examples_run() -> None:
    # STYLE.md: "Docstring examples must run".
    result = doctest.testmod(server.framing, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 3
    assert result.failed == 0


_HTTP_API_DOC = Path(__file__).resolve().parent.parent / "docs" / "http-api.md"
_DOC_SID = "3f0c5e1a9b7d42c68e2f1a0b9c8d7e6f"


def test_docs_examples_of_the_other_kinds_are_what_the_framings_send() -> None:
    # docs/http-api.md documents reasoning, tool_call and refusal byte by byte: the examples must stay true.
    doc = _HTTP_API_DOC.read_text(encoding="utf-8")
    sse_stream = [
        Reasoning("The user greets me."),
        ToolCallDelta(0, "call_1", "get_weather"),
        ToolCallDelta(0, arguments='{"city":"Paris"}'),
        Done("tool_calls"),
    ]
    sse = b"".join(SSEFraming().encode(_DOC_SID, seq, e) for seq, e in enumerate(sse_stream, start=1))
    assert sse.decode() in doc
    ndjson_stream = [*sse_stream[:3], Refusal("I can't help with that.")]
    ndjson = b"".join(NDJSONFraming().encode(_DOC_SID, seq, e) for seq, e in enumerate(ndjson_stream, start=1))
    assert ndjson.decode() in doc
