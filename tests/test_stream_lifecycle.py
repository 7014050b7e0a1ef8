"""A stream's life in the one-task design (server/stream.py): one task iterates the provider itself, one timer
drives the clocks, a short side task writes heartbeats and flush-window ends, and the stream's own timeouts,
disconnects and shutdown cancel that task, which must end the stream and carry on; a cancellation from outside
(the host's) must go on through.

Everything runs over real loopback sockets. A raw socket is used where the test needs to control reading (a
client that stalls) or to reuse one keep-alive connection for a second request."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import json
import logging
import socket
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from server import stream as stream_module
from server.app import create_relay_app
from server.chat_request import ChatRequest
from server.config import Config
from server.errors import UpstreamError, UpstreamUnavailable
from server.events import Delta, Done, Event
from server.state import RELAY, StreamRegistry
from server.stream import RelayStream

from .conftest import ServeApp
from .wire import ndjson_objects, sse_events

BASE = Config(provider="demo", limits_enabled=False, heartbeat=0.0)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# What the scripted provider is told to do next: yield a batch, raise, or (None) end without a terminal event.
Step = Sequence[Event] | BaseException | None

SSE_PING = b": ping\n\n"
NDJSON_PING = b'{"type":"ping"}\n'


class ScriptedProvider:
    """Yields exactly the batches the test puts in its queue, raises the exceptions put there; `None` ends the
    generator. Counts streams opened and closed (the generator's ``finally``) and batches pulled."""

    name = "scripted"

    def __init__(self) -> None:
        self.steps: asyncio.Queue[Step] = asyncio.Queue()
        self.started = asyncio.Event()
        self.closed = asyncio.Event()
        self.opened = 0
        self.finished = 0
        self.pulls = 0

    async def stream(self, request: ChatRequest) -> AsyncGenerator[Sequence[Event], None]:
        self.opened += 1
        self.closed.clear()
        self.started.set()
        try:
            while (step := await self.next_step()) is not None:
                if isinstance(step, BaseException):
                    raise step
                self.pulls += 1
                yield step
        finally:
            self.finished += 1
            self.closed.set()

    async def next_step(self) -> Step:
        """What the test put next (the upstream's next read)."""
        return await self.steps.get()

    def put(self, *steps: Step) -> None:
        for step in steps:
            self.steps.put_nowait(step)

    async def aclose(self) -> None:
        return None


class EndlessProvider:
    """Always has another batch ready (one big delta), up to `cap`; counts how many the relay pulled."""

    name = "endless"

    def __init__(self, size: int, cap: int) -> None:
        self.size = size
        self.cap = cap
        self.pulls = 0
        self.started = asyncio.Event()
        self.closed = asyncio.Event()
        self.finished = 0

    async def stream(self, request: ChatRequest) -> AsyncGenerator[Sequence[Event], None]:
        self.started.set()
        chunk = "x" * self.size
        try:
            while self.pulls < self.cap:
                self.pulls += 1
                yield [Delta(chunk)]
                await asyncio.sleep(0)  # ready at once, but cooperative, like the demo provider at full speed
            yield [Done("stop")]
        finally:
            self.finished += 1
            self.closed.set()

    async def aclose(self) -> None:
        return None


# -- helpers ------------------------------------------------------------------------------------------------------


class RecordingRegistry(StreamRegistry):
    """The app's stream registry, also remembering every stream, the outcome each left with and, as each one
    leaves (after its run() returned), how many provider generators had been closed by then."""

    def __init__(self, closed_count: Callable[[], int]) -> None:
        super().__init__()
        self.closed_count = closed_count
        self.seen: list[RelayStream] = []
        self.outcomes: list[str] = []
        self.closed_at_end: list[int] = []

    def add(self, stream: RelayStream) -> None:
        self.seen.append(stream)
        super().add(stream)

    def discard(self, stream: RelayStream) -> None:
        self.outcomes.append(stream.outcome)
        self.closed_at_end.append(self.closed_count())
        super().discard(stream)


def _relay_host(
    config: Config, provider: object, *, middlewares: Sequence[Any] = (), prepare_delay: float = 0.0
) -> tuple[web.Application, web.Application]:
    """The relay mounted under /api of a host app; with `prepare_delay`, the host has an on_response_prepare
    hook that takes that long (as one that awaits something would), so a write that prepares the response waits
    there for a while."""
    host = web.Application(middlewares=list(middlewares))
    if prepare_delay:

        async def slow_prepare(request: web.Request, response: web.StreamResponse) -> None:
            await asyncio.sleep(prepare_delay)

        host.on_response_prepare.append(slow_prepare)
    api = create_relay_app(config, provider=provider)  # type: ignore[arg-type]
    api[RELAY].streams = RecordingRegistry(lambda: getattr(provider, "finished", 0))
    host.add_subapp("/api", api)
    return host, api


def host_deadline(seconds: float, answer: Callable[[], web.StreamResponse]) -> Any:
    """A host middleware with a deadline of its own on the handler: when it falls, `answer()` (from the handler's
    task, after the stream has unwound) gives the host's response, or raises."""

    @web.middleware
    async def deadline(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            async with asyncio.timeout(seconds):
                return await handler(request)
        except TimeoutError:
            return answer()

    return deadline


class TaskProbe:
    """A host middleware noting how the handler's task stands once the handler is done: "cancelled" if a
    cancellation came out of it, else "returned" with the task's cancellation count and whether a cancellation
    was still pending (it would have hit the host's next await)."""

    __middleware_version__ = 1  # what @web.middleware marks

    def __init__(self) -> None:
        self.after: list[tuple[str, int, bool]] = []

    async def __call__(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        task = asyncio.current_task()
        assert task is not None
        try:
            response = await handler(request)
        except asyncio.CancelledError:
            self.after.append(("cancelled", task.cancelling(), False))
            raise
        count = task.cancelling()
        try:
            await asyncio.sleep(0)
        except asyncio.CancelledError:
            self.after.append(("returned", count, True))
            raise
        self.after.append(("returned", count, False))
        return response


def _registry(api: web.Application) -> RecordingRegistry:
    registry = api[RELAY].streams
    assert isinstance(registry, RecordingRegistry)
    return registry


async def _serve_scripted(
    serve: ServeApp, config: Config, **host_options: Any
) -> tuple[str, ScriptedProvider, web.Application]:
    provider = ScriptedProvider()
    host, api = _relay_host(config, provider, **host_options)
    return await serve(host), provider, api


def _address(base: str) -> tuple[str, int]:
    host, port = base.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


_raw_clients: list[asyncio.StreamWriter] = []


@pytest.fixture(autouse=True)
async def _close_raw_clients() -> AsyncIterator[None]:
    """Raw client connections are closed after each test, also when it failed half way."""
    yield
    while _raw_clients:
        await _close(_raw_clients.pop())


async def _connect(base: str, *, rcvbuf: int | None = None) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw client connection; with `rcvbuf`, a small fixed receive buffer (set before connecting, so the
    kernel cannot autotune it) and a reader that stops reading the socket past about twice that."""
    host, port = _address(base)
    if rcvbuf is None:
        reader, writer = await asyncio.open_connection(host, port)
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, (host, port))
        except BaseException:
            sock.close()
            raise
        reader, writer = await asyncio.open_connection(sock=sock, limit=rcvbuf)
    _raw_clients.append(writer)
    return reader, writer


def _send_get(writer: asyncio.StreamWriter, path: str) -> None:
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return status, headers


async def _read_chunk(reader: asyncio.StreamReader) -> bytes:
    """One chunk of a chunked body; b"" for the last one."""
    size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
    if size == 0:
        assert await reader.readuntil(b"\r\n") == b"\r\n"  # no trailers
        return b""
    data = await reader.readexactly(size)
    assert await reader.readexactly(2) == b"\r\n"
    return data


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = bytearray()
        while chunk := await _read_chunk(reader):
            body += chunk
        return bytes(body)
    return await reader.readexactly(int(headers.get("content-length", "0")))


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response: status, headers (lower-case names) and the body (chunked or sized)."""
    status, headers = await _read_head(reader)
    return status, headers, await _read_body(reader, headers)


def _dechunk(raw: bytes) -> bytes:
    """The body of a complete chunked encoding."""
    body = bytearray()
    at = 0
    while True:
        end = raw.index(b"\r\n", at)
        size = int(raw[at:end].split(b";")[0], 16)
        if size == 0:
            return bytes(body)
        body += raw[end + 2 : end + 2 + size]
        at = end + 2 + size + 2


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


async def _the_stream(api: web.Application, timeout: float = 5.0) -> RelayStream:
    """The latest stream of `api`, once it is registered (it may have ended since)."""
    registry = _registry(api)
    async with asyncio.timeout(timeout):
        while not registry.seen:
            await asyncio.sleep(0.005)
    return registry.seen[-1]


async def _wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


async def _assert_released(registry: RecordingRegistry, index: int = 0) -> None:
    """Nothing but the test's own record holds the ended stream: no armed timer (its bound method), no side task
    or unfinished handler (their frames), no callback left on the connection."""
    here = inspect.currentframe()
    for _ in range(50):
        gc.collect()
        holders = [h for h in gc.get_referrers(registry.seen[index]) if h is not registry.seen and h is not here]
        if not holders:
            return
        described = [repr(h) for h in holders]
        del holders  # or this list would keep them alive through the next collection
        await asyncio.sleep(0.01)
    raise AssertionError(f"the ended stream is still held by {described}")


def _relay_tasks() -> list[asyncio.Task[Any]]:
    """Server-side tasks of a request or of a stream that are still running."""
    running = []
    for task in asyncio.all_tasks():
        name = getattr(task.get_coro(), "__qualname__", "")
        if not task.done() and (name == "RequestHandler._handle_request" or name.startswith("RelayStream.")):
            running.append(task)
    return running


async def _serves_another_stream(
    provider: ScriptedProvider, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """The keep-alive connection serves the next stream, start to end, then is closed."""
    provider.put([Delta("b"), Done("stop")], None)
    _send_get(writer, "/api/chat?prompt=y")
    status, _, body = await asyncio.wait_for(_read_response(reader), 5)
    assert status == 200
    assert [kind for kind, _, _ in sse_events(body)] == ["message", "done"]
    await _close(writer)


def _side_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in _relay_tasks() if getattr(t.get_coro(), "__qualname__", "") == "RelayStream._side"]


def _split_frames(body: bytes, ping: bytes, frames: Sequence[bytes]) -> list[bytes]:
    """Split `body` into whole pieces, each a ping or the next expected frame, in order; fails on anything else
    (a frame out of order, cut, repeated or missing)."""
    pieces: list[bytes] = []
    at = 0
    expected = iter(frames)
    want = next(expected, None)
    while at < len(body):
        if body.startswith(ping, at):
            pieces.append(ping)
            at += len(ping)
        elif want is not None and body.startswith(want, at):
            pieces.append(want)
            at += len(want)
            want = next(expected, None)
        else:
            raise AssertionError(f"unexpected bytes at {at}: {body[at : at + 80]!r} (next frame: {want!r})")
    assert want is None, f"frame never arrived: {want!r}"
    return pieces


def _sse_delta(seq: int, text: str) -> bytes:
    return f'id: {seq}\ndata: {{"content":"{text}"}}\n\n'.encode()


def _ndjson_delta(text: str) -> bytes:
    return f'{{"type":"delta","content":"{text}"}}\n'.encode()


# -- (a) no read-ahead --------------------------------------------------------------------------------------------


async def test_a_stalled_client_stops_the_provider_being_pulled_and_the_buffer_stays_bounded(serve: ServeApp) -> None:
    seen: list[web.Request] = []

    @web.middleware
    async def remember(request: web.Request, handler: Handler) -> web.StreamResponse:
        seen.append(request)
        return await handler(request)

    size, cap = 16_000, 2_000  # 32 MB on offer: far more than any socket buffer along the way
    provider = EndlessProvider(size, cap)
    host, api = _relay_host(BASE.with_changes(write_timeout=1.0, send_buffer=32_768), provider, middlewares=[remember])
    base = await serve(host)
    reader, writer = await _connect(base, rcvbuf=16_384)
    _send_get(writer, "/api/chat?prompt=x&format=ndjson")  # and then read nothing
    await asyncio.wait_for(provider.started.wait(), 5)
    (request,) = seen
    assert request.transport is not None

    # Wait until the relay stops pulling: the count holds still for a while, with batches still on offer.
    last, still = -1, 0
    async with asyncio.timeout(5):
        while still < 5:
            await asyncio.sleep(0.04)
            still = still + 1 if provider.pulls == last else 0
            last = provider.pulls
    assert not provider.closed.is_set(), "the stream ended before the write timeout"
    assert request.protocol.writing_paused, "the relay stopped pulling although the transport could take more"
    # Only what fits in the socket buffers, the transport's high-water mark and one write group was pulled:
    # nothing was read ahead into memory for a client that does not read.
    assert provider.pulls * size < 1_000_000, f"{provider.pulls} batches pulled for a stalled client"
    assert request.transport.get_write_buffer_size() < 256 * 1024
    await asyncio.sleep(0.3)
    assert provider.pulls == last, "the provider was pulled again while the client still read nothing"

    # The write timeout drops the client; the provider is closed and nothing more was pulled.
    await asyncio.wait_for(provider.closed.wait(), 5)
    assert provider.pulls == last
    assert await api[RELAY].streams.wait_empty(5)
    assert _registry(api).outcomes == ["slow_client"]
    assert _registry(api).closed_at_end == [1]
    received = 0
    with contextlib.suppress(ConnectionError):
        while chunk := await asyncio.wait_for(reader.read(1 << 16), 5):
            received += len(chunk)
    assert received < 1_000_000
    await _close(writer)


# -- (b) side-task writes keep the frame order ----------------------------------------------------------------------


@pytest.mark.parametrize("framing", ["sse", "ndjson"])
async def test_heartbeats_written_while_the_provider_waits_and_frames_arrive_in_order_byte_exact(
    serve: ServeApp, http: aiohttp.ClientSession, framing: str
) -> None:
    interval = 0.01
    config = BASE.with_changes(heartbeat=interval, ndjson_keepalive=True)
    base, provider, _ = await _serve_scripted(serve, config)
    request = asyncio.create_task(http.get(f"{base}/api/chat", params={"prompt": "x", "format": framing}))
    await asyncio.wait_for(provider.started.wait(), 5)
    await asyncio.sleep(3.5 * interval)  # heartbeats before the first token (they also send the head)
    # Tokens at gaps around the heartbeat interval, so that many arrive just as a heartbeat falls due and the
    # side task is still writing or about to; then a quiet spell in the middle of the reply.
    gaps = [0.0, 0.009, 0.01, 0.0105, 0.011, 0.002, 0.0, 0.012, 0.0098, 0.0102]
    count = 60
    for i in range(count):
        provider.put([Delta(f"t{i}")])
        await asyncio.sleep(gaps[i % len(gaps)])
        if i == count // 2:
            await asyncio.sleep(4 * interval)
    provider.put([Done("stop")], None)
    async with await request as resp:
        assert resp.status == 200
        body = await asyncio.wait_for(resp.read(), 5)
    if framing == "sse":
        ping = SSE_PING
        frames = [_sse_delta(i + 1, f"t{i}") for i in range(count)]
        frames.append(f'id: {count + 1}\nevent: done\ndata: {{"finish_reason":"stop"}}\n\n'.encode())
    else:
        ping = NDJSON_PING
        frames = [_ndjson_delta(f"t{i}") for i in range(count)]
        frames.append(b'{"type":"done","finish_reason":"stop"}\n')
    pieces = _split_frames(body, ping, frames)
    assert pieces[0] == ping
    assert body.replace(ping, b"") == b"".join(frames)
    # Heartbeats were also written by the side task in the middle of the reply, between whole frames.
    first, last = pieces.index(frames[0]), pieces.index(frames[-1])
    assert ping in pieces[first:last]


async def test_frames_released_by_the_flush_window_and_heartbeats_stay_in_order(
    serve: ServeApp, http: aiohttp.ClientSession
) -> None:
    # Both kinds of side-task writes (held frames at the window's end, heartbeats) interleaved with the main
    # task's own writes (frames over flush_bytes, the terminal frame).
    config = BASE.with_changes(heartbeat=0.01, flush_window=0.015, flush_bytes=100)
    base, provider, _ = await _serve_scripted(serve, config)
    request = asyncio.create_task(http.get(f"{base}/api/chat", params={"prompt": "x"}))
    await asyncio.wait_for(provider.started.wait(), 5)
    count = 40
    for i in range(count):
        provider.put([Delta(f"t{i}")] if i % 5 else [Delta(f"t{i}"), Delta(f"t{i}b"), Delta(f"t{i}c")])
        await asyncio.sleep((0.0, 0.004, 0.02, 0.011, 0.03)[i % 5])
    provider.put([Done("stop")], None)
    async with await request as resp:
        body = await asyncio.wait_for(resp.read(), 5)
    frames: list[bytes] = []
    for i in range(count):
        texts = [f"t{i}"] if i % 5 else [f"t{i}", f"t{i}b", f"t{i}c"]
        frames.extend(_sse_delta(len(frames) + 1, text) for text in texts)
    frames.append(f'id: {len(frames) + 1}\nevent: done\ndata: {{"finish_reason":"stop"}}\n\n'.encode())
    _split_frames(body, SSE_PING, frames)


# -- (c) timeouts while a side-task write is pending ------------------------------------------------------------------


async def test_first_token_timeout_after_heartbeats_is_in_band(serve: ServeApp, http: aiohttp.ClientSession) -> None:
    # The heartbeats already sent the 200 head: the timeout must come in band, after whole heartbeats.
    base, provider, api = await _serve_scripted(serve, BASE.with_changes(heartbeat=0.03, first_token_timeout=0.2))
    async with http.get(f"{base}/api/chat", params={"prompt": "x"}) as resp:
        stream = await _the_stream(api)
        assert resp.status == 200
        body = await asyncio.wait_for(resp.read(), 5)
    error = (
        b'id: 1\nevent: error\ndata: {"error":{"type":"timeout",'
        b'"message":"the model did not start answering in time"}}\n\n'
    )
    assert body.endswith(error)
    assert body.removesuffix(error) == SSE_PING * body.count(SSE_PING)
    assert body.count(SSE_PING) >= 3
    assert provider.closed.is_set()
    assert stream.outcome == "timeout"


async def test_a_timeout_due_with_a_heartbeat_wins_over_it(serve: ServeApp, http: aiohttp.ClientSession) -> None:
    # Both clocks fall due at the same instant: no heartbeat goes out first, so the timeout is still a status.
    base, provider, _ = await _serve_scripted(serve, BASE.with_changes(heartbeat=0.15, first_token_timeout=0.15))
    async with http.get(f"{base}/api/chat", params={"prompt": "x"}) as resp:
        assert resp.status == 504
        assert (await resp.json())["error"]["type"] == "timeout"
    assert provider.closed.is_set()


async def test_idle_timeout_while_a_side_write_waits_on_a_stalled_client(serve: ServeApp) -> None:
    # A flush window's end hands a large held frame to the side task; the client reads nothing, so that write
    # waits. Meanwhile the provider is silent: the idle timeout must still fire, close the provider at once
    # (not when the write finishes), and end the stream in band, after the frame, once the client reads again.
    config = BASE.with_changes(
        flush_window=0.02, idle_timeout=0.3, write_timeout=5.0, heartbeat=0.05, send_buffer=32_768
    )
    base, provider, api = await _serve_scripted(serve, config)
    reader, writer = await _connect(base, rcvbuf=16_384)
    _send_get(writer, "/api/chat?prompt=x")
    await asyncio.wait_for(provider.started.wait(), 5)
    stream = await _the_stream(api)
    big = "y" * 2_000_000
    provider.put([Delta(big)])
    loop = asyncio.get_running_loop()
    put_at = loop.time()
    await asyncio.wait_for(provider.closed.wait(), 3)
    # Closed by the idle clock, well before the 5 s write timeout, while the held frame still waits to be read.
    assert loop.time() - put_at < 2.0
    assert stream.outcome == "running"
    status, _, body = await asyncio.wait_for(_read_response(reader), 10)
    assert status == 200
    events = sse_events(body)
    assert [kind for kind, _, _ in events] == ["message", "error"]
    assert events[0][1]["content"] == big
    assert events[1][1]["error"] == {"type": "timeout", "message": "the model stopped answering mid-reply"}
    assert [event_id for _, _, event_id in events] == ["1", "2"]
    assert await api[RELAY].streams.wait_empty(5)
    assert stream.outcome == "timeout"
    assert _registry(api).closed_at_end == [1]
    await _close(writer)


async def test_a_reply_arriving_while_a_heartbeat_write_is_pending_waits_for_it(
    serve: ServeApp, http: aiohttp.ClientSession
) -> None:
    # The first heartbeat's write prepares the response, and the host's prepare hook keeps it waiting; the reply
    # that arrives meanwhile must wait for that write (one head, the heartbeat, then the frames), not start a
    # response of its own.
    base, provider, api = await _serve_scripted(serve, BASE.with_changes(heartbeat=0.03), prepare_delay=0.15)
    request = asyncio.create_task(http.get(f"{base}/api/chat", params={"prompt": "x"}))
    await asyncio.wait_for(provider.started.wait(), 5)
    await asyncio.sleep(0.06)  # the heartbeat's write is under way, waiting in the prepare hook
    provider.put([Delta("a"), Done("stop")], None)
    async with await request as resp:
        assert resp.status == 200
        body = await asyncio.wait_for(resp.read(), 5)
    assert body == SSE_PING + b'id: 1\ndata: {"content":"a"}\n\nid: 2\nevent: done\ndata: {"finish_reason":"stop"}\n\n'
    assert _registry(api).outcomes == ["done"]


async def test_a_heartbeat_falling_due_while_the_first_frame_is_being_prepared_waits_for_it(
    serve: ServeApp, http: aiohttp.ClientSession
) -> None:
    # The other way round: the main task's first write prepares the response and waits in the host's prepare
    # hook while a heartbeat falls due. The heartbeat must not start a second response (or write before the
    # head); at most it follows the frame.
    base, provider, api = await _serve_scripted(serve, BASE.with_changes(heartbeat=0.03), prepare_delay=0.15)
    provider.put([Delta("a")])
    async with http.get(f"{base}/api/chat", params={"prompt": "x"}) as resp:
        assert resp.status == 200
        first = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 2)
        assert first == b'id: 1\ndata: {"content":"a"}\n\n'
        provider.put([Done("stop")], None)
        rest = await asyncio.wait_for(resp.read(), 5)
    assert rest.replace(SSE_PING, b"") == b'id: 2\nevent: done\ndata: {"finish_reason":"stop"}\n\n'
    assert _registry(api).outcomes == ["done"]


async def test_a_first_token_timeout_while_a_heartbeat_write_is_pending_ends_in_band_after_it(
    serve: ServeApp, http: aiohttp.ClientSession
) -> None:
    # The timeout falls due while the side task's heartbeat write still waits (in the prepare hook): the provider
    # is closed at once, and the stream ends in band once that write is done, since the head is on its way.
    config = BASE.with_changes(heartbeat=0.03, first_token_timeout=0.1)
    base, provider, api = await _serve_scripted(serve, config, prepare_delay=0.3)
    request = asyncio.create_task(http.get(f"{base}/api/chat", params={"prompt": "x"}))
    await asyncio.wait_for(provider.started.wait(), 5)
    await asyncio.wait_for(provider.closed.wait(), 5)
    assert not request.done()  # closed by the timeout, while the heartbeat's write still waits
    async with await request as resp:
        assert resp.status == 200
        body = await asyncio.wait_for(resp.read(), 5)
    assert body == SSE_PING + (
        b'id: 1\nevent: error\ndata: {"error":{"type":"timeout",'
        b'"message":"the model did not start answering in time"}}\n\n'
    )
    assert _registry(api).outcomes == ["timeout"]
    assert _registry(api).closed_at_end == [1]


# -- (d) handler_cancellation=True ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "when", ["before-first-token", "mid-stream", "while-a-write-waits", "while-a-heartbeat-write-is-pending"]
)
async def test_with_handler_cancellation_a_disconnect_closes_the_provider_and_leaves_nothing_running(
    when: str,
) -> None:
    # pytest-aiohttp's TestServer and some hosts run handler_cancellation=True: aiohttp then cancels the handler
    # task too. That cancellation comes from outside the stream and must go on, with the generator closed.
    provider = ScriptedProvider()
    probe = TaskProbe()
    pending = when == "while-a-heartbeat-write-is-pending"
    config = BASE.with_changes(write_timeout=10.0, send_buffer=32_768, heartbeat=0.03 if pending else 0.05)
    host, api = _relay_host(config, provider, middlewares=[probe], prepare_delay=0.5 if pending else 0.0)
    runner = web.AppRunner(host, access_log=None, handler_cancellation=True, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        host_, port = runner.addresses[0][:2]
        reader, writer = await _connect(f"http://{host_}:{port}", rcvbuf=16_384)
        _send_get(writer, "/api/chat?prompt=x")
        await asyncio.wait_for(provider.started.wait(), 5)
        if when == "mid-stream":
            provider.put([Delta("first")])
            await asyncio.wait_for(reader.readuntil(b'data: {"content":"first"}\n\n'), 5)
        elif when == "while-a-write-waits":
            provider.put([Delta("z" * 4_000_000)])  # far more than the buffers hold: the write waits
            await _wait_until(lambda: provider.pulls == 1)
            await asyncio.sleep(0.1)
        elif pending:
            await asyncio.sleep(0.1)  # the first heartbeat's write waits in the prepare hook
        writer.transport.abort()  # the client leaves (RST)
        await asyncio.wait_for(provider.closed.wait(), 5)
        registry = _registry(api)
        assert await registry.wait_empty(5)
        assert not _side_tasks()
        assert registry.outcomes == ["disconnected"]
        assert registry.closed_at_end == [1]  # closed before the handler ended, not later by the loop
        await _wait_until(lambda: not _relay_tasks())
        assert probe.after == [("cancelled", 1, False)]  # aiohttp's cancellation came out of the handler
        await _assert_released(registry)
        # The server still serves.
        provider.put([Delta("ok"), Done("stop")], None)
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://{host_}:{port}/api/chat", params={"prompt": "y"}) as resp,
        ):
            assert [kind for kind, _, _ in sse_events(await resp.read())] == ["message", "done"]
    finally:
        await runner.cleanup()


# -- (e) the generator is closed on every ending ----------------------------------------------------------------------

# name: (config changes, steps queued before the request (made fresh: a raised exception keeps its traceback,
# and so the frames it went through), status, outcome, type of the last frame or of the JSON error)
ENDINGS: dict[str, tuple[dict[str, Any], Callable[[], list[Step]], int, str, str]] = {
    "done": ({}, lambda: [[Delta("a")], [Delta("b"), Done("stop")], None], 200, "done", "done"),
    "done-provider-keeps-going": ({}, lambda: [[Delta("a"), Done("stop")]], 200, "done", "done"),
    "relay-error-mid-stream": ({}, lambda: [[Delta("a")], UpstreamError("boom")], 200, "error", "upstream_error"),
    "exception-mid-stream": ({}, lambda: [[Delta("a")], RuntimeError("kaput")], 200, "error", "internal_error"),
    "ended-without-terminal": ({}, lambda: [[Delta("a")], None], 200, "error", "internal_error"),
    "relay-error-before-first-token": (
        {},
        lambda: [UpstreamUnavailable("down")],
        502,
        "error",
        "upstream_unavailable",
    ),
    "exception-before-first-token": ({}, lambda: [RuntimeError("kaput")], 500, "error", "internal_error"),
    "first-token-timeout": ({"first_token_timeout": 0.1}, lambda: [], 504, "timeout", "timeout"),
    "idle-timeout": ({"idle_timeout": 0.1}, lambda: [[Delta("a")]], 200, "timeout", "timeout"),
    "total-timeout": ({"total_timeout": 0.2}, lambda: [[Delta("a")]], 200, "timeout", "timeout"),
}


@pytest.mark.parametrize("ending", list(ENDINGS))
async def test_the_provider_is_closed_and_the_stream_released_on_each_ending(
    serve: ServeApp, http: aiohttp.ClientSession, ending: str, caplog: pytest.LogCaptureFixture
) -> None:
    changes, steps, status, outcome, last = ENDINGS[ending]
    base, provider, api = await _serve_scripted(serve, BASE.with_changes(**changes))
    provider.put(*steps())
    with caplog.at_level(logging.ERROR, logger="llm_relay.stream"):
        async with http.get(f"{base}/api/chat", params={"prompt": "x", "format": "ndjson"}) as resp:
            assert resp.status == status
            body = await asyncio.wait_for(resp.read(), 5)
    if status != 200:
        assert resp.content_type == "application/json"
        assert json.loads(body)["error"]["type"] == last
    else:
        objects = ndjson_objects(body)
        assert objects[0] == {"type": "delta", "content": "a"}
        final = objects[-1]
        assert (final["type"] if final["type"] == "done" else final["error"]["type"]) == last
    await asyncio.wait_for(provider.closed.wait(), 5)
    assert provider.opened == provider.finished == 1
    registry = _registry(api)
    assert await registry.wait_empty(5)
    assert registry.outcomes == [outcome]
    assert registry.closed_at_end == [1]  # closed before the handler ended, not later by the loop
    # Only a provider that raised something other than a RelayError is logged as a failure.
    failed = [r for r in caplog.records if "the provider failed" in r.getMessage()]
    assert bool(failed) == ending.startswith("exception")
    for record in failed:
        record.exc_info = None  # the logged traceback holds the relay's frames, and so the stream
    await _assert_released(registry)


@pytest.mark.parametrize("when", ["before-first-token", "mid-stream", "while-a-heartbeat-write-is-pending"])
async def test_the_provider_is_closed_when_the_client_leaves(serve: ServeApp, when: str) -> None:
    pending = when == "while-a-heartbeat-write-is-pending"
    config = BASE.with_changes(heartbeat=0.03) if pending else BASE
    probe = TaskProbe()
    base, provider, api = await _serve_scripted(
        serve, config, prepare_delay=0.5 if pending else 0.0, middlewares=[probe]
    )
    reader, writer = await _connect(base)
    _send_get(writer, "/api/chat?prompt=x")
    await asyncio.wait_for(provider.started.wait(), 5)
    if when == "mid-stream":
        provider.put([Delta("first")])
        await asyncio.wait_for(reader.readuntil(b'data: {"content":"first"}\n\n'), 5)
    elif pending:
        await asyncio.sleep(0.1)  # the first heartbeat's write waits in the prepare hook
    writer.close()
    await asyncio.wait_for(provider.closed.wait(), 5)
    registry = _registry(api)
    assert await registry.wait_empty(5)
    # The side task was ended with the stream, not left to finish its write on its own.
    assert not _side_tasks()
    assert registry.outcomes == ["disconnected"]
    assert registry.closed_at_end == [1]
    await _wait_until(lambda: not _relay_tasks())
    # The stream cancelled the handler's task to stop, and took that back: the host's task came back clean.
    assert probe.after == [("returned", 0, False)]
    await _assert_released(registry)
    await _close(writer)


async def test_shutdown_closes_the_providers_of_open_streams() -> None:
    # One stream mid-reply (ends in band with a retry hint), one still waiting for its first token (a 503 with
    # Retry-After, since nothing was sent yet). Both generators are closed before cleanup returns.
    provider = ScriptedProvider()
    config = BASE.with_changes(shutdown_grace=2.0, reconnect_hint_ms=1500)
    host, api = _relay_host(config, provider)
    runner = web.AppRunner(host, access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host_, port = runner.addresses[0][:2]
    base = f"http://{host_}:{port}"
    mid_reader, mid_writer = await _connect(base)
    _send_get(mid_writer, "/api/chat?prompt=x")
    await _wait_until(lambda: provider.opened == 1)
    provider.put([Delta("first")])
    status, headers = await asyncio.wait_for(_read_head(mid_reader), 5)
    assert status == 200
    assert await asyncio.wait_for(_read_chunk(mid_reader), 5) == b'id: 1\ndata: {"content":"first"}\n\n'
    early_reader, early_writer = await _connect(base)
    _send_get(early_writer, "/api/chat?prompt=y")
    await _wait_until(lambda: provider.opened == 2)
    await asyncio.wait_for(runner.cleanup(), 10)
    assert provider.finished == 2
    assert _registry(api).outcomes == ["shutdown", "shutdown"]
    # As each stream left, its generator (and those of the streams before it) had been closed.
    assert all(closed >= k for k, closed in enumerate(_registry(api).closed_at_end, 1))
    rest = await asyncio.wait_for(_read_body(mid_reader, headers), 5)
    assert rest == (
        b"retry: 1500\n\n"
        b'id: 2\nevent: error\ndata: {"error":{"type":"server_shutdown",'
        b'"message":"the server is restarting; try again shortly"}}\n\n'
    )
    status, headers, body = await asyncio.wait_for(_read_response(early_reader), 5)
    assert status == 503
    assert headers["retry-after"] == "2"
    assert json.loads(body)["error"]["type"] == "server_shutdown"
    await _close(mid_writer)
    await _close(early_writer)


# -- (f) keep-alive: the self-cancellation does not leak into the next request ----------------------------------------


@pytest.mark.parametrize("ending", list(ENDINGS))
async def test_a_keep_alive_connection_serves_another_stream_after_each_ending(serve: ServeApp, ending: str) -> None:
    # A stream ended by its own cancellation (timeouts) uncancels its task; one left cancelled would lose the
    # response or the connection. The next request on the same socket must be served as usual.
    changes, steps, status, outcome, _ = ENDINGS[ending]
    probe = TaskProbe()
    base, provider, api = await _serve_scripted(serve, BASE.with_changes(**changes), middlewares=[probe])
    provider.put(*steps())
    reader, writer = await _connect(base)
    _send_get(writer, "/api/chat?prompt=x&format=ndjson")
    got_status, headers, _ = await asyncio.wait_for(_read_response(reader), 5)
    assert got_status == status
    assert headers.get("connection", "").lower() != "close"
    await asyncio.wait_for(provider.closed.wait(), 5)
    registry = _registry(api)
    assert await registry.wait_empty(5)
    # Same socket, next request: a normal stream, start to end.
    provider.put([Delta("again")], [Done("stop")], None)
    _send_get(writer, "/api/chat?prompt=y&format=ndjson")
    got_status, _, body = await asyncio.wait_for(_read_response(reader), 5)
    assert got_status == 200
    assert body == b'{"type":"delta","content":"again"}\n{"type":"done","finish_reason":"stop"}\n'
    assert provider.opened == provider.finished == 2
    assert registry.outcomes == [outcome, "done"]
    assert registry.closed_at_end == [1, 2]
    # The handler's task came back clean both times: no cancellation left counted or pending for the host.
    assert probe.after == [("returned", 0, False)] * 2
    await _close(writer)


async def test_a_cancellation_from_the_host_is_not_taken_for_the_streams_own(serve: ServeApp) -> None:
    # A host middleware puts its own deadline on handlers. Its cancellation did not come from the stream: the
    # stream must let it through (closing the provider), so the host's timeout turns it into its own answer.
    seen: list[str] = []

    def answer() -> web.StreamResponse:
        seen.append("host timeout")
        return web.Response(status=503, text="host deadline")

    base, provider, api = await _serve_scripted(serve, BASE, middlewares=[host_deadline(0.15, answer)])
    reader, writer = await _connect(base)
    _send_get(writer, "/api/chat?prompt=x")
    status, _, body = await asyncio.wait_for(_read_response(reader), 5)
    assert (status, body) == (503, b"host deadline")
    assert seen == ["host timeout"]
    assert provider.closed.is_set()
    assert _registry(api).outcomes == ["cancelled"]
    assert _registry(api).closed_at_end == [1]
    # And the connection is still good for the next request.
    await _serves_another_stream(provider, reader, writer)


# -- (g) a provider that raises mid-reply --------------------------------------------------------------------------


async def test_an_exception_in_the_provider_after_tokens_is_an_in_band_internal_error(
    serve: ServeApp, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    base, provider, api = await _serve_scripted(serve, BASE)
    provider.put([Delta("a")], [Delta("b")], ZeroDivisionError("provider bug"))
    with caplog.at_level(logging.ERROR, logger="llm_relay.stream"):
        async with http.get(f"{base}/api/chat", params={"prompt": "x"}) as resp:
            assert resp.status == 200
            body = await asyncio.wait_for(resp.read(), 5)
    assert body == (
        b'id: 1\ndata: {"content":"a"}\n\n'
        b'id: 2\ndata: {"content":"b"}\n\n'
        b'id: 3\nevent: error\ndata: {"error":{"type":"internal_error",'
        b'"message":"the relay failed while generating the reply"}}\n\n'
    )
    (record,) = [r for r in caplog.records if "the provider failed" in r.getMessage()]
    assert record.exc_info is not None
    assert record.exc_info[0] is ZeroDivisionError
    assert provider.closed.is_set()
    # The server keeps serving, streams and health alike.
    provider.put([Delta("fine"), Done("stop")], None)
    async with http.get(f"{base}/api/chat", params={"prompt": "y"}) as resp:
        assert [kind for kind, _, _ in sse_events(await resp.read())] == ["message", "done"]
    async with http.get(f"{base}/api/healthz") as resp:
        assert (await resp.json())["open_streams"] == 0
    assert _registry(api).outcomes == ["error", "done"]


# -- found in review: behaviour of server/stream.py that these tests show to be wrong ---------------------------------


async def test_a_provider_failing_after_the_terminal_event_does_not_make_a_finished_stream_an_error(
    serve: ServeApp, http: aiohttp.ClientSession
) -> None:
    # After Done, the provider is drained for connection reuse; a failure then must not send the stream to the
    # error path (the write_eof of an already-ended response is a no-op, so only the outcome would be wrong: "error"
    # for a reply the client received complete).
    base, provider, api = await _serve_scripted(serve, BASE)
    provider.put([Delta("a"), Done("stop")], RuntimeError("after the end"))
    async with http.get(f"{base}/api/chat", params={"prompt": "x"}) as resp:
        events = sse_events(await asyncio.wait_for(resp.read(), 5))
    assert [kind for kind, _, _ in events] == ["message", "done"]
    registry = _registry(api)
    assert await registry.wait_empty(5)
    assert provider.closed.is_set()
    assert registry.outcomes == ["done"]


class LingeringProvider(ScriptedProvider):
    """After its last batch it keeps waiting, as an upstream whose body does not end; once cancelled it does
    what `on_cancel` says: "raise" the cancellation, "swallow" it (the generator just ends) or turn it into an
    "error" of its own."""

    def __init__(self, on_cancel: str) -> None:
        super().__init__()
        self.on_cancel = on_cancel

    async def stream(self, request: ChatRequest) -> AsyncGenerator[Sequence[Event], None]:
        try:
            async for batch in super().stream(request):
                yield batch
        except asyncio.CancelledError:
            if self.on_cancel == "error":
                raise UpstreamError("the upstream read was cut") from None
            if self.on_cancel == "raise":
                raise


@pytest.mark.parametrize("on_cancel", ["raise", "swallow", "error"])
async def test_a_provider_still_reading_after_the_reply_gets_the_grace_then_is_closed(
    serve: ServeApp, monkeypatch: pytest.MonkeyPatch, on_cancel: str
) -> None:
    # After Done the provider may read on (the upstream's tail, for connection reuse), for PROVIDER_DRAIN_GRACE at
    # most. However it takes the cancellation that ends that, the stream is "done", and the handler's task is not
    # left cancelled: the keep-alive connection serves the next stream.
    monkeypatch.setattr(stream_module, "PROVIDER_DRAIN_GRACE", 0.3)
    probe = TaskProbe()
    provider = LingeringProvider(on_cancel)
    host, api = _relay_host(BASE, provider, middlewares=[probe])
    base = await serve(host)
    loop = asyncio.get_running_loop()
    reader, writer = await _connect(base)
    provider.put([Delta("a"), Done("stop")])  # and then nothing: the provider waits
    _send_get(writer, "/api/chat?prompt=x")
    status, _, body = await asyncio.wait_for(_read_response(reader), 5)
    replied = loop.time()
    assert status == 200
    assert [kind for kind, _, _ in sse_events(body)] == ["message", "done"]
    registry = _registry(api)
    assert await registry.wait_empty(5)
    assert 0.2 <= loop.time() - replied < 3
    assert provider.closed.is_set()
    assert registry.outcomes == ["done"]
    for _ in range(100):  # the probe notes the handler's end a few loop turns after the registry is empty
        if probe.after:
            break
        await asyncio.sleep(0.01)
    assert probe.after == [("returned", 0, False)]
    task = registry.seen[0]._task  # the task the stream ran in: the drain's cancellation was taken back
    assert task is not None
    assert task.cancelling() == 0
    await _serves_another_stream(provider, reader, writer)


async def test_a_host_cancellation_during_the_drain_after_the_reply_goes_on(
    serve: ServeApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The host's own deadline falls while the provider is still being read after Done: the cancellation is the
    # host's, not the drain's, so it must come out of the handler (the reply itself was already complete).
    monkeypatch.setattr(stream_module, "PROVIDER_DRAIN_GRACE", 5.0)
    cancelled: list[bool] = []

    def answer() -> web.StreamResponse:
        cancelled.append(True)
        raise TimeoutError

    provider = LingeringProvider("raise")
    host, api = _relay_host(BASE, provider, middlewares=[host_deadline(0.3, answer)])
    base = await serve(host)
    reader, writer = await _connect(base)
    provider.put([Delta("a"), Done("stop")])
    _send_get(writer, "/api/chat?prompt=x")
    status, _, body = await asyncio.wait_for(_read_response(reader), 5)
    assert status == 200
    assert [kind for kind, _, _ in sse_events(body)] == ["message", "done"]
    assert await _registry(api).wait_empty(3)  # well before the 5 s grace: the host's deadline ended it
    assert cancelled == [True]
    assert provider.closed.is_set()
    await _close(writer)


async def test_a_providers_async_cleanup_runs_to_its_end_when_a_slow_client_is_dropped(serve: ServeApp) -> None:
    # A dropped slow client returns from the loop, and aclosing awaits the generator's aclose(); the
    # transport.abort() of the drop then reaches _on_client_lost -> _stop(_GONE), which must not cancel the task in
    # the middle of the provider's own cleanup (its `finally` awaits, like the openai provider's response.close()).
    cleaned = asyncio.Event()

    class CarefulProvider(ScriptedProvider):
        async def stream(self, request: ChatRequest) -> AsyncGenerator[Sequence[Event], None]:
            try:
                async for batch in super().stream(request):
                    yield batch
            finally:
                await asyncio.sleep(0.01)  # releasing an upstream connection takes an await or two
                cleaned.set()

    provider = CarefulProvider()
    host, api = _relay_host(BASE.with_changes(write_timeout=0.3, send_buffer=32_768), provider)
    base = await serve(host)
    _reader, writer = await _connect(base, rcvbuf=16_384)
    _send_get(writer, "/api/chat?prompt=x&format=ndjson")  # and then read nothing
    await asyncio.wait_for(provider.started.wait(), 5)
    provider.put([Delta("w" * 4_000_000)])
    assert await _registry(api).wait_empty(5)
    assert _registry(api).outcomes == ["slow_client"]
    assert provider.closed.is_set()
    assert cleaned.is_set(), "the provider's cleanup was cut short by the stream's own cancellation"
    await _close(writer)


async def test_a_slow_but_reading_client_is_not_told_the_model_went_idle(serve: ServeApp) -> None:
    # The provider is not asked for more while a write waits on the client, so the idle clock must not run then:
    # otherwise one write that waits longer than idle_timeout (allowed: the write timeout is longer) would end the
    # stream in band with "the model stopped answering mid-reply", although the model had more ready all along.
    provider = EndlessProvider(64_000, 12)
    config = BASE.with_changes(idle_timeout=0.25, write_timeout=5.0, send_buffer=32_768)
    host, api = _relay_host(config, provider)
    base = await serve(host)
    reader, writer = await _connect(base, rcvbuf=16_384)
    _send_get(writer, "/api/chat?prompt=x&format=ndjson")
    status, headers = await asyncio.wait_for(_read_head(reader), 5)
    assert status == 200
    assert headers["transfer-encoding"] == "chunked"
    raw = bytearray()
    loop = asyncio.get_running_loop()
    slow_until = loop.time() + 1.2
    while loop.time() < slow_until:  # reading, but slowly: 16 KB every 0.4 s
        raw += await asyncio.wait_for(reader.read(16_384), 5)
        await asyncio.sleep(0.4)
    while not raw.endswith(b"\r\n0\r\n\r\n"):  # then at full speed to the end of the body
        raw += await asyncio.wait_for(reader.read(1 << 20), 5)
    await _close(writer)
    body = _dechunk(bytes(raw))
    objects = ndjson_objects(body)
    assert [o["type"] for o in objects[-2:]] == ["delta", "done"], objects[-1]
    assert len(objects) == 13
    assert _registry(api).outcomes == ["done"]
