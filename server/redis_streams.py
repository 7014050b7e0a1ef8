"""Streams in Redis (``--stream-store redis``): resume, read and stop a generation from any instance.

    owner instance (runs the generation)                  Redis                         another instance
    Generation ─append─▶ EventLog ─▶ local readers
          └ registry (changed) ──▶ appended() ─▶ writer ─ one EVALSHA per flush ──▶ log (Stream), state (hash)
             (marks it dirty: no await, no IO)   task     (an XADD per stream in it)  │ XRANGE, then XREAD BLOCK
                                                                                      ▼
    lease refresher (every LEASE_REFRESH s): the instance's liveness key,   replica Generation ─▶ EventLog ─▶ readers
      the reader leases of this instance's replicas, remote reader counts   (a `ReplicaProvider` is its provider)
    control subscriber: ``stop <id>`` (DELETE elsewhere), ``left <id>`` (a remote reader left)

- **Local readers** of a local generation follow memory, exactly as with the memory store: the per-token path
  gains one attribute check and a dict store (`appended`); Redis is written by one writer task, which sends every
  stream's new events in one script call per flush (`FLUSH_INTERVAL`): per stream with news one XADD of its whole
  batch, its state and TTLs, run by Redis inside the script. Never one write per token, nor one per stream.
- **Remote readers** get a *replica*: a `Generation` of their instance whose provider replays the Redis Stream
  (XRANGE) and follows it (XREAD BLOCK of at most `FOLLOW_BLOCK_MS`, on a connection of its own from the blocking
  pool: cancelling the replica, when its last reader leaves, disconnects that connection at once, redis-py's
  answer to a cancelled read). Its readers are ordinary `Reader`s of the replica, in a registry of replicas that
  forgets an ended replica at once (a later resume replays Redis again, never a replica's own ending).
- **Reader presence**: an instance reading a stream holds a lease (a sorted set per stream, score: expiry in Redis
  time) refreshed every `LEASE_REFRESH` s and removed, with a ``left`` message to the owner, when its replica ends.
  When the last reader on the owner leaves, the registry asks `watch_remote_readers`: the owner counts the live
  leases, and applies its policy (cancel, or the resume grace) only when none is left.
- **Stop** (DELETE on an instance that does not run the generation): a ``stop <id>`` message published on the
  owner's channel. Pub/sub, not a stop key polled by the owner: delivery takes one round trip (well under 100 ms),
  and polling fast enough for that would cost every running generation ~10 commands per second.
- **Owner liveness**: each instance refreshes a key with a `OWNER_TTL` s expiry every `LEASE_REFRESH` s. A remote
  follower that waited `FOLLOW_BLOCK_MS` without news runs the "check" script: a running stream whose owner's key has
  expired ends there and then with a `generation_lost` error appended to its log, which every reader, now or at a
  later reconnect, reads (never a new generation). Bound: `OWNER_TTL` + `FOLLOW_BLOCK_MS` + a round trip.
- **Redis unreachable**: the writer keeps what it has not written (each generation's memory log still holds it)
  and tries again after `REDIS_RETRY_INTERVAL` (a flush whose answer was lost is first resynchronised from the
  state's last sequence number); local readers never notice. A batch Redis refuses (its state is gone after a
  Redis restart, or it does not follow what Redis holds) marks the stream ``degraded``: never resumable elsewhere,
  since its Redis log would have a gap. Resumes elsewhere get `resume_unavailable` meanwhile;
  new streams use Redis again once it answers. Logged once per episode.

Keys are in `server/stream_store.py`; the clients, scripts and what an outage means in `server/redis_link.py`; the
readers' side (replicas, stops sent to owners) in `server/redis_replicas.py`. The scripts name keys of several
streams and the owner's liveness key beside a stream's, so the store needs one Redis (or a primary with replicas),
not a Redis Cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .config import Config, ConfigError
from .events import is_terminal
from .generation import Generation, GenerationSettings
from .redis_link import (
    FLUSH_TIMEOUT,
    FOLLOW_BLOCK_MS,
    LEASE_REFRESH,
    OWNER_TTL,
    READER_LEASE_TTL,
    REDIS_RETRY_INTERVAL,
    REDIS_TIMEOUT,
    SCRIPTS,
    RedisLink,
    ms,
)
from .redis_replicas import Opened, RemoteStreams
from .registry import StreamRegistry
from .stream_store import (
    KEY_PREFIX,
    flush_record,
    instance_channel,
    instance_key,
    parse_control,
    readers_key,
    state_key,
)

if TYPE_CHECKING:
    from redis.asyncio.client import PubSub

log = logging.getLogger("llm_relay.redis_streams")

# Seconds the writer gathers appends before one flush: what a reader on another instance may lag behind the
# owner's own readers, and what lets several tokens of a stream share one entry (paced streams: ~50 ms / pace).
FLUSH_INTERVAL = 0.05


@dataclass(slots=True)
class _Mirror:
    """What the writer knows of one local generation it shares."""

    generation: Generation
    written: int = 0  # the last sequence number Redis holds
    opened: bool = False  # the state hash exists
    # A flush that carried this stream failed without an answer: Redis may hold its batch or not. The next flush
    # reads the state's last sequence number first, so a batch is never sent twice nor skipped.
    uncertain: bool = False


class RedisStreamStore:
    """Shares this instance's generations through Redis (a `registry.SharedStore`), and reads other instances'
    through `remote` (see the module's doc). `link` is owned: `aclose` closes it."""

    def __init__(
        self,
        link: RedisLink,
        registry: StreamRegistry,
        settings: GenerationSettings,
        *,
        retention: float,
        flush_interval: float = FLUSH_INTERVAL,
    ) -> None:
        self._link = link
        self.registry = registry
        self._settings = settings
        self._ttl_ms = max(1, round(retention * 1000))
        # While running, a stream's keys outlive the longest wait between two of its batches.
        longest_wait = max(settings.first_token_timeout, settings.idle_timeout) or settings.total_timeout
        self._running_ttl_ms = self._ttl_ms + round((longest_wait or 3600.0) * 1000)
        self._flush_interval = flush_interval
        self.remote = RemoteStreams(link, settings, ttl_ms=self._ttl_ms)
        self._mirrored: dict[str, _Mirror] = {}
        self._dirty: dict[str, _Mirror] = {}
        self._to_degrade: set[str] = set()
        self._watching: dict[str, tuple[Generation, Callable[[], None]]] = {}
        self._wake = asyncio.Event()
        self._flushing = asyncio.Lock()
        self._opening: tuple[list[_Mirror], asyncio.Future[None]] | None = None
        # Counters (healthz): flushes sent, entries (batches) and events written.
        self.flushes = 0
        self.batches_written = 0
        self.events_written = 0

    @classmethod
    def from_url(
        cls, url: str, registry: StreamRegistry, config: Config, settings: GenerationSettings
    ) -> RedisStreamStore:
        return cls(RedisLink.from_url(url), registry, settings, retention=config.stream_retention)

    @property
    def instance_id(self) -> str:
        return self._link.instance_id

    @property
    def replicas(self) -> StreamRegistry:
        """Other instances' streams read here."""
        return self.remote.replicas

    def start(self) -> None:
        """Start the writer, the lease refresher and the control subscriber (in the running loop)."""
        for job in (self._write_forever(), self._refresh_forever(), self._listen_forever()):
            self._link.spawn(job)

    async def aclose(self) -> None:
        """Write what is left (the streams' ends), stop the tasks, give up the liveness key, close the clients."""
        await self.replicas.shutdown(0.0)
        self.replicas.close()
        if self._dirty and self._link.available:
            dirty, self._dirty = self._dirty, {}
            await self._flush(dirty)
        if self._link.available:
            with contextlib.suppress(*self._link.failures):
                async with asyncio.timeout(REDIS_TIMEOUT):
                    await self._link.redis.delete(instance_key(self.instance_id))
        await self._link.aclose()

    # -- another instance's streams (the handlers' calls) ------------------------------------------------------

    async def open(self, stream_id: str, after: int) -> Opened | None:
        """See `RemoteStreams.open`."""
        return await self.remote.open(stream_id, after)

    async def stop(self, stream_id: str) -> bool:
        """See `RemoteStreams.stop`."""
        return await self.remote.stop(stream_id)

    def report(self) -> dict[str, object]:
        """What `/healthz` says of the store."""
        return {
            "instance": self.instance_id,
            "redis": "unreachable" if self._link.down else "up",
            "shared_streams": len(self._mirrored),
            "replicas": len(self.replicas),
            "flushes": self.flushes,
            "batches_written": self.batches_written,
            "events_written": self.events_written,
        }

    # -- the owner's side: what the registry tells (synchronous, per append) ----------------------------------

    def started(self, generation: Generation) -> None:
        mirror = self._mirrored[generation.id] = _Mirror(generation)
        self._mark(mirror)

    def appended(self, generation: Generation) -> None:
        mirror = self._mirrored.get(generation.id)
        if mirror is not None:
            self._mark(mirror)

    def _mark(self, mirror: _Mirror) -> None:
        self._dirty[mirror.generation.id] = mirror
        if not self._wake.is_set():
            self._wake.set()

    async def announce(self, generation: Generation) -> None:
        """Make `generation` findable on every instance (its state hash) before its id goes out to a client, who
        may take it to another instance at once; the writer's next flush may be up to `FLUSH_INTERVAL` later.
        Streams announced in the same loop turn share one round trip. No wait while Redis is down: the stream then
        runs from memory alone."""
        mirror = self._mirrored.get(generation.id)
        if mirror is None or mirror.opened or not self._link.available:
            return
        if self._opening is None:
            self._opening = ([], asyncio.get_running_loop().create_future())
            self._link.spawn(self._open_announced())
        waiting, done = self._opening
        waiting.append(mirror)
        await asyncio.shield(done)

    async def _open_announced(self) -> None:
        assert self._opening is not None
        done = self._opening[1]
        try:
            await asyncio.sleep(0)  # the rest of this loop turn's announcements
        except BaseException:
            self._opening = None
            done.set_result(None)  # torn down before its turn: whoever awaits the announcement goes on
            raise
        assert self._opening is not None
        (mirrors, done), self._opening = self._opening, None
        try:
            states = [state_key(m.generation.id) for m in mirrors]
            await self._link.call("open", states, [self.instance_id, self._running_ttl_ms])
        except self._link.failures as exc:
            self._link.went_down(exc)
        else:
            for mirror in mirrors:
                mirror.opened = True
        finally:
            done.set_result(None)

    def _give_up(self, mirror: _Mirror) -> None:
        """Redis cannot hold this stream whole: it is never read elsewhere again (see the module's doc)."""
        self._mirrored.pop(mirror.generation.id, None)
        self._dirty.pop(mirror.generation.id, None)
        self._to_degrade.add(mirror.generation.id)

    # -- the writer ---------------------------------------------------------------------------------------------

    async def _write_forever(self) -> None:
        while True:
            await self._wake.wait()
            # Gather: appends of every stream in this window go in one flush, several tokens in one entry.
            await asyncio.sleep(max(self._flush_interval, self._link.retry_in()))
            self._wake.clear()
            dirty, self._dirty = self._dirty, {}
            if dirty:
                await self._flush(dirty)

    async def _flush(self, dirty: dict[str, _Mirror]) -> None:
        """One pipeline: the state of streams new to Redis, then one append per stream with news. One flush at a
        time (the writer's, or the last one at close): each starts from what the previous one wrote."""
        async with self._flushing:
            await self._flush_now(dirty)

    async def _flush_now(self, dirty: dict[str, _Mirror]) -> None:
        if not await self._resync([m for m in dirty.values() if m.uncertain]):
            self._keep(list(dirty.values()))
            return
        records: list[bytes] = []
        sent: list[tuple[_Mirror, int, bool]] = []  # (mirror, the last seq sent, whether that ends the stream)
        for mirror in dirty.values():
            generation = mirror.generation
            try:
                events = generation.log.since(mirror.written)
            except LookupError:  # trimmed before it was written (memory pressure while Redis was away)
                self._give_up(mirror)
                continue
            if not events and mirror.opened:
                continue
            last = mirror.written + len(events)
            ends = bool(events) and is_terminal(events[-1])
            records.append(
                flush_record(
                    generation.id,
                    new=not mirror.opened,
                    first=mirror.written + 1,
                    events=events,
                    ttl_ms=self._ttl_ms if ends else self._running_ttl_ms,
                )
            )
            sent.append((mirror, last, ends))
        if not sent:
            return
        try:
            args: list[str | int | bytes] = [
                self.instance_id,
                self._running_ttl_ms,
                self._settings.log_max_events,
                KEY_PREFIX,
            ]
            results = await self._link.call("flush", [], [*args, b"".join(records)], FLUSH_TIMEOUT)
        except self._link.failures as exc:
            self._link.went_down(exc)
            for mirror, _, _ in sent:
                mirror.uncertain = True
            self._keep([mirror for mirror, _, _ in sent])
            return
        self._link.came_back()
        self.flushes += 1
        refused = 0
        for (mirror, last, ends), written in zip(sent, results, strict=True):
            mirror.opened = True
            if last == mirror.written:
                continue
            if written != 1:
                refused += 1
                self._give_up(mirror)
                continue
            self.events_written += last - mirror.written
            mirror.written = last
            self.batches_written += 1
            if ends:
                self._mirrored.pop(mirror.generation.id, None)
        if refused:
            # One line per flush, not per stream: after a Redis restart every running stream is refused at once.
            log.warning("%d streams could not be kept whole in Redis: they stay resumable only here", refused)

    def _keep(self, mirrors: list[_Mirror]) -> None:
        """A flush failed: each generation's log still holds what was not written; it goes with a later flush.
        Not past the retention, though: by then its keys would have expired, and a long outage must not hold every
        ended generation in memory."""
        now = asyncio.get_running_loop().time()
        for mirror in mirrors:
            ended_at = mirror.generation.ended_at
            if ended_at is not None and now - ended_at > self._ttl_ms / 1000:
                self._give_up(mirror)
            else:
                self._dirty.setdefault(mirror.generation.id, mirror)
        self._wake.set()

    async def _resync(self, uncertain: list[_Mirror]) -> bool:
        """Where Redis is for streams whose last flush got no answer: its state's `last` (the batch landed, or not).
        False if Redis cannot tell now."""
        if not uncertain:
            return True
        try:
            pipe = self._link.redis.pipeline(transaction=False)
            for mirror in uncertain:
                pipe.hget(state_key(mirror.generation.id), "last")
            async with asyncio.timeout(FLUSH_TIMEOUT):
                lasts = await pipe.execute()
        except self._link.failures as exc:
            self._link.went_down(exc)
            return False
        for mirror, raw in zip(uncertain, lasts, strict=True):
            mirror.uncertain = False
            if raw is not None:
                mirror.opened = True
                # Only what this writer sent can be there: at most what it had sent, at least what it knew written.
                mirror.written = max(mirror.written, min(int(raw), mirror.generation.log.last_seq))
        return True

    # -- presence: readers elsewhere ------------------------------------------------------------------------------

    def watch_remote_readers(
        self, generation: Generation, none_now: Callable[[], None], none_later: Callable[[], None]
    ) -> bool:
        if generation.id not in self._mirrored or not self._link.available:
            return False
        self._link.spawn(self._first_count(generation, none_now, none_later))
        return True

    async def _first_count(
        self, generation: Generation, none_now: Callable[[], None], none_later: Callable[[], None]
    ) -> None:
        count = await self._count(generation.id)
        if not count:
            none_now()
        elif not generation.ended and not generation.readers:
            self._watching[generation.id] = (generation, none_later)

    async def _count(self, stream_id: str) -> int:
        """Live reader leases of other instances; 0 when Redis cannot tell (then only local readers count)."""
        try:
            count = int(await self._link.call("count", [readers_key(stream_id)], []))
        except self._link.failures as exc:
            self._link.went_down(exc)
            return 0
        return count

    async def _recount(self, stream_id: str) -> None:
        watched = self._watching.get(stream_id)
        if watched is None:
            return
        self._counted(stream_id, await self._count(stream_id))

    def _counted(self, stream_id: str, count: int) -> None:
        """A watched stream's remote readers were counted: none left, and none here, decides its fate."""
        watched = self._watching.get(stream_id)
        if watched is None:
            return
        generation, none_later = watched
        if generation.ended or generation.readers:
            self._watching.pop(stream_id, None)
        elif not count:
            self._watching.pop(stream_id, None)
            none_later()

    # -- the lease refresher and the control subscriber ---------------------------------------------------------

    async def _refresh_forever(self) -> None:
        while True:
            if self._link.available:
                await self._refresh()
            await asyncio.sleep(LEASE_REFRESH)

    async def _refresh(self) -> None:
        """This instance's liveness, its replicas' reader leases, degraded marks; then watched streams' counts."""
        replicas = self.remote.running()
        degrade = list(self._to_degrade)
        try:
            await self._link.load_scripts()
            pipe = self._link.redis.pipeline(transaction=False)
            pipe.set(instance_key(self.instance_id), 1, px=round(OWNER_TTL * 1000))
            for stream_id in replicas:
                pipe.evalsha(SCRIPTS["lease"][1], 1, readers_key(stream_id), self.instance_id, ms(READER_LEASE_TTL))
            for stream_id in degrade:
                pipe.evalsha(SCRIPTS["degrade"][1], 1, state_key(stream_id))
            watched = list(self._watching)
            for stream_id in watched:
                pipe.evalsha(SCRIPTS["count"][1], 1, readers_key(stream_id))
            async with asyncio.timeout(FLUSH_TIMEOUT):  # off every request's path, like the writer
                results = await pipe.execute()
        except self._link.failures as exc:
            self._link.went_down(exc)
            return
        self._link.came_back()
        self._to_degrade.difference_update(degrade)
        for stream_id, count in zip(watched, results[-len(watched) :] if watched else [], strict=True):
            self._counted(stream_id, int(count))

    async def _listen_forever(self) -> None:
        channel = instance_channel(self.instance_id)
        while True:
            pubsub: PubSub | None = None
            try:
                pubsub = self._link.blocking.pubsub(ignore_subscribe_messages=True)
                async with asyncio.timeout(REDIS_TIMEOUT):
                    await pubsub.subscribe(channel)
                while True:
                    message = await pubsub.get_message(timeout=FOLLOW_BLOCK_MS / 1000)
                    if message is not None and message.get("type") == "message":
                        self._on_control(message["data"])
            except self._link.failures as exc:
                self._link.went_down(exc)
                await asyncio.sleep(REDIS_RETRY_INTERVAL)
            finally:
                if pubsub is not None:
                    with contextlib.suppress(*self._link.failures):
                        await pubsub.aclose()  # type: ignore[no-untyped-call]

    def _on_control(self, data: bytes | str) -> None:
        parsed = parse_control(data)
        if parsed is None:
            return
        verb, stream_id = parsed
        if verb == "stop":
            generation = self.registry.get(stream_id)
            if generation is not None:
                self.registry.stop(generation)
        elif stream_id in self._watching:
            self._link.spawn(self._recount(stream_id))


def build_stream_store(config: Config, registry: StreamRegistry, settings: GenerationSettings) -> RedisStreamStore:
    """The Redis store for ``--stream-store redis`` (it needs ``--redis-url``)."""
    if not config.redis_url:
        raise ConfigError("--stream-store redis needs --redis-url")
    store = RedisStreamStore.from_url(config.redis_url, registry, config, settings)
    registry.shared = store
    return store


__all__ = ["FLUSH_INTERVAL", "RedisStreamStore", "build_stream_store"]
