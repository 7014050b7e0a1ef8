"""The AI SDK UI message stream framing (server/ui_stream.py): exact parts, and for any reply a stream that the
rules of the SDK's state machine (``processUIMessageStream`` in the ``ai`` package) accept. The real SDK reads it
in tests/js/ai-sdk.test.mjs."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from server.events import Delta, Done, Error, Event, Reasoning, Refusal, ToolCallDelta, Usage
from server.framing import UIMessageStreamFraming
from server.ui_stream import ui_finish_reason

from .sse_decoder import SSEDecoder

SID = "00112233445566778899aabbccddeeff"


def parts_of(events: list[Event], framing: UIMessageStreamFraming | None = None) -> list[Any]:
    """The JSON parts of the stream, read with the independent spec decoder; "[DONE]" as it is."""
    framing = framing or UIMessageStreamFraming()
    wire = b"".join(framing.encode(SID, seq, e) for seq, e in enumerate(events, 1))
    decoder = SSEDecoder()
    decoded = decoder.feed(wire) + decoder.end()
    assert all(event.type == "message" for event in decoded)
    return [event.data if event.data == "[DONE]" else json.loads(event.data) for event in decoded]


def test_a_text_reply() -> None:
    assert parts_of([Delta("Hel"), Delta("lo"), Done("stop", Usage(1, 2, 3))]) == [
        {"type": "start"},
        {"type": "start-step"},
        {"type": "text-start", "id": "t1"},
        {"type": "text-delta", "id": "t1", "delta": "Hel"},
        {"type": "text-delta", "id": "t1", "delta": "lo"},
        {"type": "text-end", "id": "t1"},
        {"type": "finish-step"},
        {"type": "finish", "finishReason": "stop"},
        "[DONE]",
    ]


def test_reasoning_then_text_then_a_tool_call() -> None:
    events: list[Event] = [
        Reasoning("hm"),
        Delta("Let me see."),
        ToolCallDelta(0, "call_1", "get_weather", '{"city":'),
        ToolCallDelta(0, arguments='"Paris"}'),
        Done("tool_calls"),
    ]
    assert parts_of(events)[2:] == [
        {"type": "reasoning-start", "id": "r1"},
        {"type": "reasoning-delta", "id": "r1", "delta": "hm"},
        {"type": "reasoning-end", "id": "r1"},
        {"type": "text-start", "id": "t2"},
        {"type": "text-delta", "id": "t2", "delta": "Let me see."},
        {"type": "text-end", "id": "t2"},
        {"type": "tool-input-start", "toolCallId": "call_1", "toolName": "get_weather"},
        {"type": "tool-input-delta", "toolCallId": "call_1", "inputTextDelta": '{"city":'},
        {"type": "tool-input-delta", "toolCallId": "call_1", "inputTextDelta": '"Paris"}'},
        {"type": "tool-input-available", "toolCallId": "call_1", "toolName": "get_weather", "input": {"city": "Paris"}},
        {"type": "finish-step"},
        {"type": "finish", "finishReason": "tool-calls"},
        "[DONE]",
    ]


def test_arguments_that_are_not_json_are_a_tool_input_error() -> None:
    parts = parts_of([ToolCallDelta(0, "c", "f", "{oops"), Done("tool_calls")])
    assert parts[4] == {
        "type": "tool-input-error",
        "toolCallId": "c",
        "toolName": "f",
        "input": "{oops",
        "errorText": "the model's tool call arguments are not valid JSON",
    }


def test_a_refusal_is_text_and_an_error_ends_the_open_part() -> None:
    assert parts_of([Refusal("no"), Error("timeout", "too slow")])[2:] == [
        {"type": "text-start", "id": "t1"},
        {"type": "text-delta", "id": "t1", "delta": "no"},
        {"type": "text-end", "id": "t1"},
        {"type": "error", "errorText": "too slow"},
        "[DONE]",
    ]


def test_an_error_before_anything_still_starts_the_message() -> None:
    assert parts_of([Error("upstream_error", "down")]) == [
        {"type": "start"},
        {"type": "start-step"},
        {"type": "error", "errorText": "down"},
        "[DONE]",
    ]


def test_quiet_frames() -> None:
    framing = UIMessageStreamFraming()
    assert framing.keepalive() == b": ping\n\n"
    assert framing.opening(SID, 3000) == framing.reconnect_hint(3000) == b""


def test_finish_reasons() -> None:
    assert [ui_finish_reason(r) for r in ("stop", "length", "tool_calls", "content_filter", None, "x")] == [
        "stop",
        "length",
        "tool-calls",
        "content-filter",
        "stop",
        "other",
    ]


def check_like_the_sdk(parts: list[Any]) -> None:
    """The rules ``processUIMessageStream`` enforces (it throws UIMessageStreamError otherwise), and the order
    ``useChat`` expects: start, start-step, ..., then finish-step, finish, [DONE] (or error, [DONE])."""
    assert parts[0]["type"] == "start"
    assert parts[1] == {"type": "start-step"}
    assert parts[-1] == "[DONE]"
    open_parts: dict[str, str] = {}
    tool_calls: set[str] = set()
    for part in parts[2:-1]:
        kind = part["type"]
        for prefix in ("text", "reasoning"):
            if kind == f"{prefix}-start":
                assert not open_parts, "one part open at a time"
                open_parts[part["id"]] = prefix
            elif kind in (f"{prefix}-delta", f"{prefix}-end"):
                assert open_parts.get(part["id"]) == prefix, f"{kind} for a part not started"
                if kind.endswith("-end"):
                    del open_parts[part["id"]]
        if kind == "tool-input-start":
            tool_calls.add(part["toolCallId"])
        elif kind in ("tool-input-delta", "tool-input-available", "tool-input-error"):
            assert part["toolCallId"] in tool_calls
        elif kind in ("finish-step", "finish", "error"):
            assert not open_parts, f"{kind} with a part still open"
    assert parts[-2]["type"] in ("finish", "error")


texts = st.text(st.characters(codec="utf-8"), max_size=6)
progress = st.one_of(
    texts.map(Delta),
    texts.map(Reasoning),
    texts.map(Refusal),
    st.builds(ToolCallDelta, index=st.integers(0, 2), id=st.none() | st.just("c"), name=st.just("f"), arguments=texts),
)
terminal = st.one_of(st.builds(Done, st.sampled_from(["stop", "length", "tool_calls", None])), st.just(Error("x", "y")))


@given(st.lists(progress, max_size=15), terminal)
def test_any_reply_is_a_stream_the_sdk_accepts(events: list[Event], end: Event) -> None:
    events = [*events, end]
    parts = parts_of(events)
    check_like_the_sdk(parts)
    # Text and reasoning arrive whole, in order.
    for kind, of in (("text", (Delta, Refusal)), ("reasoning", (Reasoning,))):
        sent = "".join(e.content for e in events if isinstance(e, of))
        got = "".join(p["delta"] for p in parts if isinstance(p, dict) and p["type"] == f"{kind}-delta")
        assert got == sent
    if isinstance(end, Done):
        calls = {e.index for e in events if isinstance(e, ToolCallDelta)}
        announced = [p for p in parts if isinstance(p, dict) and p["type"].startswith("tool-input-a")]
        assert len(announced) + sum(1 for p in parts if isinstance(p, dict) and p["type"] == "tool-input-error") == len(
            calls
        )


def test_a_fresh_encoder_replays_the_same_parts() -> None:
    """A resume replays the log from its start through a new encoder: the same bytes."""
    events: list[Event] = [Reasoning("a"), Delta("b"), ToolCallDelta(0, "c", "f", "{}"), Done("tool_calls")]
    assert parts_of(events) == parts_of(events, UIMessageStreamFraming())
