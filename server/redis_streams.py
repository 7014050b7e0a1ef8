"""Streams in Redis (``--stream-store redis``): resume, read and stop a generation from any instance.

    owner instance (runs the generation)                  Redis                         another instance
    Generation ─append─▶ EventLog ─▶ local readers
          └ registry._on_change ─▶ appended() ─▶ writer ─ one EVALSHA per flush ──▶ log (Stream), state (hash)
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
  follower that waited `FOLLOW_BLOCK_MS` without news runs `_CHECK_LUA`: a running stream whose owner's key has
  expired ends there and then with a `generation_lost` error appended to its log, which every reader, now or at a
  later reconnect, reads (never a new generation). Bound: `OWNER_TTL` + `FOLLOW_BLOCK_MS` + a round trip.
- **Redis unreachable**: the writer keeps what it has not written (each generation's memory log still holds it)
  and tries again after `REDIS_RETRY_INTERVAL`; local readers never notice. A batch Redis refuses (its state is
  gone after a Redis restart, or a lost reply left the log ambiguous) marks the stream ``degraded``: never
  resumable elsewhere, since its Redis log would have a gap. Resumes elsewhere get `resume_unavailable` meanwhile;
  new streams use Redis again once it answers. Logged once per episode.

Keys are in `server/stream_store.py`. The owner's liveness key is read by a script that also touches the stream's
keys, so the store needs one Redis (or a primary with replicas), not a Redis Cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .chat_request import ChatRequest, Message
from .config import Config, ConfigError
from .errors import RelayError, RequestError, ResumeUnavailable
from .events import Event, is_terminal
from .generation import EventLog, Generation, GenerationSettings
from .registry import RegistrySettings, StreamRegistry
from .stream_store import (
    DEGRADED,
    ENDED_STATUSES,
    KEY_PREFIX,
    RUNNING,
    GenerationLost,
    StreamState,
    control_message,
    decode_entry,
    encode_batch,
    entry_id,
    events_after,
    flush_record,
    instance_channel,
    instance_key,
    log_key,
    parse_control,
    readers_key,
    state_key,
)

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.client import PubSub

log = logging.getLogger("llm_relay.redis_streams")

# Seconds the writer gathers appends before one pipeline: what a reader on another instance may lag behind the
# owner's own readers, and what lets several tokens of a stream share one entry (paced streams: ~50 ms / pace).
FLUSH_INTERVAL = 0.05
REDIS_TIMEOUT = 0.5  # seconds for any one command or pipeline on a request's path (as the limiter)
# Seconds for the writer's flush, off every request's path: longer, so that a relay whose own event loop is
# saturated (its replies read late) is not taken for a Redis outage.
FLUSH_TIMEOUT = 2.0
REDIS_RETRY_INTERVAL = 1.0  # after a failure, Redis is not asked again for this long
# A SIGKILLed owner is seen as gone this long after its last refresh. Several refreshes long: an owner whose event
# loop lags (saturated) must not be taken for a dead one, since a lost generation is lost for good.
OWNER_TTL = 5.0
LEASE_REFRESH = 1.0  # how often an instance refreshes its liveness key and its readers' leases
READER_LEASE_TTL = 5.0  # a dead instance stops counting as a reader this long after its last refresh (as OWNER_TTL)
FOLLOW_BLOCK_MS = 1000  # one XREAD BLOCK; after one without news the follower checks that the owner lives
REPLAY_COUNT = 1000  # entries per XRANGE / XREAD reply

# -- scripts (Redis runs each atomically) --------------------------------------------------------------------------

# A new stream's state, unless it exists (`announce` and the writer may both send it, in either order).
# KEYS: the states. ARGV: owner instance id, TTL ms.
_OPEN_LUA = """
for i = 1, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 0 then
    redis.call('HSET', KEYS[i], 'owner', ARGV[1], 'status', 'running', 'last', 0)
    redis.call('PEXPIRE', KEYS[i], ARGV[2])
  end
end
return 1
"""

# One flush: per stream, its state if it is new, then its batch of events. A batch is appended only to a running
# stream whose last event is the one before it (no gap, no duplicate, even when a lost reply makes the writer send
# a batch twice); a batch that does not follow marks the stream degraded. The streams come as one blob of records
# (`flush_record`) rather than as keys and arguments: the client's cost of a command grows with its arguments, and
# this is the one per-token path that reaches Redis; the script names the keys itself (one Redis, not a Cluster).
# ARGV: owner, running TTL ms, length cap, key prefix, records. Returns 1 (written) or 0 per record.
_FLUSH_LUA = """
local owner, running_ttl, maxlen, prefix, blob = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local out, pos = {}, 1
while pos <= #blob do
  local nl = string.find(blob, '\\n', pos, true)
  local id, new, first, last, status, ttl, size = string.match(
    string.sub(blob, pos, nl - 1), '^(%x+) (%d) (%d+) (%d+) (%a+) (%d+) (%d+)$')
  pos = nl + 1 + tonumber(size)
  local log, state = prefix .. ':stream:{' .. id .. '}:log', prefix .. ':stream:{' .. id .. '}:state'
  if new == '1' and redis.call('EXISTS', state) == 0 then
    redis.call('HSET', state, 'owner', owner, 'status', 'running', 'last', 0)
    redis.call('PEXPIRE', state, running_ttl)
  end
  local result = 1
  if tonumber(last) >= tonumber(first) then
    local st = redis.call('HMGET', state, 'status', 'last')
    if st[1] ~= 'running' then
      result = 0
    elseif tonumber(st[2]) ~= tonumber(first) - 1 then
      redis.call('HSET', state, 'status', 'degraded')
      result = 0
    else
      local events = string.sub(blob, nl + 1, nl + tonumber(size))
      redis.call('XADD', log, 'MAXLEN', '~', maxlen, last .. '-0', 'f', first, 'e', events)
      redis.call('HSET', state, 'last', last, 'status', status)
      redis.call('PEXPIRE', log, ttl)
      redis.call('PEXPIRE', state, ttl)
    end
  end
  out[#out + 1] = result
end
return out
"""

# The stream's status; a running stream whose owner's liveness key is gone ends here with `generation_lost`.
# KEYS: log, state. ARGV: owner key prefix, the error's events JSON, TTL ms.
_CHECK_LUA = """
local st = redis.call('HMGET', KEYS[2], 'status', 'last', 'owner')
if not st[1] then return false end
if st[1] ~= 'running' or redis.call('EXISTS', ARGV[1] .. st[3]) == 1 then return st[1] end
local seq = tonumber(st[2]) + 1
redis.call('XADD', KEYS[1], seq .. '-0', 'f', seq, 'e', ARGV[2])
redis.call('HSET', KEYS[2], 'last', seq, 'status', 'lost')
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return 'lost'
"""

# Mark a running stream degraded (its owner could not write all of it). KEYS: state.
_DEGRADE_LUA = """
if redis.call('HGET', KEYS[1], 'status') == 'running' then redis.call('HSET', KEYS[1], 'status', 'degraded') end
return 1
"""

# This instance reads the stream: its lease, with an expiry in Redis time (instances' clocks may differ).
# KEYS: readers. ARGV: instance id, lease TTL ms.
_LEASE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

# Live reader leases of a stream. KEYS: readers.
_COUNT_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZCARD', KEYS[1])
"""

_SCRIPTS = {
    name: (text, hashlib.sha1(text.encode()).hexdigest())  # Redis names scripts by their SHA-1
    for name, text in {
        "open": _OPEN_LUA,
        "flush": _FLUSH_LUA,
        "check": _CHECK_LUA,
        "degrade": _DEGRADE_LUA,
        "lease": _LEASE_LUA,
        "count": _COUNT_LUA,
    }.items()
}

# The request a replica's generation is made with: a replica never asks a provider for anything.
_REPLICA_CHAT = ChatRequest(messages=(Message("user", ""),), model="replica")
# A replica follows another instance's clocks: its own are off (the owner's liveness bounds its waits instead).
_NO_CLOCKS = {"first_token_timeout": 0.0, "idle_timeout": 0.0, "total_timeout": 0.0}


@dataclass(slots=True)
class _Mirror:
    """What the writer knows of one local generation it shares."""

    generation: Generation
    written: int = 0  # the last sequence number Redis holds
    opened: bool = False  # the state hash exists
    # A flush that carried this stream failed without an answer: Redis may hold its batch or not. The next flush
    # reads the state's last sequence number first, so a batch is never sent twice nor skipped.
    uncertain: bool = False


@dataclass(frozen=True, slots=True)
class Opened:
    """A generation a resume reads, local or replica, and what is known of its log at this moment."""

    generation: Generation
    registry: StreamRegistry
    first_seq: int
    last_seq: int
    ended: bool


class RedisStreamStore:
    """Shares this instance's generations through Redis and reads other instances' (see the module's doc).

    `redis` (commands, short timeouts) and `blocking` (XREAD BLOCK and pub/sub, timeouts past the block) are owned:
    `aclose` closes them. `registry` holds this instance's own generations; `replicas` those of others it reads.
    """

    def __init__(
        self,
        redis: Redis,
        blocking: Redis,
        registry: StreamRegistry,
        settings: GenerationSettings,
        *,
        retention: float,
        instance_id: str | None = None,
        flush_interval: float = FLUSH_INTERVAL,
    ) -> None:
        from redis.exceptions import RedisError

        self._failures: tuple[type[Exception], ...] = (RedisError, OSError, TimeoutError)
        self._redis = redis
        self._blocking = blocking
        self.registry = registry
        self.instance_id = instance_id or secrets.token_hex(8)
        self._settings = settings
        self._replica_settings = GenerationSettings(
            **_NO_CLOCKS,
            log_max_events=settings.log_max_events,
            log_max_bytes=settings.log_max_bytes,
            reader_lead_bytes=settings.reader_lead_bytes,
        )
        # An ended replica is forgotten at once: a later resume reads Redis again, never a replica's own end.
        self.replicas = StreamRegistry(RegistrySettings(resume_grace=0.0, retention=0.0))
        self._ttl_ms = max(1, round(retention * 1000))
        # While running, a stream's keys outlive the longest wait between two of its batches.
        longest_wait = max(settings.first_token_timeout, settings.idle_timeout) or settings.total_timeout
        self._running_ttl_ms = self._ttl_ms + round((longest_wait or 3600.0) * 1000)
        self._flush_interval = flush_interval
        self._mirrored: dict[str, _Mirror] = {}
        self._dirty: dict[str, _Mirror] = {}
        self._to_degrade: set[str] = set()
        self._watching: dict[str, tuple[Generation, Callable[[], None]]] = {}
        self._replica_owners: dict[str, str] = {}  # a running replica's stream id → its owner's instance id
        self._wake = asyncio.Event()
        self._flushing = asyncio.Lock()
        self._loading = asyncio.Lock()
        self._opening: tuple[list[_Mirror], asyncio.Future[None]] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._down_until = 0.0
        self._down = False
        self._scripts_loaded = False
        self._closed = False
        # Counters (healthz): flushes sent, entries (batches) and events written.
        self.flushes = 0
        self.batches_written = 0
        self.events_written = 0

    @classmethod
    def from_url(
        cls, url: str, registry: StreamRegistry, config: Config, settings: GenerationSettings
    ) -> RedisStreamStore:
        try:
            from redis.asyncio import Redis
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff
        except ImportError:  # pragma: no cover - depends on the installation
            raise ConfigError("--stream-store redis needs the redis package: pip install 'llm-relay[redis]'") from None
        try:
            # No retries inside the client: the store decides what an outage means (see the module's doc). The
            # socket timeout is the longest any call may take (the writer's); calls on a request's path have their
            # own, shorter `asyncio.timeout`.
            redis = Redis.from_url(
                url, socket_timeout=FLUSH_TIMEOUT, socket_connect_timeout=REDIS_TIMEOUT, retry=Retry(NoBackoff(), 0)
            )
            blocking = Redis.from_url(
                url,
                socket_timeout=FOLLOW_BLOCK_MS / 1000 + 2 * REDIS_TIMEOUT,
                socket_connect_timeout=REDIS_TIMEOUT,
                retry=Retry(NoBackoff(), 0),
            )
        except ValueError:
            raise ConfigError(
                "--redis-url is not a Redis URL: expected redis://[[user]:password@]host[:port][/db], rediss://... "
                "or unix:///path, with '@', ':' and '/' in a password percent-encoded"
            ) from None
        return cls(redis, blocking, registry, settings, retention=config.stream_retention)

    # -- life ------------------------------------------------------------------------------------------------

    @property
    def available(self) -> bool:
        """False while Redis is considered down (after a failure, for `REDIS_RETRY_INTERVAL`)."""
        return asyncio.get_running_loop().time() >= self._down_until

    def start(self) -> None:
        """Start the writer, the lease refresher and the control subscriber (in the running loop)."""
        for job in (self._write_forever(), self._refresh_forever(), self._listen_forever()):
            self._spawn(job)

    async def aclose(self) -> None:
        """Write what is left (the streams' ends), stop the tasks, give up the leases, close the clients."""
        await self.replicas.shutdown(0.0)
        self.replicas.close()
        if self._dirty and self.available:
            dirty, self._dirty = self._dirty, {}
            await self._flush(dirty)
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.available:
            with contextlib.suppress(*self._failures):
                async with asyncio.timeout(REDIS_TIMEOUT):
                    await self._redis.delete(instance_key(self.instance_id))
        await self._redis.aclose()
        await self._blocking.aclose()

    def _spawn(self, job: Any) -> None:
        task = asyncio.get_running_loop().create_task(job)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _went_down(self, exc: BaseException) -> None:
        self._down_until = asyncio.get_running_loop().time() + REDIS_RETRY_INTERVAL
        self._scripts_loaded = False  # a restarted Redis has none
        if not self._down:
            self._down = True
            # The pools' idle connections may be dead (a restarted Redis): dropped now, each would fail once more
            # when Redis is back, and every failure would look like a new outage.
            for client in (self._redis, self._blocking):
                self._spawn(self._drop_idle(client))
            log.warning(
                "Redis is unreachable (%s: %s): streams go on from memory, but cannot be resumed on another "
                "instance until it answers again",
                type(exc).__name__,
                exc,
            )

    async def _drop_idle(self, client: Redis) -> None:
        with contextlib.suppress(*self._failures):
            await client.connection_pool.disconnect(inuse_connections=False)

    def _came_back(self) -> None:
        if self._down:
            self._down = False
            log.warning("Redis answers again: new streams can be resumed on any instance again")

    async def _call(
        self, script: str, keys: Sequence[str], args: Sequence[str | int | bytes], seconds: float = REDIS_TIMEOUT
    ) -> Any:
        """One script call on the command client, under a timeout of `seconds`."""
        await self._load_scripts()
        async with asyncio.timeout(seconds):
            return await self._redis.evalsha(_SCRIPTS[script][1], len(keys), *keys, *args)

    async def _load_scripts(self) -> None:
        if self._scripts_loaded:
            return
        async with self._loading:  # once, not once per caller that found them missing
            if not self._scripts_loaded:
                async with asyncio.timeout(REDIS_TIMEOUT):
                    for text, _ in _SCRIPTS.values():
                        await self._redis.script_load(text)
                self._scripts_loaded = True

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
        if mirror is None or mirror.opened or not self.available:
            return
        if self._opening is None:
            self._opening = ([], asyncio.get_running_loop().create_future())
            self._spawn(self._open_announced())
        waiting, done = self._opening
        waiting.append(mirror)
        await asyncio.shield(done)

    async def _open_announced(self) -> None:
        await asyncio.sleep(0)  # the rest of this loop turn's announcements
        assert self._opening is not None
        (mirrors, done), self._opening = self._opening, None
        try:
            states = [state_key(m.generation.id) for m in mirrors]
            await self._call("open", states, [self.instance_id, self._running_ttl_ms])
        except self._failures as exc:
            self._went_down(exc)
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
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            # Gather: appends of every stream in this window go in one pipeline, several tokens in one entry.
            await asyncio.sleep(max(self._flush_interval, self._down_until - loop.time()))
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
            results = await self._call("flush", [], [*args, b"".join(records)], FLUSH_TIMEOUT)
        except self._failures as exc:
            self._went_down(exc)
            for mirror, _, _ in sent:
                mirror.uncertain = True
            self._keep([mirror for mirror, _, _ in sent])
            return
        self._came_back()
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
            pipe = self._redis.pipeline(transaction=False)
            for mirror in uncertain:
                pipe.hget(state_key(mirror.generation.id), "last")
            async with asyncio.timeout(FLUSH_TIMEOUT):
                lasts = await pipe.execute()
        except self._failures as exc:
            self._went_down(exc)
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
        if generation.id not in self._mirrored or not self.available:
            return False
        self._spawn(self._first_count(generation, none_now, none_later))
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
            count = int(await self._call("count", [readers_key(stream_id)], []))
        except self._failures as exc:
            self._went_down(exc)
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
            if self.available:
                await self._refresh()
            await asyncio.sleep(LEASE_REFRESH)

    async def _refresh(self) -> None:
        """This instance's liveness, its replicas' reader leases, degraded marks; then watched streams' counts."""
        replicas = [g.id for g in self.replicas.running()]
        degrade = list(self._to_degrade)
        try:
            await self._load_scripts()
            pipe = self._redis.pipeline(transaction=False)
            pipe.set(instance_key(self.instance_id), 1, px=round(OWNER_TTL * 1000))
            for stream_id in replicas:
                pipe.evalsha(_SCRIPTS["lease"][1], 1, readers_key(stream_id), self.instance_id, _ms(READER_LEASE_TTL))
            for stream_id in degrade:
                pipe.evalsha(_SCRIPTS["degrade"][1], 1, state_key(stream_id))
            watched = list(self._watching)
            for stream_id in watched:
                pipe.evalsha(_SCRIPTS["count"][1], 1, readers_key(stream_id))
            async with asyncio.timeout(FLUSH_TIMEOUT):  # off every request's path, like the writer
                results = await pipe.execute()
        except self._failures as exc:
            self._went_down(exc)
            return
        self._came_back()
        self._to_degrade.difference_update(degrade)
        for stream_id, count in zip(watched, results[-len(watched) :] if watched else [], strict=True):
            self._counted(stream_id, int(count))

    async def _listen_forever(self) -> None:
        channel = instance_channel(self.instance_id)
        while True:
            pubsub: PubSub | None = None
            try:
                pubsub = self._blocking.pubsub(ignore_subscribe_messages=True)
                async with asyncio.timeout(REDIS_TIMEOUT):
                    await pubsub.subscribe(channel)
                while True:
                    message = await pubsub.get_message(timeout=FOLLOW_BLOCK_MS / 1000)
                    if message is not None and message.get("type") == "message":
                        self._on_control(message["data"])
            except self._failures as exc:
                self._went_down(exc)
                await asyncio.sleep(REDIS_RETRY_INTERVAL)
            finally:
                if pubsub is not None:
                    with contextlib.suppress(*self._failures):
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
            self._spawn(self._recount(stream_id))

    # -- another instance's side: resume, follow, stop ---------------------------------------------------------

    async def open(self, stream_id: str, after: int) -> Opened | None:
        """A replica of another instance's generation for a reader from after event `after`: an existing one, or a
        new one that replays Redis. None: the stream has ended and the client has its terminal event.

        Raises `ResumeUnavailable` when Redis does not have the stream whole (unknown, expired, degraded, the events
        after `after` no longer kept) or cannot be reached, `RequestError` for an event after an ended stream's end.
        No replica is left behind by a refusal.
        """
        replica = self.replicas.get(stream_id)
        if replica is not None and not replica.ended:
            log_ = replica.log
            return Opened(replica, self.replicas, log_.first_seq, log_.last_seq, False)
        for _ in range(10):  # an ended replica is forgotten in the next loop turn: not under the new one's id
            if replica is None or not replica.ended:
                break
            await asyncio.sleep(0)
            replica = self.replicas.get(stream_id)
        if not self.available:
            raise ResumeUnavailable("this stream cannot be resumed here now: the shared stream store is unreachable")
        try:
            await self._load_scripts()
            pipe = self._redis.pipeline(transaction=False)
            # The lease first: the owner must not decide that nobody reads while this replica starts.
            pipe.evalsha(_SCRIPTS["lease"][1], 1, readers_key(stream_id), self.instance_id, _ms(READER_LEASE_TTL))
            pipe.evalsha(_SCRIPTS["check"][1], 2, log_key(stream_id), state_key(stream_id), *self._check_args())
            pipe.hgetall(state_key(stream_id))
            pipe.xrange(log_key(stream_id), "-", "+")
            async with asyncio.timeout(REDIS_TIMEOUT):
                _, _, raw_state, raw_entries = await pipe.execute()
        except self._failures as exc:
            self._went_down(exc)
            raise ResumeUnavailable(
                "this stream cannot be resumed here now: the shared stream store is unreachable"
            ) from None
        self._came_back()
        state = StreamState.parse(raw_state)
        try:
            if state is None or state.status == DEGRADED:
                raise ResumeUnavailable("this stream cannot be resumed here: it is unknown, expired or evicted")
            entries = [decode_entry(entry_id_, fields) for entry_id_, fields in raw_entries]
            first_seq = entries[0].first if entries else state.last + 1
            _, events = events_after(entries, first_seq - 1)
        except (ValueError, ResumeUnavailable) as exc:
            self._spawn(self._leave(stream_id, None))
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
            self._spawn(self._leave(stream_id, None))
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
        self._replica_owners[stream_id] = state.owner
        self.replicas.start(replica)
        return Opened(replica, self.replicas, first_seq, last_seq, ended)

    def _check_args(self) -> tuple[str, str, int]:
        lost = GenerationLost("the instance that was generating this reply stopped; please ask again")
        return (instance_key(""), encode_batch([lost.to_event()]), self._ttl_ms)

    async def follow(self, stream_id: str, after: int) -> list[Event]:
        """The events after `after`, waiting up to `FOLLOW_BLOCK_MS` for some; [] when none came (then the owner's
        liveness was checked: a lost generation's error comes with the next call)."""
        key = log_key(stream_id)
        try:
            async with asyncio.timeout(FOLLOW_BLOCK_MS / 1000 + 2 * REDIS_TIMEOUT):
                reply = await self._blocking.xread({key: entry_id(after)}, count=REPLAY_COUNT, block=FOLLOW_BLOCK_MS)
            if not reply:
                status = await self._call("check", [key, state_key(stream_id)], self._check_args())
                status = status.decode() if isinstance(status, bytes) else status
                if status is None or status == DEGRADED:
                    raise ResumeUnavailable("this stream can no longer be followed here: its shared log is gone")
                return []
        except self._failures as exc:
            self._went_down(exc)
            raise ResumeUnavailable("the shared stream store became unreachable; try again shortly") from None
        self._came_back()
        try:
            streams: list[Any] = reply  # type: ignore[assignment]  # RESP2: [[key, [(id, fields), ...]], ...]
            entries = [decode_entry(entry_id_, fields) for _, items in streams for entry_id_, fields in items]
            first, events = events_after(entries, after)
        except ValueError:
            raise ResumeUnavailable("this stream's shared log has a gap") from None
        if first != after + 1:
            raise ResumeUnavailable("the events after this one are no longer kept")
        return events

    def replica_ended(self, stream_id: str) -> None:
        """A replica's provider is done (its readers left, or the stream ended): give up its lease now."""
        owner = self._replica_owners.pop(stream_id, None)
        if not self._closed:
            self._spawn(self._leave(stream_id, owner))

    async def _leave(self, stream_id: str, owner: str | None) -> None:
        if not self.available:
            return  # the lease expires by itself
        try:
            pipe = self._redis.pipeline(transaction=False)
            pipe.zrem(readers_key(stream_id), self.instance_id)
            if owner is not None and owner != self.instance_id:
                pipe.publish(instance_channel(owner), control_message("left", stream_id))
            async with asyncio.timeout(REDIS_TIMEOUT):
                await pipe.execute()
        except self._failures as exc:
            self._went_down(exc)

    def report(self) -> dict[str, object]:
        """What `/healthz` says of the store."""
        return {
            "instance": self.instance_id,
            "redis": "up" if not self._down else "unreachable",
            "shared_streams": len(self._mirrored),
            "replicas": len(self.replicas),
            "flushes": self.flushes,
            "batches_written": self.batches_written,
            "events_written": self.events_written,
        }

    async def stop(self, stream_id: str) -> bool:
        """Stop a stream another instance runs: its owner is told on its channel. False: no such stream."""
        if not self.available:
            raise ResumeUnavailable("this stream cannot be stopped here now: the shared stream store is unreachable")
        try:
            async with asyncio.timeout(REDIS_TIMEOUT):
                state = StreamState.parse(await self._redis.hgetall(state_key(stream_id)))
            if state is None:
                return False
            if state.status != RUNNING:
                return True  # already ended: nothing to stop
            async with asyncio.timeout(REDIS_TIMEOUT):
                listeners = await self._redis.publish(instance_channel(state.owner), control_message("stop", stream_id))
            if not listeners:  # the owner is gone (or not listening): whatever it ran is lost, say so now
                await self._call("check", [log_key(stream_id), state_key(stream_id)], self._check_args())
        except self._failures as exc:
            self._went_down(exc)
            raise ResumeUnavailable(
                "this stream cannot be stopped here now: the shared stream store is unreachable"
            ) from None
        return True


class ReplicaProvider:
    """The provider of a replica: the events Redis held when it opened, then what XREAD brings."""

    name = "replica"

    def __init__(self, store: RedisStreamStore, stream_id: str, replay: Sequence[Event], last_seq: int) -> None:
        self._store = store
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
                events = await self._store.follow(self._stream_id, after)
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
            self._store.replica_ended(self._stream_id)

    async def aclose(self) -> None:
        return None


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


def build_stream_store(config: Config, registry: StreamRegistry, settings: GenerationSettings) -> RedisStreamStore:
    """The Redis store for ``--stream-store redis`` (it needs ``--redis-url``)."""
    if not config.redis_url:
        raise ConfigError("--stream-store redis needs --redis-url")
    store = RedisStreamStore.from_url(config.redis_url, registry, config, settings)
    registry.shared = store
    return store


__all__ = ["KEY_PREFIX", "Opened", "RedisStreamStore", "ReplicaProvider", "build_stream_store"]
