"""server/upstream_sse.py: the OpenAI ``chat.completion.chunk`` stream, in every byte chunking and line ending."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.errors import RelayError, UpstreamError, UpstreamProtocolError
from server.events import Delta, Done, Event, Reasoning, Refusal, ToolCallDelta, Usage
from server.upstream_sse import MAX_EVENT_BYTES, MAX_EVENT_LINES, MAX_GAP_BYTES, MAX_TOOL_CALLS, ChunkStreamDecoder


def chunk(choices: list[dict[str, Any]] | None = None, usage: Any = None, **extra: Any) -> dict[str, Any]:
    """A ``chat.completion.chunk`` object as OpenAI sends it (all fields present, ``usage`` null until the end)."""
    return {
        "id": "chatcmpl-AbC123",
        "object": "chat.completion.chunk",
        "created": 1_735_000_000,
        "model": "gpt-4o-mini-2024-07-18",
        "service_tier": "default",
        "system_fingerprint": "fp_0aa8d3e20b",
        "choices": [] if choices is None else choices,
        "usage": usage,
        **extra,
    }


def choice(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


def data_line(value: Any) -> bytes:
    return b"data: " + json.dumps(value, separators=(",", ":")).encode() + b"\n\n"


# What the openai API sends for a streamed reply with stream_options.include_usage: a role-only first chunk (with
# an empty content), content chunks, an empty delta with the finish_reason, a usage chunk with no choices, [DONE].
SAMPLE = b"".join(
    [
        data_line(chunk([choice({"role": "assistant", "content": "", "refusal": None})])),
        data_line(chunk([choice({"content": "Hel"})])),
        data_line(chunk([choice({"content": "lo, wörld 😀"})])),
        data_line(chunk([choice({"content": "\n\n- a\r\n"})])),
        data_line(chunk([choice({}, "stop")])),
        data_line(
            chunk(
                [],
                {
                    "prompt_tokens": 9,
                    "completion_tokens": 12,
                    "total_tokens": 21,
                    "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                    "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
                },
            )
        ),
        b"data: [DONE]\n\n",
    ]
)
SAMPLE_EVENTS: list[Event] = [
    Delta("Hel"),
    Delta("lo, wörld 😀"),
    Delta("\n\n- a\r\n"),
    Done("stop", Usage(9, 12, 21)),
]


# A reply with some text, for the cases that test something else: a [DONE] after no text and no finish_reason is
# a failure of its own (see test_done_without_a_reply_is_a_protocol_error).
X = b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n'
DONE = b"data: [DONE]\n\n"


def decode(chunks: list[bytes]) -> list[Event]:
    decoder = ChunkStreamDecoder()
    events: list[Event] = []
    for piece in chunks:
        events.extend(decoder.feed(piece))
    events.extend(decoder.end())
    return events


def decode_until_error(chunks: list[bytes]) -> tuple[list[Event], type[RelayError] | None]:
    """The events delivered before the decoder raised, and the type of what it raised."""
    decoder = ChunkStreamDecoder()
    events: list[Event] = []
    try:
        for piece in chunks:
            events.extend(decoder.feed(piece))
        events.extend(decoder.end())
    except RelayError as exc:
        return events, type(exc)
    return events, None


def chunked(blob: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted(cuts)
    return [blob[a:b] for a, b in zip([0, *points], [*points, len(blob)], strict=True)]


# --- the real wire format -------------------------------------------------------------------------------------------


def test_sample_stream() -> None:
    assert decode([SAMPLE]) == SAMPLE_EVENTS


def test_sample_stream_in_every_two_piece_split() -> None:
    for cut in range(len(SAMPLE) + 1):
        assert decode([SAMPLE[:cut], SAMPLE[cut:]]) == SAMPLE_EVENTS, cut


def test_sample_stream_one_byte_at_a_time() -> None:
    assert decode([SAMPLE[i : i + 1] for i in range(len(SAMPLE))]) == SAMPLE_EVENTS


@pytest.mark.parametrize("line_end", [b"\n", b"\r\n", b"\r"], ids=["LF", "CRLF", "CR"])
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_sample_stream_in_any_chunking(line_end: bytes, data: st.DataObject) -> None:
    # JSON escapes every CR and LF, so replacing the LFs of the framing changes nothing inside the data.
    blob = SAMPLE.replace(b"\n", line_end)
    cuts = data.draw(st.lists(st.integers(0, len(blob)), max_size=20))
    assert decode(chunked(blob, cuts)) == SAMPLE_EVENTS


def test_crlf_split_between_reads() -> None:
    blob = SAMPLE.replace(b"\n", b"\r\n")
    at = blob.index(b"\r\n") + 1  # between the CR and the LF of the first line end
    assert decode([blob[:at], blob[at:]]) == SAMPLE_EVENTS


def test_deltas_arrive_as_their_chunks_do() -> None:
    decoder = ChunkStreamDecoder()
    assert decoder.feed(data_line(chunk([choice({"role": "assistant", "content": ""})]))) == []
    assert decoder.feed(data_line(chunk([choice({"content": "a"})]))) == [Delta("a")]
    assert decoder.feed(b'data: {"choices":[{"delta":{"content":"b"}}]}\n') == []  # not dispatched yet
    assert decoder.feed(b"\n") == [Delta("b")]
    assert decoder.feed(b"data: [DONE]\n\n") == [Done(None, None)]
    assert decoder.finished


@pytest.mark.parametrize(
    ("blob", "events"),
    [
        # Comments and other fields carry nothing (OpenRouter sends ": OPENROUTER PROCESSING" comments).
        (b": OPENROUTER PROCESSING\n\n" + SAMPLE, SAMPLE_EVENTS),
        (b"event: message\nid: 1\nretry: 100\n" + SAMPLE, SAMPLE_EVENTS),
        (b':\ndata: {"choices":[{"delta":{"content":"x"}}]}\n: between\nid: 9\n\ndata: [DONE]\n\n',
         [Delta("x"), Done()]),
        # The space after the colon is optional.
        (b'data:{"choices":[{"delta":{"content":"x"}}]}\n\ndata:[DONE]\n\n', [Delta("x"), Done()]),
        # Multi-line data is joined with LF, which JSON takes as whitespace.
        (b'data: {"choices":[{"delta":\ndata: {"content":"x"}}]}\n\ndata: [DONE]\n\n', [Delta("x"), Done()]),
        # Blank lines without data dispatch nothing.
        (b"\n\n\n" + SAMPLE, SAMPLE_EVENTS),
        # Lines after [DONE] are not read.
        (X + b'data: [DONE]\n\ndata: {"choices":[{"delta":{"content":"late"}}]}\n\n', [Delta("x"), Done()]),
        (X + b"data: [DONE]\n\ndata: not json\n\n", [Delta("x"), Done()]),
        # finish_reason and usage travel to Done.
        (
            data_line(chunk([choice({"content": "x"}, "length")], {"prompt_tokens": 1, "completion_tokens": 2,
                                                                  "total_tokens": 3}))
            + b"data: [DONE]\n\n",
            [Delta("x"), Done("length", Usage(1, 2, 3))],
        ),
        (data_line(chunk([choice({}, "content_filter")])) + b"data: [DONE]\n\n", [Done("content_filter")]),
        # A choices-less chunk with usage null changes nothing.
        (X + data_line(chunk([], None)) + DONE, [Delta("x"), Done()]),
        # Unknown extra fields are ignored.
        (data_line(chunk([choice({"content": "x", "tool_calls": None})], obfuscation="abc")) + b"data: [DONE]\n\n",
         [Delta("x"), Done()]),
    ],
    ids=["comment", "other-fields", "interleaved", "no-space", "multi-line-data", "leading-blank-lines",
         "after-done", "garbage-after-done", "finish-and-usage", "content-filter", "usage-null", "extra-fields"],
)  # fmt: skip
def test_stream_shapes(blob: bytes, events: list[Event]) -> None:
    assert decode([blob]) == events
    assert decode([blob[i : i + 1] for i in range(len(blob))]) == events


def test_leading_bom_is_ignored() -> None:
    # WHATWG HTML §9.2.6, which the module says it follows: "One leading U+FEFF BYTE ORDER MARK character must be
    # ignored if any are present." Today the BOM turns the first line into an unknown field and the delta is lost.
    blob = b"\xef\xbb\xbf" + b'data: {"choices":[{"delta":{"content":"first"}}]}\n\ndata: [DONE]\n\n'
    assert decode([blob]) == [Delta("first"), Done()]
    assert decode([blob[:2], blob[2:]]) == [Delta("first"), Done()]


def test_a_bom_before_a_chunks_json_is_skipped_like_json_loads_of_bytes_does() -> None:
    blob = b'data: \xef\xbb\xbf{"choices":[{"delta":{"content":"x"}}]}\n\ndata: [DONE]\n\n'
    assert decode([blob]) == [Delta("x"), Done()]


@pytest.mark.parametrize(
    "delta",
    [{}, {"content": ""}, {"content": None}, {"role": "assistant"}, {"content": 5}, {"content": ["x"]},
     {"refusal": None}, {"refusal": ""}, {"reasoning_content": ""}, {"reasoning": None}, {"reasoning": 3},
     {"tool_calls": None}, {"tool_calls": []}, {"tool_calls": [{"index": 0, "function": {"arguments": ""}}]},
     {"tool_calls": [{"index": 0, "id": "", "type": "function", "function": {"name": ""}}]}],
    ids=["empty", "empty-content", "null-content", "role-only", "number", "list", "null-refusal", "empty-refusal",
         "empty-reasoning", "null-reasoning", "number-reasoning", "null-tool-calls", "no-tool-calls",
         "tool-call-without-anything", "tool-call-with-empty-names"],
)  # fmt: skip
def test_no_event_without_progress(delta: dict[str, Any]) -> None:
    assert decode([X + data_line(chunk([choice(delta)])) + DONE]) == [Delta("x"), Done()]


@pytest.mark.parametrize(
    "delta_field",
    [None, "text", 1, ["content"]],
    ids=["null", "string", "number", "list"],
)
def test_a_delta_that_is_not_an_object_is_skipped(delta_field: Any) -> None:
    assert decode([X + data_line({"choices": [{"delta": delta_field}]}) + DONE]) == [Delta("x"), Done()]


@pytest.mark.parametrize(
    "usage",
    [
        {"prompt_tokens": "9", "completion_tokens": 2, "total_tokens": 11},
        {"prompt_tokens": 9, "completion_tokens": 2.0, "total_tokens": 11},
        {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": True},
        {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": None},
        {"prompt_tokens": 9, "completion_tokens": 2},
        {},
    ],
    ids=["string", "float", "bool", "null", "missing", "empty"],
)
def test_usage_with_bad_types_is_none(usage: dict[str, Any]) -> None:
    assert decode([X + data_line(chunk([], usage)) + DONE]) == [Delta("x"), Done(None, None)]


@pytest.mark.parametrize("usage", ["12", 12, ["prompt_tokens"], True], ids=["string", "number", "list", "bool"])
def test_usage_that_is_not_an_object_keeps_what_came_before(usage: Any) -> None:
    good = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    blob = X + data_line(chunk([], good)) + data_line(chunk([], usage)) + DONE
    assert decode([blob]) == [Delta("x"), Done(None, Usage(1, 2, 3))]


# --- failures ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b'{"choices": [',
        b"[DONE",
        b"DONE",
        b"",
        b'{"choices":[{"delta":{"content":"x"}}]} extra',
        b'{"choices":[{"delta":{"content":"\xff"}}]}',
        b"[" * 100_000 + b"]" * 100_000,
        b'{"n": ' + b"9" * 5000 + b"}",  # beyond int()'s 4300-digit limit: json raises a plain ValueError
    ],
    ids=["text", "truncated", "done-truncated", "done-no-brackets", "empty", "trailing",
         "invalid-utf8", "deeply-nested", "huge-int"],
)  # fmt: skip
def test_malformed_json_is_a_protocol_error(payload: bytes) -> None:
    with pytest.raises(UpstreamProtocolError):
        decode([b"data: " + payload + b"\n\n"])


@pytest.mark.parametrize(
    "payload",
    [b"[]", b"[1]", b'"text"', b"42", b"null", b"true"],
    ids=["empty-list", "list", "string", "number", "null", "bool"],
)
def test_json_that_is_not_an_object_is_a_protocol_error(payload: bytes) -> None:
    with pytest.raises(UpstreamProtocolError):
        decode([b"data: " + payload + b"\n\n"])


@pytest.mark.parametrize(
    "choices",
    [{"0": {}}, "abc", [None], ["x"], [1], [[{"delta": {"content": "x"}}]]],
    ids=["object", "string", "null-choice", "string-choice", "number-choice", "nested-list"],
)
def test_malformed_choices_are_a_protocol_error(choices: Any) -> None:
    with pytest.raises(UpstreamProtocolError):
        decode([data_line({"choices": choices})])


@pytest.mark.parametrize(
    "error",
    [
        {"message": "The server had an error while processing your request.", "type": "server_error"},
        {"message": "overloaded", "code": 503},
        "internal error",
    ],
    ids=["openai", "vllm", "string"],
)
def test_error_object_in_stream_is_an_upstream_error(error: Any) -> None:
    with pytest.raises(UpstreamError) as info:
        decode([data_line(chunk([choice({"content": "x"})])), data_line({"error": error})])
    assert type(info.value) is UpstreamError
    assert info.value.status == 502
    # The provider's own text is not shown to the user (errors.py: "never an exception's text").
    assert "overloaded" not in info.value.message
    assert "server_error" not in info.value.message


def test_null_error_field_is_not_an_error() -> None:
    assert decode([data_line(chunk([choice({"content": "x"})], error=None)) + b"data: [DONE]\n\n"]) == [
        Delta("x"),
        Done(),
    ]


@pytest.mark.parametrize(
    "blob",
    [
        data_line(chunk([choice({"content": "x"})])) + data_line({"error": {"message": "boom"}}),
        data_line(chunk([choice({"content": "x"})])) + b"data: not json\n\n",
        data_line(chunk([choice({"content": "x"})])) + b"data: [1]\n\n",
    ],
    ids=["error-object", "malformed", "not-an-object"],
)
def test_text_before_a_failure_is_delivered_in_every_chunking(blob: bytes) -> None:
    # The relay writes every event it gets before the error event. If the delta and the failure arrive in one
    # network read, feed() raises and the delta it had already decoded is dropped: what the user sees would depend
    # on TCP segmentation. Whatever the chunking, the user must get "x" and then the error.
    _, error = decode_until_error([blob[i : i + 1] for i in range(len(blob))])
    assert error is not None
    for chunks in ([blob], [blob[:-1], blob[-1:]]):
        assert decode_until_error(chunks) == ([Delta("x")], error)


def feed_until_refused(decoder: ChunkStreamDecoder, piece: bytes, times: int) -> int:
    """How many times `piece` was fed before the decoder raised UpstreamProtocolError; -1 if it never did."""
    for count in range(1, times + 1):
        try:
            decoder.feed(piece)
        except UpstreamProtocolError:
            return count
    return -1


def test_oversized_line_is_refused_before_its_end_arrives() -> None:
    decoder = ChunkStreamDecoder()
    decoder.feed(b'data: {"choices":[{"delta":{"content":"')
    # Refused once the held partial line passes MAX_EVENT_BYTES, not only when its line end finally arrives.
    count = feed_until_refused(decoder, b"x" * 65536, 64)
    assert MAX_EVENT_BYTES // 65536 <= count <= MAX_EVENT_BYTES // 65536 + 1


def test_oversized_event_of_many_data_lines_is_refused() -> None:
    decoder = ChunkStreamDecoder()
    count = feed_until_refused(decoder, b"data: " + b" " * 65536 + b"\n", 64)
    # 16 lines of 64 KiB are exactly MAX_EVENT_BYTES, still allowed; the 17th is one too many.
    assert count == MAX_EVENT_BYTES // 65536 + 1


def test_oversized_line_with_its_end_in_one_read_is_refused() -> None:
    with pytest.raises(UpstreamProtocolError):
        decode([b"data: " + b" " * (MAX_EVENT_BYTES + 1) + b"\n\n"])


def test_a_large_but_sane_event_is_accepted() -> None:
    text = "y" * (MAX_EVENT_BYTES // 2)
    assert decode([data_line({"choices": [{"delta": {"content": text}}]}) + b"data: [DONE]\n\n"]) == [
        Delta(text),
        Done(),
    ]


def test_keep_alive_comments_are_not_an_oversized_event() -> None:
    # Keep-alive comments, each a block of its own (OpenRouter, DeepSeek), never add up to "an event": megabytes
    # of them pass, as long as they stay under the gap bound.
    blob = X + b": keep-alive\n\n" * (MAX_GAP_BYTES // 16) + DONE
    assert len(blob) > 3 * MAX_EVENT_BYTES
    assert decode([blob]) == [Delta("x"), Done()]


# --- the end of the body -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("blob", "events"),
    [
        # Some compatible servers omit [DONE] after a chunk with finish_reason: that reply is whole.
        (data_line(chunk([choice({"content": "x"})])) + data_line(chunk([choice({}, "stop")])),
         [Delta("x"), Done("stop")]),
        (data_line(chunk([choice({}, "stop")])) + data_line(chunk([], {"prompt_tokens": 1, "completion_tokens": 2,
                                                                       "total_tokens": 3})),
         [Done("stop", Usage(1, 2, 3))]),
        # The last event's blank line (or its whole line end) may be missing at EOF.
        (X + b"data: [DONE]", [Delta("x"), Done()]),
        (X + b"data: [DONE]\n", [Delta("x"), Done()]),
        (X + b"data: [DONE]\r", [Delta("x"), Done()]),
        (data_line(chunk([choice({}, "stop")]))[:-2], [Done("stop")]),
        (b'data: {"choices":[{"delta":{"content":"x"},"finish_reason":"stop"}]}', [Delta("x"), Done("stop")]),
    ],
    ids=["finish-reason-no-done", "finish-and-usage-no-done", "done-no-line-end", "done-no-blank-line",
         "done-cr-only", "finish-no-line-end", "delta-and-finish-no-line-end"],
)  # fmt: skip
def test_end(blob: bytes, events: list[Event]) -> None:
    assert decode([blob]) == events


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        b": only a comment\n\n",
        data_line(chunk([choice({"role": "assistant", "content": ""})])),
        data_line(chunk([choice({"content": "half a rep"})])),
        data_line(chunk([choice({"content": "x"})])) + b'data: {"choices":[{"delta":{"content":"y"}',
        data_line(chunk([choice({}, None)])),
    ],
    ids=["empty-body", "comment-only", "role-only", "content-no-finish", "cut-mid-chunk", "null-finish-reason"],
)
def test_end_without_done_or_finish_reason_is_a_protocol_error(blob: bytes) -> None:
    decoder = ChunkStreamDecoder()
    decoder.feed(blob)
    with pytest.raises(UpstreamProtocolError):
        decoder.end()


def test_feed_and_end_after_done_return_nothing() -> None:
    decoder = ChunkStreamDecoder()
    assert decoder.feed(X + DONE) == [Delta("x"), Done()]
    assert decoder.finished
    assert decoder.feed(b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n') == []
    assert decoder.feed(b"data: not json\n\n") == []
    assert decoder.end() == []
    assert decoder.end() == []


def test_end_twice_after_finish_reason_returns_nothing_the_second_time() -> None:
    decoder = ChunkStreamDecoder()
    decoder.feed(data_line(chunk([choice({}, "stop")])))
    assert decoder.end() == [Done("stop")]
    assert decoder.end() == []
    assert decoder.feed(b"data: [DONE]\n\n") == []


@settings(max_examples=200, deadline=None)
@given(
    contents=st.lists(st.text(max_size=8), max_size=8),
    line_end=st.sampled_from([b"\n", b"\r\n", b"\r"]),
    data=st.data(),
)
def test_any_content_in_any_chunking(contents: list[str], line_end: bytes, data: st.DataObject) -> None:
    blob = b"".join(data_line({"choices": [{"delta": {"content": text}}]}) for text in contents)
    blob = (blob + b"data: [DONE]\n\n").replace(b"\n", line_end)
    cuts = data.draw(st.lists(st.integers(0, len(blob)), max_size=12))
    if any(contents):
        assert decode(chunked(blob, cuts)) == [*(Delta(text) for text in contents if text), Done()]
    else:  # no text and no finish_reason: not a reply
        assert decode_until_error(chunked(blob, cuts)) == ([], UpstreamProtocolError)


@pytest.mark.parametrize(
    "payload",
    [
        # CESU-8 / Java "modified UTF-8": U+1F600 as two encoded surrogates. json.loads(bytes) decodes with
        # errors="surrogatepass", so the old decoder read it (and json_bytes relays it as \ud83d\ude00).
        b'{"choices":[{"delta":{"content":"\xed\xa0\xbd\xed\xb8\x80"}}]}',
        b'{"choices":[{"delta":{"content":"a\xed\xa0\x80"}}]}',  # one encoded lone surrogate
    ],
    ids=["cesu8-pair", "lone"],
)
def test_chunk_json_accepts_what_json_loads_of_bytes_accepts(payload: bytes) -> None:
    expected = json.loads(payload)["choices"][0]["delta"]["content"]
    assert decode([b"data: " + payload + b"\n\ndata: [DONE]\n\n"]) == [Delta(expected), Done()]


# --- bounds: what one upstream can make the decoder hold, and do --------------------------------------------------


def feed_all(decoder: ChunkStreamDecoder, blob: bytes, piece: int) -> int:
    """Feed `blob` in pieces of `piece` bytes; the offset of the piece that was refused, -1 if none was."""
    for at in range(0, len(blob), piece):
        try:
            decoder.feed(blob[at : at + piece])
        except UpstreamProtocolError:
            return at
    return -1


def test_an_event_of_max_lines_is_accepted() -> None:
    # Data lines of one event are joined with LF, which JSON reads as whitespace.
    event = b'data: {"choices":[{"delta":{"content":"x"}}]}\n' + b"data:\n" * (MAX_EVENT_LINES - 1) + b"\n"
    assert decode([event + DONE]) == [Delta("x"), Done()]


@pytest.mark.parametrize(
    "line",
    [b"data:\n", b"data: x\n", b": comment\n", b"id: 1\n", b"data\n"],
    ids=["empty-data", "short-data", "comment", "other-field", "data-without-colon"],
)
def test_an_event_of_one_line_too_many_is_refused(line: bytes) -> None:
    # Empty data lines add no bytes: only the line count stops an event made of them.
    with pytest.raises(UpstreamProtocolError, match="oversized"):
        decode([X + line * (MAX_EVENT_LINES + 1)])
    # At the bound, no refusal for size (a block of data lines that is not JSON is a malformed chunk instead).
    blob = X + line * MAX_EVENT_LINES + b"\n" + DONE
    if line.startswith(b"data"):
        with pytest.raises(UpstreamProtocolError, match="malformed"):
            decode([blob])
    else:
        assert decode([blob]) == [Delta("x"), Done()]


@pytest.mark.parametrize(
    ("flood", "bound"),
    [
        # 40,000 short data lines (625 KiB) in one event: once froze the event loop for 24 s.
        (b"data: 0123456789\n" * 40_000, MAX_EVENT_LINES * 17),
        # 5 MB of empty data lines: no bytes, so the byte bound never tripped; minutes of a frozen loop.
        (b"data:\n" * (5_000_000 // 6), MAX_EVENT_LINES * 6),
        # Comment lines, each a block of its own: nothing is an event, the gap bound stops them.
        (b":\n\n" * (52_000_000 // 3), MAX_GAP_BYTES),
        # Nothing but line ends (what a gzip bomb of newlines inflates to).
        (b"\n" * (MAX_GAP_BYTES * 2), MAX_GAP_BYTES),
        # One line that never ends.
        (b"data: " + b"x" * (MAX_EVENT_BYTES * 2), MAX_EVENT_BYTES),
    ],
    ids=["40k-short-data-lines", "5mb-empty-data-lines", "52mb-comment-blocks", "line-ends", "endless-line"],
)
@pytest.mark.parametrize("piece", [16 * 1024, 65_521], ids=["16KiB", "odd"])
def test_a_flood_is_refused_within_its_bound(flood: bytes, bound: int, piece: int) -> None:
    decoder = ChunkStreamDecoder()
    decoder.feed(X)
    refused_at = feed_all(decoder, flood, piece)
    assert 0 <= refused_at <= bound + piece


@settings(max_examples=60, deadline=None)
@given(
    line=st.sampled_from([b"data:", b"data: abc", b": c", b"event: e", b""]),
    line_end=st.sampled_from([b"\n", b"\r\n", b"\r"]),
    data=st.data(),
)
def test_a_flood_is_refused_whatever_the_chunking(line: bytes, line_end: bytes, data: st.DataObject) -> None:
    # The running counts are the decoder's only memory of an event: any chunking must give the same refusal (or
    # the same events), as one read of the whole would.
    flood = X + (line + line_end) * (MAX_EVENT_LINES + 10)
    if not line:
        flood += b"\n" * (MAX_GAP_BYTES + 1)
    cuts = data.draw(st.lists(st.integers(0, len(flood)), max_size=30))
    assert decode_until_error(chunked(flood, cuts)) == ([Delta("x")], UpstreamProtocolError)


def test_decoding_work_is_linear_in_the_lines_of_an_event(monkeypatch: pytest.MonkeyPatch) -> None:
    # A count of work, not a timing: the decoder's size bookkeeping goes through len(), and summing the sizes of
    # an event's lines again at every line (the quadratic decoder) calls it n²/2 times for n lines. The module's
    # global `len` is replaced by a counting one (a test-only seam: builtins are looked up through the module).
    import server.upstream_sse as module

    calls = 0

    def counting_len(obj: Any) -> int:
        nonlocal calls
        calls += 1
        return len(obj)

    monkeypatch.setattr(module, "len", counting_len, raising=False)

    def work(lines: int) -> int:
        nonlocal calls
        calls = 0
        decoder = ChunkStreamDecoder()
        blob = b"data: 0123456789\n" * lines
        for at in range(0, len(blob), 4096):
            decoder.feed(blob[at : at + 4096])
        return calls

    small, large = work(MAX_EVENT_LINES // 8), work(MAX_EVENT_LINES)
    assert small > 0
    assert large <= 8 * small * 1.25  # linear: 8 times the lines, about 8 times the work (quadratic: 64 times)


# --- odd endings ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "message"),
    [
        (b'error: {"code":400,"message":"Incorrect API key provided: sk-secret"}', "(code 400)"),
        (b'error: {"error":{"code":503,"message":"sk-secret overloaded"}}', "(code 503)"),
        (b'error:{"code":"400","message":"sk-secret"}', None),
        (b'error: {"code":99999999999999999999,"message":"sk-secret"}', None),
        (b'error: {"code":true}', None),
        (b"error: sk-secret is not valid", None),
        (b"error", None),
    ],
    ids=["llama-cpp", "nested", "code-string", "code-huge", "code-bool", "not-json", "no-value"],
)
def test_an_sse_error_field_is_an_upstream_error(field: bytes, message: str | None) -> None:
    # Older llama.cpp servers: an ``error:`` field (not data), then ``data: [DONE]``. The text is never relayed.
    blob = X + field + b"\n\n" + DONE
    events, error = decode_until_error([blob])
    assert (events, error) == ([Delta("x")], UpstreamError)
    for chunks in ([blob[i : i + 1] for i in range(len(blob))], [blob[:-1], blob[-1:]]):
        assert decode_until_error(chunks) == ([Delta("x")], UpstreamError)
    with pytest.raises(UpstreamError) as info:
        decode([field + b"\n\n" + DONE])
    assert type(info.value) is UpstreamError
    assert "secret" not in info.value.message
    assert "code" not in info.value.message if message is None else message in info.value.message


@pytest.mark.parametrize(
    "line",
    [b"data: [DONE]  ", b"data:[DONE]\t", b"data:  [DONE]", b"data: [DONE]\x0c", b"data: [DONE] \t "],
    ids=["trailing-spaces", "trailing-tab", "leading-space", "form-feed", "mixed"],
)
def test_done_with_whitespace_ends_the_stream(line: bytes) -> None:
    # The openai package ends a stream on any data that starts with [DONE]; the relay accepts the whitespace.
    blob = X + line + b"\n\n" + data_line(chunk([choice({"content": "late"})]))
    assert decode([blob]) == [Delta("x"), Done()]
    assert decode([blob[i : i + 1] for i in range(len(blob))]) == [Delta("x"), Done()]


@pytest.mark.parametrize("payload", [b"[DONE]x", b"[DONE] x", b"x[DONE]"], ids=["suffix", "word", "prefix"])
def test_done_with_other_text_is_a_protocol_error(payload: bytes) -> None:
    assert decode_until_error([X + b"data: " + payload + b"\n\n"]) == ([Delta("x")], UpstreamProtocolError)


@pytest.mark.parametrize(
    "blob",
    [
        DONE,
        data_line(chunk([choice({"role": "assistant", "content": ""})])) + DONE,
        data_line(chunk([], {"prompt_tokens": 1, "completion_tokens": 0, "total_tokens": 1})) + DONE,
        data_line(chunk([choice({"reasoning_content": "thinking"})])) + DONE,
        data_line(chunk([{"index": 1, "delta": {"content": "another choice's text"}}])) + DONE,
    ],
    ids=["done-only", "role-only", "usage-only", "reasoning-only", "other-choice-only"],
)
def test_done_without_a_reply_is_a_protocol_error(blob: bytes) -> None:
    # No text and no finish_reason: the upstream never started answering. An empty Done would show the user a
    # finished, empty reply; the relay reports a failure instead.
    with pytest.raises(UpstreamProtocolError, match="without a reply"):
        decode([blob])


@pytest.mark.parametrize(
    ("blob", "events"),
    [
        (X + DONE, [Delta("x"), Done(None)]),
        (data_line(chunk([choice({}, "stop")])) + DONE, [Done("stop")]),
        (data_line(chunk([choice({}, "content_filter")])) + DONE, [Done("content_filter")]),
    ],
    ids=["text-no-finish-reason", "finish-reason-no-text", "filtered"],
)
def test_done_after_text_or_a_finish_reason_is_done(blob: bytes, events: list[Event]) -> None:
    assert decode([blob]) == events


def test_only_choice_0_is_relayed_found_by_its_index() -> None:
    # n > 1 forced by an upstream or a proxy: each chunk may hold several choices, in any order.
    def two(first: tuple[int, str, str | None], second: tuple[int, str, str | None]) -> bytes:
        return data_line(
            chunk([{"index": i, "delta": {"content": text}, "finish_reason": reason} for i, text, reason in (first,
                                                                                                           second)])
        )  # fmt: skip

    blob = (
        two((1, "B1", None), (0, "A1", None))
        + two((0, "A2", None), (1, "B2", None))
        + data_line(chunk([{"index": 1, "delta": {"content": "B3"}, "finish_reason": "length"}]))
        + two((1, "", None), (0, "", "stop"))
        + DONE
    )
    assert decode([blob]) == [Delta("A1"), Delta("A2"), Done("stop")]


@pytest.mark.parametrize(
    "choices",
    [
        [{"delta": {"content": "x"}}, {"delta": {"content": "y"}}],
        [{"index": 0, "delta": {"content": "x"}}, {"delta": {"content": "y"}}],
    ],
    ids=["no-index", "mixed"],
)
def test_a_choice_without_an_index_counts_at_its_position(choices: list[dict[str, Any]]) -> None:
    assert decode([data_line({"choices": choices}) + DONE]) == [Delta("x"), Done()]


@pytest.mark.parametrize("index", ["0", 0.0, None, True], ids=["string", "float", "null", "bool"])
def test_a_choice_index_that_is_not_an_integer_is_a_protocol_error(index: Any) -> None:
    with pytest.raises(UpstreamProtocolError):
        decode([data_line({"choices": [{"index": index, "delta": {"content": "x"}}]}) + DONE])


# --- reasoning, tool calls, refusals: the chunk shapes of real upstreams ----------------------------------------------


def _deepseek(delta: dict[str, Any], finish: str | None = None, usage: Any = None) -> bytes:
    """A deepseek-reasoner chunk: both fields always present, the unused one null; usage in the finish chunk."""
    body = chunk([choice({"content": None, "reasoning_content": None, **delta}, finish)], usage)
    body["model"] = "deepseek-reasoner"
    return data_line(body)


DEEPSEEK_REASONER = b"".join(
    [
        _deepseek({"role": "assistant", "reasoning_content": ""}),
        b": keep-alive\n\n",  # DeepSeek's comment lines while it is busy
        _deepseek({"reasoning_content": "The user"}),
        _deepseek({"reasoning_content": " greets me."}),
        _deepseek({"content": "Hello"}),
        _deepseek({"content": "!"}),
        _deepseek(
            {"content": ""},
            "stop",
            {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14,
             "completion_tokens_details": {"reasoning_tokens": 6}, "prompt_cache_hit_tokens": 0},
        ),
        DONE,
    ]
)  # fmt: skip

# vLLM leaves out null fields; its reasoning parsers fill ``reasoning_content`` (older servers) or both
# ``reasoning`` and ``reasoning_content`` with the same text (newer ones).
VLLM_REASONING = b"".join(
    [
        data_line({"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "Qwen/QwQ-32B",
                   "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                "finish_reason": None}]}),
        data_line({"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "Qwen/QwQ-32B",
                   "choices": [{"index": 0, "delta": {"reasoning_content": "Think"}, "logprobs": None,
                                "finish_reason": None}]}),
        data_line({"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "Qwen/QwQ-32B",
                   "choices": [{"index": 0, "delta": {"reasoning": "ing", "reasoning_content": "ing"},
                                "logprobs": None, "finish_reason": None}]}),
        data_line({"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "Qwen/QwQ-32B",
                   "choices": [{"index": 0, "delta": {"content": "42"}, "logprobs": None, "finish_reason": "stop",
                                "stop_reason": None}]}),
        DONE,
    ]
)  # fmt: skip

# Groq with reasoning_format=parsed: ``reasoning``, and an x_groq object of its own on the first and last chunks.
GROQ_REASONING = b"".join(
    [
        data_line({"id": "chatcmpl-g", "object": "chat.completion.chunk", "model": "qwen/qwen3-32b",
                   "x_groq": {"id": "req_01"},
                   "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                "finish_reason": None}]}),
        data_line({"id": "chatcmpl-g", "object": "chat.completion.chunk", "model": "qwen/qwen3-32b",
                   "choices": [{"index": 0, "delta": {"reasoning": "Hmm"}, "logprobs": None,
                                "finish_reason": None}]}),
        data_line({"id": "chatcmpl-g", "object": "chat.completion.chunk", "model": "qwen/qwen3-32b",
                   "choices": [{"index": 0, "delta": {"content": "Yes"}, "logprobs": None, "finish_reason": None}]}),
        data_line({"id": "chatcmpl-g", "object": "chat.completion.chunk", "model": "qwen/qwen3-32b",
                   "x_groq": {"id": "req_01", "usage": {"prompt_tokens": 3}},
                   "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]}),
        DONE,
    ]
)  # fmt: skip

# OpenAI: the first piece of each call carries id, type and name with empty arguments; the arguments follow in
# fragments; two calls in parallel interleave by index; the finish reason is tool_calls.
OPENAI_TOOL_CALLS = b"".join(
    [
        data_line(chunk([choice({"role": "assistant", "content": None, "refusal": None, "tool_calls": [
            {"index": 0, "id": "call_DdmO9pD3", "type": "function",
             "function": {"name": "get_weather", "arguments": ""}}]})])),
        data_line(chunk([choice({"tool_calls": [{"index": 0, "function": {"arguments": '{"ci'}}]})])),
        data_line(chunk([choice({"tool_calls": [{"index": 0, "function": {"arguments": 'ty":"Paris"}'}}]})])),
        data_line(chunk([choice({"tool_calls": [
            {"index": 1, "id": "call_Zx9", "type": "function", "function": {"name": "get_time", "arguments": ""}}]})])),
        data_line(chunk([choice({"tool_calls": [{"index": 1, "function": {"arguments": "{}"}}]})])),
        data_line(chunk([choice({}, "tool_calls")])),
        data_line(chunk([], {"prompt_tokens": 80, "completion_tokens": 40, "total_tokens": 120})),
        DONE,
    ]
)  # fmt: skip

OPENAI_REFUSAL = b"".join(
    [
        data_line(chunk([choice({"role": "assistant", "content": None, "refusal": ""})])),
        data_line(chunk([choice({"refusal": "I'm sorry, "})])),
        data_line(chunk([choice({"refusal": "I can't help with that."})])),
        data_line(chunk([choice({}, "stop")])),
        DONE,
    ]
)

# Ollama sends each call whole in one piece; its older versions leave out the index and say finish_reason stop.
OLLAMA_TOOL_CALLS = b"".join(
    [
        data_line({"id": "chatcmpl-7", "object": "chat.completion.chunk", "created": 1, "model": "llama3.2",
                   "system_fingerprint": "fp_ollama",
                   "choices": [{"index": 0, "delta": {"role": "assistant", "content": "", "tool_calls": [
                       {"id": "call_a1", "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
                       {"id": "call_b2", "type": "function",
                        "function": {"name": "get_time", "arguments": "{}"}}]}, "finish_reason": None}]}),
        data_line({"id": "chatcmpl-7", "object": "chat.completion.chunk", "created": 1, "model": "llama3.2",
                   "system_fingerprint": "fp_ollama",
                   "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                "finish_reason": "stop"}]}),
        DONE,
    ]
)  # fmt: skip


@pytest.mark.parametrize(
    ("blob", "events"),
    [
        (DEEPSEEK_REASONER, [Reasoning("The user"), Reasoning(" greets me."), Delta("Hello"), Delta("!"),
                             Done("stop", Usage(5, 9, 14))]),
        (VLLM_REASONING, [Reasoning("Think"), Reasoning("ing"), Delta("42"), Done("stop")]),
        (GROQ_REASONING, [Reasoning("Hmm"), Delta("Yes"), Done("stop")]),
        (OPENAI_TOOL_CALLS, [ToolCallDelta(0, "call_DdmO9pD3", "get_weather"), ToolCallDelta(0, None, None, '{"ci'),
                             ToolCallDelta(0, None, None, 'ty":"Paris"}'), ToolCallDelta(1, "call_Zx9", "get_time"),
                             ToolCallDelta(1, None, None, "{}"), Done("tool_calls", Usage(80, 40, 120))]),
        (OPENAI_REFUSAL, [Refusal("I'm sorry, "), Refusal("I can't help with that."), Done("stop")]),
        (OLLAMA_TOOL_CALLS, [ToolCallDelta(0, "call_a1", "get_weather", '{"city":"Paris"}'),
                             ToolCallDelta(1, "call_b2", "get_time", "{}"), Done("stop")]),
    ],
    ids=["deepseek-reasoner", "vllm-reasoning", "groq-reasoning", "openai-tool-calls", "openai-refusal",
         "ollama-tool-calls"],
)  # fmt: skip
def test_real_upstream_shapes(blob: bytes, events: list[Event]) -> None:
    assert decode([blob]) == events
    # And one byte at a time: the decoder's chunking never changes what it makes.
    assert decode([blob[i : i + 1] for i in range(len(blob))]) == events


@pytest.mark.parametrize(
    "blob",
    [OPENAI_REFUSAL, OLLAMA_TOOL_CALLS, OPENAI_TOOL_CALLS.replace(b'"tool_calls"}', b"null}")],
    ids=["refusal", "tool-calls", "tool-calls-without-finish-reason"],
)
def test_a_reply_of_no_text_is_done_not_a_protocol_error(blob: bytes) -> None:
    events = decode([blob])
    assert not any(isinstance(e, Delta) for e in events)
    assert isinstance(events[-1], Done)


def test_only_reasoning_with_a_finish_reason_is_done() -> None:
    # A reasoner whose token budget ran out while it was thinking: no answer, but the upstream says why.
    blob = data_line(chunk([choice({"reasoning_content": "hm"})])) + data_line(chunk([choice({}, "length")])) + DONE
    assert decode([blob]) == [Reasoning("hm"), Done("length")]


def test_only_reasoning_without_a_finish_reason_is_delivered_then_a_protocol_error() -> None:
    blob = data_line(chunk([choice({"reasoning_content": "hm"})])) + DONE
    assert decode_until_error([blob]) == ([Reasoning("hm")], UpstreamProtocolError)


def test_one_chunk_with_every_kind_keeps_their_order() -> None:
    delta = {"reasoning": "r", "content": "c", "refusal": "f", "tool_calls": [{"index": 2, "id": "i"}]}
    blob = data_line(chunk([choice(delta, "stop")])) + DONE
    assert decode([blob]) == [Reasoning("r"), Delta("c"), Refusal("f"), ToolCallDelta(2, "i"), Done("stop")]


def test_reasoning_content_wins_over_reasoning_when_both_are_sent() -> None:
    blob = data_line(chunk([choice({"reasoning_content": "a", "reasoning": "b"}, "length")])) + DONE
    assert decode([blob]) == [Reasoning("a"), Done("length")]


def test_tool_calls_of_another_choice_are_not_relayed() -> None:
    other = {"index": 1, "delta": {"tool_calls": [{"index": 0, "id": "x", "function": {"name": "n"}}]}}
    blob = X + data_line(chunk([other])) + DONE
    assert decode([blob]) == [Delta("x"), Done()]


@pytest.mark.parametrize(
    "tool_calls",
    [
        "call",
        {"index": 0},
        [None],
        ["call"],
        [{"index": -1, "id": "a"}],
        [{"index": MAX_TOOL_CALLS, "id": "a"}],
        [{"index": True, "id": "a"}],
        [{"index": "0", "id": "a"}],
        [{"index": 0.0, "id": "a"}],
        [{"index": 0, "id": 5}],
        [{"index": 0, "function": "get_weather"}],
        [{"index": 0, "function": {"name": ["get_weather"]}}],
        [{"index": 0, "function": {"arguments": ["Paris"]}}],
    ],
    ids=["string", "object", "null-item", "string-item", "negative-index", "index-too-large", "bool-index",
         "string-index", "float-index", "number-id", "string-function", "list-name", "list-arguments"],
)  # fmt: skip
def test_malformed_tool_calls_are_a_protocol_error(tool_calls: Any) -> None:
    blob = X + data_line(chunk([choice({"tool_calls": tool_calls})])) + DONE
    events, error = decode_until_error([blob])
    assert events == [Delta("x")]
    assert error is UpstreamProtocolError


def test_the_last_tool_call_index_is_accepted() -> None:
    blob = data_line(chunk([choice({"tool_calls": [{"index": MAX_TOOL_CALLS - 1, "id": "a"}]})])) + DONE
    assert decode([blob]) == [ToolCallDelta(MAX_TOOL_CALLS - 1, "a"), Done()]


def test_tool_call_arguments_sent_as_an_object_are_relayed_as_json_text() -> None:
    # llama.cpp's server (some versions) and TGI send the arguments object itself, where OpenAI sends JSON text.
    call = {"index": 0, "id": "0", "type": "function", "function": {"name": "pay", "arguments": {"id": "T1", "n": 2}}}
    blob = data_line(chunk([choice({"tool_calls": [call]}, "tool_calls")])) + DONE
    assert decode([blob]) == [ToolCallDelta(0, "0", "pay", '{"id":"T1","n":2}'), Done("tool_calls")]
