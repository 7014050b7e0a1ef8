"""The OpenAI chat completions framings (server/openai_chunks.py): exact bytes, and any reply read back by the real
openai SDK's own parsers (its SSE decoder, ``ChatCompletionChunk``, and the accumulator behind ``.stream()``)."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from openai._streaming import SSEDecoder
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from server.errors import RateLimited, RequestError, Unauthorized, UpstreamTimeout
from server.events import Delta, Done, Error, Event, Reasoning, Refusal, ToolCallDelta, Usage
from server.framing import OpenAIChunkFraming, OpenAICompletionFraming
from server.openai_chunks import openai_error_body

SID = "0123456789abcdef0123456789abcdef"


def encode_all(framing: OpenAIChunkFraming | OpenAICompletionFraming, events: list[Event]) -> bytes:
    return b"".join(framing.encode(SID, seq, event) for seq, event in enumerate(events, 1))


def sdk_events(wire: bytes) -> list[str]:
    """The data of each event the openai SDK's own SSE decoder dispatches."""
    return [sse.data for sse in SSEDecoder().iter_bytes(iter([wire]))]


def test_a_text_reply_byte_for_byte() -> None:
    framing = OpenAIChunkFraming("m", 1700000000)
    wire = encode_all(framing, [Delta("Hi"), Delta(" there"), Done("stop")])
    head = b'data: {"id":"chatcmpl-%s","object":"chat.completion.chunk","created":1700000000,"model":"m"' % SID.encode()
    assert wire == (
        head + b',"choices":[{"index":0,"delta":{"role":"assistant","content":"Hi"},"logprobs":null,'
        b'"finish_reason":null}]}\n\n'
        + head
        + b',"choices":[{"index":0,"delta":{"content":" there"},"logprobs":null,"finish_reason":null}]}\n\n'
        + head
        + b',"choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}]}\n\n'
        b"data: [DONE]\n\n"
    )


def test_include_usage_adds_null_usage_and_a_usage_chunk() -> None:
    framing = OpenAIChunkFraming("m", 1, include_usage=True)
    wire = encode_all(framing, [Delta("a"), Done("length", Usage(1, 2, 3))])
    data = sdk_events(wire)
    assert data[-1] == "[DONE]"
    chunks = [ChatCompletionChunk.model_validate_json(item) for item in data[:-1]]
    assert [c.usage for c in chunks[:-1]] == [None, None]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == 3
    assert chunks[-2].choices[0].finish_reason == "length"


def test_a_done_without_text_still_opens_with_the_role() -> None:
    data = sdk_events(encode_all(OpenAIChunkFraming("m", 1), [Done(None)]))
    first = json.loads(data[0])
    assert first["choices"][0] == {
        "index": 0,
        "delta": {"role": "assistant"},
        "logprobs": None,
        "finish_reason": "stop",
    }


def test_tool_call_pieces() -> None:
    framing = OpenAIChunkFraming("m", 1)
    wire = encode_all(framing, [ToolCallDelta(0, "call_1", "f", ""), ToolCallDelta(0, arguments='{"a":1}')])
    first, second = (json.loads(d)["choices"][0]["delta"] for d in sdk_events(wire))
    assert first == {
        "role": "assistant",
        "tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"arguments": "", "name": "f"}}],
    }
    assert second == {"tool_calls": [{"index": 0, "function": {"arguments": '{"a":1}'}}]}


def test_an_error_in_band_is_openai_s_error_object_without_done() -> None:
    wire = encode_all(OpenAIChunkFraming("m", 1), [Delta("a"), Error("timeout", "the model stopped answering")])
    data = sdk_events(wire)
    assert json.loads(data[-1]) == {
        "error": {"message": "the model stopped answering", "type": "server_error", "param": None, "code": "timeout"}
    }
    assert "[DONE]" not in data


def test_keepalive_opening_and_hint_never_give_the_sdk_an_event() -> None:
    framing = OpenAIChunkFraming("m", 1)
    quiet = framing.keepalive() + framing.opening(SID, 3000) + framing.reconnect_hint(3000)
    wire = encode_all(framing, [Delta("a")]) + quiet + framing.keepalive() + encode_all(framing, [Done("stop")])
    data = sdk_events(wire)
    assert len(data) == 3  # the two chunks and [DONE]: the pings were skipped
    assert data[-1] == "[DONE]"


def test_error_bodies() -> None:
    cases = [
        (RequestError("bad"), "invalid_request_error", "invalid_request"),
        (Unauthorized("who"), "authentication_error", "unauthorized"),
        (RateLimited("slow down"), "rate_limit_error", "rate_limited"),
        (UpstreamTimeout("late"), "server_error", "upstream_timeout"),
    ]
    for error, kind, code in cases:
        assert openai_error_body(error) == {
            "error": {"message": error.message, "type": kind, "param": None, "code": code}
        }


def test_the_completion_of_every_kind() -> None:
    framing = OpenAICompletionFraming("m", 5)
    events: list[Event] = [
        Reasoning("think"),
        Delta("Hi"),
        Refusal("no"),
        ToolCallDelta(1, "c2", "g", "{}"),
        ToolCallDelta(0, "c1", "f", '{"a"'),
        ToolCallDelta(0, arguments=":1}"),
    ]
    assert [framing.encode(SID, seq, e) for seq, e in enumerate(events, 1)] == [b""] * len(events)
    body = json.loads(framing.encode(SID, 7, Done("tool_calls", Usage(1, 2, 3))))
    completion = ChatCompletion.model_validate(body)
    message = completion.choices[0].message
    assert completion.id == f"chatcmpl-{SID}"
    assert message.content == "Hi"
    assert message.refusal == "no"
    assert (message.model_extra or {})["reasoning_content"] == "think"
    assert [(c.id, c.function.name, c.function.arguments) for c in message.tool_calls or []] == [
        ("c1", "f", '{"a":1}'),
        ("c2", "g", "{}"),
    ]
    assert completion.usage is not None
    assert completion.usage.total_tokens == 3


def test_the_completion_says_nothing_of_a_failure() -> None:
    framing = OpenAICompletionFraming("m", 5)
    assert framing.encode(SID, 1, Delta("a")) == b""
    assert framing.encode(SID, 2, Error("timeout", "late")) == b""
    assert framing.keepalive() == framing.opening(SID) == framing.reconnect_hint(10) == b""


texts = st.text(st.characters(codec="utf-8"), max_size=8)
progress = st.one_of(
    texts.map(Delta),
    texts.map(Reasoning),
    texts.map(Refusal),
    st.builds(
        ToolCallDelta,
        index=st.integers(0, 2),
        id=st.none(),
        name=st.none(),
        arguments=texts,
    ),
)


def _as_upstreams_send_them(events: list[Event]) -> list[Event]:
    """Tool calls numbered 0, 1, 2... in the order they start, the first piece of each naming it (what the
    SDK's accumulator expects, and what OpenAI, vLLM and Ollama send)."""
    numbers: dict[int, int] = {}
    out: list[Event] = []
    for event in events:
        if isinstance(event, ToolCallDelta):
            if event.index not in numbers:
                index = numbers[event.index] = len(numbers)
                event = ToolCallDelta(index, f"call_{index}", f"tool_{index}", event.arguments)
            else:
                event = ToolCallDelta(numbers[event.index], arguments=event.arguments)
        out.append(event)
    return out


# Not "length" nor "content_filter": the SDK's accumulator raises for those (LengthFinishReasonError...).
@given(st.lists(progress, max_size=12), st.sampled_from(["stop", "tool_calls"]), st.booleans())
def test_the_sdk_assembles_the_chunks_into_the_completion_we_assemble(
    events: list[Event], finish: str, usage: bool
) -> None:
    """Any reply: the SDK's own accumulator (what ``.stream()`` uses) over our chunks gives the message our
    completion framing writes for the same events."""
    events = [*_as_upstreams_send_them(events), Done(finish, Usage(1, 2, 3) if usage else None)]
    data = sdk_events(encode_all(OpenAIChunkFraming("m", 9, include_usage=True), events))
    assert data[-1] == "[DONE]"
    state: ChatCompletionStreamState[Any] = ChatCompletionStreamState()
    for item in data[:-1]:
        state.handle_chunk(ChatCompletionChunk.model_validate_json(item))
    streamed = state.get_final_completion()
    whole = ChatCompletion.model_validate_json(encode_all(OpenAICompletionFraming("m", 9), events))
    assert streamed.id == whole.id
    assert streamed.choices[0].finish_reason == whole.choices[0].finish_reason == finish
    a, b = streamed.choices[0].message, whole.choices[0].message
    assert (a.content or "") == (b.content or "")
    assert a.refusal == b.refusal
    assert (a.model_extra or {}).get("reasoning_content") == (b.model_extra or {}).get("reasoning_content")
    assert [(c.id, c.function.name, c.function.arguments) for c in a.tool_calls or []] == [
        (c.id, c.function.name, c.function.arguments) for c in b.tool_calls or []
    ]
    assert (streamed.usage is None) == (whole.usage is None) == (not usage)
