"""The request head timeout of the relay's own processes (`server.app.runner_settings`: aiohttp's
``keepalive_timeout``), over raw sockets: a connection that never completes its head is closed in time, whoever
sends a request normally is not affected. The body timeout is the handler's (tests/test_intake.py)."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from aiohttp import web

from server import gunicorn
from server.config import Config

from .conftest import ServeStandalone
from .raw_http import closed_by_server, connect, read_response
from .wire import sse_events

HEAD_TIMEOUT = 1.0
CONFIG = Config(provider="demo", demo_delay=0.0, heartbeat=0.0, limits_enabled=False, request_head_timeout=HEAD_TIMEOUT)
SLOW_HEAD = b"GET /api/chat?prompt=slow HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: " + b"x" * 200


async def _trickle(writer: asyncio.StreamWriter, data: bytes, every: float) -> None:
    try:
        for byte in data:
            writer.write(bytes([byte]))
            await asyncio.sleep(every)
    except ConnectionError:
        return


async def _closed_after(base: str, send: bytes, every: float) -> float | None:
    """Seconds until the server closed a connection that sends `send` one byte every `every` s; None if it served
    a response instead."""
    started = time.monotonic()
    reader, writer = await connect(base)
    trickling = asyncio.create_task(_trickle(writer, send, every))
    try:
        first = await asyncio.wait_for(reader.read(1), HEAD_TIMEOUT + 5)
    except ConnectionError:
        first = b""
    finally:
        trickling.cancel()
        writer.close()
    return time.monotonic() - started if first == b"" else None


@pytest.mark.parametrize(("send", "every"), [(b"", 0.0), (SLOW_HEAD, 0.1)], ids=["silent", "one-byte-at-a-time"])
async def test_a_connection_that_never_completes_its_head_is_closed(
    serve_standalone: ServeStandalone, send: bytes, every: float
) -> None:
    base = await serve_standalone(CONFIG)
    took = await _closed_after(base, send, every)
    assert took is not None, "the server answered a request it never received in full"
    assert HEAD_TIMEOUT - 0.1 <= took < HEAD_TIMEOUT + 2


async def test_many_slow_heads_are_all_closed_and_the_server_stays_responsive(
    serve_standalone: ServeStandalone, http: aiohttp.ClientSession
) -> None:
    base = await serve_standalone(CONFIG)
    slow = [asyncio.create_task(_closed_after(base, SLOW_HEAD, 0.25)) for _ in range(200)]
    polls = 0
    while not all(task.done() for task in slow):
        started = time.monotonic()
        async with http.get(f"{base}/healthz") as resp:
            assert resp.status == 200
        assert time.monotonic() - started < 1.0  # a liveness bound, not a performance target
        polls += 1
        await asyncio.sleep(0.1)
    took = [task.result() for task in slow]
    assert None not in took
    assert max(t for t in took if t is not None) < HEAD_TIMEOUT + 3
    assert polls >= 5


async def test_normal_requests_are_not_affected(serve_standalone: ServeStandalone) -> None:
    # A stream that lasts longer than the head timeout, then a second request on the same connection.
    base = await serve_standalone(CONFIG.with_changes(demo_delay=0.1))
    reader, writer = await connect(base)
    for _ in range(2):
        writer.write(
            b"GET /api/chat?prompt=hi&format=ndjson&max_tokens=15 HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: */*\r\n\r\n"
        )
        started = time.monotonic()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
        body = await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), 10)
        assert b'"type":"done"' in body
        assert time.monotonic() - started > HEAD_TIMEOUT
        await asyncio.sleep(HEAD_TIMEOUT / 2)  # idle, but less than the timeout: the connection is kept
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert (await read_response(reader)).status == 200
    # Idle for longer than the timeout: the server ends the keep-alive connection.
    assert await closed_by_server(reader, timeout=HEAD_TIMEOUT + 2)
    writer.close()


async def test_the_gunicorn_app_serves_with_the_same_runner_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "LLM_RELAY_API_KEY", "LLM_RELAY_PROVIDER"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LLM_RELAY_REQUEST_HEAD_TIMEOUT", str(HEAD_TIMEOUT))
    monkeypatch.setenv("LLM_RELAY_GC_TUNING", "off")
    monkeypatch.setenv("LLM_RELAY_DEMO_DELAY", "0")
    # aiohttp's gunicorn worker serves a runner that the app factory returns as it is (aiohttp/worker.py, _run):
    # set it up and start a site on it the way the worker does.
    runner = await gunicorn.app()
    assert isinstance(runner, web.AppRunner)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        base = f"http://{host}:{port}"
        took = await _closed_after(base, SLOW_HEAD, 0.1)
        assert took is not None
        assert took < HEAD_TIMEOUT + 2
        async with aiohttp.ClientSession() as http, http.get(f"{base}/api/chat", params={"prompt": "hi"}) as resp:
            assert resp.status == 200
            assert sse_events(await resp.read())[-1][0] == "done"
    finally:
        await runner.cleanup()
