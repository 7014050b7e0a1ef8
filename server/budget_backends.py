"""Token budgets kept in process (`LocalBudgets`) or shared through Redis (`RedisBudgets`); the arithmetic is
`server/budget.py`'s.

    intake ── reserve(client, chat) ──▶ LocalBudgets   BucketTable of TATs + quota counters, in one process
         (after the body is read:  └──▶ RedisBudgets   two Lua scripts (reserve, settle) on Redis time
          the estimate needs it)          └─ Redis unreachable: fail open → LocalBudgets; fail closed → 503
    generation ends ── BudgetReservation.settle(usage, relayed_chars) ── the same backend gives back or takes more

A reservation is refused, in this order, with

    400 invalid_request           the reservation is larger than the budget itself (it could never fit)
    429 token_quota_exhausted     the day's quota cannot hold it: Retry-After is the quota's reset (UTC midnight)
    429 token_budget_exhausted    the minute's bucket cannot hold it: Retry-After is when it can

Redis keys (the limiter's hash tag, so that a Redis Cluster keeps them with the request limits):

    {llm-relay}:tokens:<client>    string: the token bucket's TAT, µs of Redis time; expires when the bucket is full
    {llm-relay}:quota:<client>     hash: p (the UTC day, days since the epoch), u (tokens used that day)

`BudgetStats` counts reservations and their outcomes for the operator (``/healthz``'s ``token_budget``, and any
metrics exporter that reads it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from fractions import Fraction
from typing import TYPE_CHECKING, Any, Protocol

from .budget import (
    Estimate,
    Hold,
    TokenBudgetPolicy,
    charge,
    estimate,
    interval,
    level,
    quota_period,
    reserve,
    settle_tat,
)
from .chat_request import ChatRequest
from .config import Config
from .errors import Overloaded, RequestError, TokenBudgetExhausted, TokenQuotaExhausted
from .events import Usage
from .limits import BucketTable, float_up, service_limit
from .redis_client import RedisOutage, redis_client

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger("llm_relay.budget")

Clock = Callable[[], float]
PolicyFor = Callable[[str], TokenBudgetPolicy]
_US = 1_000_000
REDIS_TIMEOUT = 0.5
REDIS_RETRY_INTERVAL = 1.0


@dataclass(slots=True)
class BudgetStats:
    """Counters since start, in tokens unless named otherwise. `refunded` is what reservations held beyond what
    their streams were charged; `overrun` what streams were charged beyond their reservations."""

    reservations: int = 0
    settled: int = 0  # reservations whose stream has ended and been charged
    reserved: int = 0
    charged: int = 0
    refunded: int = 0
    overrun: int = 0
    budget_exhausted: int = 0  # requests refused by the minute's bucket
    quota_exhausted: int = 0  # requests refused by the day's quota

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class BudgetReservation:
    """A stream's reservation: its header fields for the response, and `settle`, which the generation calls once
    at its end, whatever ended it."""

    __slots__ = ("_settle", "_stats", "estimate", "headers")

    def __init__(
        self,
        estimated: Estimate,
        headers: Mapping[str, str],
        settle: Callable[[int], Awaitable[None]],
        stats: BudgetStats,
    ) -> None:
        self.estimate = estimated
        self.headers = headers
        self._settle: Callable[[int], Awaitable[None]] | None = settle
        self._stats = stats

    async def settle(self, usage: Usage | None, relayed_chars: int) -> None:
        settle, self._settle = self._settle, None
        if settle is None:
            return
        charged = charge(self.estimate, usage, relayed_chars)
        stats, reserved = self._stats, self.estimate.tokens
        stats.settled += 1
        stats.charged += charged
        if charged <= reserved:
            stats.refunded += reserved - charged
        else:
            stats.overrun += charged - reserved
        await settle(charged)


class TokenBudgets(Protocol):
    stats: BudgetStats

    async def reserve(self, client: str, chat: ChatRequest) -> BudgetReservation | None:
        """The client's reservation for `chat`, None when the client has no token budget; raises `RequestError`,
        `TokenQuotaExhausted`, `TokenBudgetExhausted` or (Redis down, fail closed) `Overloaded`."""
        ...

    async def aclose(self) -> None: ...


def _estimate_for(policy: TokenBudgetPolicy, chat: ChatRequest) -> Estimate:
    estimated = estimate(chat, policy.ceiling)
    limits = [limit for limit in (policy.tokens_per_minute, policy.tokens_per_day) if limit]
    if estimated.tokens > min(limits):
        raise RequestError(
            f"this request may use up to {estimated.tokens} tokens ({estimated.prompt_tokens} estimated for the "
            f"prompt, {estimated.reply_tokens} for the reply), more than your whole budget of {min(limits)}: "
            "send a lower max_tokens or a shorter prompt"
        )
    return estimated


def _reset_text(resets_at: int) -> str:
    return datetime.fromtimestamp(resets_at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _quota_refusal(
    policy: TokenBudgetPolicy, used: int, needed: int, resets_at: int, wait: float, headers: Mapping[str, str]
) -> TokenQuotaExhausted:
    return TokenQuotaExhausted(
        f"the daily token quota of {policy.tokens_per_day} is spent ({used} used, this request may need {needed}); "
        f"it resets at {_reset_text(resets_at)} (in {math.ceil(wait)} s)",
        retry_after=wait,
        headers=headers,
    )


def _budget_refusal(policy: TokenBudgetPolicy, wait: float, headers: Mapping[str, str]) -> TokenBudgetExhausted:
    return TokenBudgetExhausted(
        f"the token budget of {policy.tokens_per_minute} tokens per minute is spent; this request needs more "
        f"than is left, try again in {math.ceil(wait)} s",
        retry_after=wait,
        headers=headers,
    )


# -- in process ---------------------------------------------------------------------------------------------------


class LocalBudgets:
    """Token budgets of one process. `reserve_now` has no ``await`` between its checks and its taking, so
    reservations are atomic on the event loop. Memory: at most `max_tracked_clients` buckets (`BucketTable`: full
    ones are forgotten first) and as many quota counters (the oldest dropped first)."""

    def __init__(
        self,
        policy_for: PolicyFor,
        *,
        max_tracked_clients: int = 100_000,
        clock: Clock = time.monotonic,
        wall_clock: Clock = time.time,
        stats: BudgetStats | None = None,
    ) -> None:
        self.policy_for = policy_for
        self.stats = stats or BudgetStats()
        self._clock = clock
        self._wall_clock = wall_clock
        self._max = max(1, max_tracked_clients)
        self._tats = BucketTable(self._max)
        self._quotas: OrderedDict[str, tuple[int, int]] = OrderedDict()  # client → (day, tokens used that day)

    async def reserve(self, client: str, chat: ChatRequest) -> BudgetReservation | None:
        policy = self.policy_for(client)
        if not policy.enabled:
            return None
        return self.reserve_now(client, policy, _estimate_for(policy, chat))

    def reserve_now(self, client: str, policy: TokenBudgetPolicy, estimated: Estimate) -> BudgetReservation:
        now, wall = self._clock(), self._wall_clock()
        tokens = estimated.tokens
        day, resets_at = quota_period(wall)
        used = self._used(client, day)
        tat = self._tats.get(client)
        remaining, reset = level(policy.tokens_per_minute, tat, now) if policy.tokens_per_minute else (None, None)
        quota_wait = resets_at - wall
        if policy.tokens_per_day and used + tokens > policy.tokens_per_day:
            self.stats.quota_exhausted += 1
            headers = policy.header_fields(
                remaining=remaining, reset=None, quota_left=policy.tokens_per_day - used, quota_reset=quota_wait
            )
            raise _quota_refusal(policy, used, tokens, resets_at, quota_wait, headers)
        hold: Hold | None = None
        if policy.tokens_per_minute:
            taken = reserve(policy.tokens_per_minute, tat, now, tokens)
            if not taken.allowed:
                self.stats.budget_exhausted += 1
                headers = policy.header_fields(
                    remaining=taken.remaining,
                    reset=taken.retry_after,
                    quota_left=policy.tokens_per_day - used,
                    quota_reset=quota_wait,
                )
                raise _budget_refusal(policy, taken.retry_after, headers)
            assert taken.tat is not None  # tokens were taken
            assert taken.hold is not None
            self._tats.store(client, taken.tat, now)
            hold, remaining, reset = taken.hold, taken.remaining, taken.reset
        if policy.tokens_per_day:
            self._store_used(client, day, used + tokens)
        self.stats.reservations += 1
        self.stats.reserved += tokens
        headers = policy.header_fields(
            remaining=remaining, reset=reset, quota_left=policy.tokens_per_day - used - tokens, quota_reset=quota_wait
        )

        async def settle(charged: int) -> None:
            self.settle_now(client, policy, hold, day, tokens, charged)

        return BudgetReservation(estimated, headers, settle, self.stats)

    def settle_now(
        self, client: str, policy: TokenBudgetPolicy, hold: Hold | None, day: int, reserved: int, charged: int
    ) -> None:
        """Replace a reservation (`hold` in the bucket, `reserved` in the quota of `day`) with `charged`."""
        if hold is not None:
            now = self._clock()
            tat = settle_tat(policy.tokens_per_minute, self._tats.get(client), now, hold, charged)
            if tat is None:
                self._tats.forget(client)
            else:
                self._tats.store(client, tat, now)
        if policy.tokens_per_day:
            # A reservation of yesterday settles into yesterday's count, which is gone: today owes nothing for it.
            stored = self._quotas.get(client)
            if stored is not None and stored[0] == day:
                self._store_used(client, day, max(0, stored[1] + charged - reserved))

    def _used(self, client: str, day: int) -> int:
        stored = self._quotas.get(client)
        return stored[1] if stored is not None and stored[0] == day else 0

    def _store_used(self, client: str, day: int, used: int) -> None:
        quotas = self._quotas
        if client in quotas:
            quotas.move_to_end(client)
        elif len(quotas) >= self._max:
            quotas.popitem(last=False)
        quotas[client] = (day, used)

    async def aclose(self) -> None:
        return None


# -- Redis --------------------------------------------------------------------------------------------------------

# Reserve: the quota, then the minute's bucket, checked and taken in one script (Redis runs it atomically, so every
# instance sharing the Redis shares one budget exactly). Times are integer µs of the Redis server's clock, written
# back with %.0f (Lua 5.1 prints numbers with %.14g, which would round a µs timestamp). ARGV: interval (µs per
# token, 0 = no bucket), bucket size, tokens, quota (0 = none), quota period (s).
# Reply: {code, start, end, now, day, used}; code 0 admitted, 1 quota spent, 2 bucket empty (start is then the
# bucket's TAT, and end, for 2, the earliest time the reservation fits).
_RESERVE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local step = tonumber(ARGV[1])
local size = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local quota = tonumber(ARGV[4])
local period = tonumber(ARGV[5])
local day = math.floor(tonumber(t[1]) / period)
local used = 0
local tat = tonumber(redis.call('GET', KEYS[1]) or 0)
if tat < now then tat = now end
if quota > 0 then
  local stored = redis.call('HMGET', KEYS[2], 'p', 'u')
  if tonumber(stored[1]) == day then used = tonumber(stored[2]) or 0 end
  if used + cost > quota then return {1, tat, tat, now, day, used} end
end
local new_tat = tat
if step > 0 then
  new_tat = tat + cost * step
  if new_tat - now > size * step then return {2, tat, new_tat - size * step, now, day, used} end
  local full_in_ms = string.format('%.0f', math.ceil((new_tat - now) / 1000))
  redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', full_in_ms)
end
if quota > 0 then
  used = used + cost
  redis.call('HSET', KEYS[2], 'p', day, 'u', string.format('%.0f', used))
  redis.call('EXPIREAT', KEYS[2], (day + 2) * period)
end
return {0, tat, new_tat, now, day, used}
"""
_RESERVED, _QUOTA_SPENT, _BUCKET_EMPTY = 0, 1, 2

# Settle: ARGV: interval, start, end (the hold, µs), reserved, charged, quota (0 = none), day. The same rule as
# `budget.settle_tat`: a refund gives back only the part of the hold still in the future; an excess is taken now.
_SETTLE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local step = tonumber(ARGV[1])
local start = tonumber(ARGV[2])
local hold_end = tonumber(ARGV[3])
local reserved = tonumber(ARGV[4])
local charged = tonumber(ARGV[5])
local quota = tonumber(ARGV[6])
local day = tonumber(ARGV[7])
if step > 0 then
  local tat = tonumber(redis.call('GET', KEYS[1]) or 0)
  if tat < now then tat = now end
  local settled = tat
  if charged <= reserved then
    local kept = start + charged * step
    if kept < now then kept = now end
    local refund = hold_end - kept
    if refund > 0 then
      settled = tat - refund
      if settled < now then settled = now end
    end
  else
    settled = tat + (charged - reserved) * step
  end
  if settled > now then
    local full_in_ms = string.format('%.0f', math.ceil((settled - now) / 1000))
    redis.call('SET', KEYS[1], string.format('%.0f', settled), 'PX', full_in_ms)
  else
    redis.call('DEL', KEYS[1])
  end
end
if quota > 0 then
  local stored = redis.call('HMGET', KEYS[2], 'p', 'u')
  if tonumber(stored[1]) == day then
    local used = (tonumber(stored[2]) or 0) + charged - reserved
    if used < 0 then used = 0 end
    redis.call('HSET', KEYS[2], 'u', string.format('%.0f', used))
  end
end
return 1
"""


class RedisBudgets:
    """Token budgets shared by every process that uses the same Redis (see the module docstring).

    Unreachable Redis (an error, or no answer within `timeout`): with a `fallback` (this process's `LocalBudgets`)
    reservations are made there until Redis answers again (fail open); without one they are refused with 503
    (fail closed). Redis is then not asked again for `retry_interval`. A settlement that cannot reach Redis is
    dropped: the reservation stays charged, which errs on the client's side of the budget, never the payer's.
    """

    def __init__(
        self,
        policy_for: PolicyFor,
        redis: Redis,
        *,
        fallback: LocalBudgets | None = None,
        timeout: float = REDIS_TIMEOUT,
        retry_interval: float = REDIS_RETRY_INTERVAL,
        prefix: str = "{llm-relay}:",
        clock: Clock = time.monotonic,
    ) -> None:
        from redis.exceptions import RedisError

        self._failures: tuple[type[Exception], ...] = (RedisError, OSError, TimeoutError)
        self.policy_for = policy_for
        self.fallback = fallback
        self.stats = fallback.stats if fallback is not None else BudgetStats()
        self._redis = redis
        self._timeout = timeout
        self._retry_interval = retry_interval
        self._prefix = prefix
        self._clock = clock
        self._reserve = redis.register_script(_RESERVE_LUA)
        self._settle = redis.register_script(_SETTLE_LUA)
        what = "this process's own budgets apply" if fallback else "requests are refused (503)"
        self._outage = RedisOutage(
            clock, retry_interval, log, f"for token budgets: {what}", "token budgets are shared again"
        )
        self._closed = False

    @classmethod
    def from_url(cls, url: str, policy_for: PolicyFor, **kwargs: Any) -> RedisBudgets:
        """Budgets on a new connection pool for `url` (no connection is made until the first request)."""
        redis = redis_client(url, timeout=kwargs.get("timeout", REDIS_TIMEOUT), needed_by="--redis-url")
        return cls(policy_for, redis, **kwargs)

    @property
    def available(self) -> bool:
        return self._outage.available

    def key(self, *parts: str) -> str:
        return self._prefix + ":".join(parts)

    @staticmethod
    def interval_us(policy: TokenBudgetPolicy) -> int:
        """µs per token, rounded up: never more permissive than the configured budget."""
        return math.ceil(interval(policy.tokens_per_minute) * _US) if policy.tokens_per_minute else 0

    async def reserve(self, client: str, chat: ChatRequest) -> BudgetReservation | None:
        if self._closed:
            raise RuntimeError("reserve() after aclose(): the budgets are closed")
        policy = self.policy_for(client)
        if not policy.enabled:
            return None
        estimated = _estimate_for(policy, chat)
        if not self.available:
            return self._degraded(client, policy, estimated)
        step, tokens = self.interval_us(policy), estimated.tokens
        keys = [self.key("tokens", client), self.key("quota", client)]
        args = [step, policy.tokens_per_minute, tokens, policy.tokens_per_day, 86_400]
        try:
            async with asyncio.timeout(self._timeout):
                reply = await self._reserve(keys=keys, args=args)
        except self._failures as exc:
            self._outage.went_down(exc)
            return self._degraded(client, policy, estimated)
        self._outage.came_back()
        code, start, end, now, day, used = (int(value) for value in reply)
        resets_at = (day + 1) * 86_400
        quota_wait = float_up(Fraction(resets_at * _US - now, _US))
        stats = self.stats
        if code == _QUOTA_SPENT:
            stats.quota_exhausted += 1
            remaining, _ = self._level(policy, start, now)
            headers = policy.header_fields(
                remaining=remaining, reset=None, quota_left=policy.tokens_per_day - used, quota_reset=quota_wait
            )
            raise _quota_refusal(policy, used, tokens, resets_at, quota_wait, headers)
        if code == _BUCKET_EMPTY:
            stats.budget_exhausted += 1
            wait = float_up(Fraction(end - now, _US))
            remaining, _ = self._level(policy, start, now)
            headers = policy.header_fields(
                remaining=remaining, reset=wait, quota_left=policy.tokens_per_day - used, quota_reset=quota_wait
            )
            raise _budget_refusal(policy, wait, headers)
        stats.reservations += 1
        stats.reserved += tokens
        remaining, reset = self._level(policy, end, now)
        headers = policy.header_fields(
            remaining=remaining, reset=reset, quota_left=policy.tokens_per_day - used, quota_reset=quota_wait
        )

        async def settle(charged: int) -> None:
            await self._settle_in_redis(keys, [step, start, end, tokens, charged, policy.tokens_per_day, day])

        return BudgetReservation(estimated, headers, settle, stats)

    def _level(self, policy: TokenBudgetPolicy, tat_us: int | None, now_us: int) -> tuple[int | None, float | None]:
        """(remaining, reset) of a bucket whose TAT is `tat_us` at `now_us`, at the µs interval Redis uses."""
        if not policy.tokens_per_minute:
            return None, None
        debt = Fraction(max(0, (tat_us or now_us) - now_us), _US)
        return service_limit(debt, Fraction(_US, self.interval_us(policy)), policy.tokens_per_minute)

    async def _settle_in_redis(self, keys: list[str], args: list[int]) -> None:
        if self._closed or not self.available:
            return  # the reservation stays charged (see the class docstring)
        try:
            async with asyncio.timeout(self._timeout):
                await self._settle(keys=keys, args=args)
        except self._failures as exc:
            self._outage.went_down(exc)

    def _degraded(self, client: str, policy: TokenBudgetPolicy, estimated: Estimate) -> BudgetReservation:
        if self.fallback is not None:
            return self.fallback.reserve_now(client, policy, estimated)
        raise Overloaded(
            "token budgets are unavailable; try again in a moment", retry_after=max(1.0, self._retry_interval)
        )

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(*self._failures):
            await self._redis.aclose()


# -- from the configuration ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KeyBudget:
    """Per-key values from the API keys file (``tokens_per_minute=N``, ``tokens_per_day=N``); None: the default."""

    tokens_per_minute: int | None = None
    tokens_per_day: int | None = None


def default_policy(config: Config) -> TokenBudgetPolicy:
    return TokenBudgetPolicy(config.tokens_per_minute, config.tokens_per_day, config.token_ceiling)


def policies(config: Config, per_client: Mapping[str, KeyBudget]) -> PolicyFor:
    """``client -> TokenBudgetPolicy``: the configured default, with a key's own values from the keys file."""
    default = default_policy(config)
    own: dict[str, TokenBudgetPolicy] = {}
    for client, values in per_client.items():
        changes: dict[str, int] = {}
        if values.tokens_per_minute is not None:
            changes["tokens_per_minute"] = values.tokens_per_minute
        if values.tokens_per_day is not None:
            changes["tokens_per_day"] = values.tokens_per_day
        own[client] = replace(default, **changes)

    def policy_for(client: str) -> TokenBudgetPolicy:
        return own.get(client, default)

    return policy_for


def build_budgets(config: Config, per_client: Mapping[str, KeyBudget]) -> TokenBudgets | None:
    """The budgets `config` describes (in process, or shared through ``--redis-url``); None when no client has one."""
    policy_for = policies(config, per_client)
    if not default_policy(config).enabled and not any(policy_for(client).enabled for client in per_client):
        return None
    local = LocalBudgets(policy_for, max_tracked_clients=config.max_tracked_clients)
    if not config.redis_url:
        return local
    return RedisBudgets.from_url(config.redis_url, policy_for, fallback=local if config.redis_fail_open else None)


__all__ = [
    "BudgetReservation",
    "BudgetStats",
    "KeyBudget",
    "LocalBudgets",
    "RedisBudgets",
    "TokenBudgets",
    "build_budgets",
    "default_policy",
    "policies",
]
