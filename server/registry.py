"""The app's generations by stream id, and the policies that decide their fate.

- **Readers leave**: when the last reader of a running generation leaves, it is cancelled at once, unless its
  request opted in to resume: then it runs on for the resume grace, and a reader arriving meanwhile keeps it.
  With a shared store (`SharedStore`, ``--stream-store redis``), readers on other instances count too.
- **Retention**: an ended generation's log stays readable for `retention` seconds, then it is forgotten.
- **Memory**: the logs of all generations together stay under `max_total_bytes`. Past it, ended generations are
  forgotten first, oldest end first; then running ones lose their retained events, oldest start first (they
  keep streaming live to their readers; only a resume from before what is retained becomes impossible).
- **Shutdown**: readers end (each with an in-band ``server_shutdown``), detached generations get the grace period,
  then whatever still runs is cancelled.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from .generation import Generation, Outcome
from .observe import StreamObserver

log = logging.getLogger("llm_relay.registry")


class Follower(Protocol):
    """What the registry needs of a reader: the generation it follows and the last event it has written to its
    client (what the memory policy must keep after), and to be told the server is going down."""

    generation: Generation
    position: int

    def shutdown(self) -> None: ...


class SharedStore(Protocol):
    """A store that shares this registry's generations with other instances (`server/redis_streams.py`).

    Told of every start and append (synchronously: it only marks the generation for its own writer), and asked,
    when the last reader here has left, whether readers on other instances still follow the generation.
    """

    def started(self, generation: Generation) -> None: ...

    def appended(self, generation: Generation) -> None: ...

    def watch_remote_readers(
        self, generation: Generation, none_now: Callable[[], None], none_later: Callable[[], None]
    ) -> bool:
        """True if the store decides: it calls `none_now` if no other instance reads the generation, or
        `none_later` once the last one has left. False: it cannot tell (not shared), the caller decides now."""
        ...


@dataclass(frozen=True, slots=True)
class RegistrySettings:
    resume_grace: float = 15.0
    retention: float = 60.0
    max_total_bytes: int = 256 << 20


class StreamRegistry:
    """Generations by id (running and recently ended), with reader counts; awaited empty before cleanup."""

    def __init__(self, settings: RegistrySettings | None = None, observer: StreamObserver | None = None) -> None:
        self.settings = settings or RegistrySettings()
        # Told when a generation ends and when its task has closed (server/observe.py).
        self.observer = observer or StreamObserver()
        # Insertion order is start order: the memory policy trims running generations oldest first.
        self._generations: OrderedDict[str, Generation] = OrderedDict()
        self._ended: OrderedDict[str, Generation] = OrderedDict()  # by end time, oldest first
        # Per stream id: the resume grace's cancellation (a running generation without readers).
        self._grace: dict[str, asyncio.TimerHandle] = {}
        # The retention's end of the oldest ended generation: one timer for them all (see _expire).
        self._expiry: asyncio.TimerHandle | None = None
        self._followers: set[Follower] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._shutting_down = False
        self._shutdown: asyncio.Future[None] | None = None  # the one shutdown, however often it is asked for
        self._over = False  # over max_total_bytes: warned once per episode
        # Every generation whose task has not finished, registered or already forgotten: shutdown waits for them.
        self._unclosed: set[Generation] = set()
        self.total_bytes = 0
        self.finished = 0
        # Set when generations are shared with other instances (--stream-store redis); None keeps every path here
        # as it is in memory alone.
        self.shared: SharedStore | None = None

    # -- what is here ----------------------------------------------------------------------------------------

    def __len__(self) -> int:
        """Running generations (only ended ones are ever forgotten)."""
        return len(self._generations) - len(self._ended)

    def __iter__(self) -> Iterator[Generation]:
        """Every generation whose log is kept: running ones and those ended within the retention."""
        return iter(list(self._generations.values()))

    def running(self) -> list[Generation]:
        return [g for g in self._generations.values() if not g.ended]

    @property
    def readers(self) -> int:
        return len(self._followers)

    @property
    def retained(self) -> int:
        """Generations whose log is kept (running and ended)."""
        return len(self._generations)

    def get(self, stream_id: str) -> Generation | None:
        return self._generations.get(stream_id)

    # -- life of a generation ---------------------------------------------------------------------------------

    def start(self, generation: Generation, *, framing: str = "unknown") -> None:
        """Register `generation` and start its task. Once shutdown has begun it ends at once with
        ``server_shutdown`` and opens no upstream request (its reader answers 503 with a reconnection hint).
        `framing` (of the request that started it) is for metrics."""
        self.observer.stream_started(generation, framing)
        self._generations[generation.id] = generation
        self._idle.clear()
        self._unclosed.add(generation)
        generation.start(self)
        if self.shared is not None:
            self.shared.started(generation)
        if self._shutting_down:
            generation.cancel(Outcome.SHUTDOWN)

    def attach(self, generation: Generation, reader: Follower) -> None:
        """`reader` starts following `generation`."""
        generation.readers += 1
        self._followers.add(reader)
        grace = self._grace.pop(generation.id, None)
        if grace is not None:
            grace.cancel()  # a reader came back within the resume grace

    def detach(self, generation: Generation, reader: Follower) -> None:
        """`reader` left. The last one leaving a running generation decides its fate (see the module's doc)."""
        generation.readers -= 1
        self._followers.discard(reader)
        generation.readers_changed()
        if generation.readers or generation.ended:
            return
        if self.shared is not None and not self._shutting_down:
            # Readers on other instances count too: the shared store decides once it has asked.
            def unread() -> None:
                self._unread(generation)

            if self.shared.watch_remote_readers(generation, unread, unread):
                return
        self._unread(generation)

    def _unread(self, generation: Generation) -> None:
        """No reader anywhere: cancel now, or after the resume grace if the request opted in."""
        if generation.readers or generation.ended or generation.id in self._grace:
            return
        if not generation.resumable:
            generation.cancel(Outcome.SHUTDOWN if self._shutting_down else Outcome.ABANDONED)
            return
        loop = asyncio.get_running_loop()
        self._grace[generation.id] = loop.call_later(self.settings.resume_grace, self._grace_over, generation)

    def stop(self, generation: Generation) -> None:
        """An explicit stop (DELETE): cancel at once, whoever reads it."""
        generation.cancel(Outcome.STOPPED)

    def _grace_over(self, generation: Generation) -> None:
        self._grace.pop(generation.id, None)
        if generation.readers or generation.ended:
            return
        if self.shared is not None and not self._shutting_down:
            # A reader elsewhere keeps it; when that one leaves, a new grace starts.
            def abandon() -> None:
                if not generation.readers:
                    generation.cancel(Outcome.ABANDONED)

            def unread() -> None:
                self._unread(generation)

            if self.shared.watch_remote_readers(generation, abandon, unread):
                return
        generation.cancel(Outcome.ABANDONED)

    def generation_ended(self, generation: Generation) -> None:
        grace = self._grace.pop(generation.id, None)
        if grace is not None:
            grace.cancel()
        self.finished += 1
        self._ended[generation.id] = generation
        if self._expiry is None:
            self._expire_at(generation)
        if not len(self):
            self._idle.set()
        self.observer.stream_ended(generation)

    def generation_closed(self, generation: Generation) -> None:
        self._unclosed.discard(generation)
        ended_at = generation.ended_at
        if ended_at is not None:
            self.observer.stream_closed(generation, asyncio.get_running_loop().time() - ended_at)

    def _expire(self) -> None:
        """Forget the ended generations whose retention is over, then wait for the next one's end.

        Generations join `_ended` as they end and all are kept for the same retention, so they expire in that
        order and one timer, for the oldest, serves them all: a timer per ended generation would keep a handle,
        its callback and a copy of its task's context per retained stream.
        """
        self._expiry = None
        # (A timer may run up to the loop's clock resolution early: what is due within a millisecond is due.)
        now = asyncio.get_running_loop().time() + 0.001
        while self._ended:
            oldest = next(iter(self._ended.values()))
            if self._retained_until(oldest) > now:
                self._expire_at(oldest)
                return
            self._forget(oldest.id)

    def _retained_until(self, generation: Generation) -> float:
        return (generation.ended_at or 0.0) + self.settings.retention

    def _expire_at(self, generation: Generation) -> None:
        """Run `_expire` when `generation`'s retention ends. (In an empty context: the timer outlives the task that
        ended the generation, and so would that task's context.)"""
        loop = asyncio.get_running_loop()
        self._expiry = loop.call_at(self._retained_until(generation), self._expire, context=contextvars.Context())

    def _forget(self, stream_id: str) -> None:
        generation = self._generations.pop(stream_id, None)
        self._ended.pop(stream_id, None)
        if generation is not None:
            self.total_bytes -= generation.log.bytes

    # -- memory -----------------------------------------------------------------------------------------------

    def generation_changed(self, generation: Generation, delta: int) -> None:
        if self.shared is not None:
            self.shared.appended(generation)
        self.total_bytes += delta
        limit = self.settings.max_total_bytes
        if self.total_bytes <= limit:
            self._over = False
            return
        # Ended generations first, oldest end first (one a reader still replays keeps its log until it is done:
        # forgetting it would free nothing). One at a time from the oldest, not a list of them all: at the limit,
        # every append of every stream comes here, and usually one forgotten stream is enough.
        while self.total_bytes > limit:
            oldest = next((g for g in self._ended.values() if not g.readers), None)
            if oldest is None:
                break
            self._forget(oldest.id)
        # Then running ones, oldest start first, but never what a live reader has not written yet: a reader keeps
        # streaming; only a resume from before what is kept becomes impossible. Without readers, everything goes.
        # What a live reader still needs is after the slowest one's position, not after the furthest any reader
        # reached (`delivered_seq`: a reader that has left, or one ahead of a reconnected client, counts there).
        slowest: dict[str, int] | None = None
        for running in list(self._generations.values()):
            if self.total_bytes <= limit:
                break
            if running.ended:
                continue
            if running.readers:
                if slowest is None:  # one pass over the readers, only once running logs must give way
                    slowest = self._slowest_positions()
                keep_after = slowest.get(running.id, 0)
            else:
                keep_after = running.log.last_seq
            self.total_bytes -= running.log.drop_through(keep_after)
        if not self._over:
            self._over = True
            log.warning("stream logs over %d bytes: the oldest events were dropped", limit)

    def _slowest_positions(self) -> dict[str, int]:
        """Each followed generation's slowest reader's position, by stream id."""
        slowest: dict[str, int] = {}
        for reader in self._followers:
            stream_id = reader.generation.id
            known = slowest.get(stream_id)
            if known is None or reader.position < known:
                slowest[stream_id] = reader.position
        return slowest

    # -- shutdown ---------------------------------------------------------------------------------------------

    async def wait_idle(self, within: float) -> bool:
        """True if every generation ended within `within` seconds."""
        try:
            async with asyncio.timeout(within):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    async def shutdown(self, grace: float) -> None:
        """End every reader in band, give running generations `grace` seconds, then cancel the rest and wait
        for their tasks (their upstreams closed).

        Idempotent: the app asks on shutdown and again at cleanup (an embedding app may run only the latter);
        a second call waits for the first one's work instead of doing it again.
        """
        if self._shutdown is None:
            self._shutting_down = True  # from this call on, not once the task below takes its first step
            self._shutdown = asyncio.ensure_future(self._shut_down(grace))
        await asyncio.shield(self._shutdown)

    async def _shut_down(self, grace: float) -> None:
        for reader in list(self._followers):
            reader.shutdown()
        if not await self.wait_idle(grace):
            running = self.running()
            log.warning("%d streams still running after the shutdown grace period: cancelled", len(running))
            for generation in running:
                generation.cancel(Outcome.SHUTDOWN)
        await asyncio.gather(*(g.wait_closed() for g in list(self._unclosed)))

    def close(self) -> None:
        """Cancel the timers (the app is going away)."""
        for timer in self._grace.values():
            timer.cancel()
        self._grace.clear()
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
