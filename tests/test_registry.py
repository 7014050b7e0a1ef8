"""The stream registry's policies that need no HTTP: what happens to new work and repeated calls at shutdown, and
the last reader's leaving."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence

from server.chat_request import ChatRequest, Message
from server.events import Delta, Done, Event
from server.generation import Generation, GenerationSettings, Outcome
from server.providers.base import on_abort
from server.registry import RegistrySettings, StreamRegistry

from .scripted import ScriptedProvider, wait_until

CHAT = ChatRequest((Message("user", "x"),), "m")


class _Follower:
    def __init__(self) -> None:
        self.told = 0

    def shutdown(self) -> None:
        self.told += 1


async def test_a_generation_started_during_shutdown_ends_at_once_without_an_upstream_request() -> None:
    registry = StreamRegistry(RegistrySettings())
    busy, late = ScriptedProvider(), ScriptedProvider()
    running = Generation(busy, CHAT, GenerationSettings())
    registry.start(running)
    await busy.started.wait()
    shutdown = asyncio.create_task(registry.shutdown(5.0))
    await asyncio.sleep(0)  # shutdown has begun and waits for `running`
    newcomer = Generation(late, CHAT, GenerationSettings())
    registry.start(newcomer)
    assert newcomer.outcome is Outcome.SHUTDOWN
    assert newcomer.log.since(0)[-1].type == "server_shutdown"  # type: ignore[union-attr]
    busy.put([Delta("a"), Done("stop")])
    await asyncio.wait_for(shutdown, 5)
    await newcomer.wait_closed()
    assert late.opened == 0
    assert running.outcome is Outcome.DONE


async def test_shutdown_asked_twice_does_its_work_once_and_both_calls_wait_for_it() -> None:
    registry = StreamRegistry(RegistrySettings())
    provider = ScriptedProvider()
    generation = Generation(provider, CHAT, GenerationSettings())
    registry.start(generation)
    follower = _Follower()
    registry.attach(generation, follower)
    first = asyncio.create_task(registry.shutdown(0.2))
    second = asyncio.create_task(registry.shutdown(0.2))
    await wait_until(lambda: follower.told > 0)
    # The generation still runs: both calls wait for the grace period.
    assert not first.done()
    assert not second.done()
    await asyncio.wait_for(asyncio.gather(first, second), 5)
    assert follower.told == 1
    assert generation.outcome is Outcome.SHUTDOWN
    assert provider.closed.is_set()
    await asyncio.wait_for(registry.shutdown(0.2), 1)  # and a later call returns at once
    registry.close()


async def test_only_the_last_reader_leaving_cancels_and_the_upstream_is_dropped_before_the_end_is_recorded() -> None:
    # What the disconnect path relies on: the registry decides in the leaving reader's own call (no loop turn in
    # between), and the provider's abort callbacks run before the end is recorded (readers, observers).
    ended_when_aborted: list[bool] = []

    class AbortingProvider(ScriptedProvider):
        async def stream(self, request: ChatRequest) -> AsyncGenerator[Sequence[Event], None]:
            on_abort(lambda: ended_when_aborted.append(generation.ended))
            async for batch in super().stream(request):
                yield batch

    registry = StreamRegistry(RegistrySettings())
    provider = AbortingProvider()
    generation = Generation(provider, CHAT, GenerationSettings())
    registry.start(generation)
    await provider.started.wait()
    first, second = _Follower(), _Follower()
    registry.attach(generation, first)
    registry.attach(generation, second)
    registry.detach(generation, first)
    assert (generation.outcome, generation.readers, registry.readers) == (Outcome.RUNNING, 1, 1)
    registry.detach(generation, second)
    assert (generation.outcome, generation.readers, registry.readers) == (Outcome.ABANDONED, 0, 0)
    assert ended_when_aborted == [False]
    await asyncio.wait_for(generation.wait_closed(), 5)
    assert provider.closed.is_set()


async def test_each_ended_generation_is_forgotten_after_its_own_retention() -> None:
    # One timer serves every ended generation: each is still there until its own end + retention, whatever ended
    # before or after it.
    retention = 0.3
    registry = StreamRegistry(RegistrySettings(retention=retention))
    loop = asyncio.get_running_loop()
    providers = [ScriptedProvider() for _ in range(3)]
    generations = [Generation(p, CHAT, GenerationSettings()) for p in providers]
    ended_at: dict[str, float] = {}
    for generation, provider in zip(generations, providers, strict=True):
        registry.start(generation)
        await provider.started.wait()
        provider.put([Delta("a"), Done("stop")])
        await wait_until(lambda g=generation: g.ended)  # type: ignore[misc]
        assert generation.ended_at is not None
        ended_at[generation.id] = generation.ended_at
        await asyncio.sleep(0.05)
    assert registry.retained == 3
    forgotten_at: dict[str, float] = {}
    async with asyncio.timeout(5):
        while len(forgotten_at) < 3:
            for generation in generations:
                if generation.id not in forgotten_at and registry.get(generation.id) is None:
                    forgotten_at[generation.id] = loop.time()
            await asyncio.sleep(0.005)
    for generation in generations:
        kept = forgotten_at[generation.id] - ended_at[generation.id]
        # Never early (within the millisecond a timer may run early); late by this polling at most (a liveness
        # bound, not a benchmark).
        assert retention - 0.002 <= kept <= retention + 0.25, (generation.id, kept)
    assert [forgotten_at[g.id] for g in generations] == sorted(forgotten_at.values())
    assert registry.retained == 0
    registry.close()


class _Reader:
    """A follower at a position: the last event it has written to its client."""

    def __init__(self, generation: Generation, position: int = 0) -> None:
        self.generation = generation
        self.position = position

    def shutdown(self) -> None:
        pass


async def _append(provider: ScriptedProvider, generation: Generation, count: int, text: str) -> None:
    last = generation.log.last_seq + count
    for _ in range(count):
        provider.put([Delta(text)])
    await wait_until(lambda: generation.log.last_seq >= last)


async def test_over_the_memory_limit_a_running_log_keeps_what_its_slowest_reader_has_not_written() -> None:
    registry = StreamRegistry(RegistrySettings(max_total_bytes=20_000))
    provider = ScriptedProvider()
    generation = Generation(provider, CHAT, GenerationSettings(reader_lead_bytes=1 << 20))
    registry.start(generation)
    fast, slow = _Reader(generation), _Reader(generation)
    registry.attach(generation, fast)
    registry.attach(generation, slow)
    await _append(provider, generation, 10, "a" * 900)
    fast.position = 10
    generation.delivered(10)  # the fast reader has written all ten; the slow one none
    await _append(provider, generation, 15, "b" * 900)  # past the limit: the log must give way
    assert registry.total_bytes > 20_000  # nothing the slow reader needs could go
    assert generation.log.first_seq == 1
    assert len(generation.log.since(0)) == 25
    fast.position, slow.position = 25, 12
    await _append(provider, generation, 1, "c" * 900)
    assert generation.log.first_seq == 13  # what both have written is dropped
    generation.cancel(Outcome.STOPPED)
    await generation.wait_closed()
    registry.close()


async def test_over_the_memory_limit_a_resumed_reader_keeps_what_it_resumes_from() -> None:
    # The first reader wrote ten events to a connection that then dropped; its client had received five, and
    # resumes after them: events 6..10 are what the resumed reader still needs, whatever the first one wrote.
    registry = StreamRegistry(RegistrySettings(max_total_bytes=20_000, resume_grace=5))
    provider = ScriptedProvider()
    generation = Generation(provider, CHAT, GenerationSettings(reader_lead_bytes=1 << 20), resumable=True)
    registry.start(generation)
    first = _Reader(generation)
    registry.attach(generation, first)
    await _append(provider, generation, 10, "a" * 900)
    first.position = 10
    generation.delivered(10)
    registry.detach(generation, first)
    resumed = _Reader(generation, position=5)
    registry.attach(generation, resumed)
    generation.delivered(5)
    await _append(provider, generation, 15, "b" * 900)
    assert generation.log.first_seq == 6
    generation.cancel(Outcome.STOPPED)
    await generation.wait_closed()
    registry.close()
