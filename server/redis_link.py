"""The stream store's connection to Redis (``--stream-store redis``): its two clients, its scripts, and what an
outage means. Shared by the owner's side (`server/redis_streams.py`) and the readers' side
(`server/redis_replicas.py`).

- `redis`: commands, with a socket timeout as long as the longest call (the writer's `FLUSH_TIMEOUT`); calls on a
  request's path set their own, shorter `asyncio.timeout` (`REDIS_TIMEOUT`).
- `blocking`: XREAD BLOCK and pub/sub, with a socket timeout past the longest block.
- **Outage**: any Redis error, socket error or timeout marks Redis down for `REDIS_RETRY_INTERVAL` (nothing asks it
  meanwhile: an outage costs one timeout per interval, not one per request); logged once per episode, and once
  when it answers again. The pools' idle connections are dropped then, so a restarted Redis is one episode.
- The scripts are loaded once (again after an outage: a restarted Redis has none) and called by their SHA-1.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
from collections.abc import Coroutine, Sequence
from typing import TYPE_CHECKING, Any

from .redis_client import redis_client
from .stream_store import GenerationLost, encode_batch, instance_key

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger("llm_relay.redis_streams")

REDIS_TIMEOUT = 0.5  # seconds for any one command or pipeline on a request's path (as the limiter)
# Seconds for the calls off every request's path (the writer's flush, the lease refresher): longer, so that a relay
# whose own event loop is saturated (its replies read late) is not taken for a Redis outage.
FLUSH_TIMEOUT = 2.0
REDIS_RETRY_INTERVAL = 1.0  # after a failure, Redis is not asked again for this long
# A SIGKILLed owner is seen as gone this long after its last refresh. Several refreshes long: an owner whose event
# loop lags (saturated) must not be taken for a dead one, since a lost generation is lost for good.
OWNER_TTL = 5.0
LEASE_REFRESH = 1.0  # how often an instance refreshes its liveness key and its readers' leases
READER_LEASE_TTL = 5.0  # a dead instance stops counting as a reader this long after its last refresh (as OWNER_TTL)
FOLLOW_BLOCK_MS = 1000  # one XREAD BLOCK; after one without news the follower checks that the owner lives

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

SCRIPTS = {
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


def ms(seconds: float) -> int:
    return round(seconds * 1000)


def check_args(ttl_ms: int) -> tuple[str, str, int]:
    """ARGV of the "check" script: where owners' liveness keys are, the error a lost stream ends with, its TTL."""
    lost = GenerationLost("the instance that was generating this reply stopped; please ask again")
    return (instance_key(""), encode_batch([lost.to_event()]), ttl_ms)


class RedisLink:
    """The two clients (owned: `aclose` closes them), the scripts, availability, and the tasks the store spawns."""

    def __init__(self, redis: Redis, blocking: Redis, instance_id: str | None = None) -> None:
        from redis.exceptions import RedisError

        # What "Redis is unreachable" means: any Redis error, a socket error, or no answer in time.
        self.failures: tuple[type[Exception], ...] = (RedisError, OSError, TimeoutError)
        self.redis = redis
        self.blocking = blocking
        self.instance_id = instance_id or secrets.token_hex(8)
        self.closed = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._down_until = 0.0
        self._down = False
        self._scripts_loaded = False
        self._loading = asyncio.Lock()

    @classmethod
    def from_url(cls, url: str) -> RedisLink:
        # The store decides what an outage means (see the module's doc); the follower's client waits out a block.
        needed_by = "--stream-store redis"
        redis = redis_client(url, timeout=FLUSH_TIMEOUT, connect_timeout=REDIS_TIMEOUT, needed_by=needed_by)
        blocking = redis_client(
            url, timeout=FOLLOW_BLOCK_MS / 1000 + 2 * REDIS_TIMEOUT, connect_timeout=REDIS_TIMEOUT, needed_by=needed_by
        )
        return cls(redis, blocking)

    @property
    def available(self) -> bool:
        """False while Redis is considered down (after a failure, for `REDIS_RETRY_INTERVAL`)."""
        return asyncio.get_running_loop().time() >= self._down_until

    def retry_in(self) -> float:
        """Seconds until Redis may be asked again (0: now)."""
        return max(0.0, self._down_until - asyncio.get_running_loop().time())

    @property
    def down(self) -> bool:
        """Between a failure and the next call that worked."""
        return self._down

    def spawn(self, job: Coroutine[Any, Any, Any]) -> None:
        """Run `job` in a task of the store's own, cancelled at `aclose`."""
        task = asyncio.get_running_loop().create_task(job)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def went_down(self, exc: BaseException) -> None:
        self._down_until = asyncio.get_running_loop().time() + REDIS_RETRY_INTERVAL
        self._scripts_loaded = False  # a restarted Redis has none
        if not self._down:
            self._down = True
            # The pools' idle connections may be dead (a restarted Redis): dropped now, each would fail once more
            # when Redis is back, and every failure would look like a new outage.
            for client in (self.redis, self.blocking):
                self.spawn(self._drop_idle(client))
            log.warning(
                "Redis is unreachable (%s: %s): streams go on from memory, but cannot be resumed on another "
                "instance until it answers again",
                type(exc).__name__,
                exc,
            )

    def came_back(self) -> None:
        if self._down:
            self._down = False
            log.warning("Redis answers again: new streams can be resumed on any instance again")

    async def _drop_idle(self, client: Redis) -> None:
        with contextlib.suppress(*self.failures):
            await client.connection_pool.disconnect(inuse_connections=False)

    async def call(
        self, script: str, keys: Sequence[str], args: Sequence[str | int | bytes], seconds: float = REDIS_TIMEOUT
    ) -> Any:
        """One script call on the command client, under a timeout of `seconds`."""
        await self.load_scripts()
        async with asyncio.timeout(seconds):
            return await self.redis.evalsha(SCRIPTS[script][1], len(keys), *keys, *args)

    async def load_scripts(self) -> None:
        if self._scripts_loaded:
            return
        async with self._loading:  # once, not once per caller that found them missing
            if not self._scripts_loaded:
                async with asyncio.timeout(REDIS_TIMEOUT):
                    for text, _ in SCRIPTS.values():
                        await self.redis.script_load(text)
                self._scripts_loaded = True

    async def aclose(self) -> None:
        """Stop the tasks, then close the clients."""
        self.closed = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.redis.aclose()
        await self.blocking.aclose()
