"""Token budgets shared through a real Redis: exact under concurrency, the same refund rule as the pure arithmetic,
the daily quota kept in Redis, and Redis going away (fail open, fail closed)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from redis.asyncio import Redis

from server.budget import TokenBudgetPolicy
from server.budget_backends import BudgetReservation, LocalBudgets, RedisBudgets, build_budgets
from server.chat_request import ChatRequest, Message
from server.config import Config
from server.errors import Overloaded, RateLimited, TokenBudgetExhausted, TokenQuotaExhausted
from server.events import Usage

from .redis_server import RedisServer

MakeBudgets = Callable[..., RedisBudgets]
CHAT = ChatRequest((Message("user", "x"),), "m", max_tokens=92)  # 8 + 92 = 100 tokens reserved
pytestmark = pytest.mark.redis


@pytest.fixture
async def make_budgets(redis_server: RedisServer) -> AsyncIterator[MakeBudgets]:
    made: list[RedisBudgets] = []

    def make(policy: TokenBudgetPolicy, **kwargs: Any) -> RedisBudgets:
        # A generous timeout unless a test is about timeouts: on a loaded machine 0.5 s is sometimes not enough.
        kwargs.setdefault("timeout", 5.0)
        budgets = RedisBudgets.from_url(redis_server.url, lambda client: policy, **kwargs)
        made.append(budgets)
        return budgets

    yield make
    for budgets in made:
        await budgets.aclose()


async def _outcome(budgets: RedisBudgets, client: str) -> BudgetReservation | RateLimited:
    try:
        reservation = await budgets.reserve(client, CHAT)
    except RateLimited as refused:
        return refused
    assert reservation is not None
    return reservation


async def test_many_instances_fired_at_once_admit_exactly_the_budget(make_budgets: MakeBudgets) -> None:
    policy = TokenBudgetPolicy(tokens_per_minute=1000)  # ten reservations of 100; one more refills in 6 s
    instances = [make_budgets(policy) for _ in range(4)]
    outcomes = await asyncio.gather(*(_outcome(instances[i % 4], "key:a") for i in range(40)))
    admitted = [o for o in outcomes if isinstance(o, BudgetReservation)]
    assert len(admitted) == 10
    assert all(isinstance(o, TokenBudgetExhausted) for o in outcomes if o not in admitted)
    assert sum(budgets.stats.reserved for budgets in instances) == 1000


async def test_a_refund_reaches_every_instance(make_budgets: MakeBudgets, redis: Redis) -> None:
    policy = TokenBudgetPolicy(tokens_per_minute=150)
    first, second = make_budgets(policy), make_budgets(policy)
    held = await first.reserve("key:a", CHAT)
    assert held is not None
    assert held.headers == {"RateLimit-Policy": '"tokens";q=150;w=60;qu="tokens"', "RateLimit": '"tokens";r=50;t=1'}
    with pytest.raises(TokenBudgetExhausted) as refused:
        await second.reserve("key:a", CHAT)
    assert refused.value.retry_after is not None
    assert 19 < refused.value.retry_after <= 20  # 50 short at 2.5 tokens per second
    assert refused.value.headers["RateLimit"].startswith('"tokens";r=50;t=')
    await held.settle(None, relayed_chars=8)  # cut short: charged its prompt (8) and 2 tokens of output
    assert int(await redis.pttl("{llm-relay}:tokens:key:a")) <= 4000  # 10 tokens: 4 s from full
    assert await second.reserve("key:a", CHAT) is not None


async def test_an_overrun_is_charged_in_redis(make_budgets: MakeBudgets) -> None:
    budgets = make_budgets(TokenBudgetPolicy(tokens_per_minute=600))
    held = await budgets.reserve("key:a", CHAT)
    assert held is not None
    await held.settle(Usage(100, 500, 600), relayed_chars=0)  # 500 beyond the reservation: the bucket is empty
    with pytest.raises(TokenBudgetExhausted):
        await budgets.reserve("key:a", CHAT)
    assert budgets.stats.overrun == 500


async def test_the_daily_quota_is_kept_in_redis(make_budgets: MakeBudgets, redis: Redis) -> None:
    policy = TokenBudgetPolicy(tokens_per_day=250)
    first, second = make_budgets(policy), make_budgets(policy)
    held = [await first.reserve("key:a", CHAT), await second.reserve("key:a", CHAT)]
    with pytest.raises(TokenQuotaExhausted) as refused:
        await first.reserve("key:a", CHAT)
    assert "daily token quota of 250 is spent (200 used, this request may need 100)" in refused.value.message
    assert refused.value.headers["RateLimit"].startswith('"daily-tokens";r=50;t=')
    assert await redis.hget("{llm-relay}:quota:key:a", "u") == "200"
    assert 86_400 < await redis.ttl("{llm-relay}:quota:key:a") <= 2 * 86_400  # kept a day past its end
    assert held[0] is not None
    await held[0].settle(Usage(5, 5, 10), relayed_chars=0)
    assert await redis.hget("{llm-relay}:quota:key:a", "u") == "110"
    assert await second.reserve("key:a", CHAT) is not None


async def test_fail_open_reserves_in_this_process(make_budgets: MakeBudgets, redis_server: RedisServer) -> None:
    policy = TokenBudgetPolicy(tokens_per_minute=150)
    local = LocalBudgets(lambda client: policy)
    budgets = make_budgets(policy, fallback=local, timeout=0.2)
    redis_server.stop()
    held = await budgets.reserve("key:a", CHAT)
    assert held is not None
    assert not budgets.available
    with pytest.raises(TokenBudgetExhausted):
        await budgets.reserve("key:a", CHAT)  # this process's own bucket
    await held.settle(None, relayed_chars=0)
    assert await budgets.reserve("key:a", CHAT) is not None  # settled in this process's bucket too
    assert budgets.stats is local.stats


async def test_fail_closed_refuses_with_503(make_budgets: MakeBudgets, redis_server: RedisServer) -> None:
    budgets = make_budgets(TokenBudgetPolicy(tokens_per_minute=150), timeout=0.2)
    held = await budgets.reserve("key:a", CHAT)
    assert held is not None
    redis_server.stop()
    await held.settle(None, relayed_chars=0)  # Redis is gone: dropped, not raised
    with pytest.raises(Overloaded) as refused:
        await budgets.reserve("key:a", CHAT)
    assert refused.value.status == 503
    assert refused.value.retry_after == 1.0


async def test_build_budgets_follows_the_config(redis_server: RedisServer) -> None:
    assert build_budgets(Config(), {}) is None
    local = build_budgets(Config(tokens_per_minute=100), {})
    assert isinstance(local, LocalBudgets)
    shared = build_budgets(Config(tokens_per_day=100, redis_url=redis_server.url), {})
    assert isinstance(shared, RedisBudgets)
    assert isinstance(shared.fallback, LocalBudgets)
    closed = build_budgets(Config(tokens_per_day=100, redis_url=redis_server.url, redis_fail_open=False), {})
    assert isinstance(closed, RedisBudgets)
    assert closed.fallback is None
    for budgets in (local, shared, closed):
        await budgets.aclose()
    with pytest.raises(RuntimeError, match="after aclose"):
        await shared.reserve("key:a", CHAT)
