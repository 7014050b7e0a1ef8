"""What the garbage collector sees of a relay: served streams leave no reference cycles, and a stream retained for
resuming keeps a handful of objects, not one per token nor its upstream response.

Both matter under load: a collection walks every tracked object that survived the last one, and each pauses the
event loop (every token and every first byte waits behind it). A cycle is freed only by a collection, with all it
holds; a retained stream is walked by every collection of the older generations for as long as it is retained.
Over real sockets, the relay in openai mode in front of the fake upstream, production runner settings.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

import aiohttp

from server.app import create_app

from .conftest import ServeApp, upstream_config
from .fake_upstream import Behavior, FakeUpstream
from .streaming import wait_health
from .wire import ndjson_objects, sse_events

SSE = {"Accept": "text/event-stream"}
NDJSON = {"Accept": "application/x-ndjson"}
TOKENS = [f"t{i:02d} " for i in range(30)]
# Tracked objects the process may gain per retained, ended stream: the generation, its log (two lists), how it
# ended (the terminal event, the usage, the upstream's report) and a few small lists, 9 in all; ~3 more per
# request come from this test's own connections and timers (12 measured). Not one per token (the 30-token replies
# here kept 66 each when they did), nor the task, its context and the upstream response (~25 more).
RETAINED_OBJECTS_PER_STREAM = 20


def _is_the_relays(obj: object) -> bool:
    """An object of the relay's own classes (server/). (aiohttp's own objects are left out: the fake upstream is
    an aiohttp server in this process too. A cycle through a relay request has a reader or a generation in it.)"""
    return type(obj).__module__.startswith("server.")


@contextmanager
def _garbage_kept() -> Iterator[list[object]]:
    """Collect first, then keep what the collector frees (it frees only reference cycles) in the yielded list."""
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    kept: list[object] = []
    try:
        yield kept
        gc.collect()
        kept.extend(gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()


async def _chat_sse(http: aiohttp.ClientSession, base: str) -> None:
    async with http.get(f"{base}/api/chat", params={"prompt": "hi"}, headers=SSE) as response:
        assert sse_events(await response.read())[-1][0] == "done"


async def test_served_streams_leave_no_reference_cycles(
    fake_upstream: FakeUpstream, serve: ServeApp, http: aiohttp.ClientSession
) -> None:
    fake_upstream.behavior = Behavior(tokens=TOKENS, delay=0.002)
    base = await serve(create_app(upstream_config(fake_upstream)))
    await _chat_sse(http, base)  # first use: the upstream client and its pool are made once
    body = {"messages": [{"role": "user", "content": "hi"}]}
    with _garbage_kept() as garbage:
        await _chat_sse(http, base)
        async with http.post(f"{base}/api/chat", json={**body, "resume": True}, headers=NDJSON) as response:
            stream_id = response.headers["X-Stream-Id"]
            assert ndjson_objects(await response.read())[-1]["type"] == "done"
        async with http.get(f"{base}/api/streams/{stream_id}", params={"after": "3"}, headers=NDJSON) as response:
            assert ndjson_objects(await response.read())[-1]["type"] == "done"
        openai_body = {**body, "model": "fake-model", "stream": True}
        async with http.post(f"{base}/v1/chat/completions", json=openai_body) as response:
            assert (await response.read()).endswith(b"data: [DONE]\n\n")
        # A client that leaves mid-reply, and a refused request.
        async with http.get(f"{base}/api/chat", params={"prompt": "hi"}, headers=SSE) as response:
            await response.content.readuntil(b"\n\n")
            response.close()
        async with http.post(
            f"{base}/api/chat", data=b"{not json", headers={**NDJSON, "Content-Type": "application/json"}
        ) as response:
            assert response.status == 400
        await wait_health(http, base, open_streams=0, readers=0)
    assert [type(obj).__qualname__ for obj in garbage if _is_the_relays(obj)] == []


async def test_a_retained_stream_keeps_a_few_objects_not_one_per_token(
    fake_upstream: FakeUpstream, serve: ServeApp, http: aiohttp.ClientSession
) -> None:
    fake_upstream.behavior = Behavior(tokens=TOKENS)
    base = await serve(create_app(upstream_config(fake_upstream)))
    for _ in range(3):  # the upstream client, its pool and the connections are made once
        await _chat_sse(http, base)
    streams = 40
    await wait_health(http, base, open_streams=0, retained_streams=3)
    fake_upstream.seen.clear()
    gc.collect()
    before = len(gc.get_objects())
    for _ in range(streams):
        await _chat_sse(http, base)
    await wait_health(http, base, open_streams=0, readers=0, retained_streams=3 + streams)
    fake_upstream.seen.clear()  # (the fake upstream's own record of each request)
    gc.collect()
    per_stream = (len(gc.get_objects()) - before) / streams
    assert per_stream <= RETAINED_OBJECTS_PER_STREAM, per_stream
