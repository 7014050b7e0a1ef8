"""Token budgets over real sockets: the fake upstream reports usage (prompt 7, one completion token per token it
sends), the real openai client reads it, and every way a stream ends settles its reservation with what it
consumed; the 429 carries the token policy beside the request policy; two instances on one real redis-server
admit exactly the budget."""

from __future__ import annotations

import asyncio
import math
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from server.app import create_app, setup
from server.budget_backends import LocalBudgets, policies

from .conftest import ServeApp, upstream_config
from .fake_upstream import Behavior, FakeUpstream
from .processes import running_server
from .redis_server import RedisServer
from .streaming import health

PROMPT_TOKENS = 3 + 4 + 1  # the estimate for the one-character prompt "x": reply priming, one message, 1 token
CEILING = 100
RESERVATION = PROMPT_TOKENS + CEILING


async def _budget(http: aiohttp.ClientSession, base: str, settled: int, timeout: float = 10.0) -> dict[str, int]:
    """The relay's token budget counters once `settled` reservations have been settled."""
    async with asyncio.timeout(timeout):
        while True:
            report: dict[str, Any] = await health(http, base)
            stats: dict[str, int] = report["token_budget"]
            if stats["settled"] >= settled:
                return stats
            await asyncio.sleep(0.01)


def _tokens(*contents: str) -> int:
    return math.ceil(sum(map(len, contents)) / 4)


@pytest.mark.parametrize(
    ("behavior", "changes", "read_until", "expected"),
    [
        (Behavior(tokens=["Hello", ",", " world", "!"]), {}, None, 7 + 4),
        (Behavior(tokens=["Hello", ",", " world", "!"]), {"include_usage": False}, None, PROMPT_TOKENS + 4),
        (Behavior(tokens=["abcd", "efgh"], first_delay=30), {}, b"", PROMPT_TOKENS),
        (Behavior(tokens=["abcd", "efgh", "ijkl"], fault="stall", fault_after=2), {}, b"efgh", PROMPT_TOKENS + 2),
        (
            Behavior(tokens=["abcd", "efgh", "ijkl"], fault="stall", fault_after=2),
            {"idle_timeout": 0.3},
            None,
            PROMPT_TOKENS + 2,
        ),
        (
            Behavior(tokens=["abcde", "efgh", "ijkl"], fault="error_chunk", fault_after=2),
            {},
            None,
            PROMPT_TOKENS + _tokens("abcde", "efgh"),
        ),
        (Behavior(fault="status", status=500), {}, None, PROMPT_TOKENS),
    ],
    ids=[
        "done-with-usage",
        "done-without-usage",
        "disconnect-before-first-token",
        "disconnect-after-first-token",
        "idle-timeout",
        "upstream-error-mid-stream",
        "upstream-error-before-first-token",
    ],
)
async def test_every_ending_settles_what_was_consumed(
    fake_upstream: FakeUpstream,
    serve: ServeApp,
    http: aiohttp.ClientSession,
    behavior: Behavior,
    changes: dict[str, object],
    read_until: bytes | None,
    expected: int,
) -> None:
    fake_upstream.behavior = behavior
    config = upstream_config(fake_upstream, tokens_per_minute=1000, token_ceiling=CEILING, **changes)
    base = await serve(create_app(config))
    if read_until == b"":
        # The response's head is sent with the first event: the client leaves while it waits for it.
        waiting = asyncio.create_task(http.get(f"{base}/api/chat", params={"prompt": "x"}))
        await fake_upstream.wait_for_request()
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
    else:
        response = await http.get(f"{base}/api/chat", params={"prompt": "x"})
        if read_until is None:
            await response.read()  # to its end: done, or an in-band or HTTP error
        else:
            await response.content.readuntil(read_until)
        response.close()  # the client goes away
    stats = await _budget(http, base, settled=1)
    assert stats["reserved"] == RESERVATION
    assert stats["charged"] == expected
    assert stats["refunded"] == RESERVATION - expected
    assert stats["overrun"] == 0


async def test_a_refund_is_given_back_to_the_bucket(
    fake_upstream: FakeUpstream, serve: ServeApp, http: aiohttp.ClientSession
) -> None:
    """Two reservations do not fit the budget; once the first has settled for what it used, the second does."""
    fake_upstream.behavior = Behavior(tokens=["a", "b"], fault="stall", fault_after=1)
    config = upstream_config(fake_upstream, tokens_per_minute=2 * RESERVATION - 1, token_ceiling=CEILING)
    base = await serve(create_app(config))
    first = await http.get(f"{base}/api/chat", params={"prompt": "x"})
    async with http.get(f"{base}/api/chat", params={"prompt": "x"}) as refused:
        assert refused.status == 429
    first.close()
    await _budget(http, base, settled=1)
    fake_upstream.behavior = Behavior(tokens=["b"])
    async with http.get(f"{base}/api/chat", params={"prompt": "x"}) as second:
        assert second.status == 200
        assert b"b" in await second.read()


async def test_shutdown_and_stop_settle_too(fake_upstream: FakeUpstream, http: aiohttp.ClientSession) -> None:
    fake_upstream.behavior = Behavior(tokens=["abcd", "efgh", "ijkl"], fault="stall", fault_after=2)
    config = upstream_config(fake_upstream, tokens_per_minute=1000, token_ceiling=CEILING, shutdown_grace=0.2)
    budgets = LocalBudgets(policies(config, {}))
    app = web.Application()
    setup(app, config, budgets=budgets)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    base = f"http://{host}:{port}"
    try:
        stopped = await http.get(f"{base}/api/chat", params={"prompt": "x"})
        await stopped.content.readuntil(b"efgh")
        async with http.delete(f"{base}/api/streams/{stopped.headers['X-Stream-Id']}") as stop:
            assert stop.status == 204
        await stopped.read()
        stopped.close()
        await _budget(http, base, settled=1)
        assert budgets.stats.charged == PROMPT_TOKENS + 2
        running = await http.get(f"{base}/api/chat", params={"prompt": "x"})
        await running.content.readuntil(b"efgh")
    finally:
        await runner.cleanup()  # the server shuts down under the running stream
    running.close()
    assert budgets.stats.settled == 2
    assert budgets.stats.charged == 2 * (PROMPT_TOKENS + 2)


async def test_the_429_names_the_token_policy_beside_the_request_policy(
    fake_upstream: FakeUpstream, serve: ServeApp, http: aiohttp.ClientSession
) -> None:
    fake_upstream.behavior = Behavior(tokens=["a", "b"], fault="stall", fault_after=1)
    config = upstream_config(
        fake_upstream, tokens_per_minute=150, token_ceiling=CEILING, limits_enabled=True, rate="1/s", burst=5
    )
    base = await serve(create_app(config))
    held = await http.get(f"{base}/api/chat", params={"prompt": "x"})
    assert held.status == 200
    assert held.headers["RateLimit-Policy"] == (
        '"rate";q=5;w=5, "streams";q=8;qu="concurrent-requests", "tokens";q=150;w=60;qu="tokens"'
    )
    assert held.headers["RateLimit"] == '"rate";r=4;t=1, "streams";r=7, "tokens";r=42;t=1'
    async with http.post(f"{base}/api/chat", json={"prompt": "x", "max_tokens": 50}) as refused:
        assert refused.status == 429
        # 42 left, 58 needed: 16 tokens at 2.5 per second is 6.4 s.
        assert refused.headers["Retry-After"] == "7"
        assert refused.headers["RateLimit-Policy"] == held.headers["RateLimit-Policy"]
        # The request policies as admission left them (its request token stays spent, as for an invalid body).
        assert refused.headers["RateLimit"] == '"rate";r=3;t=1, "streams";r=6, "tokens";r=42;t=7'
        assert await refused.json() == {
            "error": {
                "type": "token_budget_exhausted",
                "message": "the token budget of 150 tokens per minute is spent; this request needs more than is "
                "left, try again in 7 s",
            }
        }
    async with http.post(f"{base}/api/chat", json={"prompt": "x", "max_tokens": 149}) as too_big:
        assert too_big.status == 400
        body = await too_big.json()
        assert body["error"]["type"] == "invalid_request"
        assert "more than your whole budget of 150" in body["error"]["message"]
    assert len(fake_upstream.seen) == 1  # refused before the upstream was asked
    stats = (await health(http, base))["token_budget"]
    assert (stats["reservations"], stats["reserved"], stats["budget_exhausted"]) == (1, RESERVATION, 1)
    held.close()


async def test_a_key_with_a_daily_quota_is_told_when_it_resets(
    fake_upstream: FakeUpstream, serve: ServeApp, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    keys = tmp_path / "keys"
    keys.write_text("sk-small tokens_per_day=300\nsk-large\n")
    config = upstream_config(fake_upstream, api_keys_file=str(keys), token_ceiling=CEILING, tokens_per_day=10_000)
    base = await serve(create_app(config))
    small = {"Authorization": "Bearer sk-small"}
    admitted = 0
    while True:
        async with http.get(f"{base}/api/chat", params={"prompt": "x"}, headers=small) as response:
            if response.status != 200:
                body = await response.json()
                break
            assert response.headers["RateLimit-Policy"] == '"daily-tokens";q=300;w=86400;qu="tokens"'
            await response.read()
        admitted += 1
        await _budget(http, base, settled=admitted)
    # Each reserved 108 and was charged 11 (the upstream's usage): the 19th finds 198 used, and 306 > 300.
    assert admitted == 18
    assert response.status == 429
    assert body["error"]["type"] == "token_quota_exhausted"
    assert body["error"]["message"].startswith(
        "the daily token quota of 300 is spent (198 used, this request may need 108); it resets at "
    )
    reset = re.fullmatch(r".*T00:00:00Z \(in (\d+) s\)", body["error"]["message"])
    assert reset is not None
    assert 0 < int(reset[1]) <= 86_400
    # Retry-After is the wait, clamped to an hour as every Retry-After is (server/responses.py); the body and the
    # RateLimit ``t`` say when the quota really resets.
    assert response.headers["Retry-After"] == str(min(3600, int(reset[1])))
    assert response.headers["RateLimit"].startswith('"daily-tokens";r=102;t=')
    async with http.get(f"{base}/api/chat", params={"prompt": "x"}, headers={"Authorization": "Bearer sk-large"}) as ok:
        assert ok.status == 200
        await ok.read()


@pytest.mark.redis
async def test_two_instances_on_one_redis_admit_exactly_the_budget(tmp_path: Path) -> None:
    """Two processes, one redis-server: requests fired at both at once are admitted exactly as many times as the
    budget holds reservations, not that many per instance."""
    redis_server = RedisServer(tmp_path)
    redis_server.start()
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    reservation = 3 + 4 + 1 + 500  # prompt "x", max_tokens 500
    argv = [
        "--provider", "demo", "--demo-delay", "0.2", "--limits", "false",
        "--tokens-per-minute", str(4 * reservation), "--redis-url", redis_server.url,
    ]  # fmt: skip
    try:
        async with (
            running_server(tmp_path / "a", *argv) as first,
            running_server(tmp_path / "b", *argv) as second,
            aiohttp.ClientSession() as http,
        ):
            bases = [first.base, second.base]
            # Each further reservation takes 15 s to refill: far longer than firing these takes.
            responses = await asyncio.gather(
                *(http.post(f"{bases[i % 2]}/api/chat", json={"prompt": "x", "max_tokens": 500}) for i in range(16))
            )
            statuses = sorted(response.status for response in responses)
            for response in responses:
                response.close()  # every admitted stream ends now, having used a few tokens
            assert statuses == [200] * 4 + [429] * 12
            # Their refunds went back to the shared bucket: a new reservation fits again, on either instance.
            async with asyncio.timeout(10):
                while True:
                    async with http.post(f"{bases[1]}/api/chat", json={"prompt": "x", "max_tokens": 500}) as again:
                        if again.status == 200:
                            break
                    await asyncio.sleep(0.05)
    finally:
        redis_server.stop()
