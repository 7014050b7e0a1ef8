"""The practical floor for relaying in Python (issue 17): ``asyncio.Protocol`` on both sides, uvloop, no framework.

``GET /relay?prompt=P``: one upstream connection per stream, from a pool of idle keep-alive connections (opened on
demand), ``POST /v1/chat/completions``; the upstream's chunked SSE body is de-chunked and split into events by
hand, each ``data:`` parsed with ``json.loads`` (the same work as every relay here: the text must be taken out of
the chunk), and everything one upstream read completes goes to the client in one ``transport.write``. When the
client leaves, the upstream connection is closed in the same callback; a client that stops reading pauses the
upstream's reads. No validation, no timeouts, no heartbeats, no error handling beyond closing: a ceiling, not a
server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import cast
from urllib.parse import parse_qs, urlsplit

from bench.peers._common import BACKLOG, MODEL, UPSTREAM, use_uvloop

_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)
_DONE = b"data: [DONE]\n\n"
_LAST = b"%x\r\n%s\r\n0\r\n\r\n" % (len(_DONE), _DONE)
_URL = urlsplit(UPSTREAM)
_UPSTREAM_ADDRESS = (_URL.hostname or "127.0.0.1", _URL.port or 80)
_UPSTREAM_PATH = f"{_URL.path.rstrip('/')}/chat/completions"


class Upstream(asyncio.Protocol):
    """One keep-alive connection to the upstream, serving one client stream at a time."""

    def __init__(self, pool: list[Upstream]) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.client: Client | None = None
        self.buffer = b""
        self.in_body = False
        self.need = 0  # bytes left of the current chunk's data; 0 (and no CRLF to skip): a size line comes next
        self.skip = 0
        self.events = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def send(self, client: Client, prompt: str) -> None:
        assert self.transport is not None
        self.client, self.buffer, self.in_body, self.need, self.skip, self.events = client, b"", False, 0, 0, b""
        body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": prompt}], "stream": True})
        self.transport.write(
            f"POST {_UPSTREAM_PATH} HTTP/1.1\r\nHost: {_URL.netloc}\r\nContent-Type: application/json\r\n"
            f"Accept: text/event-stream\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode()
        )

    def data_received(self, data: bytes) -> None:
        buf = self.buffer + data
        pos, end, body = 0, len(buf), []
        finished = False
        if not self.in_body:
            head_end = buf.find(b"\r\n\r\n")
            if head_end < 0:
                self.buffer = buf
                return
            pos, self.in_body = head_end + 4, True
        while pos < end:
            if self.skip:  # the CRLF after a chunk's data
                take = min(self.skip, end - pos)
                pos += take
                self.skip -= take
                continue
            if self.need:
                take = min(self.need, end - pos)
                body.append(buf[pos : pos + take])
                pos += take
                self.need -= take
                if not self.need:
                    self.skip = 2
                continue
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                break
            size = int(buf[pos:eol], 16)
            pos = eol + 2
            if size == 0:
                finished = True
                pos = min(end, pos + 2)
                break
            self.need = size
        self.buffer = buf[pos:]
        self.events += b"".join(body)
        *complete, self.events = self.events.split(b"\n\n")
        frames = []
        for event in complete:
            if not event.startswith(b"data: ") or event == b"data: [DONE]":
                continue
            choices = json.loads(event[6:]).get("choices")
            text = choices[0]["delta"].get("content") if choices else None
            if text:
                frame = b"data: %s\n\n" % json.dumps({"content": text}).encode()
                frames.append(b"%x\r\n%s\r\n" % (len(frame), frame))
        client = self.client
        if client is not None and client.transport is not None:
            if finished:
                frames.append(_LAST)
            if frames:
                client.transport.write(b"".join(frames))
        if finished:
            self.client = None
            self.pool.append(self)
            if client is not None:
                client.finished()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self in self.pool:
            self.pool.remove(self)
        if self.client is not None and self.client.transport is not None:
            self.client.transport.abort()


class Client(asyncio.Protocol):
    def __init__(self, pool: list[Upstream]) -> None:
        self.loop = asyncio.get_running_loop()
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.upstream: Upstream | None = None
        self.buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.upstream is None:
            self.next_request()

    def next_request(self) -> None:
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0 or self.transport is None:
            return
        head, self.buffer = self.buffer[:end], self.buffer[end + 4 :]
        query = parse_qs(urlsplit(head.split(b" ", 2)[1].decode()).query)
        self.transport.write(_HEAD)
        self.loop.create_task(self.relay(query["prompt"][0]))

    async def relay(self, prompt: str) -> None:
        if self.pool:
            upstream = self.pool.pop()
        else:
            _, upstream = await self.loop.create_connection(lambda: Upstream(self.pool), *_UPSTREAM_ADDRESS)
        if self.transport is None:  # the client left while the connection was opening
            self.pool.append(upstream)
            return
        self.upstream = upstream
        upstream.send(self, prompt)

    def finished(self) -> None:
        self.upstream = None
        self.next_request()

    def pause_writing(self) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        upstream, self.upstream = self.upstream, None
        if upstream is not None and upstream.transport is not None:
            upstream.client = None
            upstream.transport.close()  # mid-reply: the upstream connection cannot be reused, and stops generating


async def _serve(port: int) -> None:
    pool: list[Upstream] = []
    server = await asyncio.get_running_loop().create_server(lambda: Client(pool), "127.0.0.1", port, backlog=BACKLOG)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    use_uvloop()
    asyncio.run(_serve(parser.parse_args().port))


if __name__ == "__main__":
    main()
