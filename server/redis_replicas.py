"""Other instances' streams, read here (``--stream-store redis``): a *replica* per stream, replayed and followed
from Redis.

    GET /api/streams/{id} ─▶ RemoteStreams.open ─▶ replica Generation ─▶ EventLog ─▶ Reader(s), as for a local one
                               lease, check, state, XRANGE  ▲
                               (one pipeline)               └─ ReplicaProvider: the replay, then XREAD BLOCK ...

A replica is a `Generation` whose provider is a `ReplicaProvider`, kept in a registry of its own that forgets an
ended replica at once (a later resume replays Redis again, never a replica's own ending, such as its cancellation
when its last reader here left). Its readers are ordinary `Reader`s; its clocks are off (the owner's liveness
bounds its waits). Each XREAD BLOCK waits at most `FOLLOW_BLOCK_MS` on a connection of the blocking pool;
cancelling the replica (its last reader left) cancels the read, and redis-py closes that connection rather than
leave a reply in flight on it, so the follower stops at once.

While a replica runs, this instance holds a reader lease on its stream (refreshed by the store's refresher); when
it ends the lease is given up and its owner told (``left <id>``), so the owner can decide the generation's fate.
A follower that waited a whole block without news runs the "check" script: a running stream whose owner's
liveness key expired ends for good with `generation_lost`, appended to its log for every reader, now or later.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Any

from .chat_request import ChatRequest, Message
from .errors import RelayError, RequestError, ResumeUnavailable
from .events import Event, is_terminal
from .generation import EventLog, Generation, GenerationSettings
from .redis_link import (
    FOLLOW_BLOCK_MS,
    READER_LEASE_TTL,
    REDIS_TIMEOUT,
    SCRIPTS,
    RedisLink,
    check_args,
    ms,
)
from .registry import RegistrySettings, StreamRegistry
from .stream_store import (
    DEGRADED,
    ENDED_STATUSES,
    RUNNING,
    StreamState,
    control_message,
    decode_entry,
    entry_id,
    events_after,
    instance_channel,
    log_key,
    readers_key,
    state_key,
)

log = logging.getLogger("llm_relay.redis_streams")

REPLAY_COUNT = 1000  # entries per XREAD reply
# The request a replica's generation is made with: a replica never asks a provider for anything.
_REPLICA_CHAT = ChatRequest(messages=(Message("user", ""),), model="replica")
# A replica follows another instance's clocks: its own are off (the owner's liveness bounds its waits instead).
_NO_CLOCKS = {"first_token_timeout": 0.0, "idle_timeout": 0.0, "total_timeout": 0.0}
_UNREACHABLE = "the shared stream store is unreachable"


@dataclass(frozen=True, slots=True)
class Opened:
    """A replica a resume reads, and what is known of its log at this moment."""

    generation: Generation
    registry: StreamRegistry
    first_seq: int
    last_seq: int
    ended: bool


class RemoteStreams:
    """Replicas of other instances' streams, and stops sent to their owners."""

    def __init__(self, link: RedisLink, settings: GenerationSettings, *, ttl_ms: int) -> None:
        self._link = link
        self._settings = settings
        self._replica_settings = GenerationSettings(
            **_NO_CLOCKS,
            log_max_events=settings.log_max_events,
            log_max_bytes=settings.log_max_bytes,
            reader_lead_bytes=settings.reader_lead_bytes,
        )
        self._ttl_ms = ttl_ms
        # An ended replica is forgotten at once: a later resume reads Redis again, never a replica's own end.
        self.replicas = StreamRegistry(RegistrySettings(resume_grace=0.0, retention=0.0))
        self._owners: dict[str, str] = {}  # a running replica's stream id → its owner's instance id

    async def open(self, stream_id: str, after: int) -> Opened | None:
        """A replica of another instance's generation for a reader from after event `after`: an existing one, or a
        new one that replays Redis. None: the stream has ended and the client has its terminal event.

        Raises `ResumeUnavailable` when Redis does not have the stream whole (unknown, expired, degraded, the events
        after `after` no longer kept) or cannot be reached, `RequestError` for an event after an ended stream's end.
        No replica is left behind by a refusal.
        """
        link = self._link
        replica = self.replicas.get(stream_id)
        if replica is not None and not replica.ended:
            log_ = replica.log
            return Opened(replica, self.replicas, log_.first_seq, log_.last_seq, False)
        for _ in range(10):  # an ended replica is forgotten in the next loop turn: not under the new one's id
            if replica is None or not replica.ended:
                break
            await asyncio.sleep(0)
            replica = self.replicas.get(stream_id)
        if not link.available:
            raise ResumeUnavailable(f"this stream cannot be resumed here now: {_UNREACHABLE}")
        try:
            await link.load_scripts()
            pipe = link.redis.pipeline(transaction=False)
            # The lease first: the owner must not decide that nobody reads while this replica starts.
            pipe.evalsha(SCRIPTS["lease"][1], 1, readers_key(stream_id), link.instance_id, ms(READER_LEASE_TTL))
            pipe.evalsha(SCRIPTS["check"][1], 2, log_key(stream_id), state_key(stream_id), *check_args(self._ttl_ms))
            pipe.hgetall(state_key(stream_id))
            pipe.xrange(log_key(stream_id), "-", "+")
            async with asyncio.timeout(REDIS_TIMEOUT):
                _, _, raw_state, raw_entries = await pipe.execute()
        except link.failures as exc:
            link.went_down(exc)
            raise ResumeUnavailable(f"this stream cannot be resumed here now: {_UNREACHABLE}") from None
        link.came_back()
        state = StreamState.parse(raw_state)
        try:
            if state is None or state.status == DEGRADED:
                raise ResumeUnavailable("this stream cannot be resumed here: it is unknown, expired or evicted")
            entries = [decode_entry(entry_id_, fields) for entry_id_, fields in raw_entries]
            first_seq = entries[0].first if entries else state.last + 1
            _, events = events_after(entries, first_seq - 1)
        except (ValueError, ResumeUnavailable) as exc:
            link.spawn(self._leave(stream_id, None))
            if isinstance(exc, ResumeUnavailable):
                raise
            log.warning("stream %s: its Redis log is not one this relay wrote", stream_id)
            raise ResumeUnavailable("this stream cannot be resumed here") from None
        last_seq = first_seq + len(events) - 1
        ended = state.status in ENDED_STATUSES and bool(events) and is_terminal(events[-1])
        refusal: RelayError | None = None
        if after + 1 < first_seq:
            refusal = ResumeUnavailable("the events after this one are no longer kept")
        elif ended and after > last_seq:
            refusal = RequestError("the stream has no such event yet")
        if refusal is not None or (ended and after >= last_seq):
            link.spawn(self._leave(stream_id, None))
            if refusal is not None:
                raise refusal
            return None
        replica = Generation(
            ReplicaProvider(self, stream_id, events, last_seq),
            _REPLICA_CHAT,
            self._replica_settings,
            stream_id=stream_id,
        )
        replica.log = EventLog(self._settings.log_max_events, self._settings.log_max_bytes, first_seq=first_seq)
        self._owners[stream_id] = state.owner
        self.replicas.start(replica)
        return Opened(replica, self.replicas, first_seq, last_seq, ended)

    async def follow(self, stream_id: str, after: int) -> list[Event]:
        """The events after `after`, waiting up to `FOLLOW_BLOCK_MS` for some; [] when none came (then the owner's
        liveness was checked: a lost generation's error comes with the next call)."""
        link = self._link
        key = log_key(stream_id)
        try:
            async with asyncio.timeout(FOLLOW_BLOCK_MS / 1000 + 2 * REDIS_TIMEOUT):
                reply = await link.blocking.xread({key: entry_id(after)}, count=REPLAY_COUNT, block=FOLLOW_BLOCK_MS)
            if not reply:
                status = await link.call("check", [key, state_key(stream_id)], check_args(self._ttl_ms))
                status = status.decode() if isinstance(status, bytes) else status
                if status is None or status == DEGRADED:
                    raise ResumeUnavailable("this stream can no longer be followed here: its shared log is gone")
                return []
        except link.failures as exc:
            link.went_down(exc)
            raise ResumeUnavailable("the shared stream store became unreachable; try again shortly") from None
        link.came_back()
        try:
            streams: list[Any] = reply  # type: ignore[assignment]  # RESP2: [[key, [(id, fields), ...]], ...]
            entries = [decode_entry(entry_id_, fields) for _, items in streams for entry_id_, fields in items]
            first, events = events_after(entries, after)
        except ValueError:
            raise ResumeUnavailable("this stream's shared log has a gap") from None
        if first != after + 1:
            raise ResumeUnavailable("the events after this one are no longer kept")
        return events

    def running(self) -> list[str]:
        """The streams this instance reads from elsewhere now (whose reader leases it renews)."""
        return [replica.id for replica in self.replicas.running()]

    def replica_ended(self, stream_id: str) -> None:
        """A replica's provider is done (its readers left, or the stream ended): give up its lease now."""
        owner = self._owners.pop(stream_id, None)
        if not self._link.closed:
            self._link.spawn(self._leave(stream_id, owner))

    async def _leave(self, stream_id: str, owner: str | None) -> None:
        link = self._link
        if not link.available:
            return  # the lease expires by itself
        try:
            pipe = link.redis.pipeline(transaction=False)
            pipe.zrem(readers_key(stream_id), link.instance_id)
            if owner is not None and owner != link.instance_id:
                pipe.publish(instance_channel(owner), control_message("left", stream_id))
            async with asyncio.timeout(REDIS_TIMEOUT):
                await pipe.execute()
        except link.failures as exc:
            link.went_down(exc)

    async def stop(self, stream_id: str) -> bool:
        """Stop a stream another instance runs: its owner is told on its channel. False: no such stream.

        Pub/sub, not a stop key polled by the owner: delivery takes one round trip (well under 100 ms), and polling
        fast enough for that would cost every running generation ~10 commands per second."""
        link = self._link
        if not link.available:
            raise ResumeUnavailable(f"this stream cannot be stopped here now: {_UNREACHABLE}")
        try:
            async with asyncio.timeout(REDIS_TIMEOUT):
                state = StreamState.parse(await link.redis.hgetall(state_key(stream_id)))
            if state is None:
                return False
            if state.status != RUNNING:
                return True  # already ended: nothing to stop
            async with asyncio.timeout(REDIS_TIMEOUT):
                listeners = await link.redis.publish(instance_channel(state.owner), control_message("stop", stream_id))
            if not listeners:  # the owner is gone (or not listening): whatever it ran is lost, say so now
                await link.call("check", [log_key(stream_id), state_key(stream_id)], check_args(self._ttl_ms))
        except link.failures as exc:
            link.went_down(exc)
            raise ResumeUnavailable(f"this stream cannot be stopped here now: {_UNREACHABLE}") from None
        return True


class ReplicaProvider:
    """The provider of a replica: the events Redis held when it opened, then what XREAD brings."""

    name = "replica"

    def __init__(self, remote: RemoteStreams, stream_id: str, replay: Sequence[Event], last_seq: int) -> None:
        self._remote = remote
        self._stream_id = stream_id
        self._replay: Sequence[Event] | None = replay
        self._last_seq = last_seq

    async def stream(self, request: ChatRequest) -> AsyncGenerator[Sequence[Event], None]:
        try:
            replay, self._replay = self._replay, None
            if replay:
                yield replay
                if is_terminal(replay[-1]):
                    return
            after = self._last_seq
            while True:
                events = await self._remote.follow(self._stream_id, after)
                if not events:
                    yield events  # no progress; it lets the generation see a cancellation between waits
                    continue
                after += len(events)
                terminal = next((i for i, e in enumerate(events) if is_terminal(e)), None)
                if terminal is not None:
                    yield events[: terminal + 1]
                    return
                yield events
        finally:
            self._remote.replica_ended(self._stream_id)

    async def aclose(self) -> None:
        return None
