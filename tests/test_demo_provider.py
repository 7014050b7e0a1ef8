"""The demo model: its reply, and its pacing through one shared timer per millisecond tick."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import Sequence

from server.chat_request import ChatRequest, Message
from server.events import Delta, Done, Event
from server.providers.demo import DemoProvider, _Pacer, demo_tokens


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
