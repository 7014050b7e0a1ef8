"""The stream runs in the host's handler task: its own cancellations (stops) must be balanced on that task
whatever happens to them (taken back exactly once, over the count the task came in with), a cancellation of the
host's must still come out, and nothing of the stream (its abort-callback list) stays in the task's context."""

from __future__ import annotations

import asyncio
import contextlib
import json

import pytest
from aiohttp import web

from server.events import Delta, Done
from server.providers import base as providers_base

from .conftest import ServeApp
from .test_stream_lifecycle import (  # noqa: F401  (_close_raw_clients: the autouse fixture)
    BASE,
    Handler,
    LingeringProvider,
    ScriptedProvider,
    Step,
    TaskProbe,
    _close_raw_clients,
    _connect,
    _read_response,
    _registry,
    _relay_host,
    _send_get,
    _the_stream,
    _wait_until,
    host_deadline,
)
from .wire import sse_events


class WaitForProvider(ScriptedProvider):
    """The scripted provider, but each upstream read is bounded with asyncio.wait_for (a common way to put a
    read timeout on an upstream). On 3.11, wait_for returns the result and drops the cancellation when the
    awaited read completed in the same loop turn as the cancel."""

    async def next_step(self) -> Step:
        return await asyncio.wait_for(self.steps.get(), 30)


@pytest.mark.parametrize("host", ["probe", "host-deadline"])
async def test_a_stop_absorbed_by_the_provider_is_still_taken_back_from_the_host_task(
    serve: ServeApp, host: str
) -> None:
    # shutdown() (or a timeout or a disconnect) falls in the same loop turn as the next upstream batch: the
    # provider's wait_for swallows the cancellation and yields the batch, the stream goes on to Done and returns
    # from _relay: the stop's cancellation must still be taken back.
    provider = WaitForProvider()
    probe = TaskProbe()
    seen: list[str] = []

    @web.middleware
    async def host_deadline(request: web.Request, handler: Handler) -> web.StreamResponse:
        # The host's deadline covers the handler and its own work after it (an audit write, say).
        try:
            async with asyncio.timeout(0.4):
                response = await handler(request)
                await asyncio.sleep(2)
        except TimeoutError:
            seen.append("timeout")
            return response
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise
        return response

    host_app, api = _relay_host(BASE, provider, middlewares=[probe if host == "probe" else host_deadline])
    base = await serve(host_app)
    reader, writer = await _connect(base)
    _send_get(writer, "/api/chat?prompt=x")
    await asyncio.wait_for(provider.started.wait(), 5)
    stream = await _the_stream(api)
    await asyncio.sleep(0.05)
    # One loop turn: the upstream's next batch arrives, and the server starts its graceful shutdown.
    provider.put([Delta("a"), Done("stop")], None)
    stream.shutdown()
    status, _, body = await asyncio.wait_for(_read_response(reader), 5)
    assert status == 200
    assert [kind for kind, _, _ in sse_events(body)] == ["message", "done"]
    assert await _registry(api).wait_empty(5)
    if host == "probe":
        await _wait_until(lambda: bool(probe.after))
        assert probe.after == [("returned", 0, False)]
    else:
        await _wait_until(lambda: bool(seen))
        assert seen == ["timeout"]  # the host's own deadline stays a TimeoutError, not a bare CancelledError


async def test_a_host_task_entering_with_a_cancellation_count_still_gets_the_streams_own_timeout(
    serve: ServeApp,
) -> None:
    # The host's task already carries a cancellation count when the handler starts (a pre-step cut short by a
    # pre-3.11-style timeout helper that catches the CancelledError without uncancel(), or a 3.11 wait_for that
    # dropped one). The stream's own first-token timeout must still be the stream's: a 504, not taken for a
    # cancellation of the host's.
    provider = ScriptedProvider()

    @web.middleware
    async def old_style_timeout(request: web.Request, handler: Handler) -> web.StreamResponse:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().call_later(0.01, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):  # fall back to the handler
            await asyncio.sleep(1)  # a cache lookup, given up on after 10 ms
        return await handler(request)

    host_app, api = _relay_host(BASE.with_changes(first_token_timeout=0.1), provider, middlewares=[old_style_timeout])
    base = await serve(host_app)
    reader, writer = await _connect(base)
    _send_get(writer, "/api/chat?prompt=x")
    status, _, body = await asyncio.wait_for(_read_response(reader), 5)
    assert status == 504
    assert json.loads(body)["error"]["type"] == "timeout"
    assert _registry(api).outcomes == ["timeout"]


async def test_the_abort_collection_is_reset_when_the_host_cancels_during_the_side_tasks_unwinding(
    serve: ServeApp,
) -> None:
    # The client leaves while a heartbeat's side write waits in the host's on_response_prepare hook, whose cleanup
    # takes a moment; run()'s finally cancels the side task and waits for it, and the host's own deadline falls
    # there. The host's code after the handler (same task, same context) must not see the ended stream's abort
    # list as the place on_abort() appends to.
    provider = ScriptedProvider()
    after: list[object] = []

    def answer() -> web.StreamResponse:
        after.append(providers_base._abort_callbacks.get())
        return web.Response(status=504)

    host_app, _api = _relay_host(BASE.with_changes(heartbeat=0.03), provider, middlewares=[host_deadline(0.3, answer)])

    async def slow_prepare(request: web.Request, response: web.StreamResponse) -> None:
        try:
            await asyncio.sleep(1)
        finally:
            await asyncio.shield(asyncio.sleep(0.4))  # e.g. flushing an audit record, even when cancelled

    host_app.on_response_prepare.append(slow_prepare)
    base = await serve(host_app)
    _reader, writer = await _connect(base)
    _send_get(writer, "/api/chat?prompt=x")
    await asyncio.wait_for(provider.started.wait(), 5)
    await asyncio.sleep(0.1)  # the first heartbeat's write waits in the prepare hook
    writer.close()
    await _wait_until(lambda: bool(after))
    assert after == [None]


async def test_a_host_cancellation_with_a_stop_the_provider_turns_into_an_error_goes_on(serve: ServeApp) -> None:
    # The host cancels in the same loop turn as a stop, and the provider turns the CancelledError into an error of
    # its own: the stop ends the stream, and the host's cancellation still comes out of the handler.
    provider = LingeringProvider("error")
    probe = TaskProbe()
    tasks: list[asyncio.Task] = []

    @web.middleware
    async def grab(request: web.Request, handler: Handler) -> web.StreamResponse:
        task = asyncio.current_task()
        assert task is not None
        tasks.append(task)
        return await handler(request)

    host, api = _relay_host(BASE, provider, middlewares=[probe, grab])
    base = await serve(host)
    _reader, writer = await _connect(base)
    _send_get(writer, "/api/chat?prompt=x")
    await asyncio.wait_for(provider.started.wait(), 5)
    provider.put([Delta("a")])
    stream = await _the_stream(api)
    await asyncio.sleep(0.05)
    tasks[0].cancel()  # the host's
    stream.shutdown()  # the stream's own, same loop turn
    assert await _registry(api).wait_empty(5)
    await _wait_until(lambda: bool(probe.after))
    assert probe.after[0][0] == "cancelled", probe.after
