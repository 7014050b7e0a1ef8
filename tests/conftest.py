"""Shared fixtures: a fake OpenAI-compatible upstream, and the relay served with production runner settings."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from redis.asyncio import Redis

from server.app import create_app, runner_settings
from server.config import Config

from .fake_upstream import FakeUpstream
from .redis_server import RedisServer

ServeApp = Callable[[web.Application], Awaitable[str]]


@pytest.fixture
async def fake_upstream() -> AsyncIterator[FakeUpstream]:
    upstream = FakeUpstream()
    await upstream.start()
    yield upstream
    await upstream.close()


@pytest.fixture
async def serve() -> AsyncIterator[ServeApp]:
    """Serve an app on a loopback port with aiohttp's production defaults (``handler_cancellation=False``,
    unlike pytest-aiohttp's TestServer); returns its base URL."""
    runners: list[web.AppRunner] = []

    async def start(app: web.Application) -> str:
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        assert runner.addresses
        host, port = runner.addresses[0][:2]
        return f"http://{host}:{port}"

    yield start
    for runner in reversed(runners):
        await runner.cleanup()


ServeStandalone = Callable[[Config], Awaitable[str]]


@pytest.fixture
async def serve_standalone() -> AsyncIterator[ServeStandalone]:
    """Serve `create_app(config)` with the runner settings of ``python -m server`` (`runner_settings`: the request
    head timeout, the lingering time); returns its base URL."""
    runners: list[web.AppRunner] = []

    async def start(config: Config) -> str:
        runner = web.AppRunner(create_app(config), **runner_settings(config))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        host, port = runner.addresses[0][:2]
        return f"http://{host}:{port}"

    yield start
    for runner in reversed(runners):
        await runner.cleanup()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def upstream_config(upstream: FakeUpstream, **changes: object) -> Config:
    """A relay configuration that points the openai client at the fake upstream."""
    base: dict[str, object] = {
        "provider": "openai",
        "base_url": upstream.url,
        "api_key": "sk-test-secret-key-0123456789",
        "model": "fake-model",
        "upstream_max_retries": 0,
        "limits_enabled": False,
        "heartbeat": 0.0,
    }
    base.update(changes)
    return Config(**base)  # type: ignore[arg-type]


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server of the test's own, stopped at the end."""
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[Redis]:
    """A client of `redis_server`, to look at what the relay wrote."""
    client = Redis.from_url(redis_server.url, decode_responses=True)
    yield client
    await client.aclose()
