"""Limits shared through a real Redis: one budget for many instances, leased slots, and Redis going away."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from server.admission import Admission
from server.app import create_app, create_relay_app
from server.chat_request import ChatRequest
from server.config import Config, ConfigError
from server.errors import Overloaded, RateLimited
from server.events import Delta, Done, Event
from server.limiter import LocalAdmission, LocalLimiter, RedisLimiter, build_limiter
from server.limits import LimitPolicy
from server.state import RELAY

from .redis_server import RedisServer

AiohttpClient = Callable[..., Awaitable[TestClient[Any, Any]]]
MakeLimiter = Callable[..., RedisLimiter]

SLOW = LimitPolicy(rate=1 / 60, burst=10, max_streams_per_client=0, max_streams=0)


@pytest.fixture
async def make_limiter(redis_server: RedisServer) -> AsyncIterator[MakeLimiter]:
    made: list[RedisLimiter] = []

    def make(policy: LimitPolicy = SLOW, **kwargs: Any) -> RedisLimiter:
        limiter = RedisLimiter.from_url(redis_server.url, policy, **kwargs)
        made.append(limiter)
        return limiter

    yield make
    for limiter in made:
        await limiter.aclose()


async def _outcome(limiter: RedisLimiter, client: str) -> Admission | RateLimited | Overloaded:
    try:
        return await limiter.admit(client)
    except (RateLimited, Overloaded) as refused:
        return refused


# -- one budget ---------------------------------------------------------------------------------------------------


@pytest.mark.redis
async def test_two_limiters_fired_at_once_admit_exactly_burst(make_limiter: MakeLimiter) -> None:
    first, second = make_limiter(), make_limiter()
    outcomes = await asyncio.gather(*(_outcome((first, second)[i % 2], "ip:198.51.100.1") for i in range(40)))
    admitted = [o for o in outcomes if not isinstance(o, Exception)]
    refused = [o for o in outcomes if isinstance(o, RateLimited)]
    assert len(admitted) == SLOW.burst
    assert len(refused) == 40 - SLOW.burst
    assert all(59 < (r.retry_after or 0) <= 60 for r in refused)
    for admission in admitted:
        await admission.release()


@pytest.mark.redis
async def test_two_app_instances_share_one_budget(aiohttp_client: AiohttpClient, redis_server: RedisServer) -> None:
    config = Config(provider="demo", demo_delay=0.0, heartbeat=0.0, rate="1/m", burst=5, redis_url=redis_server.url)
    clients = [await aiohttp_client(create_app(config)), await aiohttp_client(create_app(config))]
    assert all(isinstance(c.app[RELAY].limiter, RedisLimiter) for c in clients if c.app is not None)

    async def ask(client: TestClient[Any, Any]) -> tuple[int, dict[str, str]]:
        async with client.get("/api/chat", params={"prompt": "hi"}) as resp:
            await resp.read()
            return resp.status, dict(resp.headers)

    results = await asyncio.gather(*(ask(clients[i % 2]) for i in range(20)))
    statuses = sorted(status for status, _ in results)
    assert statuses == [200] * 5 + [429] * 15
    for status, headers in results:
        assert headers["RateLimit-Policy"] == '"rate";q=5;w=300, "streams";q=8;qu="concurrent-requests"'
        if status == 429:
            assert headers["Retry-After"] in {"59", "60"}
            assert headers["RateLimit"].startswith('"rate";r=0;t=')
            assert headers["RateLimit"].split(";t=")[1].split(",")[0] == headers["Retry-After"]
    remaining = sorted(h["RateLimit"].split(";")[1] for s, h in results if s == 200)
    assert remaining == ["r=0", "r=1", "r=2", "r=3", "r=4"]


@pytest.mark.redis
async def test_remaining_and_reset_come_from_redis_time(make_limiter: MakeLimiter) -> None:
    limiter = make_limiter(LimitPolicy(rate=1.0, burst=3))
    first = await limiter.admit("ip:a")
    assert first.headers["RateLimit"] == '"rate";r=2;t=1'
    await limiter.admit("ip:a")
    await limiter.admit("ip:a")
    with pytest.raises(RateLimited) as refused:
        await limiter.admit("ip:a")
    assert 0 < (refused.value.retry_after or 0) <= 1
    assert refused.value.headers["RateLimit"] == '"rate";r=0;t=1'


@pytest.mark.redis
async def test_stream_caps_are_shared(make_limiter: MakeLimiter) -> None:
    policy = LimitPolicy(rate=100.0, burst=100, max_streams_per_client=2, max_streams=3)
    first, second = make_limiter(policy), make_limiter(policy)
    held = [await first.admit("ip:a"), await second.admit("ip:a")]
    assert held[1].headers["RateLimit"].endswith('"streams";r=0')
    with pytest.raises(RateLimited) as refused:
        await first.admit("ip:a")
    assert refused.value.retry_after == 1.0
    assert refused.value.headers["RateLimit"].endswith('"streams";r=0')
    held.append(await first.admit("ip:b"))
    with pytest.raises(Overloaded) as busy:
        await second.admit("ip:c")
    assert busy.value.status == 503
    await held[1].release()
    await held[1].release()  # twice is harmless
    held.append(await first.admit("ip:a"))
    for admission in held:
        await admission.release()
    assert (first.leases, second.leases) == (0, 0)


@pytest.mark.redis
async def test_idle_buckets_expire_in_redis(make_limiter: MakeLimiter, redis: Redis) -> None:
    limiter = make_limiter(LimitPolicy(rate=2.0, burst=4))
    for i in range(200):
        await (await limiter.admit(f"ip:192.0.2.{i}")).release()
    buckets = [key async for key in redis.scan_iter(match="{llm-relay}:bucket:*")]
    assert len(buckets) == 200
    ttls = [await redis.pttl(key) for key in buckets]
    # One token at 2/s: full again within 500 ms, then gone (-2: already gone on a slow machine; never -1, no TTL).
    assert all(ttl == -2 or 0 < ttl <= 500 for ttl in ttls)
    async with asyncio.timeout(5):
        while [key async for key in redis.scan_iter(match="{llm-relay}:*")]:
            await asyncio.sleep(0.05)


# -- leases --------------------------------------------------------------------------------------------------------


@pytest.mark.redis
async def test_leases_are_renewed_while_streams_run(make_limiter: MakeLimiter) -> None:
    policy = LimitPolicy(rate=100.0, burst=100, max_streams_per_client=1)
    first, second = make_limiter(policy, lease_ttl=0.3), make_limiter(policy, lease_ttl=0.3)
    held = await first.admit("ip:a")
    for _ in range(5):  # 1.5 s: five lease lifetimes, held by renewals
        await asyncio.sleep(0.3)
        with pytest.raises(RateLimited):
            await second.admit("ip:a")
    refreshers = [t for t in asyncio.all_tasks() if t.get_name() == "llm-relay lease refresher"]
    assert len(refreshers) == 1  # one task per limiter, not per stream
    await held.release()
    await (await second.admit("ip:a")).release()


@pytest.mark.redis
async def test_a_crashed_instance_gives_its_slots_back(make_limiter: MakeLimiter) -> None:
    policy = LimitPolicy(rate=100.0, burst=100, max_streams_per_client=1)
    crashed, survivor = make_limiter(policy, lease_ttl=0.3), make_limiter(policy, lease_ttl=0.3)
    await crashed.admit("ip:a")
    await crashed.aclose()  # no release, no more renewals: as if the process died mid-stream
    with pytest.raises(RateLimited):
        await survivor.admit("ip:a")
    async with asyncio.timeout(3):
        while True:
            with contextlib.suppress(RateLimited):
                admission = await survivor.admit("ip:a")
                break
            await asyncio.sleep(0.05)
    await admission.release()


@pytest.mark.redis
async def test_a_failed_renewal_is_noticed(make_limiter: MakeLimiter, redis_server: RedisServer) -> None:
    limiter = make_limiter(LimitPolicy(rate=0.0, burst=0, max_streams_per_client=2), lease_ttl=0.15)
    held = await limiter.admit("ip:a")
    assert held.headers["RateLimit"] == '"streams";r=1'  # no bucket: the stream cap alone
    assert limiter.available
    redis_server.stop()
    async with asyncio.timeout(3):
        while limiter.available:
            await asyncio.sleep(0.02)
    await held.release()  # Redis known to be down: not asked, the lease expires on its own


def test_lease_ttl_and_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError, match="must be positive"):
        RedisLimiter.from_url("redis://127.0.0.1:1/0", SLOW, lease_ttl=0)


@pytest.mark.redis
async def test_renewals_go_in_batches(make_limiter: MakeLimiter) -> None:
    limiter = make_limiter(LimitPolicy(rate=1000.0, burst=1000))
    held = [await limiter.admit(f"ip:c{i % 7}") for i in range(300)]
    assert await limiter.refresh_leases() == 300
    for admission in held:
        await admission.release()
    assert await limiter.refresh_leases() == 0


# -- Redis going away ------------------------------------------------------------------------------------------------


@pytest.mark.redis
async def test_fail_open_falls_back_to_this_process_limits(
    make_limiter: MakeLimiter, redis_server: RedisServer
) -> None:
    policy = LimitPolicy(rate=1 / 60, burst=3, max_streams_per_client=0)
    limiter = make_limiter(policy, fallback=LocalLimiter(policy), retry_interval=0.2)
    shared = await limiter.admit("ip:a")
    assert limiter.available
    redis_server.stop()
    # Redis is gone mid-test: this process's own limits take over, still limits, not none.
    local = [await limiter.admit("ip:a") for _ in range(3)]
    assert all(isinstance(a, LocalAdmission) for a in local)
    assert not limiter.available
    with pytest.raises(RateLimited):
        await limiter.admit("ip:a")
    await shared.release()  # Redis is down: the lease will expire; releasing must not fail
    for admission in local:
        await admission.release()
    redis_server.start()
    await asyncio.sleep(0.25)
    back = await limiter.admit("ip:a")  # the restarted Redis is empty: a fresh shared budget
    assert not isinstance(back, LocalAdmission)
    assert limiter.available
    await back.release()


@pytest.mark.redis
async def test_fail_closed_refuses_with_503(make_limiter: MakeLimiter, redis_server: RedisServer) -> None:
    limiter = make_limiter(LimitPolicy(rate=1.0, burst=3), retry_interval=2.5)
    await (await limiter.admit("ip:a")).release()
    redis_server.stop()
    for _ in range(3):
        with pytest.raises(Overloaded) as refused:
            await limiter.admit("ip:a")
        assert refused.value.retry_after == 2.5
        assert refused.value.headers == {"RateLimit-Policy": '"rate";q=3;w=3'}


class GatedProvider:
    """One token, then the rest of the reply once the test opens the gate."""

    name = "gated"

    def __init__(self) -> None:
        self.gate = asyncio.Event()

    async def stream(self, request: ChatRequest) -> AsyncGenerator[Sequence[Event], None]:
        yield [Delta("first ")]
        await self.gate.wait()
        yield [Delta("last"), Done("stop")]

    async def aclose(self) -> None:
        return None


@pytest.mark.redis
@pytest.mark.parametrize(("fail_open", "status"), [(True, 200), (False, 503)], ids=["fail-open", "fail-closed"])
async def test_redis_stopping_under_the_api(
    aiohttp_client: AiohttpClient, redis_server: RedisServer, fail_open: bool, status: int
) -> None:
    config = Config(heartbeat=0.0, redis_url=redis_server.url, redis_fail_open=fail_open)
    provider = GatedProvider()
    client = await aiohttp_client(create_relay_app(config, provider=provider))
    async with client.get("/chat", params={"prompt": "hi"}) as streaming:
        assert streaming.status == 200
        await streaming.content.readuntil(b"\n\n")
        redis_server.stop()  # mid-stream
        provider.gate.set()
        assert b"event: done" in await streaming.read()  # the stream ends well; its release fails quietly
    async with client.get("/chat", params={"prompt": "hi"}) as resp:
        assert resp.status == status
        body = await resp.read()
    if status == 503:
        assert resp.headers["Retry-After"] == "1"
        assert b'"type":"overloaded"' in body
    else:
        assert b"event: done" in body


async def test_a_redis_that_never_answers_times_out() -> None:
    # A server that accepts and says nothing: without timeouts every admission would hang.
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            await reader.read()
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    policy = LimitPolicy(rate=1.0, burst=2)
    limiter = RedisLimiter.from_url(
        f"redis://127.0.0.1:{port}/0", policy, fallback=LocalLimiter(policy), timeout=0.2, retry_interval=60
    )
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        admission = await limiter.admit("ip:a")
        assert isinstance(admission, LocalAdmission)
        assert loop.time() - started < 1.0
        assert not limiter.available
        started = loop.time()
        await limiter.admit("ip:a")  # known to be down: no second wait
        assert loop.time() - started < 0.05
    finally:
        await limiter.aclose()
        server.close()
        await server.wait_closed()


@pytest.mark.redis
async def test_admit_after_aclose_is_an_error(make_limiter: MakeLimiter) -> None:
    limiter = make_limiter()
    await limiter.aclose()
    await limiter.aclose()
    with pytest.raises(RuntimeError, match=r"admit\(\) after aclose\(\)"):
        await limiter.admit("ip:a")


async def test_build_limiter_with_redis() -> None:
    url = "redis://127.0.0.1:1/0"  # never connected: building makes no connection
    opened = build_limiter(Config(redis_url=url))
    closed = build_limiter(Config(redis_url=url, redis_fail_open=False))
    assert isinstance(opened, RedisLimiter)
    assert isinstance(closed, RedisLimiter)
    assert isinstance(opened.fallback, LocalLimiter)
    assert closed.fallback is None
    assert math.isclose(opened.policy.rate, 2.0)
    for limiter in (opened, closed):
        await limiter.aclose()


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:6379/0", "127.0.0.1:6379", "redis://:s3cret/x@127.0.0.1:6379/0", "redis://host:s3cret/0"],
    ids=["http", "no-scheme", "unencoded-slash-in-password", "bad-port"],
)
def test_a_bad_redis_url_is_a_config_error_that_quotes_none_of_it(url: str) -> None:
    with pytest.raises(ConfigError, match=r"^--redis-url is not a Redis URL:") as info:
        build_limiter(Config(redis_url=url))
    assert "s3cret" not in str(info.value)
    assert "127.0.0.1" not in str(info.value)
