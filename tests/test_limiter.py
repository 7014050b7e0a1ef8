"""The in-process limiter, alone and behind the HTTP API: refusals, headers, and a slot freed in every outcome."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from server.app import create_app, create_relay_app, setup
from server.chat_request import ChatRequest
from server.config import Config
from server.errors import Overloaded, RateLimited, UpstreamError
from server.events import Delta, Done, Event
from server.limiter import LocalLimiter, build_limiter, policy_from_config
from server.limits import LimitPolicy
from server.state import RELAY

from .conftest import ServeApp

AiohttpClient = Callable[..., Awaitable[TestClient[Any, Any]]]


class Clock:
    """Time for the limiter, moved by the test."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _limiter(clock: Clock, tracked: int = 100_000, **limits: Any) -> LocalLimiter:
    policy = LimitPolicy(**{"rate": 1.0, "burst": 3, **limits})
    return LocalLimiter(policy, clock=clock, max_tracked_clients=tracked)


# -- the limiter alone -------------------------------------------------------------------------------------------


async def test_burst_then_429_with_an_exact_retry_after() -> None:
    clock = Clock()
    limiter = LocalLimiter(LimitPolicy(rate=2.0, burst=3), clock=clock)
    admissions = [await limiter.admit("ip:a") for _ in range(3)]
    assert [a.headers["RateLimit"] for a in admissions] == ['"rate";r=2;t=1', '"rate";r=1;t=1', '"rate";r=0;t=1']
    with pytest.raises(RateLimited) as refused:
        await limiter.admit("ip:a")
    assert refused.value.retry_after == 0.5
    assert refused.value.headers == {"RateLimit-Policy": '"rate";q=3;w=2', "RateLimit": '"rate";r=0;t=1'}
    await limiter.admit("ip:b")  # another client has its own bucket
    clock.now += 0.5
    await limiter.admit("ip:a")


async def test_the_client_stream_cap_refuses_without_taking_a_token() -> None:
    clock = Clock()
    limiter = LocalLimiter(LimitPolicy(rate=1.0, burst=5, max_streams_per_client=2), clock=clock)
    first = await limiter.admit("ip:a")
    await limiter.admit("ip:a")
    assert limiter.streams_of("ip:a") == 2
    with pytest.raises(RateLimited) as refused:
        await limiter.admit("ip:a")
    assert refused.value.retry_after == 1.0
    assert refused.value.headers["RateLimit"] == '"rate";r=3, "streams";r=0'
    await first.release()
    third = await limiter.admit("ip:a")
    assert third.headers["RateLimit"] == '"rate";r=2;t=1, "streams";r=0'  # the refusal cost no token


async def test_a_stream_cap_refusal_waits_for_the_next_token_too() -> None:
    clock = Clock()
    limiter = LocalLimiter(LimitPolicy(rate=0.25, burst=1, max_streams_per_client=1), clock=clock)
    await limiter.admit("ip:a")
    clock.now += 1.0
    with pytest.raises(RateLimited) as refused:
        await limiter.admit("ip:a")
    assert refused.value.retry_after == 3.0  # the slot may free sooner, but no token is there for 3 s


async def test_the_global_cap_is_503_for_everyone() -> None:
    limiter = _limiter(Clock(), max_streams=2)
    held = [await limiter.admit("ip:a"), await limiter.admit("ip:b")]
    with pytest.raises(Overloaded) as refused:
        await limiter.admit("ip:c")
    assert refused.value.status == 503
    assert refused.value.retry_after == 1.0
    await held[0].release()
    await limiter.admit("ip:c")
    assert limiter.open_streams == 2


async def test_release_is_idempotent() -> None:
    limiter = _limiter(Clock(), max_streams_per_client=1)
    mine = await limiter.admit("ip:a")
    await mine.release()
    await mine.release()
    other = await limiter.admit("ip:a")
    await mine.release()  # a stale admission must not free someone else's slot
    assert limiter.streams_of("ip:a") == 1
    await other.release()
    assert limiter.open_streams == 0
    assert limiter.streams_of("ip:a") == 0


async def test_rate_zero_leaves_only_the_stream_caps() -> None:
    limiter = _limiter(Clock(), rate=0.0, burst=0, max_streams_per_client=1)
    for _ in range(50):
        admission = await limiter.admit("ip:a")
        assert admission.headers == {
            "RateLimit-Policy": '"streams";q=1;qu="concurrent-requests"',
            "RateLimit": '"streams";r=0',
        }
        await admission.release()


async def test_idle_buckets_are_forgotten_and_busy_ones_kept() -> None:
    clock = Clock()
    limiter = _limiter(clock, burst=2, tracked=10)
    for i in range(10):
        await limiter.admit(f"ip:{i}")
    assert limiter.tracked_clients == 10
    clock.now += 0.5  # nobody's bucket is full yet
    busy = [await limiter.admit("ip:0"), await limiter.admit("ip:1")]  # these two are the most recently used
    clock.now += 0.6  # the other eight are full again: forgetting them loses nothing
    for i in range(100, 108):
        await limiter.admit(f"ip:{i}")
    assert limiter.tracked_clients <= 10
    assert limiter.evicted_busy == 0
    busy.append(await limiter.admit("ip:0"))  # 1.1 tokens: one more now, not the two of a forgotten bucket
    with pytest.raises(RateLimited):
        await limiter.admit("ip:0")
    for admission in busy:
        await admission.release()


async def test_a_flood_of_addresses_cannot_grow_memory() -> None:
    clock = Clock()
    limiter = _limiter(clock, burst=1, tracked=1000)
    for i in range(20_000):
        admission = limiter.admit_now(f"ip:10.{i >> 16}.{(i >> 8) & 255}.{i & 255}")
        admission.release_now()
    assert limiter.tracked_clients == 1000
    assert limiter.open_streams == 0
    assert limiter.evicted_busy == 19_000  # all active within one refill time: the oldest went
    clock.now += 10.0
    for i in range(1000):
        limiter.admit_now(f"ip:new-{i}").release_now()
    assert limiter.tracked_clients == 1000


def test_build_limiter_reads_the_config() -> None:
    config = Config(rate="30/m", burst=7, max_streams_per_client=3, max_streams=9, max_tracked_clients=5)
    limiter = build_limiter(config)
    assert isinstance(limiter, LocalLimiter)
    assert limiter.policy == LimitPolicy(rate=0.5, burst=7, max_streams_per_client=3, max_streams=9)
    assert limiter.max_tracked_clients == 5
    assert policy_from_config(Config()) == LimitPolicy(rate=2.0, burst=20, max_streams_per_client=8, max_streams=2000)


# -- behind the HTTP API -----------------------------------------------------------------------------------------

LIMITED = Config(
    provider="demo",
    demo_delay=0.0,
    heartbeat=0.0,
    rate="1/m",
    burst=2,
    max_streams_per_client=4,
    max_streams=100,
)
# One stream per client and a generous bucket: only slot leaks show.
ONE_SLOT = LIMITED.with_changes(rate="100/s", burst=100, max_streams_per_client=1)


def _local(app: web.Application) -> LocalLimiter:
    limiter = app[RELAY].limiter
    assert isinstance(limiter, LocalLimiter)
    return limiter


async def test_admitted_and_refused_responses_explain_themselves(aiohttp_client: AiohttpClient) -> None:
    client = await aiohttp_client(create_app(LIMITED))
    statuses = []
    for _ in range(3):
        async with client.get("/api/chat", params={"prompt": "hi"}) as resp:
            statuses.append(resp.status)
            body = await resp.read()
            assert resp.headers["RateLimit-Policy"] == '"rate";q=2;w=120, "streams";q=4;qu="concurrent-requests"'
            if resp.status == 200:
                assert b"event: done" in body
                last = resp.headers["RateLimit"]
            else:
                refused = resp
    assert statuses == [200, 200, 429]
    assert last == '"rate";r=0;t=60, "streams";r=3'
    assert refused.headers["Content-Type"] == "application/json"
    assert refused.headers["Retry-After"] == "60"  # RFC 9110 §10.2.3: whole seconds, not earlier than the token
    assert refused.headers["RateLimit"] == '"rate";r=0;t=60, "streams";r=4'
    error = json.loads(body)["error"]
    assert error["type"] == "rate_limited"
    assert "60 s" in error["message"]


async def test_ndjson_post_is_limited_the_same_way(aiohttp_client: AiohttpClient) -> None:
    client = await aiohttp_client(create_app(LIMITED.with_changes(burst=1)))
    headers = {"Accept": "application/x-ndjson"}
    body = {"messages": [{"role": "user", "content": "hi"}]}
    async with client.post("/api/chat", json=body, headers=headers) as resp:
        assert resp.status == 200
        await resp.read()
    async with client.post("/api/chat", json=body, headers=headers) as resp:
        assert resp.status == 429
        assert (await resp.json())["error"]["type"] == "rate_limited"


async def test_health_page_and_static_files_are_not_limited(aiohttp_client: AiohttpClient) -> None:
    client = await aiohttp_client(create_app(LIMITED.with_changes(burst=1)))
    for path in ("/healthz", "/api/healthz", "/") * 10:
        async with client.get(path) as resp:
            assert resp.status == 200, path
            assert "RateLimit" not in resp.headers
            await resp.read()
    async with client.get("/api/chat", params={"prompt": "still my first"}) as resp:
        assert resp.status == 200  # none of the above spent the one token
        await resp.read()


async def test_the_global_cap_answers_503(aiohttp_client: AiohttpClient) -> None:
    app = create_app(LIMITED.with_changes(max_streams=1, demo_delay=0.05))
    client = await aiohttp_client(app)
    async with client.get("/api/chat", params={"prompt": "a"}) as holding:
        assert holding.status == 200
        await holding.content.readuntil(b"\n\n")
        async with client.get("/api/chat", params={"prompt": "b"}) as resp:
            assert resp.status == 503
            assert resp.headers["Retry-After"] == "1"
            assert (await resp.json())["error"]["type"] == "overloaded"
            assert "RateLimit-Policy" in resp.headers


async def test_the_client_stream_cap_answers_429(aiohttp_client: AiohttpClient) -> None:
    client = await aiohttp_client(create_app(ONE_SLOT.with_changes(demo_delay=0.05, rate="1/m")))
    async with client.get("/api/chat", params={"prompt": "a"}) as holding:
        assert holding.headers["RateLimit"] == '"rate";r=99;t=60, "streams";r=0'
        await holding.content.readuntil(b"\n\n")
        async with client.get("/api/chat", params={"prompt": "b"}) as resp:
            assert resp.status == 429
            assert resp.headers["Retry-After"] == "1"
            assert resp.headers["RateLimit"] == '"rate";r=99, "streams";r=0'
            assert "wait for one to finish" in (await resp.json())["error"]["message"]


# -- a slot comes back in every outcome --------------------------------------------------------------------------


class ScriptedProvider:
    """Yields `tokens` deltas (after `first_delay` seconds), then fails with an `UpstreamError` if told to, or ends."""

    name = "scripted"

    def __init__(self, tokens: int = 0, *, fail: bool = False, first_delay: float = 0.0) -> None:
        self.tokens = tokens
        self.fail = fail
        self.first_delay = first_delay

    async def stream(self, request: ChatRequest) -> AsyncGenerator[Sequence[Event], None]:
        if self.first_delay:
            await asyncio.sleep(self.first_delay)
        for _ in range(self.tokens):
            yield [Delta("tok ")]
        if self.fail:
            raise UpstreamError("the model provider failed")
        yield [Done("stop")]

    async def aclose(self) -> None:
        return None


async def _slot_is_free(client: TestClient[Any, Any] | None, base: str, limiter: LocalLimiter) -> None:
    """The slot comes back promptly, and a follow-up request is admitted."""
    async with asyncio.timeout(5):
        while limiter.open_streams:
            await asyncio.sleep(0.005)
    if client is not None:
        async with client.get(f"{base}/chat", params={"prompt": "again"}) as resp:
            assert resp.status == 200
            await resp.read()


async def test_slot_freed_when_the_stream_is_done(aiohttp_client: AiohttpClient) -> None:
    app = create_app(ONE_SLOT)
    client = await aiohttp_client(app)
    for _ in range(5):
        async with client.get("/api/chat", params={"prompt": "hi"}) as resp:
            assert resp.status == 200
            assert b"event: done" in await resp.read()
    await _slot_is_free(client, "/api", _local(app))


@pytest.mark.parametrize(
    ("provider", "status", "in_band"),
    [
        (ScriptedProvider(0, fail=True), 502, False),
        (ScriptedProvider(3, fail=True), 200, True),
    ],
    ids=["before-first-token", "mid-stream"],
)
async def test_slot_freed_when_the_upstream_fails(
    aiohttp_client: AiohttpClient, provider: ScriptedProvider, status: int, in_band: bool
) -> None:
    api = create_relay_app(ONE_SLOT, provider=provider)
    client = await aiohttp_client(api)
    async with client.get("/chat", params={"prompt": "hi"}) as resp:
        assert resp.status == status
        body = await resp.read()
    assert (b"event: error" in body) is in_band
    assert b"upstream_error" in body
    provider.fail = False
    await _slot_is_free(client, "", _local(api))


async def test_slot_freed_after_a_timeout(aiohttp_client: AiohttpClient) -> None:
    provider = ScriptedProvider(1, first_delay=30.0)
    api = create_relay_app(ONE_SLOT.with_changes(first_token_timeout=0.05), provider=provider)
    client = await aiohttp_client(api)
    async with client.get("/chat", params={"prompt": "hi"}) as resp:
        assert resp.status == 504
        assert (await resp.json())["error"]["type"] == "timeout"
    provider.first_delay = 0.0
    await _slot_is_free(client, "", _local(api))


@pytest.mark.parametrize("handler_cancellation", [False, True], ids=["production-runner", "cancelling-runner"])
async def test_slot_freed_when_the_client_disconnects(
    serve: ServeApp, aiohttp_client: AiohttpClient, handler_cancellation: bool
) -> None:
    config = ONE_SLOT.with_changes(demo_delay=0.05)
    if handler_cancellation:
        app = create_app(config)
        client = await aiohttp_client(app)
        base = str(client.make_url("/api"))
    else:
        # aiohttp's production default: the handler is not cancelled when its client leaves.
        app = web.Application(handler_args={"handler_cancellation": False})
        api = setup(app, config)
        app[RELAY] = api[RELAY]
        base = await serve(app) + "/api"
    limiter = _local(app)
    async with aiohttp.ClientSession() as http:
        for _ in range(3):
            resp = await http.get(f"{base}/chat", params={"prompt": "hi"})
            assert resp.status == 200
            await resp.content.readuntil(b"\n\n")
            assert limiter.open_streams == 1
            resp.close()  # leave mid-stream: the connection is closed, not returned to the pool
            await _slot_is_free(None, base, limiter)
        async with http.get(f"{base}/chat", params={"prompt": "again"}) as resp:
            assert resp.status == 200


async def test_slot_freed_at_shutdown() -> None:
    app = create_app(ONE_SLOT.with_changes(demo_delay=0.05, shutdown_grace=2.0))
    limiter = _local(app)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://{host}:{port}/api/chat", params={"prompt": "hi"}) as resp:
            assert resp.status == 200
            await resp.content.readuntil(b"\n\n")
            assert limiter.open_streams == 1
            cleanup = asyncio.create_task(runner.cleanup())
            body = await resp.read()
        await cleanup
    assert b"server_shutdown" in body
    assert limiter.open_streams == 0
