"""Helpers for tests that cut, resume and follow relayed streams over real loopback sockets.

`EventSourceModel` keeps what a browser's ``EventSource`` keeps across its connections (the last event id, and the
events it dispatched), reading each connection's bytes with the independent spec decoder (`tests/sse_decoder.py`),
so a test computes the ``Last-Event-ID`` of a reconnect exactly as a browser would, whatever byte the cut fell on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web

from server.app import create_app

from .conftest import upstream_config
from .fake_upstream import Behavior, FakeUpstream
from .sse_decoder import SSEDecoder, SSEEvent


class EventSourceModel:
    """What an ``EventSource`` remembers across reconnections: its last event id and the events it dispatched.

    WHATWG HTML §9.2.6: the last event id is set when a block is dispatched (a blank line), never by a block cut
    before its end, and it survives reconnection ("the buffer does not get reset").
    """

    def __init__(self) -> None:
        self.last_event_id = ""
        self.events: list[SSEEvent] = []

    def connection(self, body: bytes) -> None:
        """One connection's bytes, up to where it ended (cut or not)."""
        decoder = SSEDecoder()
        # A new connection starts with a fresh parser but the event source's last event id.
        self.events += decoder.feed(body)
        self.events += decoder.end()  # an unfinished block is discarded, as at the end of any stream
        if decoder.last_event_id:
            self.last_event_id = decoder.last_event_id

    @property
    def last_seq(self) -> int | None:
        """The sequence number in the last event id (None before any id)."""
        if not self.last_event_id:
            return None
        return int(self.last_event_id.rpartition("/")[2])


def sse_blocks(body: bytes) -> list[bytes]:
    """The blocks of a whole SSE body of ours, each with its blank line (our data lines never hold a raw LF)."""
    parts = body.split(b"\n\n")
    assert parts[-1] == b"", "the body ends with a blank line"
    return [part + b"\n\n" for part in parts[:-1]]


def ndjson_lines(body: bytes) -> list[bytes]:
    """The complete lines of an NDJSON body (a line cut before its LF is not one), each with its LF."""
    return [line + b"\n" for line in body.split(b"\n")[:-1]]


def ndjson_complete(body: bytes) -> list[dict[str, Any]]:
    """The objects of the complete lines of a possibly cut NDJSON body."""
    return [json.loads(line) for line in ndjson_lines(body)]


async def read_cut(response: aiohttp.ClientResponse, size: int) -> bytes:
    """Read exactly `size` bytes of the body, then close the connection (the client goes away mid-body)."""
    try:
        return await response.content.readexactly(size)
    finally:
        response.close()


async def health(http: aiohttp.ClientSession, base: str, path: str = "/api/healthz") -> dict[str, Any]:
    async with http.get(base + path) as response:
        assert response.status == 200
        result: dict[str, Any] = await response.json()
        return result


async def wait_health(http: aiohttp.ClientSession, base: str, timeout: float = 2.0, **expected: int) -> dict[str, Any]:
    """Poll healthz until every field in `expected` has its value; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        report = await health(http, base)
        if all(report[key] == value for key, value in expected.items()):
            return report
        if time.monotonic() > deadline:
            raise AssertionError(f"healthz {report} never matched {expected} within {timeout} s")
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def relay_with_upstream(behavior: Behavior, **changes: object) -> AsyncIterator[tuple[str, FakeUpstream]]:
    """A fake upstream and the standalone relay in openai mode, served with production runner settings (as the
    ``serve`` fixture does), for tests that need a fresh pair per hypothesis example."""
    upstream = FakeUpstream(behavior)
    await upstream.start()
    runner = web.AppRunner(create_app(upstream_config(upstream, **changes)), access_log=None, shutdown_timeout=2.0)
    try:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}", upstream
    finally:
        await runner.cleanup()
        await upstream.close()
