"""A reader's clocks and policies, driven by a provider the test controls: flush policy, heartbeats, timeouts as
readers see them, slow readers, shutdown, HTTP/1.0 clients and disconnects under uvloop."""

from __future__ import annotations

import asyncio
import gc
import re
import socket
import time
import weakref
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from operator import methodcaller
from typing import cast

import aiohttp
import pytest
import uvloop
from aiohttp import web

from server.app import create_app, create_relay_app
from server.chat_request import ChatRequest
from server.config import Config
from server.events import Delta, Done, Event
from server.providers.base import on_abort
from server.reader import Reader, _loop_timers, _SlotTimers
from server.state import RELAY

from .conftest import ServeApp, upstream_config
from .fake_upstream import Behavior, FakeUpstream
from .wire import ndjson_objects, sse_events

BASE = Config(provider="demo", limits_enabled=False, heartbeat=0.0)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ScriptedProvider:
    """Yields exactly the batches the test puts in its queue; `None` ends the stream."""

    name = "scripted"

    def __init__(self) -> None:
        self.batches: asyncio.Queue[Sequence[Event] | None] = asyncio.Queue()
        self.started = asyncio.Event()
        self.closed = asyncio.Event()

    async def stream(self, request: ChatRequest) -> AsyncGenerator[Sequence[Event], None]:
        self.started.set()
        try:
            while (batch := await self.batches.get()) is not None:
                yield batch
        finally:
            self.closed.set()

    async def aclose(self) -> None:
        return None


async def _serve_scripted(serve: ServeApp, config: Config) -> tuple[str, ScriptedProvider, web.Application]:
    provider = ScriptedProvider()
    host = web.Application()
    api = create_relay_app(config, provider=provider)
    host.add_subapp("/api", api)
    return await serve(host), provider, api


async def _read_some(resp: aiohttp.ClientResponse, timeout: float) -> bytes:
    """Whatever arrives within `timeout` seconds (b"" if nothing)."""
    try:
        return await asyncio.wait_for(resp.content.readany(), timeout)
    except TimeoutError:
        return b""


async def test_immediate_policy_writes_each_frame_while_the_provider_still_works(
    serve: ServeApp, http: aiohttp.ClientSession
) -> None:
    base, provider, _ = await _serve_scripted(serve, BASE)
    request = asyncio.create_task(http.get(f"{base}/api/chat", params={"prompt": "x"}))
    await provider.started.wait()
    await provider.batches.put([Delta("first")])
    resp = await request
    sid = resp.headers["X-Stream-Id"].encode()
    # The provider has produced nothing more, yet the frame is already on the wire.
    assert await _read_some(resp, 5) == b'id: %s/1\ndata: {"content":"first"}\n\n' % sid
    await provider.batches.put([Delta("second")])
    assert await _read_some(resp, 5) == b'id: %s/2\ndata: {"content":"second"}\n\n' % sid
    await provider.batches.put([Done("stop")])
    assert await resp.content.read() == b'id: %s/3\nevent: done\ndata: {"finish_reason":"stop"}\n\n' % sid
    resp.close()


async def test_frames_already_waiting_go_out_in_one_write(serve: ServeApp, http: aiohttp.ClientSession) -> None:
    base, provider, _ = await _serve_scripted(serve, BASE.with_changes())
    await provider.batches.put([Delta("a"), Delta("b"), Delta("c")])
    async with http.get(f"{base}/api/chat", params={"prompt": "x", "format": "ndjson"}) as resp:
        chunk = await _read_some(resp, 5)
        assert chunk == (
            b'{"type":"delta","seq":1,"content":"a"}\n'
            b'{"type":"delta","seq":2,"content":"b"}\n'
            b'{"type":"delta","seq":3,"content":"c"}\n'
        )
        await provider.batches.put(None)
        await resp.read()


async def test_flush_window_holds_frames_until_the_window_ends(serve: ServeApp, http: aiohttp.ClientSession) -> None:
    base, provider, _ = await _serve_scripted(serve, BASE.with_changes(flush_window=0.4))
    request = asyncio.create_task(http.get(f"{base}/api/chat", params={"prompt": "x", "format": "ndjson"}))
    await provider.started.wait()
    await provider.batches.put([Delta("a")])
    await asyncio.sleep(0.05)
    await provider.batches.put([Delta("b")])
    resp = await request  # headers go with the first write: after the window
    chunk = await _read_some(resp, 5)
    assert chunk == b'{"type":"delta","seq":1,"content":"a"}\n{"type":"delta","seq":2,"content":"b"}\n'
    await provider.batches.put([Done("stop")])
    assert ndjson_objects(await resp.content.read())[-1]["type"] == "done"  # terminal frames are never held
    resp.close()


async def test_flush_bytes_releases_held_frames_early(serve: ServeApp, http: aiohttp.ClientSession) -> None:
    base, provider, _ = await _serve_scripted(serve, BASE.with_changes(flush_window=30, flush_bytes=50))
    request = asyncio.create_task(http.get(f"{base}/api/chat", params={"prompt": "x", "format": "ndjson"}))
    await provider.started.wait()
    await provider.batches.put([Delta("a")])  # 39 bytes: held
    await asyncio.sleep(0.1)
    assert not request.done()
    await provider.batches.put([Delta("b")])  # 78 bytes: over the threshold, written at once
    resp = await asyncio.wait_for(request, 5)
    assert (
        await _read_some(resp, 5) == b'{"type":"delta","seq":1,"content":"a"}\n{"type":"delta","seq":2,"content":"b"}\n'
    )
    await provider.batches.put(None)
    resp.close()


async def test_sse_heartbeats_start_before_the_first_token(serve: ServeApp, http: aiohttp.ClientSession) -> None:
    base, provider, _ = await _serve_scripted(serve, BASE.with_changes(heartbeat=0.05))
    async with http.get(f"{base}/api/chat", params={"prompt": "x"}) as resp:
        assert resp.status == 200  # the first heartbeat sent the headers
        assert await resp.content.readuntil(b"\n\n") == b": ping\n\n"
        assert await resp.content.readuntil(b"\n\n") == b": ping\n\n"
        await provider.batches.put([Delta("hi"), Done("stop")])
        body = await resp.read()
    assert [kind for kind, _, _ in sse_events(body)] == ["message", "done"]


@pytest.mark.parametrize("keepalive", [False, True], ids=["off-by-default", "on"])
async def test_ndjson_keepalive(serve: ServeApp, http: aiohttp.ClientSession, keepalive: bool) -> None:
    config = BASE.with_changes(heartbeat=0.05, ndjson_keepalive=keepalive)
    base, provider, _ = await _serve_scripted(serve, config)
    request = asyncio.create_task(http.get(f"{base}/api/chat", params={"prompt": "x", "format": "ndjson"}))
    await provider.started.wait()
    await asyncio.sleep(0.2)
    await provider.batches.put([Delta("hi"), Done("stop")])
    async with await request as resp:
        objects = ndjson_objects(await resp.read())
    pings = [o for o in objects if o["type"] == "ping"]
    assert bool(pings) == keepalive
    assert [o["type"] for o in objects if o["type"] != "ping"] == ["delta", "done"]


async def test_first_token_timeout_before_anything_was_sent_is_504(
    serve: ServeApp, http: aiohttp.ClientSession
) -> None:
    base, provider, _ = await _serve_scripted(serve, BASE.with_changes(first_token_timeout=0.1))
    async with http.get(f"{base}/api/chat", params={"prompt": "x"}) as resp:
        assert resp.status == 504
        assert (await resp.json())["error"]["type"] == "timeout"
    await asyncio.wait_for(provider.closed.wait(), 5)


async def test_idle_timeout_mid_stream_is_an_in_band_error_and_closes_the_upstream(
    fake_upstream: FakeUpstream, serve: ServeApp, http: aiohttp.ClientSession
) -> None:
    fake_upstream.behavior = Behavior(tokens=["a", "b", "c"], fault="stall", fault_after=2)
    base = await serve(create_app(upstream_config(fake_upstream, idle_timeout=0.2)))
    async with http.get(f"{base}/api/chat", params={"prompt": "x"}) as resp:
        # Far below the 60 s first-token timeout: the idle clock, not that one, must end the stream.
        events = sse_events(await asyncio.wait_for(resp.read(), 10))
    assert [kind for kind, _, _ in events] == ["message", "message", "error"]
    assert events[-1][1]["error"]["type"] == "timeout"
    await asyncio.wait_for(fake_upstream.last.client_gone.wait(), 5)


async def test_total_timeout(serve: ServeApp, http: aiohttp.ClientSession) -> None:
    config = Config(provider="demo", demo_delay=0.02, limits_enabled=False, heartbeat=0.0, total_timeout=0.3)
    async with http.get(f"{await serve(create_app(config))}/api/chat", params={"prompt": "x"}) as resp:
        events = sse_events(await resp.read())
    assert 3 < len(events) < 100
    assert events[-1][0] == "error"
    assert events[-1][1]["error"]["type"] == "timeout"


async def test_a_client_that_stops_reading_is_dropped_and_others_keep_streaming(
    fake_upstream: FakeUpstream, serve: ServeApp, http: aiohttp.ClientSession
) -> None:
    # 64 MB of tokens: far more than loopback socket buffers hold, so writes to a non-reader must block.
    fake_upstream.behavior = Behavior(tokens=["x" * 16_000] * 4_000)
    app = create_app(upstream_config(fake_upstream, write_timeout=0.3))
    base = await serve(app)
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"GET /api/chat?prompt=x&format=ndjson HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
    await writer.drain()
    stalled = await fake_upstream.wait_for_request()
    # While that client reads nothing, another one is served in full.
    fake_upstream.behavior = Behavior(tokens=["ok"])
    async with http.get(f"{base}/api/chat", params={"prompt": "y"}) as resp:
        assert sse_events(await resp.read())[-1][0] == "done"
    await asyncio.wait_for(stalled.client_gone.wait(), 10)
    assert not stalled.completed
    state = app[RELAY]
    assert await state.streams.wait_idle(5)
    # The server aborted the connection: the reader sees the end after a bounded amount of data.
    received = 0
    while chunk := await asyncio.wait_for(reader.read(1 << 16), 5):
        received += len(chunk)
    assert received < 16_000 * 4_000
    writer.close()
    await writer.wait_closed()


async def test_shutdown_ends_open_streams_in_band_with_a_retry_hint(serve: ServeApp) -> None:
    config = Config(provider="demo", demo_delay=0.05, limits_enabled=False, heartbeat=0.0, shutdown_grace=2.0)
    app = create_app(config)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    async with aiohttp.ClientSession() as http:
        sse = await http.get(f"http://{host}:{port}/api/chat", params={"prompt": "x"})
        ndjson = await http.get(f"http://{host}:{port}/api/chat", params={"prompt": "x", "format": "ndjson"})
        await sse.content.readuntil(b"\n\n")
        await ndjson.content.readline()
        await runner.cleanup()
        sse_body = await sse.read()
        ndjson_body = await ndjson.read()
    retry = re.search(rb"retry: (\d+)\n\n", sse_body)  # jittered per stream: from the hint to twice it
    assert retry is not None
    assert 3000 <= int(retry[1]) <= 6000
    assert sse_events(sse_body)[-1][1]["error"]["type"] == "server_shutdown"
    assert ndjson_objects(ndjson_body)[-1]["error"]["type"] == "server_shutdown"
    assert len(app[RELAY].streams) == 0


def test_disconnect_is_seen_under_uvloop_too() -> None:
    async def scenario() -> float:
        upstream = FakeUpstream(Behavior(tokens=["a"], first_delay=30))
        await upstream.start()
        app = create_app(upstream_config(upstream))
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        try:
            async with aiohttp.ClientSession() as http:
                task = asyncio.create_task(http.get(f"http://{host}:{port}/api/chat", params={"prompt": "x"}))
                seen = await upstream.wait_for_request()
                await asyncio.sleep(0.05)
                task.cancel()
                await asyncio.wait_for(seen.client_gone.wait(), 5)
                assert not seen.completed
                await app[RELAY].streams.wait_idle(5)
                return len(app[RELAY].streams)
        finally:
            await runner.cleanup()
            await upstream.close()

    assert uvloop.run(scenario()) == 0


async def test_half_open_peers_are_bounded_by_tcp_user_timeout(serve: ServeApp, http: aiohttp.ClientSession) -> None:
    transports: list[asyncio.Transport] = []

    @web.middleware
    async def remember_transport(request: web.Request, handler: Handler) -> web.StreamResponse:
        assert request.transport is not None
        transports.append(request.transport)  # type: ignore[arg-type]
        return await handler(request)

    provider = ScriptedProvider()
    host = web.Application(middlewares=[remember_transport])
    api = create_relay_app(BASE.with_changes(write_timeout=7.5), provider=provider)
    host.add_subapp("/api", api)
    base = await serve(host)

    def user_timeout() -> int:
        sock = transports[0].get_extra_info("socket")
        return int(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT))

    request = asyncio.create_task(http.get(f"{base}/api/chat", params={"prompt": "x"}))
    await provider.started.wait()
    assert user_timeout() == 7500  # while the stream runs
    await provider.batches.put([Delta("x"), Done("stop")])
    async with await request as resp:
        await resp.read()
    async with asyncio.timeout(5):
        while api[RELAY].streams.readers:
            await asyncio.sleep(0.01)
    assert user_timeout() == 0  # the keep-alive connection gets its old setting back


async def test_a_providers_abort_callback_runs_when_the_client_leaves(serve: ServeApp) -> None:
    aborted = asyncio.Event()

    class AbortingProvider(ScriptedProvider):
        async def stream(self, request: ChatRequest) -> AsyncGenerator[Sequence[Event], None]:
            on_abort(aborted.set)
            async for batch in super().stream(request):
                yield batch

    provider = AbortingProvider()
    host = web.Application()
    host.add_subapp("/api", create_relay_app(BASE, provider=provider))
    base = await serve(host)
    async with aiohttp.ClientSession() as http:
        request = asyncio.create_task(http.get(f"{base}/api/chat", params={"prompt": "x"}))
        await provider.started.wait()
        await provider.batches.put([Delta("first")])
        resp = await request
        await resp.content.readuntil(b"\n\n")
        assert not aborted.is_set()
        resp.close()
        await asyncio.wait_for(aborted.wait(), 5)
        await asyncio.wait_for(provider.closed.wait(), 5)


async def test_held_frames_do_not_spin_the_loop_when_a_heartbeat_is_overdue(
    serve: ServeApp, http: aiohttp.ClientSession
) -> None:
    config = BASE.with_changes(heartbeat=0.05, flush_window=0.5)
    base, provider, _ = await _serve_scripted(serve, config)
    async with http.get(f"{base}/api/chat", params={"prompt": "x"}) as resp:
        assert await resp.content.readuntil(b"\n\n") == b": ping\n\n"
        await asyncio.sleep(0.04)  # the next heartbeat is nearly due
        cpu_before = time.process_time()
        await provider.batches.put([Delta("a")])  # held for the 0.5 s window, while the heartbeat falls due
        await asyncio.sleep(0.4)
        cpu_spent = time.process_time() - cpu_before
        # A loop that spun while the frame was held would burn most of that time (client and server share this
        # process); a parked one uses almost none.
        assert cpu_spent < 0.2
        await provider.batches.put([Done("stop")])
        events = sse_events(await resp.read())
    assert [kind for kind, _, _ in events] == ["message", "done"]


async def test_a_first_token_timeout_after_heartbeats_is_in_band(serve: ServeApp, http: aiohttp.ClientSession) -> None:
    base, provider, _ = await _serve_scripted(serve, BASE.with_changes(heartbeat=0.05, first_token_timeout=0.3))
    async with http.get(f"{base}/api/chat", params={"prompt": "x"}) as resp:
        assert resp.status == 200  # a heartbeat sent the head: from then on, errors travel in band
        body = await resp.read()
    assert body.startswith(b": ping\n\n")
    events = sse_events(body)
    assert [kind for kind, _, _ in events] == ["error"]
    assert events[0][1]["error"]["type"] == "timeout"
    await asyncio.wait_for(provider.closed.wait(), 5)


async def test_an_http_10_keep_alive_client_sees_the_end_of_the_body(serve: ServeApp) -> None:
    # An HTTP/1.0 body without a length ends when the connection closes (RFC 9112 §6.3): the relay must close it
    # even when the client asked for keep-alive, or the client never sees the end.
    base, provider, _ = await _serve_scripted(serve, BASE)
    provider.batches.put_nowait([Delta("old"), Done("stop")])
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /api/chat?prompt=x HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: keep-alive\r\n\r\n")
    raw = await asyncio.wait_for(reader.read(), 5)  # returns only when the server closes the connection
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"transfer-encoding" not in head.lower()
    assert [kind for kind, _, _ in sse_events(body)] == ["message", "done"]


class _Beating:
    """What `_SlotTimers` calls of a reader: its loop, and `_on_heartbeat` (here: when it came)."""

    def __init__(self, loop: asyncio.AbstractEventLoop | _CountingLoop) -> None:
        self._loop = loop
        self.beat_at: float | None = None

    def _on_heartbeat(self) -> None:
        self.beat_at = self._loop.time()


async def test_heartbeats_due_in_the_same_slot_share_one_timer_and_none_comes_early() -> None:
    # 10,000 idle streams would otherwise hold 10,000 timers (~0.4 KiB each) to send a few bytes every interval.
    loop = asyncio.get_running_loop()
    heartbeats = _SlotTimers(methodcaller("_on_heartbeat"))
    interval = 0.08  # slots of 10 ms
    start = loop.time() + 0.02
    readers = [_Beating(loop) for _ in range(20)]
    dues = [start + i * 0.0004 for i in range(20)]  # all within 8 ms: one or two slots
    slots = {heartbeats.add(cast(Reader, r), due, interval) for r, due in zip(readers, dues, strict=True)}
    assert len(slots) <= 2
    leaving = readers.pop()
    heartbeats.discard(cast(Reader, leaving), heartbeats.add(cast(Reader, leaving), dues.pop(), interval))
    async with asyncio.timeout(2):
        while any(r.beat_at is None for r in readers):
            await asyncio.sleep(0.005)
    assert all(r.beat_at is not None and r.beat_at >= due for r, due in zip(readers, dues, strict=True))
    assert all(r.beat_at is not None and r.beat_at <= due + 1.0 for r, due in zip(readers, dues, strict=True))
    assert leaving.beat_at is None


class _CountingLoop:
    """The running loop, counting the timers armed through it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.timers = 0

    def time(self) -> float:
        return self._loop.time()

    def call_at(self, when: float, callback: Callable[..., object], *args: object) -> asyncio.TimerHandle:
        self.timers += 1
        return self._loop.call_at(when, callback, *args)


async def test_writes_of_a_slot_share_its_deadline_timer_which_calls_only_the_writes_still_waiting() -> None:
    """Write deadlines (`keep_armed`): a slot's timer outlives the writes that returned, and fires once, calling only
    the readers whose write has not returned, and none before its deadline."""
    loop = _CountingLoop(asyncio.get_running_loop())
    deadlines = _SlotTimers(methodcaller("_on_heartbeat"), keep_armed=True)
    timeout = 0.08  # slots of 10 ms
    returned = [_Beating(loop) for _ in range(1_000)]
    for reader in returned:  # each write adds itself and takes itself out when it returns
        due = loop.time() + timeout
        deadlines.discard(cast(Reader, reader), deadlines.add(cast(Reader, reader), due, timeout))
    stuck = _Beating(loop)
    due = loop.time() + timeout
    deadlines.add(cast(Reader, stuck), due, timeout)
    async with asyncio.timeout(2):
        while stuck.beat_at is None:
            await asyncio.sleep(0.005)
    assert due <= stuck.beat_at <= due + 1.0
    assert all(reader.beat_at is None for reader in returned)
    assert loop.timers <= 3  # a slot of 10 ms took every write of the first millisecond or so, not one each


def test_a_closed_loop_is_not_kept_alive_by_a_write_deadline_timer() -> None:
    """A slot's deadline timer stays armed after its writes returned; a loop closed meanwhile (the end of
    ``asyncio.run``, a test's loop) must still be freed, not kept by the per-loop timers that refer to it."""
    loop = asyncio.new_event_loop()

    async def write_once() -> None:
        running = asyncio.get_running_loop()
        deadlines = _loop_timers(running).write_deadlines
        reader = cast(Reader, _Beating(running))
        deadlines.discard(reader, deadlines.add(reader, running.time() + 10, 10))

    loop.run_until_complete(write_once())
    loop.close()
    closed = weakref.ref(loop)
    del loop
    gc.collect()
    assert closed() is None


def test_a_loop_closed_with_a_heartbeat_armed_is_freed_once_another_loop_runs_readers() -> None:
    """A stream still open when its loop is closed leaves its heartbeat armed: the per-loop timers then refer to
    the closed loop through the reader and the timer's handle. The next loop to run readers lets it go."""

    def run_on_a_new_loop(heartbeat: bool) -> weakref.ref[asyncio.AbstractEventLoop]:
        loop = asyncio.new_event_loop()

        async def arm() -> None:
            running = asyncio.get_running_loop()
            timers = _loop_timers(running)
            if heartbeat:
                timers.heartbeats.add(cast(Reader, _Beating(running)), running.time() + 15, 15)

        loop.run_until_complete(arm())
        loop.close()
        return weakref.ref(loop)

    closed = run_on_a_new_loop(heartbeat=True)
    run_on_a_new_loop(heartbeat=False)
    gc.collect()
    assert closed() is None


async def test_a_reader_whose_timer_fails_leaves_the_others_of_its_slot_called() -> None:
    loop = asyncio.get_running_loop()
    calls: list[object] = []

    def call(reader: object) -> None:
        calls.append(reader)
        if len(calls) == 1:
            raise RuntimeError("an observer failed")

    timers = _SlotTimers(call, keep_armed=True)
    readers = [_Beating(loop) for _ in range(3)]
    due = loop.time() + 0.02
    for reader in readers:
        timers.add(cast(Reader, reader), due, 0.08)
    async with asyncio.timeout(2):
        while len(calls) < 3:
            await asyncio.sleep(0.005)
    assert sorted(map(id, calls)) == sorted(map(id, readers))
