"""Admission control backends: in process (`LocalLimiter`, the default) and shared through Redis (`RedisLimiter`).

Both implement `server.admission.Limiter`. An admission checks, in this order, so that a refused request never
costs the client a token:

    1. the client's concurrent streams  → 429 RateLimited  (Retry-After: 1, a slot frees when a stream ends)
    2. all concurrent streams           → 503 Overloaded   (Retry-After: 1)
    3. the client's token bucket        → 429 RateLimited  (Retry-After: when a token is really there)

then takes a token and a stream slot; the slot is held until `Admission.release()`, which the handler calls in a
``finally`` whatever ended the stream.

    handler ── admit(client) ──▶ LocalLimiter   TokenBucket values (limits.py) + slot counts, in one process
                            └──▶ RedisLimiter   one Lua script: GCRA + leased slots, Redis server time
                                   ├─ Redis unreachable: fail open → this process's LocalLimiter
                                   │                      fail closed → 503 until Redis answers again
                                   └─ one lease refresher task: renews this process's leases every ttl/3

Redis keys (one hash tag, so that a script's keys share a Redis Cluster slot):

    {llm-relay}:bucket:<client>    string: the bucket's TAT in µs of Redis time; expires when the bucket is full
    {llm-relay}:streams:<client>   sorted set of the client's stream leases (score: lease expiry, µs)
    {llm-relay}:streams            sorted set of every stream lease

A lease that is not renewed (its process crashed, or lost Redis) expires after the lease TTL and its slot
comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import secrets
import time
from collections.abc import Callable, Mapping
from fractions import Fraction
from typing import TYPE_CHECKING, Any

from .admission import Admission, Limiter
from .config import Config
from .errors import Overloaded, RateLimited
from .limits import BucketTable, LimitPolicy, TokenBucket, exact_rate, float_up, parse_rate, service_limit
from .redis_client import RedisOutage, redis_client

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger("llm_relay.limiter")

Clock = Callable[[], float]

# A slot frees the moment one of the client's streams ends, which nobody can foresee: a polite poll interval.
SLOT_RETRY_AFTER = 1.0
REDIS_TIMEOUT = 0.5  # seconds for any one Redis command: a LAN round trip is well under a millisecond
REDIS_RETRY_INTERVAL = 1.0  # after a failure, Redis is not asked again for this long
LEASE_TTL = 30.0  # a crashed process's stream slots come back after at most this long
_REFRESH_BATCH = 256
_US = 1_000_000


def _too_fast(
    policy: LimitPolicy, retry_after: float, remaining: int | None, reset: float | None, held: int
) -> RateLimited:
    """The bucket is empty: Retry-After is when its next token is really there (rounded up to whole seconds by
    the response, RFC 9110 §10.2.3), and so is the RateLimit ``t``, which the draft's §6 asks Retry-After not to
    precede."""
    return RateLimited(
        f"too many requests; try again in {math.ceil(retry_after)} s",
        retry_after=retry_after,
        headers=policy.header_fields(remaining=remaining, reset=reset, streams=held),
    )


def _no_slot(
    policy: LimitPolicy, *, everyone: bool, remaining: int | None, reset: float | None, held: int
) -> RateLimited | Overloaded:
    """A stream cap is reached: 429 for the client's own cap, 503 for the server's.

    A slot frees whenever a stream ends, which nobody can foresee, so Retry-After is a polite poll interval,
    but never earlier than the bucket's next token when the bucket is empty too. ``t`` is left out: the bucket's
    effective window may end after this Retry-After, which the draft's §6 rules out.
    """
    retry_after = SLOT_RETRY_AFTER
    if remaining == 0 and reset is not None:
        retry_after = max(retry_after, reset)
    headers = policy.header_fields(remaining=remaining, reset=None, streams=held)
    if everyone:
        return Overloaded(
            "the server is busy with other replies; try again in a moment", retry_after=retry_after, headers=headers
        )
    return RateLimited(
        f"you already have {held} replies streaming; wait for one to finish", retry_after=retry_after, headers=headers
    )


# -- in process ---------------------------------------------------------------------------------------------------


class LocalAdmission:
    """A stream slot of a `LocalLimiter`; `release` gives it back, once."""

    __slots__ = ("_client", "_limiter", "headers")

    def __init__(self, limiter: LocalLimiter, client: str, headers: Mapping[str, str]) -> None:
        self._limiter: LocalLimiter | None = limiter
        self._client = client
        self.headers = headers

    async def release(self) -> None:
        self.release_now()

    def release_now(self) -> None:
        limiter, self._limiter = self._limiter, None
        if limiter is not None:
            limiter.give_back(self._client)


class LocalLimiter:
    """Admission control for one process: a token bucket per client and slot counts, in memory.

    `admit_now` has no ``await`` between its checks and its taking, so admissions are atomic on the event loop.

    Memory is bounded by `max_tracked_clients` buckets. Buckets are kept in order of last use; a full bucket is
    worth nothing (a new client gets a full one), so the oldest full buckets are dropped as new clients arrive.
    Only when more than `max_tracked_clients` clients have all been active within one refill time (``burst /
    rate``) is a bucket that is not full dropped: that client gets a fresh bucket, no more than a new client
    gets, and the server's memory stays bounded whatever a flood of addresses does. Slot counts exist only for
    clients holding streams, which the stream caps bound.
    """

    def __init__(
        self,
        policy: LimitPolicy,
        *,
        max_tracked_clients: int = 100_000,
        clock: Clock = time.monotonic,
    ) -> None:
        self.policy = policy
        self.max_tracked_clients = max(1, max_tracked_clients)
        self._clock = clock
        self._template = policy.new_bucket()
        self._buckets = BucketTable(self.max_tracked_clients)  # client → its bucket's TAT
        self._streams: dict[str, int] = {}
        self._open = 0

    @property
    def open_streams(self) -> int:
        return self._open

    @property
    def tracked_clients(self) -> int:
        return len(self._buckets)

    @property
    def evicted_busy(self) -> int:
        """Buckets dropped while not full (see the class docstring): worth a look if it grows."""
        return self._buckets.evicted_busy

    def streams_of(self, client: str) -> int:
        return self._streams.get(client, 0)

    async def admit(self, client: str) -> Admission:
        return self.admit_now(client)

    def admit_now(self, client: str) -> LocalAdmission:
        now = self._clock()
        policy = self.policy
        held = self._streams.get(client, 0)
        bucket = self._bucket(client)
        client_full = policy.max_streams_per_client and held >= policy.max_streams_per_client
        if client_full or (policy.max_streams and self._open >= policy.max_streams):
            # The bucket is looked at (cost 0), not taken from: a refused request costs no token.
            level = bucket.acquire(now, cost=0) if bucket is not None else None
            raise _no_slot(
                policy,
                everyone=not client_full,
                remaining=level.remaining if level else None,
                reset=level.reset if level else None,
                held=held,
            )
        remaining: int | None = None
        reset: float | None = None
        if bucket is not None:
            decision = bucket.acquire(now)
            if not decision.allowed:
                raise _too_fast(policy, decision.retry_after, decision.remaining, decision.reset, held)
            assert decision.bucket.tat is not None  # a token was taken
            self._buckets.store(client, decision.bucket.tat, now)
            remaining, reset = decision.remaining, decision.reset
        self._streams[client] = held + 1
        self._open += 1
        return LocalAdmission(self, client, policy.header_fields(remaining=remaining, reset=reset, streams=held + 1))

    def give_back(self, client: str) -> None:
        held = self._streams.get(client, 0)
        if held <= 1:
            self._streams.pop(client, None)
        else:
            self._streams[client] = held - 1
        if held:
            self._open -= 1

    async def aclose(self) -> None:
        return None

    def _bucket(self, client: str) -> TokenBucket | None:
        template = self._template
        if template is None:
            return None
        tat = self._buckets.get(client)
        return template if tat is None else TokenBucket(template.rate, template.burst, tat)


# -- Redis --------------------------------------------------------------------------------------------------------

# Check-and-take in one script: Redis runs a script atomically, so instances sharing the Redis share one budget
# exactly. Times are integer microseconds of the Redis server's clock (TIME), so instances need no synchronised
# clocks, and integers below 2^53 are exact in Lua's doubles. Numbers are written back with %.0f: Lua 5.1 turns
# a number into text with %.14g, which would round a microsecond timestamp.
_ADMIT_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local max_mine = tonumber(ARGV[4])
local max_all = tonumber(ARGV[5])
local ttl = tonumber(ARGV[6])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', string.format('%.0f', now))
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', string.format('%.0f', now))
local mine = redis.call('ZCARD', KEYS[2])
local all = redis.call('ZCARD', KEYS[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or 0)
if tat < now then tat = now end
if max_mine > 0 and mine >= max_mine then return {1, tat - now, 0, mine} end
if max_all > 0 and all >= max_all then return {2, tat - now, 0, mine} end
if interval > 0 then
  local new_tat = tat + cost * interval
  if new_tat - now > tolerance then return {3, tat - now, new_tat - now - tolerance, mine} end
  local full_in_ms = string.format('%.0f', math.ceil((new_tat - now) / 1000))
  redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', full_in_ms)
  tat = new_tat
end
local expiry = string.format('%.0f', now + ttl)
local ttl_ms = string.format('%.0f', math.ceil(ttl / 1000))
redis.call('ZADD', KEYS[2], expiry, ARGV[7])
redis.call('ZADD', KEYS[3], expiry, ARGV[7])
redis.call('PEXPIRE', KEYS[2], ttl_ms)
redis.call('PEXPIRE', KEYS[3], ttl_ms)
return {0, tat - now, 0, mine + 1}
"""
_ADMITTED, _CLIENT_STREAMS, _ALL_STREAMS, _RATE = 0, 1, 2, 3

_RELEASE_LUA = """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""

# KEYS[1]: every lease; KEYS[i]: the client set of the lease ARGV[i] (i >= 2); ARGV[1]: lease TTL, µs.
# XX: only leases still there are renewed, so a renewal that crosses a release on the wire cannot bring a
# released slot back.
_REFRESH_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local ttl = tonumber(ARGV[1])
local expiry = string.format('%.0f', now + ttl)
local ttl_ms = string.format('%.0f', math.ceil(ttl / 1000))
local renewed = 0
for i = 2, #KEYS do
  renewed = renewed + redis.call('ZADD', KEYS[1], 'XX', 'CH', expiry, ARGV[i])
  redis.call('ZADD', KEYS[i], 'XX', expiry, ARGV[i])
  redis.call('PEXPIRE', KEYS[i], ttl_ms)
end
redis.call('PEXPIRE', KEYS[1], ttl_ms)
return renewed
"""


class RedisAdmission:
    """A stream slot leased in Redis; `release` removes the lease, once."""

    __slots__ = ("_client_key", "_lease", "_limiter", "headers")

    def __init__(self, limiter: RedisLimiter, lease: str, client_key: str, headers: Mapping[str, str]) -> None:
        self._limiter: RedisLimiter | None = limiter
        self._lease = lease
        self._client_key = client_key
        self.headers = headers

    async def release(self) -> None:
        limiter, self._limiter = self._limiter, None
        if limiter is not None:
            await limiter.release_lease(self._lease, self._client_key)


class RedisLimiter:
    """Admission control shared by every process that uses the same Redis.

    `redis` is a ``redis.asyncio.Redis`` (owned: `aclose` closes it). When Redis cannot be reached (an error, or
    no answer within `timeout`), the limiter *fails open* if given a `fallback` (that process's own
    `LocalLimiter`, with the same limits, applied per process until Redis answers again) and otherwise *fails
    closed* (503 with Retry-After). Either way it does not ask Redis again for `retry_interval` seconds, so an
    outage costs one timeout per interval rather than one per request.
    """

    def __init__(
        self,
        policy: LimitPolicy,
        redis: Redis,
        *,
        fallback: LocalLimiter | None = None,
        lease_ttl: float = LEASE_TTL,
        timeout: float = REDIS_TIMEOUT,
        retry_interval: float = REDIS_RETRY_INTERVAL,
        prefix: str = "{llm-relay}:",
        clock: Clock = time.monotonic,
    ) -> None:
        if lease_ttl <= 0 or timeout <= 0:
            raise ValueError("lease_ttl and timeout must be positive")
        from redis.exceptions import RedisError

        # What "Redis is unreachable" means: any Redis error, a socket error, or no answer within `timeout`.
        self._failures: tuple[type[Exception], ...] = (RedisError, OSError, TimeoutError)
        self.policy = policy
        self.fallback = fallback
        self.lease_ttl = lease_ttl
        self._redis = redis
        self._timeout = timeout
        self._retry_interval = retry_interval
        self._prefix = prefix
        self._clock = clock
        if policy.rate_limited:
            # The interval between tokens in whole microseconds, rounded up: never more permissive than `rate`.
            self._interval_us = math.ceil(_US / exact_rate(policy.rate))
            self._rate = Fraction(_US, self._interval_us)
        else:
            self._interval_us = 0
            self._rate = Fraction(0)
        self._admit = redis.register_script(_ADMIT_LUA)
        self._release = redis.register_script(_RELEASE_LUA)
        self._refresh = redis.register_script(_REFRESH_LUA)
        self._instance = secrets.token_hex(6)
        self._sequence = itertools.count()
        self._leases: dict[str, str] = {}  # this process's live leases: lease id → the client's lease set key
        self._refresher: asyncio.Task[None] | None = None
        what = "admitting by this process's own limits" if fallback else "refusing requests (503)"
        self._outage = RedisOutage(
            clock, retry_interval, log, f"{what} until it answers again", "limits are shared again"
        )
        self._closed = False

    @classmethod
    def from_url(cls, url: str, policy: LimitPolicy, **kwargs: Any) -> RedisLimiter:
        """A limiter on a new connection pool for `url` (no connection is made until the first request)."""
        redis = redis_client(url, timeout=kwargs.get("timeout", REDIS_TIMEOUT), needed_by="--redis-url")
        return cls(policy, redis, **kwargs)

    @property
    def available(self) -> bool:
        """False while Redis is considered down (after a failure, for `retry_interval`)."""
        return self._outage.available

    @property
    def leases(self) -> int:
        """Stream slots this process holds in Redis."""
        return len(self._leases)

    def key(self, *parts: str) -> str:
        return self._prefix + ":".join(parts)

    async def admit(self, client: str) -> Admission:
        if self._closed:
            raise RuntimeError("admit() after aclose(): the limiter is closed")
        if not self.available:
            return self._degraded(client)
        policy = self.policy
        lease = f"{self._instance}:{next(self._sequence)}"
        keys = [self.key("bucket", client), self.key("streams", client), self.key("streams")]
        args: list[int | str] = [
            self._interval_us,
            self._interval_us * policy.burst,
            1,
            policy.max_streams_per_client,
            policy.max_streams,
            math.ceil(self.lease_ttl * _US),
            lease,
        ]
        try:
            async with asyncio.timeout(self._timeout):
                reply = await self._admit(keys=keys, args=args)
        except self._failures as exc:
            # If the script ran but its answer was lost, its token is spent and its lease expires on its own.
            self._outage.went_down(exc)
            return self._degraded(client)
        self._outage.came_back()
        code, debt_us, retry_us, held = (int(value) for value in reply)
        remaining: int | None = None
        reset: float | None = None
        if policy.rate_limited:
            remaining, reset = service_limit(Fraction(debt_us, _US), self._rate, policy.burst)
        if code == _ADMITTED:
            self._leases[lease] = keys[1]
            self._start_refresher()
            headers = policy.header_fields(remaining=remaining, reset=reset, streams=held)
            return RedisAdmission(self, lease, keys[1], headers)
        if code == _RATE:
            raise _too_fast(policy, float_up(Fraction(retry_us, _US)), remaining, reset, held)
        raise _no_slot(policy, everyone=code == _ALL_STREAMS, remaining=remaining, reset=reset, held=held)

    async def release_lease(self, lease: str, client_key: str) -> None:
        if self._leases.pop(lease, None) is None:
            return
        if not self.available or self._closed:
            return  # the lease expires on its own
        try:
            async with asyncio.timeout(self._timeout):
                await self._release(keys=[client_key, self.key("streams")], args=[lease])
        except self._failures as exc:
            self._outage.went_down(exc)

    async def refresh_leases(self) -> int:
        """Renew the leases of this process's open streams; the number renewed."""
        renewed = 0
        leases = list(self._leases.items())
        for start in range(0, len(leases), _REFRESH_BATCH):
            batch = leases[start : start + _REFRESH_BATCH]
            keys = [self.key("streams"), *(client_key for _, client_key in batch)]
            args: list[str | int] = [math.ceil(self.lease_ttl * _US), *(lease for lease, _ in batch)]
            async with asyncio.timeout(self._timeout):
                renewed += int(await self._refresh(keys=keys, args=args))
        return renewed

    async def aclose(self) -> None:
        """Stop renewing leases and close the connections. Leases still held expire after the lease TTL."""
        if self._closed:
            return
        self._closed = True
        refresher, self._refresher = self._refresher, None
        if refresher is not None:
            refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await refresher
        await self._redis.aclose()
        if self.fallback is not None:
            await self.fallback.aclose()

    def _degraded(self, client: str) -> Admission:
        if self.fallback is not None:
            return self.fallback.admit_now(client)
        policy_field = self.policy.policy_field
        raise Overloaded(
            "admission control is unavailable; try again in a moment",
            retry_after=max(SLOT_RETRY_AFTER, self._retry_interval),
            headers={"RateLimit-Policy": policy_field} if policy_field else None,
        )

    def _start_refresher(self) -> None:
        if self._refresher is None or self._refresher.done():
            self._refresher = asyncio.get_running_loop().create_task(
                self._refresh_forever(), name="llm-relay lease refresher"
            )

    async def _refresh_forever(self) -> None:
        # One task per limiter, not one per stream: it renews every live lease in batches, every TTL / 3, so a
        # lease survives two missed renewals before its slot is given away.
        while True:
            await asyncio.sleep(self.lease_ttl / 3)
            if not self._leases or not self.available:
                continue
            try:
                await self.refresh_leases()
            except self._failures as exc:
                self._outage.went_down(exc)


def policy_from_config(config: Config) -> LimitPolicy:
    return LimitPolicy(
        rate=parse_rate(config.rate),
        burst=config.burst,
        max_streams_per_client=config.max_streams_per_client,
        max_streams=config.max_streams,
    )


def build_limiter(config: Config) -> Limiter:
    """The limiter `config` describes: in process, or shared through ``--redis-url``."""
    policy = policy_from_config(config)
    local = LocalLimiter(policy, max_tracked_clients=config.max_tracked_clients)
    if not config.redis_url:
        return local
    return RedisLimiter.from_url(config.redis_url, policy, fallback=local if config.redis_fail_open else None)


__all__ = [
    "LEASE_TTL",
    "LocalAdmission",
    "LocalLimiter",
    "RedisAdmission",
    "RedisLimiter",
    "build_limiter",
    "policy_from_config",
]
