"""A generation: one provider call in a task of its own, appending sequenced events to a bounded log.

    provider.stream(chat) ──batches──▶ Generation._run ──append──▶ EventLog ──since(seq) / wait──▶ readers

A generation never touches a client connection. Readers (`server/reader.py`) replay its log from an offset and
follow it; the registry (`server/registry.py`) decides what happens when the last reader leaves. Cancelling a
generation runs the provider's abort callbacks (which drop the upstream socket in the same loop turn) and cancels
its task, which closes the provider's generator and so the upstream request.

The clocks are the upstream's: a first-token timeout until the first event, then an idle timeout between events,
and a total timeout over all; one `asyncio.timeout` whose deadline is moved (`reschedule`) as events arrive. A
reader's pace never moves them: a slow reader is the reader's problem (its write timeout), never the generation's.
"""

from __future__ import annotations

import asyncio
import bisect
import enum
import logging
import math
import secrets
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

from .admission import Admission
from .budget import TokenReservation, output_chars
from .chat_request import ChatRequest
from .errors import RelayError, StreamTimeout, UpstreamError
from .events import Delta, Done, Error, Event, Usage, is_terminal, text_size
from .providers.base import (
    Provider,
    UpstreamReport,
    collect_aborts,
    collect_upstream_report,
    stop_collecting_aborts,
    stop_collecting_upstream_report,
)

log = logging.getLogger("llm_relay.generation")

# After the terminal event, how long the provider may go on reading the upstream body to its end (the bytes after
# [DONE]), so that the upstream connection can go back to its pool instead of being closed.
PROVIDER_DRAIN_GRACE = 0.5
# What one logged event is counted as, beyond the characters of its text: the event object (40 bytes for a slotted
# Delta), its str's header (49), its end offset (an int, 28) and their two list slots, as tracemalloc sees them on
# CPython 3.11 x86-64 (~140). An estimate used only to bound memory, never reported as exact; what the allocator
# adds beyond it (fragmentation, a str's 1-4 bytes per character past ASCII) is not counted. (A text delta is logged
# as its str alone, see EventLog, so it is counted ~40 bytes high: the bounds err on the safe side, the same for
# every kind of event.)
EVENT_OVERHEAD_BYTES = 140


class Outcome(enum.Enum):
    """How a generation ended. Every one but RUNNING is final."""

    RUNNING = "running"
    DONE = "done"
    ERROR = "error"
    TIMEOUT = "timeout"
    STOPPED = "stopped"  # DELETE /api/streams/{id}
    ABANDONED = "abandoned"  # every reader left (and the resume grace, if any, passed)
    SHUTDOWN = "shutdown"


class StreamStopped(RelayError):
    status = 409
    type = "stopped"


class StreamAbandoned(RelayError):
    status = 409
    type = "cancelled"


class ServerShuttingDown(RelayError):
    status = 503
    type = "server_shutdown"


class InternalError(RelayError):
    status = 500
    type = "internal_error"


_CANCEL_ERRORS: dict[Outcome, RelayError] = {
    Outcome.STOPPED: StreamStopped("the stream was stopped"),
    Outcome.ABANDONED: StreamAbandoned("the stream was cancelled when its last reader left"),
    Outcome.SHUTDOWN: ServerShuttingDown("the server is restarting; try again shortly"),
}


def new_stream_id() -> str:
    """128 random bits: the id is the capability to read or stop the stream, so it must not be guessable."""
    return secrets.token_hex(16)


@dataclass(frozen=True, slots=True)
class GenerationSettings:
    """The upstream's clocks (seconds, 0 = off) and the log's bounds."""

    first_token_timeout: float = 60.0
    idle_timeout: float = 60.0
    total_timeout: float = 600.0
    log_max_events: int = 20_000
    log_max_bytes: int = 2 << 20
    # How far (estimated bytes) the generation may run ahead of its furthest reader before it stops reading the
    # upstream until a reader catches up: what a client that stops reading can make the relay hold. Without
    # readers (a detached, resumable generation) only the log's bounds apply.
    reader_lead_bytes: int = 64 << 10


# The lists of every log that has no event yet (`EventLog.append` replaces them before it appends anything).
_NOTHING_YET: list[Any] = []


class EventLog:
    """The append-only, bounded, sequenced events of one generation. No IO.

    Sequence numbers start at 1. When the log passes its bounds, the oldest events are dropped (down to three
    quarters of the bounds, so trimming is amortised); `first_seq` says what is still retained. Sizes are
    estimates (`EVENT_OVERHEAD_BYTES` plus the text), kept as running totals so that both the retained size and
    the size of what follows any event are O(1).

    Once the generation has ended (`compact`), a text `Delta` is kept as its str and made again by `since`. A str
    is not tracked by the garbage collector and a `Delta` is: a relay retains the logs of ended streams for
    resuming (60 s by default), thousands of them, and with an object per logged token every collection of the
    older generations walked them all (at 500 paced streams, half of what each such collection walked, with pauses
    of ~80 ms that every token waited behind; bench/results/gc-pauses.md). While it runs, the events stay as they
    are: its live readers take them as they come, with no object made per token and reader.
    """

    __slots__ = ("_base", "_compact", "_ends", "_events", "_first_seq", "_max_bytes", "_max_events", "_total")

    def __init__(self, max_events: int, max_bytes: int, *, first_seq: int = 1) -> None:
        """`first_seq` > 1: a copy of a log whose earlier events are no longer kept (a replica of another
        instance's generation, `server/redis_replicas.py`)."""
        # Both made by the first append: until then (a stream waiting for its first token) they are one shared,
        # never-written empty list rather than two lists per open stream.
        self._events: list[Event | str] = _NOTHING_YET
        # _ends[i]: the estimated bytes appended up to and including _events[i], since the log began.
        self._ends: list[int] = _NOTHING_YET
        self._base = 0  # the same total up to the last dropped event
        self._compact = False  # text deltas kept as their str (see the class's doc)
        self._total = 0
        self._first_seq = first_seq
        self._max_events = max(1, max_events)
        self._max_bytes = max(1, max_bytes)

    @property
    def first_seq(self) -> int:
        """The oldest retained event's sequence number (last_seq + 1 when nothing is retained)."""
        return self._first_seq

    @property
    def last_seq(self) -> int:
        return self._first_seq + len(self._events) - 1

    @property
    def bytes(self) -> int:
        """The estimated size of the retained events."""
        return self._total - self._base

    def bytes_after(self, seq: int) -> int:
        """The estimated size of the retained events after `seq`."""
        index = seq - self._first_seq
        if index < 0:
            return self.bytes
        if index >= len(self._ends):
            return 0
        return self._total - self._ends[index]

    def append(self, events: Sequence[Event]) -> int:
        """Append `events`; returns the change in retained bytes (negative when the append trimmed more)."""
        before = self.bytes
        total = self._total
        logged, ends = self._events, self._ends
        if logged is _NOTHING_YET:
            logged, ends = self._events, self._ends = [], []
        for event in events:
            total += EVENT_OVERHEAD_BYTES + text_size(event)
            logged.append(event)
            ends.append(total)
        self._total = total
        if len(self._events) > self._max_events or self.bytes > self._max_bytes:
            self._trim(self._max_events * 3 // 4, self._max_bytes * 3 // 4)
        return self.bytes - before

    def since(self, seq: int) -> list[Event]:
        """The retained events after `seq`. Raises `LookupError` if some of them were already dropped."""
        if seq + 1 < self._first_seq:
            raise LookupError(seq)
        retained = self._events[seq + 1 - self._first_seq :]
        if not self._compact:
            return cast("list[Event]", retained)
        return [Delta(event) if isinstance(event, str) else event for event in retained]

    def compact(self) -> None:
        """Keep each text delta as its str: the generation has ended, its log is only replayed. (Called after the
        terminal event, the last append; `since` would still read an event appended later as it is.)"""
        if not self._compact:
            self._compact = True
            if self._events is not _NOTHING_YET:
                self._events = [event.content if type(event) is Delta else event for event in self._events]

    def drop_through(self, seq: int) -> int:
        """Drop the retained events up to and including `seq` (memory pressure); returns the bytes freed."""
        before = self.bytes
        keep = max(0, self.last_seq - seq)
        if keep < len(self._events):
            self._trim(keep, self._max_bytes)
        return before - self.bytes

    def _trim(self, max_events: int, max_bytes: int) -> None:
        drop = max(0, len(self._events) - max_events)
        # Past the byte bound as well: drop up to the first event whose end leaves at most max_bytes after it.
        threshold = self._total - max_bytes
        if threshold > self._base:
            drop = max(drop, bisect.bisect_left(self._ends, threshold) + 1)
        if drop:
            self._base = self._ends[drop - 1]
            del self._events[:drop]
            del self._ends[:drop]
            self._first_seq += drop


class GenerationListener(Protocol):
    """Told of a generation's changes (the registry): one object rather than a callback each, which would be
    bound methods kept per open stream."""

    def generation_changed(self, generation: Generation, delta: int) -> None:
        """Its retained bytes changed by `delta` (an append, or a trim)."""

    def generation_ended(self, generation: Generation) -> None:
        """It ended: its terminal event is in the log."""

    def generation_closed(self, generation: Generation) -> None:
        """Its task's last step: the provider and the upstream are closed. (A task cancelled before its first step,
        which only a loop being torn down does, never gets here.)"""


class Generation:
    """One provider call for one chat request: its id, its log, its task and how it ended.

    `start()` runs it in a task of its own. Readers wait for news with `add_waiter` (a future resolved at the next
    append or at the end). `cancel(outcome)` stops it at once; it is also how the registry's policies end it.
    """

    __slots__ = (
        "_aborts",
        "_admission",
        "_budget",
        "_chat",
        "_delivered",
        "_listener",
        "_producer",
        "_relayed_chars",
        "_running",
        "_task",
        "_usage",
        "_waiters",
        "ended_at",
        "failure",
        "first_event_at",
        "id",
        "log",
        "outcome",
        "provider",
        "readers",
        "resumable",
        "settings",
        "started_at",
        "upstream",
    )  # fmt: skip

    def __init__(
        self,
        provider: Provider,
        chat: ChatRequest,
        settings: GenerationSettings,
        *,
        resumable: bool = False,
        admission: Admission | None = None,
        stream_id: str | None = None,
        budget: TokenReservation | None = None,
    ) -> None:
        self.id = stream_id or new_stream_id()
        self.provider = provider
        # The request is the task's to use and not kept on the generation: an ended one stays registered for the
        # retention, and a prompt can be far larger than the log the memory bounds count.
        self._chat: ChatRequest | None = chat
        self.settings = settings
        self.resumable = resumable
        self.log = EventLog(settings.log_max_events, settings.log_max_bytes)
        self.outcome = Outcome.RUNNING
        # The error that ended it, with its HTTP status: a reader that has sent nothing yet answers with it.
        self.failure: RelayError | None = None
        self.readers = 0
        self.started_at = 0.0
        self.ended_at: float | None = None
        # For logs and metrics (server/observe.py): when the first event arrived (loop time), and what the
        # provider reported of its upstream call.
        self.first_event_at: float | None = None
        self.upstream = UpstreamReport()
        self._admission = admission
        # A token budget's reservation, settled at the end with the upstream's usage or the output relayed.
        self._budget = budget
        self._relayed_chars = 0
        self._usage: Usage | None = None
        self._aborts: list[Callable[[], None]] = []
        self._waiters: list[asyncio.Future[None]] = []
        # The furthest event any reader has written to its client, and the generation's own wait for readers.
        self._delivered = 0
        self._producer: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        # Whether the task has taken its first step: a task cancelled before that never runs its body (nor its
        # `finally`, which gives the admission back), so cancel() only records the end and lets the body see it.
        self._running = False
        # Set by the registry: told of every change in retained bytes, and of the end.
        self._listener: GenerationListener | None = None

    @property
    def ended(self) -> bool:
        return self.outcome is not Outcome.RUNNING

    def start(
        self,
        listener: GenerationListener | None = None,
    ) -> None:
        if self._task is not None or self._running:
            raise RuntimeError("a generation is started once")
        self._listener = listener
        loop = asyncio.get_running_loop()
        self.started_at = loop.time()
        # One name for every generation's task (the stream id is in every log line): a name per task would be a
        # string per open stream.
        self._task = loop.create_task(self._run(), name="llm-relay generation")

    def add_waiter(self, waiter: asyncio.Future[None]) -> None:
        """Resolve `waiter` at the next append or at the end (at once if already ended)."""
        if self.ended:
            if not waiter.done():
                waiter.set_result(None)
            return
        waiters = self._waiters
        if len(waiters) >= 2 * self.readers + 2:
            # A reader woken by something else (its heartbeat, its flush window, shutdown) leaves its resolved
            # waiter here and adds a new one: without this, a stream waiting for its first token would keep one
            # more future per heartbeat until the next append. Pruned when the list is twice what the readers
            # can have pending (one each): amortised O(1) per wait.
            waiters = self._waiters = [w for w in waiters if not w.done()]
        waiters.append(waiter)

    @property
    def delivered_seq(self) -> int:
        """The furthest event any reader has written to its client."""
        return self._delivered

    def delivered(self, seq: int) -> None:
        """A reader has written every event up to `seq` to its client (it may let the generation read on)."""
        if seq > self._delivered:
            self._delivered = seq
            self.readers_changed()

    def readers_changed(self) -> None:
        """Wake the generation if it waits for its readers (one caught up, or one left)."""
        producer = self._producer
        if producer is not None and not producer.done():
            producer.set_result(None)

    def _ahead(self) -> bool:
        return self.readers > 0 and self.log.bytes_after(self._delivered) > self.settings.reader_lead_bytes

    async def _wait_for_readers(self) -> None:
        """Until a reader catches up (or none is left). Meanwhile the upstream is not read, so its own flow control
        holds it back: a client that stops reading costs the lead, not the reply."""
        loop = asyncio.get_running_loop()
        while self._ahead():
            self._producer = loop.create_future()
            try:
                await self._producer
            finally:
                self._producer = None

    def cancel(self, outcome: Outcome) -> None:
        """End the generation now with `outcome` (stopped, abandoned, shutdown); a no-op once it has ended."""
        if self.ended:
            return
        # Drop the upstream socket now, in this loop turn, rather than when the cancellation has worked its way
        # through a busy event loop; and first, so that the upstream hears of it before the relay's own bookkeeping
        # below (the terminal event, the readers, the registry and its observers).
        for abort in self._aborts:
            try:
                abort()
            except Exception:  # a failed early close only means the cancellation below does the work
                log.exception("generation %s: the provider's abort callback failed", self.id)
        self._finish(_CANCEL_ERRORS[outcome].to_event(), outcome, _CANCEL_ERRORS[outcome])
        if self._task is not None and self._running:
            self._task.cancel()

    async def wait_closed(self) -> None:
        """Wait until the task has ended (the upstream is closed)."""
        if self._task is not None:
            await asyncio.wait({self._task})

    def _append(self, events: Sequence[Event]) -> None:
        if self.first_event_at is None and not self.ended:  # (the terminal event of a failure is not a first token)
            self.first_event_at = asyncio.get_running_loop().time()
        delta = self.log.append(events)
        if self._budget is not None:
            self._relayed_chars += output_chars(events)
        if self._listener is not None:
            self._listener.generation_changed(self, delta)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _finish(self, terminal: Event, outcome: Outcome, failure: RelayError | None = None) -> None:
        """Record the end: the terminal event goes into the log, readers are woken, the registry is told."""
        self.outcome = outcome
        self.failure = failure
        if isinstance(terminal, Done):
            self._usage = terminal.usage
        self.ended_at = asyncio.get_running_loop().time()
        self._append([terminal])
        self.log.compact()
        if self._listener is not None:
            self._listener.generation_ended(self)

    async def _run(self) -> None:
        self._running = True
        settings = self.settings
        loop = asyncio.get_running_loop()
        total_deadline = self.started_at + settings.total_timeout if settings.total_timeout else None
        slack = min(1.0, settings.idle_timeout / 10)
        # The idle clock's deadline as last set (inf: none; -inf: not set yet, the first-token clock runs).
        deadline = -math.inf
        # The provider runs in this task: its on_abort() callbacks land in this generation's list. (Set in the
        # task's own context, which ends with it: no reset token is kept for the life of the stream.)
        collect_aborts(self._aborts)
        collect_upstream_report(self.upstream)
        try:
            if self.ended:  # cancelled before this task took its first step: no upstream request at all
                self._usage = Usage(0, 0, 0)  # nothing consumed: a token budget charges nothing
                return
            chat, self._chat = self._chat, None
            assert chat is not None
            batches = self.provider.stream(chat)
            try:  # (what contextlib.aclosing does, without its object and bound method per open stream)
                try:
                    async with asyncio.timeout_at(
                        _earliest(total_deadline, self.started_at, settings.first_token_timeout)
                    ) as clock:
                        async for batch in batches:
                            if not batch:  # nothing arrived: not progress, the clocks do not move
                                continue
                            terminal = next((e for e in batch if is_terminal(e)), None)
                            if terminal is None:
                                self._append(batch)
                                if self._ahead():
                                    # Not waiting on the upstream: its first-token and idle clocks stop meanwhile.
                                    clock.reschedule(total_deadline)
                                    await self._wait_for_readers()
                                    deadline = -math.inf
                                now = loop.time()
                                if deadline < (_earliest(total_deadline, now, settings.idle_timeout) or math.inf):
                                    # Moved with some slack, not per token (a reschedule costs ~2 µs with its loop
                                    # lookups on this Python): the idle timeout fires up to `slack` late, never early.
                                    moved = _earliest(total_deadline, now, settings.idle_timeout + slack)
                                    clock.reschedule(moved)
                                    deadline = math.inf if moved is None else moved
                                continue
                            events = list(batch[: batch.index(terminal)])
                            if events:
                                self._append(events)
                            if isinstance(terminal, Error):
                                # An error the provider expressed as an event: a reader that has sent nothing yet
                                # answers with its type and an upstream failure's status.
                                failure = UpstreamError(terminal.message)
                                failure.type = terminal.type
                                self._finish(terminal, Outcome.ERROR, failure)
                            else:
                                self._finish(terminal, Outcome.DONE)
                            break
                except TimeoutError:
                    self._fail(self._timeout_error(), Outcome.TIMEOUT)
                    return
                if not self.ended:
                    self._fail(InternalError("the reply ended without finishing"), Outcome.ERROR)
                    return
                await self._read_to_end(batches)
            finally:
                await batches.aclose()
        except asyncio.CancelledError:
            if not self.ended:  # not one of ours (the loop is closing): record it, and let it go on
                self._fail(InternalError("the relay stopped"), Outcome.ERROR)
                raise
            # Ours (`cancel` ended the generation first), and handled here: take the request back, so that what the
            # cleanup below awaits (a Redis limiter's release, a budget's settlement) runs as in any task, not as
            # one being cancelled (asyncio.timeout and TaskGroup read `cancelling()`).
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
        except RelayError as exc:
            self._fail(exc, Outcome.TIMEOUT if isinstance(exc, StreamTimeout) else Outcome.ERROR)
        except Exception:
            log.exception("generation %s: the provider failed", self.id)
            self._fail(InternalError("the relay failed while generating the reply"), Outcome.ERROR)
        finally:
            stop_collecting_upstream_report()
            stop_collecting_aborts()
            # An ended generation stays registered for the retention: it keeps its log and how it ended, not the
            # upstream response the abort callbacks hold, nor this task (dropped below, once nothing is left to
            # wait for: `wait_closed` waits for it until then).
            self._aborts.clear()
            try:
                if self._admission is not None:
                    await self._admission.release()
                if self._budget is not None:
                    await self._budget.settle(self._usage, self._relayed_chars)
            finally:
                # The task's last step (rather than a done callback: a closure and a context copy per stream).
                if self._listener is not None:
                    try:
                        self._listener.generation_closed(self)
                    except Exception:  # an observer's failure is logged, never the task's result nobody reads
                        log.exception("generation %s: telling of its close failed", self.id)
                self._task = None  # (its coroutine and context)

    def _timeout_error(self) -> StreamTimeout:
        settings = self.settings
        now = asyncio.get_running_loop().time()
        if settings.total_timeout and now >= self.started_at + settings.total_timeout:
            return StreamTimeout("the reply took longer than the relay allows")
        if self.log.last_seq == 0:
            return StreamTimeout("the model did not start answering in time")
        return StreamTimeout("the model stopped answering mid-reply")

    def _fail(self, error: RelayError, outcome: Outcome) -> None:
        if not self.ended:
            self._finish(error.to_event(), outcome, error)

    async def _read_to_end(self, batches: AsyncIterator[Sequence[Event]]) -> None:
        """After the terminal event, let the provider read the upstream body to its end so its connection is
        reused; at most PROVIDER_DRAIN_GRACE, then `_run` closes it."""
        try:
            async with asyncio.timeout(PROVIDER_DRAIN_GRACE):
                async for _ in batches:
                    pass
        except TimeoutError:
            log.debug("generation %s: the upstream had not ended %.1fs after the reply", self.id, PROVIDER_DRAIN_GRACE)
        except Exception:  # readers have the whole reply: whatever the upstream does now changes nothing for them
            log.debug("generation %s: the upstream failed after the end of the reply", self.id, exc_info=True)


def _earliest(total_deadline: float | None, now: float, timeout: float) -> float | None:
    due = now + timeout if timeout else None
    if due is None:
        return total_deadline
    return due if total_deadline is None or due < total_deadline else total_deadline
