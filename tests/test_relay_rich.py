"""Reasoning, tool calls and refusals end to end: the real `openai` client against the fake upstream, through the
relay, to SSE and NDJSON; the accepted request fields reach the upstream; reasoning is progress for the clocks."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.app import create_app

from .conftest import ServeApp, upstream_config
from .fake_upstream import Behavior, FakeUpstream
from .sse_decoder import SSEEvent, decode_sse
from .streaming import EventSourceModel, read_cut, relay_with_upstream
from .test_upstream_sse import DEEPSEEK_REASONER, GROQ_REASONING, OLLAMA_TOOL_CALLS, OPENAI_REFUSAL
from .wire import ndjson_objects, sse_events

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


async def _post(http: aiohttp.ClientSession, base: str, accept: str, **body: object) -> tuple[int, bytes]:
    async with http.post(f"{base}/api/chat", json=body, headers={"Accept": accept}) as resp:
        return resp.status, await resp.read()


@pytest.mark.parametrize("reasoning_field", ["reasoning_content", "reasoning"])
async def test_reasoning_then_the_answer_over_sse(
    fake_upstream: FakeUpstream, serve: ServeApp, http: aiohttp.ClientSession, reasoning_field: str
) -> None:
    fake_upstream.behavior = Behavior(
        reasoning=["The user", " says hi."], reasoning_field=reasoning_field, tokens=["Hello", "!"]
    )
    base = await serve(create_app(upstream_config(fake_upstream)))
    status, body = await _post(http, base, "text/event-stream", messages=[{"role": "user", "content": "hi"}])
    assert status == 200
    assert [(kind, data) for kind, data, _ in sse_events(body)] == [
        ("reasoning", {"content": "The user"}),
        ("reasoning", {"content": " says hi."}),
        ("message", {"content": "Hello"}),
        ("message", {"content": "!"}),
        ("done", {"finish_reason": "stop", "usage": {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}}),
    ]


async def test_a_tool_call_reply_over_ndjson_and_the_fields_that_reached_the_upstream(
    fake_upstream: FakeUpstream, serve: ServeApp, http: aiohttp.ClientSession
) -> None:
    fake_upstream.behavior = Behavior(tokens=[], tool_calls=[("call_1", "get_weather", ['{"city"', ':"Paris"}'])])
    base = await serve(create_app(upstream_config(fake_upstream, include_usage=False, system_prompt="Be brief.")))
    status, body = await _post(
        http,
        base,
        "application/x-ndjson",
        messages=[{"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]}],
        tools=[WEATHER],
        tool_choice="auto",
        parallel_tool_calls=False,
        stop="END",
        top_p=0.5,
        seed=7,
        max_completion_tokens=64,
        response_format={"type": "text"},
        reasoning_effort="low",
        stream_options={"include_usage": False},
    )
    assert status == 200
    assert ndjson_objects(body) == [
        {"type": "tool_call", "seq": 1, "index": 0, "id": "call_1", "name": "get_weather", "arguments": ""},
        {"type": "tool_call", "seq": 2, "index": 0, "id": None, "name": None, "arguments": '{"city"'},
        {"type": "tool_call", "seq": 3, "index": 0, "id": None, "name": None, "arguments": ':"Paris"}'},
        {"type": "done", "seq": 4, "finish_reason": "tool_calls"},
    ]
    sent = fake_upstream.last.body
    assert sent["messages"] == [
        {"role": "system", "content": "Be brief."},
        # Text parts go on as one string (DeepSeek's API and older servers take no array).
        {"role": "user", "content": "Weather in Paris?"},
    ]
    assert {k: v for k, v in sent.items() if k != "messages"} == {
        "model": "fake-model",
        "stream": True,  # the relay streams from the upstream, and asks for usage only when configured to
        "tools": [WEATHER],
        "tool_choice": "auto",
        "parallel_tool_calls": False,
        "stop": ["END"],
        "top_p": 0.5,
        "seed": 7,
        "max_completion_tokens": 64,
        "response_format": {"type": "text"},
        "reasoning_effort": "low",
    }


async def test_the_tool_result_goes_back_to_the_upstream(
    fake_upstream: FakeUpstream, serve: ServeApp, http: aiohttp.ClientSession
) -> None:
    fake_upstream.behavior = Behavior(tokens=["It is 18 C."])
    base = await serve(create_app(upstream_config(fake_upstream)))
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
    ]  # fmt: skip
    status, body = await _post(http, base, "text/event-stream", messages=messages, tools=[WEATHER])
    assert status == 200
    assert sse_events(body)[0][:2] == ("message", {"content": "It is 18 C."})
    assert fake_upstream.last.body["messages"] == messages


async def test_a_refusal_is_relayed_and_ends_done(
    fake_upstream: FakeUpstream, serve: ServeApp, http: aiohttp.ClientSession
) -> None:
    fake_upstream.behavior = Behavior(tokens=[], refusal=["I can't ", "help with that."])
    base = await serve(create_app(upstream_config(fake_upstream, include_usage=False)))
    status, body = await _post(http, base, "text/event-stream", prompt="something bad")
    assert status == 200
    assert [(kind, data) for kind, data, _ in sse_events(body)] == [
        ("refusal", {"content": "I can't "}),
        ("refusal", {"content": "help with that."}),
        ("done", {"finish_reason": "stop"}),
    ]


async def test_a_reasoner_thinking_longer_than_the_first_token_timeout_is_not_cut(
    fake_upstream: FakeUpstream, serve: ServeApp, http: aiohttp.ClientSession
) -> None:
    # Eight thoughts 0.3 s apart: 2.1 s of reasoning before the first piece of the answer, four times the
    # first-token timeout. Every thought is progress and feeds the clocks (then the idle timeout applies).
    fake_upstream.behavior = Behavior(reasoning=[f"step {i}. " for i in range(8)], tokens=["Done."], delay=0.3)
    config = upstream_config(fake_upstream, include_usage=False, first_token_timeout=0.5, idle_timeout=5.0)
    base = await serve(create_app(config))
    status, body = await _post(http, base, "application/x-ndjson", prompt="think hard")
    assert status == 200
    objects = ndjson_objects(body)
    assert [o["type"] for o in objects] == ["reasoning"] * 8 + ["delta", "done"]
    assert objects[-1]["finish_reason"] == "stop"


async def test_a_reasoner_that_stops_thinking_is_cut_by_the_idle_timeout(
    fake_upstream: FakeUpstream, serve: ServeApp, http: aiohttp.ClientSession
) -> None:
    # Reasoning moves the clocks, so it also starts the idle clock: a stall after it is a mid-reply timeout.
    fake_upstream.behavior = Behavior(reasoning=["hm"], tokens=["never"], fault="stall", fault_after=0)
    config = upstream_config(fake_upstream, include_usage=False, first_token_timeout=30.0, idle_timeout=0.5)
    base = await serve(create_app(config))
    status, body = await _post(http, base, "application/x-ndjson", prompt="think")
    assert status == 200
    objects = ndjson_objects(body)
    assert objects[0] == {"type": "reasoning", "seq": 1, "content": "hm"}
    assert objects[-1]["type"] == "error"
    assert objects[-1]["error"]["type"] == "timeout"
    assert "mid-reply" in objects[-1]["error"]["message"]


async def test_an_unknown_field_is_a_400_naming_it(
    fake_upstream: FakeUpstream, serve: ServeApp, http: aiohttp.ClientSession
) -> None:
    base = await serve(create_app(upstream_config(fake_upstream)))
    status, body = await _post(http, base, "text/event-stream", prompt="x", n=2, logprobs=True)
    assert status == 400
    assert b"unknown fields: 'logprobs', 'n'" in body
    assert fake_upstream.seen == []


async def test_empty_reasoning_pieces_are_not_progress(
    fake_upstream: FakeUpstream, serve: ServeApp, http: aiohttp.ClientSession
) -> None:
    # A "thinking" upstream that only sends empty reasoning_content keeps its connection busy but says nothing: the
    # first-token timeout still ends it, as it ends a flood of text-less chunks.
    fake_upstream.behavior = Behavior(reasoning=[""] * 40, tokens=["late"], delay=0.1)
    config = upstream_config(fake_upstream, include_usage=False, first_token_timeout=0.5)
    base = await serve(create_app(config))
    status, body = await _post(http, base, "application/x-ndjson", prompt="think")
    assert status == 504
    assert b'"type":"timeout"' in body.replace(b" ", b"")


@pytest.mark.parametrize(
    ("blob", "expected"),
    [
        (DEEPSEEK_REASONER, [("reasoning", {"content": "The user"}), ("reasoning", {"content": " greets me."}),
                             ("message", {"content": "Hello"}), ("message", {"content": "!"}),
                             ("done", {"finish_reason": "stop",
                                       "usage": {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14}})]),
        (GROQ_REASONING, [("reasoning", {"content": "Hmm"}), ("message", {"content": "Yes"}),
                          ("done", {"finish_reason": "stop"})]),
        (OLLAMA_TOOL_CALLS, [("tool_call", {"index": 0, "id": "call_a1", "name": "get_weather",
                                            "arguments": '{"city":"Paris"}'}),
                             ("tool_call", {"index": 1, "id": "call_b2", "name": "get_time", "arguments": "{}"}),
                             ("done", {"finish_reason": "stop"})]),
        (OPENAI_REFUSAL, [("refusal", {"content": "I'm sorry, "}), ("refusal", {"content": "I can't help with that."}),
                          ("done", {"finish_reason": "stop"})]),
    ],
    ids=["deepseek-reasoner", "groq-reasoning", "ollama-tool-calls", "openai-refusal"],
)  # fmt: skip
async def test_recorded_upstream_bodies_through_the_openai_client(
    fake_upstream: FakeUpstream,
    serve: ServeApp,
    http: aiohttp.ClientSession,
    blob: bytes,
    expected: list[tuple[str, object]],
) -> None:
    fake_upstream.behavior = Behavior(raw_body=blob)
    base = await serve(create_app(upstream_config(fake_upstream)))
    status, body = await _post(http, base, "text/event-stream", prompt="hi")
    assert status == 200
    assert [(kind, data) for kind, data, _ in sse_events(body)] == expected


RICH = Behavior(
    reasoning=["Think", "ing…"],
    tokens=["Let ", "me ", "check."],
    tool_calls=[("call_1", "get_weather", ['{"city":', '"Paris"}'])],
)


@given(data=st.data())
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_a_rich_reply_cut_at_any_byte_resumes_with_every_part_once(data: st.DataObject) -> None:
    sse = {"Accept": "text/event-stream"}

    def reply(events: list[SSEEvent]) -> list[tuple[str, str]]:
        return [(e.type, e.data) for e in events if e.type != "stream"]  # not the opening block (the stream's id)

    async def scenario() -> None:
        async with relay_with_upstream(RICH, resume_grace=5, shutdown_grace=0.5) as (base, upstream):
            async with aiohttp.ClientSession() as http:
                url = f"{base}/api/chat"
                params = {"prompt": "hi", "resume": "1"}
                async with http.get(url, params=params, headers=sse) as response:
                    whole = await response.read()
                reference = reply(decode_sse(whole)[0])
                upstream.behavior = replace(RICH, delay=0.01)
                async with http.get(url, params=params, headers=sse) as response:
                    stream_id = response.headers["X-Stream-Id"]
                    body = await read_cut(response, data.draw(st.integers(0, len(whole)), label="cut"))
                browser = EventSourceModel()
                browser.connection(body)
                if not browser.events or browser.events[-1].type != "done":
                    if browser.last_event_id:
                        resume = http.get(url, headers={**sse, "Last-Event-ID": browser.last_event_id})
                    else:  # cut inside the opening block: resumed from the start by the stream's id
                        resume = http.get(f"{base}/api/streams/{stream_id}", params={"after": "0"}, headers=sse)
                    async with resume as response:
                        assert response.status == 200
                        browser.connection(await response.read())
            assert reply(browser.events) == reference  # each part once, in order
            assert [kind for kind, _ in reference] == [
                "reasoning", "reasoning", "message", "message", "message", "tool_call", "tool_call", "tool_call",
                "done",
            ]  # fmt: skip

    asyncio.run(asyncio.wait_for(scenario(), 20))
