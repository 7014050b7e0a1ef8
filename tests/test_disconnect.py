"""`server/disconnect.py`: a client's end is seen in the callback in which it arrives, and `close_now` ends a
connection on the wire before the event loop runs anything else.

The checks that matter block the event loop on purpose (a blocking ``recv`` or ``select`` with a generous bound):
only the kernel can deliver a FIN then, so they pass only if it was sent before the loop was given back, and
never by waiting for it.
"""

from __future__ import annotations

import asyncio
import select
import socket
import struct
from collections.abc import Callable, Coroutine
from typing import Any, cast

import pytest
import uvloop
from aiohttp import web

from server.app import setup
from server.disconnect import close_now, watch_disconnect
from server.generation import Generation
from server.observe import Observers, StreamObserver
from server.state import RELAY

from .conftest import ServeApp, upstream_config
from .fake_upstream import Behavior, FakeUpstream
from .raw_http import connect, read_head, reset
from .scripted import wait_until

LOOPS: dict[str, Callable[[Coroutine[Any, Any, Any]], Any]] = {"asyncio": asyncio.run, "uvloop": uvloop.run}
# How long a check that blocks the loop waits for the kernel: far more than loopback ever needs.
KERNEL_BOUND = 5.0


class _Accepted(asyncio.Protocol):
    def __init__(self, made: asyncio.Future[asyncio.Transport]) -> None:
        self._made = made

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._made.set_result(cast(asyncio.Transport, transport))


async def _accepted_pair() -> tuple[asyncio.Transport, socket.socket, asyncio.Server]:
    """A server-side transport of the running loop, and its peer: a plain blocking socket the test reads itself."""
    loop = asyncio.get_running_loop()
    made: asyncio.Future[asyncio.Transport] = loop.create_future()
    server = await loop.create_server(lambda: _Accepted(made), "127.0.0.1", 0)
    peer = socket.create_connection(server.sockets[0].getsockname()[:2])
    return await asyncio.wait_for(made, KERNEL_BOUND), peer, server


def _peer_sees_the_end(peer: socket.socket) -> bool:
    """Blocks the loop: True if the connection's end reaches `peer` (EOF, or a reset) without the loop running."""
    peer.settimeout(KERNEL_BOUND)
    try:
        return peer.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_close_now_ends_the_connection_before_the_loop_runs_again(loop: str) -> None:
    # Where abort() alone would only queue the close for the loop's next turn, which this test never gives it.
    async def scenario() -> tuple[bool, bool]:
        transport, peer, server = await _accepted_pair()
        try:
            close_now(transport)
            return _peer_sees_the_end(peer), transport.is_closing()
        finally:
            peer.close()
            server.close()
            await server.wait_closed()

    assert LOOPS[loop](scenario()) == (True, True)


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_close_now_after_the_peer_reset_the_connection(loop: str) -> None:
    async def scenario() -> bool:
        transport, peer, server = await _accepted_pair()
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        peer.close()  # a reset the loop has not seen yet: shutdown(2) fails, abort() still closes
        try:
            close_now(transport)
            close_now(transport)  # and again, once it is closing
            return transport.is_closing()
        finally:
            server.close()
            await server.wait_closed()

    assert LOOPS[loop](scenario())


@pytest.mark.parametrize("how", ["close", "reset"])
async def test_a_clients_end_is_seen_once_and_a_close_in_the_callback_it_arrives_in(serve: ServeApp, how: str) -> None:
    # aiohttp learns of a closed connection in connection_lost, which clears request.transport; a close (FIN) is
    # seen before that, in the read callback that found it: the stream's own work does not wait a loop turn.
    # A reset has no such callback and is seen through connection_lost.
    calls: list[bool] = []
    lost = asyncio.Event()
    requests: list[web.Request] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        requests.append(request)
        response = web.StreamResponse()
        await response.prepare(request)

        def on_lost() -> None:
            calls.append(request.transport is not None)
            lost.set()

        with watch_disconnect(request, on_lost):
            await response.write(b"ready")
            await lost.wait()
        return response

    app = web.Application()
    app.router.add_get("/", handler)
    base = await serve(app)
    reader, writer = await connect(base)
    writer.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert (await read_head(reader))[0] == 200
    assert await reader.readuntil(b"ready") == b"5\r\nready"
    if how == "close":
        writer.close()
    else:
        reset(writer)
    await asyncio.wait_for(lost.wait(), KERNEL_BOUND)
    await wait_until(lambda: requests[0].transport is None)  # aiohttp's connection_lost has come too
    assert calls == ([True] if how == "close" else [False])  # and called back no second time


async def test_the_upstream_is_told_in_the_callback_in_which_the_last_client_leaves(
    fake_upstream: FakeUpstream, serve: ServeApp
) -> None:
    # The real openai client against the fake upstream. When the only reader's client closes, the relay ends the
    # upstream connection on the wire first: before its own record of the end (the observers are told after it),
    # and in the very callback that saw the client's FIN (aiohttp has not processed the closed connection yet).
    fake_upstream.behavior = Behavior(tokens=["a"] * 10_000, delay=0.01)
    clients: list[web.BaseRequest] = []

    @web.middleware
    async def remember(request: web.Request, handler: Any) -> web.StreamResponse:
        clients.append(request)
        response: web.StreamResponse = await handler(request)
        return response

    host = web.Application(middlewares=[remember])
    api = setup(host, upstream_config(fake_upstream))
    told: list[tuple[bool, bool]] = []

    class WhenTheStreamEnds(StreamObserver):
        def stream_ended(self, generation: Generation) -> None:
            upstream = fake_upstream.last.transport
            assert upstream is not None
            # Blocks the loop: the upstream's socket turns readable only with the relay's FIN (it sends nothing else
            # after its request), which the loop cannot send from here.
            readable, _, _ = select.select([upstream.get_extra_info("socket").fileno()], [], [], KERNEL_BOUND)
            told.append((bool(readable), clients[-1].transport is not None))

    streams = api[RELAY].streams
    streams.observer = Observers([streams.observer, WhenTheStreamEnds()])
    base = await serve(host)
    reader, writer = await connect(base)
    writer.write(b"GET /api/chat?prompt=x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert (await read_head(reader))[0] == 200
    await asyncio.wait_for(reader.readuntil(b"\n\n"), KERNEL_BOUND)  # the first token: the upstream is streaming
    writer.close()
    async with asyncio.timeout(2 * KERNEL_BOUND):
        while not told:
            await asyncio.sleep(0.01)
    assert told == [(True, True)]
    await asyncio.wait_for(fake_upstream.last.client_gone.wait(), KERNEL_BOUND)
    assert not fake_upstream.last.completed


async def test_of_several_readers_only_the_last_one_leaving_ends_the_upstream(
    fake_upstream: FakeUpstream, serve: ServeApp
) -> None:
    # The policy stays the registry's: a client leaving sooner does not end a generation another one still reads.
    fake_upstream.behavior = Behavior(tokens=["a"] * 10_000, delay=0.01)
    host = web.Application()
    setup(host, upstream_config(fake_upstream))
    base = await serve(host)
    first_reader, first = await connect(base)
    first.write(b"GET /api/chat?prompt=x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    status, headers = await read_head(first_reader)
    assert status == 200
    second_reader, second = await connect(base)
    second.write(f"GET /api/streams/{headers['x-stream-id']}?after=0 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    assert (await read_head(second_reader))[0] == 200
    seen = fake_upstream.last
    first.close()
    # The second reader goes on getting new tokens: the generation, and its upstream request, run on.
    await asyncio.wait_for(second_reader.readuntil(b"\n\n"), KERNEL_BOUND)
    sent = seen.tokens_sent
    while seen.tokens_sent < sent + 3:
        await asyncio.wait_for(second_reader.readuntil(b"\n\n"), KERNEL_BOUND)
    assert not seen.client_gone.is_set()
    second.close()
    await asyncio.wait_for(seen.client_gone.wait(), KERNEL_BOUND)
    assert not seen.completed
    assert len(fake_upstream.seen) == 1
