"""The demo model: its reply, and its pacing through one shared timer per millisecond tick."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
from collections.abc import Sequence

from server.chat_request import ChatRequest, Message, ToolCall
from server.events import Delta, Done, Event, Reasoning, ToolCallDelta
from server.providers.demo import DEMO_REASONER_MODEL, DemoProvider, _Pacer, demo_tokens


def _chat(prompt: str = "hello there", max_tokens: int | None = None) -> ChatRequest:
    return ChatRequest(messages=(Message("user", prompt),), model="m", max_tokens=max_tokens)


async def _collect(provider: DemoProvider, chat: ChatRequest) -> list[tuple[float, Sequence[Event]]]:
    loop = asyncio.get_running_loop()
    out: list[tuple[float, Sequence[Event]]] = []
    async with contextlib.aclosing(provider.stream(chat)) as batches:
        async for batch in batches:
            out.append((loop.time(), batch))
    return out


async def test_the_paced_reply_is_the_whole_reply_and_no_token_comes_before_its_due_time() -> None:
    provider = DemoProvider(delay=0.005)
    chat = _chat(max_tokens=12)
    loop = asyncio.get_running_loop()
    started = loop.time()
    batches = await _collect(provider, chat)
    events = [event for _, batch in batches for event in batch]
    assert [e.content for e in events if isinstance(e, Delta)] == demo_tokens(chat)[:12]
    assert isinstance(events[-1], Done)
    assert events[-1].finish_reason == "length"
    for index, (at, _) in enumerate(batches):
        assert at >= started + (index + 1) * 0.005 - 1e-9  # never early; lateness is the bench's business


async def test_streams_due_in_the_same_tick_share_one_timer_and_all_wake() -> None:
    loop = asyncio.get_running_loop()
    pacer = _Pacer()
    due = loop.time() + 0.05
    waiters = [pacer.wake_at(loop, due) for _ in range(20)]
    assert len(pacer._timers) == 1
    assert len(pacer._waiting) == 1
    await asyncio.wait_for(asyncio.gather(*waiters), 2)
    assert loop.time() >= due
    assert pacer._timers == {}
    assert pacer._waiting == {}


def test_the_tick_is_a_millisecond_or_a_thousandth_of_a_slower_pace() -> None:
    assert [_Pacer.tick_for(d) for d in (0, 0.001, 0.02, 1.0, 2.5, 3600)] == [1, 1, 1, 1, 2, 3600]


async def test_slow_streams_started_within_a_second_share_a_timer_and_none_wakes_early() -> None:
    # The idle bench's streams wait an hour for their first token: a timer (and its table entries) each would be
    # most of what such a stream costs while it waits.
    loop = asyncio.get_running_loop()
    pacer = _Pacer()
    tick = _Pacer.tick_for(3.0)  # 3 ms: short enough to wait for here
    start = loop.time() + 0.05
    dues = [start + i * 0.0001 for i in range(20)]  # 20 streams due within 2 ms
    waiters = [pacer.wake_at(loop, due, tick) for due in dues]
    assert len(pacer._timers) <= 2
    woke = await asyncio.wait_for(asyncio.gather(*(_woken_at(w) for w in waiters)), 2)
    assert all(at >= due for at, due in zip(woke, dues, strict=True))
    assert pacer._timers == {}
    assert pacer._waiting == {}


async def _woken_at(woken: asyncio.Future[None]) -> float:
    await woken
    return asyncio.get_running_loop().time()


async def test_a_cancelled_wait_leaves_nothing_behind_and_spares_the_others_of_its_tick() -> None:
    loop = asyncio.get_running_loop()
    pacer = _Pacer()
    far = loop.time() + 3600
    alone = pacer.wake_at(loop, far)
    near = loop.time() + 0.05
    leaving = pacer.wake_at(loop, near)
    staying = pacer.wake_at(loop, near)
    assert len(pacer._timers) == 2
    # What a waiter does when it is cancelled (the demo model's generator, when its stream ends).
    alone.cancel()
    pacer.forget(alone, far)
    leaving.cancel()
    pacer.forget(leaving, near)
    # The hour-away tick is gone with its timer; the near one still has its other waiter.
    assert len(pacer._timers) == 1
    assert [len(w) for w in pacer._waiting.values()] == [1]
    await asyncio.wait_for(staying, 2)
    assert pacer._timers == {}
    assert pacer._waiting == {}


async def test_a_waiter_that_leaves_after_its_tick_was_made_again_leaves_the_new_one_alone() -> None:
    # The waiter's future is cancelled, its tick fires (skipping it) and a newcomer makes the same tick again
    # before the waiter's own clean-up runs: that clean-up must not touch the newcomer's tick.
    loop = asyncio.get_running_loop()
    pacer = _Pacer()
    due = loop.time() + 0.005
    old = pacer.wake_at(loop, due)
    old.cancel()
    while pacer._timers:  # its tick fires
        await asyncio.sleep(0.001)
    new = pacer.wake_at(loop, due)
    pacer.forget(old, due)
    assert [len(w) for w in pacer._waiting.values()] == [1]
    await asyncio.wait_for(new, 2)
    assert pacer._timers == {}
    assert pacer._waiting == {}


async def test_a_stream_closed_while_waiting_for_its_next_token_leaves_the_pacer_empty() -> None:
    provider = DemoProvider(delay=3600)
    stream = provider.stream(_chat())
    waiting = asyncio.get_running_loop().create_task(stream.__anext__())
    await asyncio.sleep(0.01)
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    await stream.aclose()
    (pacer,) = provider._pacers.values()
    assert pacer._timers == {}
    assert pacer._waiting == {}


async def test_the_provider_does_not_keep_a_finished_loop_alive() -> None:
    # One pacer per loop, kept in a WeakKeyDictionary: a pacer holding its loop would keep every loop the provider
    # ever ran on (each test's, say) alive.
    provider = DemoProvider(delay=0.001)

    def run_once() -> None:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(_collect(provider, _chat(max_tokens=2)))
        finally:
            loop.close()

    await asyncio.to_thread(run_once)
    gc.collect()
    assert len(provider._pacers) == 0


def _events(batches: list[tuple[float, Sequence[Event]]]) -> list[Event]:
    return [event for _, batch in batches for event in batch]


async def test_the_reasoner_demo_model_thinks_before_it_answers() -> None:
    chat = ChatRequest(messages=(Message("user", "why?"),), model=DEMO_REASONER_MODEL)
    events = _events(await _collect(DemoProvider(delay=0), chat))
    kinds = [type(e).__name__ for e in events]
    first_delta = kinds.index("Delta")
    assert first_delta > 5
    assert set(kinds[:first_delta]) == {"Reasoning"}
    assert "“why?”" in "".join(e.content for e in events if isinstance(e, Reasoning))
    assert "".join(e.content for e in events if isinstance(e, Delta)) == "".join(demo_tokens(chat))
    assert isinstance(events[-1], Done)
    assert events[-1].finish_reason == "stop"
    assert events[-1].usage is not None
    assert events[-1].usage.completion_tokens == len(events) - 1  # reasoning counts, as upstreams count it


async def test_a_request_with_tools_gets_a_call_of_the_first_tool_then_an_answer_to_its_result() -> None:
    tools = ({"type": "function", "function": {"name": "search_docs"}}, {"type": "function", "function": {"name": "x"}})
    chat = ChatRequest(messages=(Message("user", "find “resume”"),), model="m", tools=tools)
    events = _events(await _collect(DemoProvider(delay=0.001), chat))
    calls = [e for e in events if isinstance(e, ToolCallDelta)]
    assert len(calls) == len(events) - 1
    assert calls[0].index == 0
    assert calls[0].name == "search_docs"
    assert calls[0].id is not None
    assert calls[0].id.startswith("call_demo_")
    assert all(c.index == 0 and c.id is None and c.name is None for c in calls[1:])
    arguments = "".join(c.arguments for c in calls)
    assert json.loads(arguments) == {"query": "find “resume”"}
    assert events[-1] == Done("tool_calls", events[-1].usage)  # type: ignore[union-attr]
    # The conversation goes on with the tool's result: the demo answers in text, quoting it.
    call = ToolCall(calls[0].id, "search_docs", arguments)
    follow_up = ChatRequest(
        messages=(*chat.messages, Message("assistant", "", tool_calls=(call,)),
                  Message("tool", "see docs/streams.md", tool_call_id=call.id)),
        model="m",
        tools=tools,
    )  # fmt: skip
    answer = _events(await _collect(DemoProvider(delay=0), follow_up))
    text = "".join(e.content for e in answer if isinstance(e, Delta))
    assert text.startswith("The tool answered: “see docs/streams.md”.")
    assert answer[-1] == Done("stop", answer[-1].usage)  # type: ignore[union-attr]


async def test_tool_choice_none_gets_text() -> None:
    tools = ({"type": "function", "function": {"name": "search_docs"}},)
    chat = ChatRequest(messages=(Message("user", "hi"),), model="m", tools=tools, tool_choice="none")
    events = _events(await _collect(DemoProvider(delay=0), chat))
    assert not any(isinstance(e, ToolCallDelta) for e in events)
    assert events[-1] == Done("stop", events[-1].usage)  # type: ignore[union-attr]


async def test_a_named_tool_choice_is_the_tool_called() -> None:
    tools = ({"type": "function", "function": {"name": "a"}}, {"type": "function", "function": {"name": "b"}})
    choice = {"type": "function", "function": {"name": "b"}}
    chat = ChatRequest(messages=(Message("user", "hi"),), model="m", tools=tools, tool_choice=choice)
    events = _events(await _collect(DemoProvider(delay=0), chat))
    assert isinstance(events[0], ToolCallDelta)
    assert events[0].name == "b"
