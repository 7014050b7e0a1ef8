"""The registry with a shared store (`registry.SharedStore`, what ``--stream-store redis`` plugs in): readers on
other instances count before a generation's fate is decided. The store here is a stand-in that answers as the test
says; tests/test_redis_streams.py runs the real one against redis-server."""

from __future__ import annotations

from collections.abc import Callable

from server.chat_request import ChatRequest, Message
from server.events import Delta
from server.generation import Generation, GenerationSettings, Outcome
from server.registry import RegistrySettings, StreamRegistry

from .scripted import ScriptedProvider, wait_until

CHAT = ChatRequest((Message("user", "x"),), "m")


class _Follower:
    def shutdown(self) -> None:
        return None


class _Store:
    """Shares everything; remembers what it was told and the callbacks it was given."""

    def __init__(self, decides: bool = True) -> None:
        self.decides = decides
        self.starts: list[str] = []
        self.appends = 0
        self.asked: list[tuple[Callable[[], None], Callable[[], None]]] = []

    def started(self, generation: Generation) -> None:
        self.starts.append(generation.id)

    def appended(self, generation: Generation) -> None:
        self.appends += 1

    def watch_remote_readers(
        self, generation: Generation, none_now: Callable[[], None], none_later: Callable[[], None]
    ) -> bool:
        self.asked.append((none_now, none_later))
        return self.decides


def _registry(store: _Store, grace: float = 15.0) -> StreamRegistry:
    registry = StreamRegistry(RegistrySettings(resume_grace=grace))
    registry.shared = store
    return registry


async def _running(registry: StreamRegistry, *, resumable: bool) -> tuple[Generation, ScriptedProvider]:
    provider = ScriptedProvider()
    generation = Generation(provider, CHAT, GenerationSettings(), resumable=resumable)
    registry.start(generation)
    await provider.started.wait()
    return generation, provider


async def test_the_store_is_told_of_starts_and_appends() -> None:
    store = _Store()
    registry = _registry(store)
    generation, provider = await _running(registry, resumable=False)
    assert store.starts == [generation.id]
    provider.put([Delta("a")], [Delta("b")])
    await wait_until(lambda: store.appends == 2)
    generation.cancel(Outcome.STOPPED)
    await generation.wait_closed()
    assert store.appends == 3  # and the end


async def test_a_reader_elsewhere_keeps_a_generation_until_the_store_says_none_is_left() -> None:
    store = _Store()
    registry = _registry(store)
    generation, provider = await _running(registry, resumable=False)
    reader = _Follower()
    registry.attach(generation, reader)
    registry.detach(generation, reader)
    assert len(store.asked) == 1
    assert not generation.ended  # the store decides, not the registry
    _, none_later = store.asked[0]
    none_later()  # the last reader elsewhere left
    assert generation.outcome is Outcome.ABANDONED
    await generation.wait_closed()
    assert provider.finished == 1


async def test_no_reader_anywhere_cancels_at_once() -> None:
    store = _Store()
    registry = _registry(store)
    generation, _ = await _running(registry, resumable=False)
    reader = _Follower()
    registry.attach(generation, reader)
    registry.detach(generation, reader)
    none_now, _ = store.asked[0]
    none_now()
    assert generation.outcome is Outcome.ABANDONED


async def test_a_reader_back_here_meanwhile_keeps_the_generation() -> None:
    store = _Store()
    registry = _registry(store)
    generation, _ = await _running(registry, resumable=False)
    first, second = _Follower(), _Follower()
    registry.attach(generation, first)
    registry.detach(generation, first)
    registry.attach(generation, second)  # before the store answered
    none_now, _ = store.asked[0]
    none_now()
    assert not generation.ended
    generation.cancel(Outcome.STOPPED)


async def test_a_store_that_cannot_tell_leaves_the_decision_to_the_registry() -> None:
    registry = _registry(_Store(decides=False))
    generation, _ = await _running(registry, resumable=False)
    reader = _Follower()
    registry.attach(generation, reader)
    registry.detach(generation, reader)
    assert generation.outcome is Outcome.ABANDONED


async def test_a_resumable_generation_gets_its_grace_after_the_last_reader_elsewhere_left() -> None:
    store = _Store()
    registry = _registry(store, grace=0.05)
    generation, _ = await _running(registry, resumable=True)
    reader = _Follower()
    registry.attach(generation, reader)
    registry.detach(generation, reader)
    none_now, _ = store.asked[0]
    none_now()  # nobody elsewhere: the grace starts
    await wait_until(lambda: len(store.asked) == 2)  # the grace is over: asked again
    assert not generation.ended
    _, none_later = store.asked[1]
    none_later()  # someone read elsewhere meanwhile and has left: a new grace, then the end
    assert not generation.ended
    await wait_until(lambda: len(store.asked) == 3)
    abandon, _ = store.asked[2]
    abandon()
    assert generation.outcome is Outcome.ABANDONED
