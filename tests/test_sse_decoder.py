"""The spec decoder the framing tests rely on, checked against WHATWG HTML §9.2.6 itself.

The four ``test_whatwg_example_*`` cases are the examples printed in the spec's "Interpreting an event stream"
section, byte for byte. https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from .sse_decoder import SSEDecoder, SSEEvent, decode_sse


def every_chunking(blob: bytes) -> list[list[bytes]]:
    """The whole blob, one byte at a time, and every split into two pieces."""
    splits = [[blob[:i], blob[i:]] for i in range(len(blob) + 1)]
    return [[blob], [blob[i : i + 1] for i in range(len(blob))], *splits]


def assert_same_in_every_chunking(blob: bytes, expected: list[SSEEvent], retry: int | None = None) -> None:
    for chunks in every_chunking(blob):
        assert decode_sse(chunks) == (expected, retry), chunks


# --- the spec's own examples ------------------------------------------------------------------------------------


def test_whatwg_example_1() -> None:
    # "The following event stream, once followed by a blank line: ... would cause an event message with the
    # interface MessageEvent to be dispatched on the EventSource object. The event's data attribute would contain
    # the string "YHOO\n+2\n10""
    blob = b"data: YHOO\ndata: +2\ndata: 10\n\n"
    assert_same_in_every_chunking(blob, [SSEEvent("message", "YHOO\n+2\n10", "")])


def test_whatwg_example_2() -> None:
    # "The first block has just a comment, and will fire nothing. The second block has two fields with names
    # "data" and "id" respectively; an event will be fired for this block, with the data "first event", and will
    # then set the last event ID to "1" ... The third block fires an event with data "second event", and also has
    # an "id" field, this time with no value, which resets the last event ID to the empty string ... The fourth
    # block fires an event with data " third event" (with a single leading space character)."
    blob = b": test stream\n\ndata: first event\nid: 1\n\ndata:second event\nid\n\ndata:  third event\n\n"
    expected = [
        SSEEvent("message", "first event", "1"),
        SSEEvent("message", "second event", ""),
        SSEEvent("message", " third event", ""),
    ]
    assert_same_in_every_chunking(blob, expected)


def test_whatwg_example_3() -> None:
    # "The following stream fires two events: The first block fires events with the data set to the empty
    # string, as would the last block if it was followed by a blank line. The middle block fires an event with the
    # data set to a single newline character. The last block is discarded because it is not followed by a blank
    # line."
    blob = b"data\n\ndata\ndata\n\ndata:"
    assert_same_in_every_chunking(blob, [SSEEvent("message", "", ""), SSEEvent("message", "\n", "")])


def test_whatwg_example_4() -> None:
    # "The following stream fires two identical events: This is because the space after the colon is ignored if
    # present."
    blob = b"data:test\n\ndata: test\n\n"
    assert_same_in_every_chunking(blob, [SSEEvent("message", "test", "")] * 2)


# --- line endings ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "blob",
    [
        b"event: e\ndata: a\ndata: b\nid: 7\n\n",
        b"event: e\rdata: a\rdata: b\rid: 7\r\r",
        b"event: e\r\ndata: a\r\ndata: b\r\nid: 7\r\n\r\n",
        b"event: e\r\ndata: a\rdata: b\nid: 7\r\n\r",
    ],
    ids=["LF", "CR", "CRLF", "mixed"],
)
def test_line_endings(blob: bytes) -> None:
    assert_same_in_every_chunking(blob, [SSEEvent("e", "a\nb", "7")])


def test_crlf_split_across_chunks_is_one_line_end() -> None:
    # If the CR and the LF of one CRLF were two line ends, the LF would be a blank line and dispatch "a" alone.
    assert decode_sse([b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n"]) == ([SSEEvent("message", "a\nb", "")], None)


def test_lone_cr_at_chunk_end_ends_the_line_at_once() -> None:
    # A CR is a complete line end: the event is dispatched without waiting for a possible LF.
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r") == []
    assert decoder.feed(b"\r") == [SSEEvent("message", "a", "")]
    assert decoder.feed(b"\n") == []  # the LF after a CR that ended a line is part of that line end


def test_cr_cr_is_two_line_ends() -> None:
    assert decode_sse(b"data: a\r\rdata: b\r\r") == ([SSEEvent("message", "a", ""), SSEEvent("message", "b", "")], None)


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\x85", "\x0b", "\x0c"], ids=["LS", "PS", "NEL", "VT", "FF"])
def test_only_cr_and_lf_end_lines(separator: str) -> None:
    blob = f"data: a{separator}b\n\n".encode()
    assert decode_sse(blob) == ([SSEEvent("message", f"a{separator}b", "")], None)


# --- BOM and UTF-8 ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("blob", "expected"),
    [
        (b"\xef\xbb\xbfdata: x\n\n", [SSEEvent("message", "x", "")]),
        # Only one leading BOM is stripped: the second makes the field name "\ufeffdata", an unknown field.
        (b"\xef\xbb\xbf\xef\xbb\xbfdata: x\n\n", []),
        # A BOM anywhere else is an ordinary character.
        (b"data: \xef\xbb\xbfx\n\n", [SSEEvent("message", "\ufeffx", "")]),
        (b"data: x\n\n\xef\xbb\xbfdata: y\n\n", [SSEEvent("message", "x", "")]),
    ],
    ids=["leading", "second-bom-kept", "inside-value", "not-at-stream-start"],
)
def test_bom(blob: bytes, expected: list[SSEEvent]) -> None:
    assert_same_in_every_chunking(blob, expected)


@pytest.mark.parametrize("char", ["é", "€", "😀", "\u2028"], ids=["2-byte", "3-byte", "4-byte", "LS"])
def test_multibyte_character_split_across_chunks(char: str) -> None:
    encoded = char.encode()
    blob = b"data: <" + encoded + b">\n\n"
    start = len(b"data: <")
    for cut in range(start + 1, start + len(encoded)):  # every cut inside the character
        assert decode_sse([blob[:cut], blob[cut:]]) == ([SSEEvent("message", f"<{char}>", "")], None)


@pytest.mark.parametrize(
    ("raw", "text"),
    [
        (b"\xff", "\ufffd"),
        (b"\xe2\x82", "\ufffd"),  # a truncated sequence followed by an ASCII character
        (b"\xed\xa0\x80", "\ufffd\ufffd\ufffd"),  # an encoded surrogate is not UTF-8
        (b"\xc0\xaf", "\ufffd\ufffd"),  # an overlong encoding
    ],
    ids=["invalid-byte", "truncated", "surrogate", "overlong"],
)
def test_invalid_utf8_is_replaced(raw: bytes, text: str) -> None:
    assert_same_in_every_chunking(b"data: " + raw + b"!\n\n", [SSEEvent("message", text + "!", "")])


def test_truncated_utf8_at_end_of_stream_does_not_dispatch() -> None:
    assert decode_sse([b"data: x\n\ndata: \xe2"]) == ([SSEEvent("message", "x", "")], None)


# --- fields ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("blob", "expected"),
    [
        (b"data: a: b\n\n", [SSEEvent("message", "a: b", "")]),
        (b"data:\n\n", [SSEEvent("message", "", "")]),
        (b"data:  two spaces\n\n", [SSEEvent("message", " two spaces", "")]),
        (b"data: x \n\n", [SSEEvent("message", "x ", "")]),
        (b"Data: x\n\n", []),
        (b"data : x\n\n", []),
        (b"something: ignored\ndata: x\n\n", [SSEEvent("message", "x", "")]),
        (b": comment\ndata: x\n: another\n\n", [SSEEvent("message", "x", "")]),
        (b":\n\n", []),
        (b"event: e\n\n", []),
        (b"event: e\n\ndata: x\n\n", [SSEEvent("message", "x", "")]),
        (b"event: \ndata: x\n\n", [SSEEvent("message", "x", "")]),
        (b"event: a\nevent: b\ndata: x\n\n", [SSEEvent("b", "x", "")]),
        (b"data: x\n", []),
        (b"data: x", []),
    ],
    ids=[
        "colon-in-value",
        "empty-data",
        "one-space-removed",
        "trailing-space-kept",
        "field-names-case-sensitive",
        "space-before-colon",
        "unknown-field",
        "comments",
        "empty-comment",
        "event-without-data-dispatches-nothing",
        "event-type-reset-by-empty-dispatch",
        "empty-event-is-message",
        "last-event-field-wins",
        "no-blank-line-at-eof",
        "no-line-end-at-eof",
    ],
)
def test_fields(blob: bytes, expected: list[SSEEvent]) -> None:
    assert_same_in_every_chunking(blob, expected)


def test_event_type_does_not_leak_into_next_event() -> None:
    events, _ = decode_sse(b"event: done\ndata: a\n\ndata: b\n\n")
    assert events == [SSEEvent("done", "a", ""), SSEEvent("message", "b", "")]


@pytest.mark.parametrize(
    ("blob", "expected"),
    [
        (b"id: 1\ndata: a\n\ndata: b\n\n", [SSEEvent("message", "a", "1"), SSEEvent("message", "b", "1")]),
        (b"id: 1\n\ndata: a\n\n", [SSEEvent("message", "a", "1")]),
        (b"id: 1\ndata: a\n\nid\ndata: b\n\n", [SSEEvent("message", "a", "1"), SSEEvent("message", "b", "")]),
        (b"id: 1\ndata: a\n\nid: 2\x003\ndata: b\n\n", [SSEEvent("message", "a", "1"), SSEEvent("message", "b", "1")]),
        (b"data: a\nid: 5\n\n", [SSEEvent("message", "a", "5")]),
        (b"id:  x\ndata: a\n\n", [SSEEvent("message", "a", " x")]),
    ],
    ids=["persists", "set-by-a-block-without-data", "reset-by-empty-id", "nul-ignored", "after-data", "leading-space"],
)
def test_last_event_id(blob: bytes, expected: list[SSEEvent]) -> None:
    assert_same_in_every_chunking(blob, expected)


@pytest.mark.parametrize(
    ("blob", "retry"),
    [
        (b"retry: 3000\n\n", 3000),
        (b"retry:0\n\n", 0),
        (b"retry: 1\n\nretry: 2\n\n", 2),
        (b"retry: 5\nretry: x\n\n", 5),
        (b"retry: 1667a\n\n", None),
        (b"retry: -1\n\n", None),
        (b"retry: 1.5\n\n", None),
        (b"retry:\n\n", None),
        (b"retry:  5\n\n", None),
        (b"retry: \xd9\xa3\n\n", None),  # ARABIC-INDIC DIGIT THREE is a digit, but not an ASCII one
    ],
    ids=["digits", "zero", "last-wins", "invalid-keeps-previous", "letters", "negative", "fraction", "empty",
         "two-spaces", "non-ascii-digit"],
)  # fmt: skip
def test_retry(blob: bytes, retry: int | None) -> None:
    assert_same_in_every_chunking(blob, [], retry)


def test_feed_after_end_is_refused() -> None:
    decoder = SSEDecoder()
    decoder.end()
    with pytest.raises(RuntimeError):
        decoder.feed(b"data: x\n\n")


_STREAM_BYTES = st.lists(
    st.sampled_from([b"data", b"event", b"id", b"retry", b":", b" ", b"x", b"7", b"\0", b"\r", b"\n", b"\r\n",
                     b"\xef\xbb\xbf", b"\xe2\x82\xac", b"\xe2", b"\xff"]),
    max_size=40,
).map(b"".join)  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(blob=_STREAM_BYTES, data=st.data())
def test_any_chunking_decodes_like_the_whole(blob: bytes, data: st.DataObject) -> None:
    cuts = sorted(data.draw(st.lists(st.integers(0, len(blob)), max_size=8)))
    chunks = [blob[a:b] for a, b in zip([0, *cuts], [*cuts, len(blob)], strict=True)]
    assert decode_sse(chunks) == decode_sse(blob)
