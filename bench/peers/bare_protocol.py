"""The practical ceiling: a bare ``asyncio.Protocol`` HTTP/1.1 server, no framework, serving the same payload.

``--mode ceiling`` encodes each token when it is due and writes it as its own chunk: one ``transport.write`` per
frame, streams interleaved through ``call_soon`` (``call_at`` the due time when paced), flow control respected.
That is the floor of what any asyncio server pays per frame; a server can beat it only by writing frames that are
already waiting together. ``&batch=K`` (zero delay only) gives it the batching a model's stream can give a server:
K frames, each encoded on its own, in one write.

``--mode blast`` writes the whole pre-encoded response in one write: no server can be cheaper, so it measures the
load client's own ceiling.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import cast
from urllib.parse import parse_qs, urlsplit

from bench.peers._common import BACKLOG, HEARTBEAT, tokens, use_uvloop

_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)
_DONE = b"data: [DONE]\n\n"
_LAST = b"%x\r\n%s\r\n0\r\n\r\n" % (len(_DONE), _DONE)
_PING = b"%x\r\n%s\r\n" % (len(b": ping\n\n"), b": ping\n\n")


def _chunk(frame: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(frame), frame)


class _HTTPProtocol(asyncio.Protocol):
    """Keep-alive request parsing shared by both modes: one response at a time, pipelined requests wait."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.busy:
            self.next_request()

    def next_request(self) -> None:
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0 or self.transport is None or self.transport.is_closing():
            return
        head, self.buffer = self.buffer[:end], self.buffer[end + 4 :]
        url = urlsplit(head.split(b" ", 2)[1].decode())
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        self.busy = True
        self.respond(url.path, query)

    def finished(self) -> None:
        self.busy = False
        self.next_request()

    def respond(self, path: str, query: dict[str, str]) -> None:
        raise NotImplementedError


class CeilingProtocol(_HTTPProtocol):
    def __init__(self) -> None:
        super().__init__()
        self.tokens: list[str] = []
        self.index = 0
        self.delay = 0.0
        self.batch = 1
        self.started = 0.0
        self.paused = False
        self.stalled = False
        self.timer: asyncio.Handle | None = None

    def respond(self, path: str, query: dict[str, str]) -> None:
        assert self.transport is not None
        self.transport.write(_HEAD)
        if path == "/idle":
            self.timer = self.loop.call_soon(self._ping)
            return
        self.tokens = tokens()[: int(query.get("n", "0"))]
        self.index = 0
        self.delay = float(query.get("delay", "0"))
        self.batch = 1 if self.delay else max(1, int(query.get("batch", "1")))
        self.started = self.loop.time()
        self._schedule()

    def _schedule(self) -> None:
        if self.delay:
            self.timer = self.loop.call_at(self.started + (self.index + 1) * self.delay, self._step)
        else:
            self.timer = self.loop.call_soon(self._step)

    def _step(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if self.paused:
            self.stalled = True
            return
        if self.index == len(self.tokens):
            self.transport.write(_LAST)
            self.finished()
            return
        if self.batch > 1:
            batch = self.tokens[self.index : self.index + self.batch]
            self.index += len(batch)
            chunks = b"".join(_chunk(f"data: {json.dumps({'content': t})}\n\n".encode()) for t in batch)
            if self.index == len(self.tokens):
                self.transport.write(chunks + _LAST)
                self.finished()
                return
            self.transport.write(chunks)
            self._schedule()
            return
        token = self.tokens[self.index]
        self.index += 1
        frame = f"data: {json.dumps({'content': token})}\n\n".encode()
        if self.index == len(self.tokens):
            self.transport.write(_chunk(frame) + _LAST)
            self.finished()
            return
        self.transport.write(_chunk(frame))
        self._schedule()

    def _ping(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self.transport.write(_PING)
        self.timer = self.loop.call_later(HEARTBEAT, self._ping)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.stalled:
            self.stalled = False
            self.timer = self.loop.call_soon(self._step)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.timer is not None:
            self.timer.cancel()


_BLASTS: dict[int, bytes] = {}


def _blast(n: int) -> bytes:
    body = _BLASTS.get(n)
    if body is None:
        frames = b"".join(_chunk(f"data: {json.dumps({'content': t})}\n\n".encode()) for t in tokens()[:n])
        body = _BLASTS[n] = _HEAD + frames + _LAST
    return body


class BlastProtocol(_HTTPProtocol):
    def respond(self, path: str, query: dict[str, str]) -> None:
        assert self.transport is not None
        self.transport.write(_blast(int(query.get("n", "0"))))
        self.finished()


async def _serve(port: int, mode: str) -> None:
    loop = asyncio.get_running_loop()
    factory = CeilingProtocol if mode == "ceiling" else BlastProtocol
    server = await loop.create_server(factory, "127.0.0.1", port, backlog=BACKLOG)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--mode", choices=("ceiling", "blast"), default="ceiling")
    args = parser.parse_args()
    use_uvloop()
    asyncio.run(_serve(args.port, args.mode))


if __name__ == "__main__":
    main()
