"""The token path writes its chunks to the transport itself (`RelayStream._deliver`): what aiohttp's writer would
have done must still hold, chunked (HTTP/1.1) or close-delimited (HTTP/1.0), and the writer's byte count, which
access logs report, must still cover every byte the client got."""

from __future__ import annotations

import asyncio
import logging
from typing import ClassVar

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from server.app import create_app
from server.chat_request import ChatRequest, Message
from server.config import Config
from server.providers.demo import demo_tokens

from .wire import sse_events

CONFIG = Config(provider="demo", demo_delay=0.001, limits_enabled=False, heartbeat=0.0)


class _Lengths(AbstractAccessLogger):
    seen: ClassVar[list[int]] = []

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.seen.append(response.body_length)


async def _raw_get(port: int, path: str, http10: bool = False) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    version = "1.0" if http10 else "1.1"
    writer.write(f"GET {path} HTTP/{version}\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode())
    data = await reader.read()
    writer.close()
    return data


async def test_access_log_counts_every_byte_the_client_got() -> None:
    runner = web.AppRunner(create_app(CONFIG), access_log_class=_Lengths, access_log=logging.getLogger("test"))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        _Lengths.seen.clear()
        for http10 in (False, True):
            raw = await _raw_get(port, "/api/chat?prompt=count%20me", http10=http10)
            head, _, body = raw.partition(b"\r\n\r\n")
            assert (b"transfer-encoding: chunked" in head.lower()) is not http10
            if not http10:
                assert body.endswith(b"\r\n0\r\n\r\n")
            assert b"event: done" in body
            await asyncio.sleep(0.05)  # the access log entry is written once the handler has returned
            assert _Lengths.seen[-1] == len(raw)
    finally:
        await runner.cleanup()


def _dechunk(body: bytes) -> tuple[list[bytes], bytes]:
    """RFC 9112 §7.1, strictly: every chunk's size line, data and CRLF; the last chunk; what follows it."""
    chunks: list[bytes] = []
    while True:
        size_line, crlf, body = body.partition(b"\r\n")
        assert crlf, "a chunk size line without its CRLF"
        size = int(size_line, 16)
        if size == 0:
            assert body.startswith(b"\r\n"), "no CRLF after the last chunk"
            return chunks, body[2:]
        assert body[size : size + 2] == b"\r\n", "a chunk's data is not followed by CRLF"
        chunks.append(body[:size])
        body = body[size + 2 :]


async def test_tokens_written_directly_and_heartbeats_written_by_aiohttp_make_one_valid_chunked_body() -> None:
    # Tokens 40 ms apart and heartbeats every 10 ms: aiohttp's writer (the head, the heartbeats, the end) and the
    # token path's own chunks take turns on the same connection.
    config = CONFIG.with_changes(demo_delay=0.04, heartbeat=0.01)
    runner = web.AppRunner(create_app(config), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        raw = await _raw_get(runner.addresses[0][1], "/api/chat?prompt=tick&max_tokens=6")
    finally:
        await runner.cleanup()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower()
    chunks, rest = _dechunk(body)
    assert rest == b""
    payload = b"".join(chunks)
    assert payload.count(b": ping\n\n") >= 3
    events = sse_events(payload)
    assert [e[0] for e in events] == ["message"] * 6 + ["done"]
    assert "".join(e[1]["content"] for e in events[:6]) == "".join(demo_tokens(_demo("tick"))[:6])


def _demo(prompt: str) -> ChatRequest:
    return ChatRequest(messages=(Message("user", prompt),), model="llm-relay-demo")
