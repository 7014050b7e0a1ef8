"""A generation's life: its log, its clocks, how it ends, and that its provider (the upstream) is always closed.

The log's arithmetic is tested as plain code; everything else over real loopback sockets with a provider the test
drives (tests/scripted.py), the relay mounted in a host app with production runner settings."""

from __future__ import annotations

import asyncio
import logging
import socket
import weakref
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from server.chat_request import ChatRequest, Message
from server.errors import UpstreamError, UpstreamUnavailable
from server.events import Delta, Done, Error, Event
from server.generation import EVENT_OVERHEAD_BYTES, EventLog, Generation, GenerationSettings, Outcome
from server.state import RELAY

from .conftest import ServeApp
from .scripted import BASE, ScriptedProvider, Step, relay_host, wait_until
from .wire import ndjson_objects, sse_events

# -- the log ---------------------------------------------------------------------------------------------------


def test_the_log_numbers_events_from_one_and_reads_after_any_offset() -> None:
    log = EventLog(100, 1 << 20)
    log.append([Delta("a"), Delta("b")])
    log.append([Done("stop")])
    assert (log.first_seq, log.last_seq) == (1, 3)
    assert log.since(0) == [Delta("a"), Delta("b"), Done("stop")]
    assert log.since(2) == [Done("stop")]
    assert log.since(3) == []


def test_past_its_bounds_the_log_drops_the_oldest_and_says_so() -> None:
    log = EventLog(8, 1 << 20)
    log.append([Delta(str(i)) for i in range(9)])
    assert log.last_seq == 9
    assert log.first_seq == 4  # trimmed to three quarters of the bound: 6 kept
    assert log.since(3) == [Delta(str(i)) for i in range(3, 9)]
    with pytest.raises(LookupError):
        log.since(2)


@given(
    batches=st.lists(st.lists(st.text(max_size=40), min_size=1, max_size=5), max_size=40),
    max_events=st.integers(1, 30),
    max_bytes=st.integers(1, 2_000),
)
def test_the_log_stays_within_its_bounds_and_keeps_a_contiguous_tail(
    batches: list[list[str]], max_events: int, max_bytes: int
) -> None:
    log = EventLog(max_events, max_bytes)
    appended: list[Event] = []
    total = 0
    for batch in batches:
        events = [Delta(text) for text in batch]
        total += log.append(events)
        appended.extend(events)
        assert len(log.since(log.first_seq - 1)) <= max_events
        assert log.bytes <= max(max_bytes, EVENT_OVERHEAD_BYTES + 40)
        assert log.bytes == total  # append() reports every change in retained bytes
        # What is retained is exactly the newest events, in order, numbered as appended.
        assert log.since(log.first_seq - 1) == appended[log.first_seq - 1 :]
        assert log.last_seq == len(appended)
        for seq in range(log.first_seq - 1, log.last_seq + 1):
            assert log.bytes_after(seq) == sum(EVENT_OVERHEAD_BYTES + len(e.content) for e in log.since(seq))  # type: ignore[union-attr]


# -- endings ---------------------------------------------------------------------------------------------------

# name: (config changes, steps queued before the request, status, generation outcome, type of the last frame or
# of the JSON error)
ENDINGS: dict[str, tuple[dict[str, Any], Callable[[], list[Step]], int, Outcome, str]] = {
    "done": ({}, lambda: [[Delta("a")], [Delta("b"), Done("stop")], None], 200, Outcome.DONE, "done"),
    "done-provider-keeps-going": ({}, lambda: [[Delta("a"), Done("stop")]], 200, Outcome.DONE, "done"),
    "relay-error-mid-stream": ({}, lambda: [[Delta("a")], UpstreamError("boom")], 200, Outcome.ERROR, "upstream_error"),
    "exception-mid-stream": ({}, lambda: [[Delta("a")], RuntimeError("kaput")], 200, Outcome.ERROR, "internal_error"),
    "ended-without-terminal": ({}, lambda: [[Delta("a")], None], 200, Outcome.ERROR, "internal_error"),
    "error-event": ({}, lambda: [[Delta("a"), Error("upstream_error", "x")]], 200, Outcome.ERROR, "upstream_error"),
    "relay-error-before-first-token": (
        {},
        lambda: [UpstreamUnavailable("down")],
        502,
        Outcome.ERROR,
        "upstream_unavailable",
    ),
    "exception-before-first-token": ({}, lambda: [RuntimeError("kaput")], 500, Outcome.ERROR, "internal_error"),
    "first-token-timeout": ({"first_token_timeout": 0.1}, lambda: [], 504, Outcome.TIMEOUT, "timeout"),
    "idle-timeout": ({"idle_timeout": 0.1}, lambda: [[Delta("a")]], 200, Outcome.TIMEOUT, "timeout"),
    "total-timeout": ({"total_timeout": 0.2}, lambda: [[Delta("a")]], 200, Outcome.TIMEOUT, "timeout"),
}


@pytest.mark.parametrize("ending", list(ENDINGS))
async def test_the_provider_is_closed_and_the_slot_released_on_each_ending(
    serve: ServeApp, http: aiohttp.ClientSession, ending: str, caplog: pytest.LogCaptureFixture
) -> None:
    changes, steps, status, outcome, last = ENDINGS[ending]
    provider = ScriptedProvider()
    provider.put(*steps())
    host, api = relay_host(BASE.with_changes(limits_enabled=True, max_streams=1, **changes), provider)
    base = await serve(host)
    with caplog.at_level(logging.ERROR, "llm_relay"):
        async with http.get(f"{base}/api/chat", params={"prompt": "x", "format": "ndjson"}) as resp:
            assert resp.status == status
            stream_id = resp.headers.get("X-Stream-Id")
            if status == 200:
                final = ndjson_objects(await resp.read())[-1]
                assert (final["type"] if final["type"] == "done" else final["error"]["type"]) == last
            else:
                assert (await resp.json())["error"]["type"] == last
    registry = api[RELAY].streams
    assert await registry.wait_idle(5)
    await asyncio.wait_for(provider.closed.wait(), 5)
    assert provider.finished == 1
    if stream_id is not None:
        generation = registry.get(stream_id)
        assert generation is not None
        assert generation.outcome is outcome
    # The admission slot (max_streams=1) came back: the next request is admitted.
    provider.put([Delta("ok"), Done("stop")])
    async with http.get(f"{base}/api/chat", params={"prompt": "y"}) as resp:
        assert resp.status == 200
        assert sse_events(await resp.read())[-1][0] == "done"
    # Only a real failure of the relay's own code is logged as an error, never a traceback for the others.
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert bool(errors) == ending.startswith("exception")


async def test_a_provider_still_reading_after_the_reply_gets_a_grace_then_is_closed(
    serve: ServeApp, http: aiohttp.ClientSession
) -> None:
    provider = ScriptedProvider()  # yields Done, then waits forever for a next step (an upstream that lingers)
    provider.put([Delta("a"), Done("stop")])
    host, _ = relay_host(BASE, provider)
    base = await serve(host)
    async with http.get(f"{base}/api/chat", params={"prompt": "x"}) as resp:
        assert sse_events(await resp.read())[-1][0] == "done"  # the reader does not wait for the upstream
    assert not provider.closed.is_set()
    await asyncio.wait_for(provider.closed.wait(), 3)  # PROVIDER_DRAIN_GRACE later, closed


async def test_a_provider_failing_after_the_terminal_event_leaves_the_stream_done(
    serve: ServeApp, http: aiohttp.ClientSession
) -> None:
    provider = ScriptedProvider()
    provider.put([Delta("a"), Done("stop")], UpstreamError("late failure"))
    host, api = relay_host(BASE, provider)
    base = await serve(host)
    async with http.get(f"{base}/api/chat", params={"prompt": "x"}) as resp:
        stream_id = resp.headers["X-Stream-Id"]
        assert [kind for kind, _, _ in sse_events(await resp.read())] == ["message", "done"]
    await asyncio.wait_for(provider.closed.wait(), 3)
    generation = api[RELAY].streams.get(stream_id)
    assert generation is not None
    assert generation.outcome is Outcome.DONE


# -- readers leaving -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("handler_cancellation", [False, True], ids=["production-runner", "cancelling-runner"])
@pytest.mark.parametrize("when", ["before-first-token", "mid-stream"])
async def test_the_last_reader_leaving_closes_the_provider_whatever_the_host_runner(
    handler_cancellation: bool, when: str
) -> None:
    provider = ScriptedProvider()
    host, api = relay_host(BASE, provider)
    runner = web.AppRunner(host, access_log=None, handler_cancellation=handler_cancellation, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        address, port = runner.addresses[0][:2]
        reader, writer = await asyncio.open_connection(address, port)
        writer.write(b"GET /api/chat?prompt=x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        await asyncio.wait_for(provider.started.wait(), 5)
        if when == "mid-stream":
            provider.put([Delta("first")])
            await asyncio.wait_for(reader.readuntil(b'data: {"content":"first"}\n\n'), 5)
        writer.transport.abort()  # the client leaves (RST)
        await asyncio.wait_for(provider.closed.wait(), 5)
        registry = api[RELAY].streams
        assert await registry.wait_idle(5)
        await wait_until(lambda: registry.readers == 0)
        (generation,) = [registry.get(i) for i in _ids(registry)]
        assert generation is not None
        assert generation.outcome is Outcome.ABANDONED
        # The server still serves, on a new connection.
        provider.put([Delta("ok"), Done("stop")])
        async with aiohttp.ClientSession() as http, http.get(f"http://{address}:{port}/api/chat?prompt=y") as resp:
            assert [kind for kind, _, _ in sse_events(await resp.read())] == ["message", "done"]
    finally:
        await runner.cleanup()


def _ids(registry: Any) -> list[str]:
    return [generation.id for generation in registry]


class _SlowConsumerProvider(ScriptedProvider):
    """A provider whose batches are ready at once and big: a reader that does not read falls behind at once."""

    def __init__(self, size: int, count: int) -> None:
        super().__init__()
        self.size = size
        self.count = count
        self.yielded = 0

    async def stream(self, request: ChatRequest) -> AsyncGenerator[Sequence[Event], None]:
        self.started.set()
        try:
            for _ in range(self.count):
                self.yielded += 1
                yield [Delta("x" * self.size)]
                await asyncio.sleep(0.001)
            yield [Done("stop")]
        finally:
            self.finished += 1
            self.closed.set()


async def test_a_reader_that_stops_reading_never_slows_the_generation_or_another_reader(serve: ServeApp) -> None:
    provider = _SlowConsumerProvider(size=16_000, count=400)  # 6.4 MB: far more than socket buffers hold
    config = BASE.with_changes(write_timeout=0.5, send_buffer=32_768, log_max_bytes=64 << 20)
    host, api = relay_host(config, provider)
    base = await serve(host)
    address, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(address, int(port))
    writer.write(b"GET /api/chat?prompt=x&format=ndjson HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    await asyncio.wait_for(provider.started.wait(), 5)
    await reader.readuntil(b"\r\n\r\n")  # the head; then this client reads nothing more
    registry = api[RELAY].streams
    await wait_until(lambda: registry.retained == 1)
    (stream_id,) = _ids(registry)
    # A second reader of the same generation gets every event, while the first one stalls.
    async with (
        aiohttp.ClientSession() as http,
        http.get(
            f"{base}/api/streams/{stream_id}", params={"after": "0"}, headers={"Accept": "application/x-ndjson"}
        ) as resp,
    ):
        objects = ndjson_objects(await asyncio.wait_for(resp.read(), 30))
    assert [o["seq"] for o in objects] == list(range(1, 402))
    assert objects[-1]["type"] == "done"
    assert provider.yielded == 400  # the generation was never held back by the stalled reader
    # The stalled client was dropped after the write timeout: the server closed its connection.
    received = 0
    while chunk := await asyncio.wait_for(reader.read(1 << 16), 10):
        received += len(chunk)
    assert received < 400 * 16_000
    writer.close()


@pytest.mark.parametrize("ending", ["done", "error", "timeout"])
async def test_a_keep_alive_connection_serves_another_stream_after_each_ending(serve: ServeApp, ending: str) -> None:
    provider = ScriptedProvider()
    host, _ = relay_host(BASE.with_changes(first_token_timeout=0.2), provider)
    base = await serve(host)
    address, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(address, int(port))
    try:
        for prompt in ("one", "two"):
            if ending == "done" or prompt == "two":
                provider.put([Delta(prompt), Done("stop")], None)
            elif ending == "error":
                provider.put([Delta(prompt)], UpstreamError("boom"))
            writer.write(f"GET /api/chat?prompt={prompt} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            if b"chunked" in head.lower():
                body = await _read_chunked(reader)
            else:
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                body = await reader.readexactly(length)
            if prompt == "two" or ending == "done":
                assert [d["content"] for k, d, _ in sse_events(body) if k == "message"] == [prompt]
            elif ending == "timeout":
                assert head.startswith(b"HTTP/1.1 504")
    finally:
        writer.close()


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    """A chunked body (RFC 9112 §7.1) read to its last chunk, so the connection can serve the next response."""
    body = b""
    while True:
        size = int((await asyncio.wait_for(reader.readuntil(b"\r\n"), 5)).split(b";")[0], 16)
        if size == 0:
            assert await reader.readuntil(b"\r\n") == b"\r\n"
            return body
        body += await reader.readexactly(size)
        assert await reader.readexactly(2) == b"\r\n"


async def test_shutdown_closes_the_providers_of_running_generations() -> None:
    provider = ScriptedProvider()
    host, api = relay_host(BASE.with_changes(shutdown_grace=1.0), provider)
    runner = web.AppRunner(host, access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    address, port = runner.addresses[0][:2]
    async with aiohttp.ClientSession() as http:
        provider.put([Delta("a")])  # the head goes out with the first frame
        resp = await http.get(f"http://{address}:{port}/api/chat", params={"prompt": "x", "format": "ndjson"})
        await resp.content.readline()
        await runner.cleanup()
        objects = ndjson_objects(await resp.read())
    assert objects[-1]["error"]["type"] == "server_shutdown"
    assert provider.closed.is_set()
    assert len(api[RELAY].streams) == 0


class _Slot:
    """An admission whose release the test can see."""

    def __init__(self) -> None:
        self.headers: dict[str, str] = {}
        self.released = 0

    async def release(self) -> None:
        self.released += 1


@pytest.mark.parametrize("when", ["before-its-task-runs", "while-it-waits"])
async def test_a_cancelled_generation_gives_its_admission_back_and_opens_no_upstream(when: str) -> None:
    provider = ScriptedProvider()
    slot = _Slot()
    generation = Generation(provider, ChatRequest((Message("user", "x"),), "m"), GenerationSettings(), admission=slot)
    generation.start()
    if when == "while-it-waits":
        await asyncio.wait_for(provider.started.wait(), 5)
    generation.cancel(Outcome.ABANDONED)
    await asyncio.wait_for(generation.wait_closed(), 5)
    assert slot.released == 1
    assert generation.outcome is Outcome.ABANDONED
    assert generation.log.since(0) == [Error("cancelled", "the stream was cancelled when its last reader left")]
    assert provider.opened == (1 if when == "while-it-waits" else 0)
    assert provider.finished == provider.opened


async def test_a_cancelled_generation_gives_its_admission_back_as_a_task_no_longer_being_cancelled() -> None:
    # The cancellation that ended it is the generation's own and handled: a release that waits on a timeout (a
    # Redis limiter's) must not see the task as still being cancelled.
    class TimedSlot(_Slot):
        cancelling = -1
        timed_out = False

        async def release(self) -> None:
            task = asyncio.current_task()
            assert task is not None
            self.cancelling = task.cancelling()
            try:
                async with asyncio.timeout(0.01):
                    await asyncio.sleep(1)
            except TimeoutError:
                self.timed_out = True
            await super().release()

    provider = ScriptedProvider()
    slot = TimedSlot()
    generation = Generation(provider, ChatRequest((Message("user", "x"),), "m"), GenerationSettings(), admission=slot)
    generation.start()
    await asyncio.wait_for(provider.started.wait(), 5)
    generation.cancel(Outcome.STOPPED)
    await asyncio.wait_for(generation.wait_closed(), 5)
    assert slot.cancelling == 0
    assert slot.timed_out
    assert slot.released == 1


async def test_wait_closed_waits_for_the_admission_to_be_given_back() -> None:
    # A Redis limiter's release is a network call: shutdown waits (wait_closed) until it is done, even for a
    # generation that has ended and is only giving its slot back.
    class SlowSlot(_Slot):
        def __init__(self) -> None:
            super().__init__()
            self.proceed = asyncio.Event()

        async def release(self) -> None:
            await self.proceed.wait()
            await super().release()

    provider = ScriptedProvider()
    slot = SlowSlot()
    generation = Generation(provider, ChatRequest((Message("user", "x"),), "m"), GenerationSettings(), admission=slot)
    generation.start()
    await asyncio.wait_for(provider.started.wait(), 5)
    provider.put([Delta("a"), Done("stop")], None)  # (None: the upstream body ends with the reply)
    await asyncio.wait_for(provider.closed.wait(), 5)  # the task is past the provider, giving the slot back
    assert generation.ended
    waiting = asyncio.create_task(generation.wait_closed())
    await asyncio.sleep(0.05)
    assert not waiting.done()
    slot.proceed.set()
    await asyncio.wait_for(waiting, 5)
    assert slot.released == 1


async def test_a_reader_that_stops_reading_holds_the_generation_to_a_bounded_lead(serve: ServeApp) -> None:
    # 6.4 MB of reply for a client that reads nothing: the generation may run ahead of it only by the lead, then
    # stops reading the upstream (whose own flow control then holds it back) until the client is dropped.
    provider = _SlowConsumerProvider(size=16_000, count=400)
    config = BASE.with_changes(write_timeout=1.0, send_buffer=32_768)
    host, api = relay_host(config, provider)
    base = await serve(host)
    address, port = base.removeprefix("http://").split(":")
    _reader, writer = await asyncio.open_connection(address, int(port))
    writer.write(b"GET /api/chat?prompt=x&format=ndjson HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    await asyncio.wait_for(provider.started.wait(), 5)
    await asyncio.sleep(0.5)  # the client reads nothing meanwhile
    pulled = provider.yielded
    await asyncio.sleep(0.3)
    # The generation stopped pulling (without the lead it pulls all 400 batches in about 0.4 s): what it holds
    # unread is the lead plus one batch; the socket buffers took the rest of what was pulled.
    assert provider.yielded == pulled
    assert pulled < 60
    await asyncio.wait_for(provider.closed.wait(), 10)  # dropped after the write timeout: upstream closed
    assert provider.yielded == pulled
    assert api[RELAY].streams.readers == 0
    writer.close()


async def test_with_idle_and_total_timeouts_off_the_first_token_clock_stops_at_the_first_token(
    serve: ServeApp, http: aiohttp.ClientSession
) -> None:
    provider = ScriptedProvider()
    config = BASE.with_changes(first_token_timeout=0.2, idle_timeout=0, total_timeout=0)
    host, _ = relay_host(config, provider)
    base = await serve(host)
    provider.put([Delta("a")])
    async with http.get(f"{base}/api/chat", params={"prompt": "x", "format": "ndjson"}) as resp:
        assert (await resp.content.readline()).startswith(b'{"type":"delta"')
        await asyncio.sleep(0.5)  # well past the first-token timeout: it no longer applies
        provider.put([Delta("b"), Done("stop")])
        assert [o["type"] for o in ndjson_objects(await resp.content.read())] == ["delta", "done"]


class _TwoProviders:
    """The first request streams from `a`, the second from `b`."""

    name = "two"

    def __init__(self) -> None:
        self.a, self.b = ScriptedProvider(), ScriptedProvider()
        self.calls = 0

    def stream(self, request: ChatRequest) -> AsyncGenerator[Sequence[Event], None]:
        self.calls += 1
        return (self.a if self.calls == 1 else self.b).stream(request)

    async def aclose(self) -> None:
        return None


async def test_over_the_total_log_bound_live_readers_keep_streaming(serve: ServeApp) -> None:
    # Each log is far inside its own bound; together they pass the total (~15 events of 1 kB), with both upstreams
    # delivering in the same loop turn: what a reader has not written yet is never dropped.
    two = _TwoProviders()
    host, _ = relay_host(BASE.with_changes(log_total_bytes=19_500), two)
    base = await serve(host)
    async with aiohttp.ClientSession() as http:

        async def read() -> bytes:
            async with http.get(f"{base}/api/chat", params={"prompt": "x", "resume": "1"}) as resp:
                return await resp.read()

        first = asyncio.create_task(read())
        await asyncio.wait_for(two.a.started.wait(), 5)
        second = asyncio.create_task(read())
        await asyncio.wait_for(two.b.started.wait(), 5)
        for _ in range(12):
            two.a.put([Delta("a" * 900)])
            two.b.put([Delta("b" * 900)])
            await asyncio.sleep(0.02)
        two.a.put([Done("stop")], None)
        two.b.put([Done("stop")], None)
        bodies = await asyncio.wait_for(asyncio.gather(first, second), 10)
    for body in bodies:
        events = sse_events(body)
        assert [kind for kind, _, _ in events] == ["stream"] + ["message"] * 12 + ["done"]


async def test_a_reader_joining_at_the_live_edge_lets_a_waiting_generation_go_on(serve: ServeApp) -> None:
    # The generation waits for its readers (the lead) while the only reader that set the pace stalls; a reader
    # that joins at the newest event holds everything before it, so the generation must go on for it.
    provider = ScriptedProvider()
    host, api = relay_host(BASE.with_changes(write_timeout=2.0, send_buffer=4096), provider)
    base = await serve(host)
    address, port = base.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((address, int(port)))
    stalled_reader, stalled = await asyncio.open_connection(sock=sock)
    stalled.write(b"GET /api/chat?prompt=x&format=ndjson&resume=1 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    await stalled_reader.readuntil(b"\r\n\r\n")
    (generation,) = list(api[RELAY].streams)
    for _ in range(200):
        provider.put([Delta("x" * 16_000)])  # 3.2 MB ready at once
    while True:  # until the generation stops pulling: it waits for its readers
        edge = generation.log.last_seq
        await asyncio.sleep(0.5)
        if generation.log.last_seq == edge:
            break
    assert provider.steps.qsize() > 100
    async with aiohttp.ClientSession() as http:
        params = {"after": str(edge), "format": "ndjson"}
        async with http.get(f"{base}/api/streams/{generation.id}", params=params) as resp:
            got = await asyncio.wait_for(resp.content.readany(), 5)
    assert got.startswith(b'{"type":"delta","seq":%d' % (edge + 1))
    stalled.close()


async def test_waiters_woken_by_something_else_are_not_kept_while_the_generation_waits() -> None:
    # A reader woken by its heartbeat (not by an append) waits again with a new future: a stream waiting an hour
    # for its first token must not keep one future per heartbeat until then.
    generation = Generation(ScriptedProvider(), ChatRequest((Message("user", "x"),), "m"), GenerationSettings())
    generation.readers = 2
    loop = asyncio.get_running_loop()
    pending = [loop.create_future() for _ in range(2)]  # the other reader's, and this one's, still waiting
    for waiter in pending:
        generation.add_waiter(waiter)
    woken: list[weakref.ref[asyncio.Future[None]]] = []
    for _ in range(100):
        waiter = loop.create_future()
        generation.add_waiter(waiter)
        waiter.set_result(None)  # its heartbeat came
        woken.append(weakref.ref(waiter))
        del waiter
    assert sum(ref() is not None for ref in woken) <= 2 * generation.readers + 2
    # The ones still waiting are woken by the next append.
    generation.start()
    generation.cancel(Outcome.STOPPED)
    assert all(waiter.done() for waiter in pending)
    await asyncio.wait_for(generation.wait_closed(), 5)


def test_logs_without_events_yet_share_nothing_once_one_of_them_appends() -> None:
    # A log makes its lists at its first append (an idle stream's log holds none): no other log may see it.
    first, second = EventLog(10, 1 << 20), EventLog(10, 1 << 20)
    first.append([Delta("a")])
    assert (first.last_seq, second.last_seq) == (1, 0)
    assert second.since(0) == []
    assert (second.bytes, second.bytes_after(0)) == (0, 0)
    second.append([Delta("b"), Delta("c")])
    assert first.since(0) == [Delta("a")]
    assert second.since(0) == [Delta("b"), Delta("c")]
    assert EventLog(10, 1 << 20).since(0) == []
