"""Streams in Redis (``--stream-store redis``, server/redis_*.py): two relay processes, one real redis-server.

Both instances are real ``python -m server`` processes (tests/processes.py) sharing a real ``redis-server``
(tests/redis_server.py); both relay the fake upstream through the real `openai` client. The fake upstream runs in
a thread of its own, so that it outlives each hypothesis example's event loop; it reports every request it saw and
when the relay closed it. Each test gives its requests a prompt of its own, so it counts only its own requests.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator, Coroutine, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .fake_upstream import Behavior, FakeUpstream, Seen
from .processes import free_port, start_server, wait_up
from .redis_server import RedisServer
from .streaming import EventSourceModel, ndjson_complete, read_cut
from .wire import ndjson_objects

pytestmark = pytest.mark.redis

NDJSON = {"Accept": "application/x-ndjson"}
SSE = {"Accept": "text/event-stream"}
TOKENS = [f"tok{i:02d} " for i in range(20)]
# The documented bound for readers elsewhere to learn that the owner died (docs/streams.md): the owner's lease
# (5 s) and one follower's wait (1 s); the rest is slack for a loaded 2-core machine, not a benchmark.
LOST_BOUND = 12.0
EXAMPLE_TIMEOUT = 30.0


class UpstreamThread:
    """The fake upstream on an event loop of its own thread, for processes that outlive a test's loops."""

    def __init__(self) -> None:
        self.upstream = FakeUpstream(Behavior(tokens=TOKENS, delay=0.01))
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.url = asyncio.run_coroutine_threadsafe(self.upstream.start(), self._loop).result(10)

    def seen(self, prompt: str) -> list[Seen]:
        return [s for s in list(self.upstream.seen) if s.body["messages"][-1]["content"] == prompt]

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.upstream.close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


@dataclass
class Instance:
    base: str
    process: Any
    stderr: Path


def relay_argv(upstream_url: str, redis_url: str, *extra: str) -> list[str]:
    return [
        "--provider", "openai", "--base-url", upstream_url, "--api-key", "sk-test-secret-key-0123456789",
        "--model", "fake-model", "--upstream-max-retries", "0", "--limits", "false", "--heartbeat", "0",
        "--shutdown-grace", "0.5", "--resume-grace", "5", "--stream-store", "redis", "--redis-url", redis_url,
        *extra,
    ]  # fmt: skip


@asynccontextmanager
async def instances(
    directory: Path, upstream_url: str, redis_url: str, count: int = 2, *extra: str
) -> AsyncIterator[list[Instance]]:
    """`count` relay processes sharing `redis_url`; killed at the end."""
    started: list[Instance] = []
    try:
        for index in range(count):
            port = free_port()
            stderr = directory / f"relay-{index}-{uuid.uuid4().hex[:6]}.log"
            process = start_server(port, *relay_argv(upstream_url, redis_url, *extra), stderr=stderr)
            started.append(Instance(f"http://127.0.0.1:{port}", process, stderr))
        async with aiohttp.ClientSession() as http:
            for instance in started:
                await wait_up(instance.base, http)
        yield started
    finally:
        for instance in started:
            instance.process.kill()
            await asyncio.to_thread(instance.process.wait, 10)


@dataclass
class Cluster:
    redis: RedisServer
    upstream: UpstreamThread
    a: str
    b: str


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One redis-server, the fake upstream and two relay instances A and B, for the tests that kill nothing."""
    directory = tmp_path_factory.mktemp("redis-streams")
    redis = RedisServer(directory)
    redis.start()
    upstream = UpstreamThread()
    loop = asyncio.new_event_loop()
    context = instances(directory, upstream.url, redis.url)
    try:
        a, b = loop.run_until_complete(context.__aenter__())
        yield Cluster(redis, upstream, a.base, b.base)
    finally:
        loop.run_until_complete(context.__aexit__(None, None, None))
        loop.close()
        upstream.close()
        redis.stop()
    # Whatever the tests did to them, neither instance logged a traceback.
    for instance in (a, b):
        assert "Traceback" not in instance.stderr.read_text()


async def _within(seconds: float, scenario: Coroutine[Any, Any, None]) -> None:
    async with asyncio.timeout(seconds):
        await scenario


def _prompt(upstream: UpstreamThread, behavior: Behavior) -> str:
    prompt = f"prompt-{uuid.uuid4().hex}"
    upstream.upstream.by_prompt[prompt] = behavior
    return prompt


def _deltas(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objects if o.get("type") == "delta"]


async def _start(http: aiohttp.ClientSession, base: str, prompt: str, *, resume: bool) -> aiohttp.ClientResponse:
    body = {"messages": [{"role": "user", "content": prompt}], "resume": resume}
    response = await http.post(f"{base}/api/chat", json=body, headers=NDJSON)
    assert response.status == 200
    return response


async def _wait_until(predicate: Any, timeout: float, what: str) -> float:
    """Poll `predicate` until true; the seconds it took. Fails after `timeout`."""
    began = time.monotonic()
    while not predicate():
        if time.monotonic() - began > timeout:
            raise AssertionError(f"{what} did not happen within {timeout} s")
        await asyncio.sleep(0.005)
    return time.monotonic() - began


# -- 1. cut on A, resume on B: the same text, one upstream request ------------------------------------------------


@given(data=st.data())
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_cut_on_one_instance_resumes_on_the_other_exactly(cluster: Cluster, data: st.DataObject) -> None:
    async def scenario() -> None:
        prompt = _prompt(cluster.upstream, Behavior(tokens=TOKENS, delay=0.01))
        async with aiohttp.ClientSession() as http:
            response = await _start(http, cluster.a, prompt, resume=True)
            stream_id = response.headers["X-Stream-Id"]
            # A whole reply is ~40 bytes per token: cut anywhere in it, the opening included.
            cut = data.draw(st.integers(0, 40 * len(TOKENS)), label="cut")
            body = await read_cut(response, cut)
            received = ndjson_complete(body)
            after = max((o["seq"] for o in received if "seq" in o), default=0)
            async with http.get(
                f"{cluster.b}/api/streams/{stream_id}", params={"after": str(after)}, headers=NDJSON
            ) as resumed:
                if resumed.status == 204:  # the cut fell after the terminal line
                    rest: list[dict[str, Any]] = []
                else:
                    assert resumed.status == 200, await resumed.text()
                    rest = ndjson_objects(await resumed.read())
        reply = [o for o in received + rest if "seq" in o]
        assert [o["seq"] for o in reply] == list(range(1, len(TOKENS) + 2))  # no gap, no duplicate
        assert "".join(o["content"] for o in _deltas(reply)) == "".join(TOKENS)
        assert reply[-1]["type"] == "done"
        assert len(cluster.upstream.seen(prompt)) == 1

    asyncio.run(_within(EXAMPLE_TIMEOUT, scenario()))


# -- 2. readers on A and B of one stream agree ---------------------------------------------------------------------


async def test_readers_on_both_instances_read_identical_sequences(cluster: Cluster) -> None:
    tokens = [f"w{i} " for i in range(60)]
    prompt = _prompt(cluster.upstream, Behavior(tokens=tokens, delay=0.01))
    async with aiohttp.ClientSession() as http:
        response = await _start(http, cluster.a, prompt, resume=False)
        stream_id = response.headers["X-Stream-Id"]
        async with http.get(f"{cluster.b}/api/streams/{stream_id}", params={"after": "0"}, headers=NDJSON) as other:
            assert other.status == 200
            on_a, on_b = await asyncio.gather(response.read(), other.read())
        response.close()
        # Ended: on the other instance too, the terminal event's holder is told to stop, a later event is refused,
        # and an unknown stream is unknown.
        last = len(tokens) + 1
        for after, status in ((last, 204), (last + 5, 400), (last - 1, 200)):
            async with http.get(
                f"{cluster.b}/api/streams/{stream_id}", params={"after": str(after)}, headers=NDJSON
            ) as late:
                assert late.status == status
        async with http.get(f"{cluster.b}/api/streams/{uuid.uuid4().hex}", params={"after": "0"}) as unknown:
            assert unknown.status == 404
            assert (await unknown.json())["error"]["type"] == "resume_unavailable"
        async with http.get(f"{cluster.a}/api/healthz") as report:
            store = (await report.json())["stream_store"]
    assert store["redis"] == "up"
    assert store["events_written"] >= len(tokens) + 1
    assert store["batches_written"] <= store["events_written"]
    a_events, b_events = ndjson_objects(on_a), ndjson_objects(on_b)
    assert a_events == b_events
    assert "".join(o["content"] for o in _deltas(a_events)) == "".join(tokens)
    assert len(cluster.upstream.seen(prompt)) == 1


async def test_an_event_source_reconnecting_to_the_other_instance_resumes(cluster: Cluster) -> None:
    """What a browser does behind a load balancer: the same /api/chat URL, with Last-Event-ID, lands on B."""
    prompt = _prompt(cluster.upstream, Behavior(tokens=TOKENS, delay=0.02))
    url = "/api/chat"
    params = {"prompt": prompt, "resume": "1"}
    async with aiohttp.ClientSession() as http:
        first = await http.get(cluster.a + url, params=params, headers=SSE)
        assert first.status == 200
        body = b""
        while body.count(b"\n\n") < 4:  # the opening block and three tokens
            body += await first.content.readany()
        first.close()
        browser = EventSourceModel()
        browser.connection(body)
        async with http.get(
            cluster.b + url, params=params, headers={**SSE, "Last-Event-ID": browser.last_event_id}
        ) as second:
            assert second.status == 200
            browser.connection(await second.read())
    reply = [event for event in browser.events if not event.last_event_id.endswith("/0")]
    assert [int(e.last_event_id.rpartition("/")[2]) for e in reply] == list(range(1, len(TOKENS) + 2))
    assert "".join(json.loads(e.data)["content"] for e in reply if e.type == "message") == "".join(TOKENS)
    assert len(cluster.upstream.seen(prompt)) == 1


# -- 3. DELETE on B stops A's generation ---------------------------------------------------------------------------


async def test_delete_on_the_other_instance_stops_the_generation(cluster: Cluster) -> None:
    prompt = _prompt(cluster.upstream, Behavior(tokens=[f"t{i} " for i in range(500)], delay=0.02))
    async with aiohttp.ClientSession() as http:
        response = await _start(http, cluster.a, prompt, resume=False)
        stream_id = response.headers["X-Stream-Id"]
        await response.content.readline()  # the first token is there: the generation runs on A
        stopped_at = time.monotonic()
        async with http.delete(f"{cluster.b}/api/streams/{stream_id}") as stop:
            assert stop.status == 204
        seen = cluster.upstream.seen(prompt)[0]
        await _wait_until(lambda: seen.closed_by_client_at is not None, 5.0, "the upstream request closing")
        assert seen.closed_by_client_at is not None
        took = seen.closed_by_client_at - stopped_at
        body = await response.read()
        response.close()
        # Unknown ids are refused on either instance.
        async with http.delete(f"{cluster.b}/api/streams/{uuid.uuid4().hex}") as unknown:
            assert unknown.status == 404
            assert (await unknown.json())["error"]["type"] == "resume_unavailable"
    print(f"DELETE sent to B -> upstream closed by A: {1000 * took:.1f} ms")
    assert seen.closed_by_client_at is not None
    assert seen.closed_by_client_at - stopped_at < 1.0
    last = json.loads(body.splitlines()[-1])
    assert last["type"] == "error"
    assert last["error"]["type"] == "stopped"


# -- 4. the last reader anywhere leaving cancels a generation that did not opt in -----------------------------------


async def test_a_reader_elsewhere_keeps_the_generation_until_it_leaves(cluster: Cluster) -> None:
    tokens = [f"t{i} " for i in range(500)]
    prompt = _prompt(cluster.upstream, Behavior(tokens=tokens, delay=0.02))
    async with aiohttp.ClientSession() as http:
        response = await _start(http, cluster.a, prompt, resume=False)
        stream_id = response.headers["X-Stream-Id"]
        await response.content.readline()
        other = await http.get(f"{cluster.b}/api/streams/{stream_id}", params={"after": "0"}, headers=NDJSON)
        assert other.status == 200
        await other.content.readline()
        response.close()  # A's own reader leaves; B's still reads
        seen = cluster.upstream.seen(prompt)[0]
        before = seen.tokens_sent
        await _wait_until(lambda: seen.tokens_sent >= before + 20, 10.0, "the generation going on for B's reader")
        assert seen.closed_by_client_at is None
        received = [json.loads(await other.content.readline()) for _ in range(5)]
        assert all(o["type"] == "delta" for o in received)
        other.close()  # the last reader anywhere leaves
        left_at = time.monotonic()
        took = await _wait_until(lambda: seen.closed_by_client_at is not None, 5.0, "the upstream request closing")
    print(f"last reader left on B -> upstream closed by A: {1000 * took:.1f} ms")
    assert seen.closed_by_client_at is not None
    assert seen.closed_by_client_at - left_at < 3.0
    assert not seen.completed


# -- 5. SIGKILL of the owner: generation_lost, now and on a later reconnect ----------------------------------------


async def test_a_killed_owner_is_reported_as_generation_lost(tmp_path: Path) -> None:
    redis = RedisServer(tmp_path)
    redis.start()
    upstream = FakeUpstream(Behavior(tokens=[f"t{i} " for i in range(1000)], delay=0.02))
    await upstream.start()
    try:
        async with instances(tmp_path, upstream.url, redis.url) as (a, b), aiohttp.ClientSession() as http:
            response = await _start(http, a.base, "kill me", resume=True)
            stream_id = response.headers["X-Stream-Id"]
            other = await http.get(f"{b.base}/api/streams/{stream_id}", params={"after": "0"}, headers=NDJSON)
            assert other.status == 200
            lines = [json.loads(await other.content.readline()) for _ in range(3)]
            os.kill(a.process.pid, signal.SIGKILL)
            killed_at = time.monotonic()
            while True:
                line = await other.content.readline()
                assert line, "B's reader ended without an error"
                lines.append(json.loads(line))
                if lines[-1]["type"] == "error":
                    break
            took = time.monotonic() - killed_at
            other.close()
            assert lines[-1]["error"]["type"] == "generation_lost"
            last = lines[-1]["seq"]
            seqs = [o["seq"] for o in lines]
            assert seqs == list(range(seqs[0], last + 1))
            # A later reconnect (any instance, any point) gets the same error, never a new generation.
            async with http.get(
                f"{b.base}/api/streams/{stream_id}", params={"after": str(last - 1)}, headers=NDJSON
            ) as again:
                assert again.status == 200
                assert ndjson_objects(await again.read()) == [lines[-1]]
            async with http.get(
                f"{b.base}/api/streams/{stream_id}", params={"after": str(last)}, headers=NDJSON
            ) as done:
                assert done.status == 204
            assert len(upstream.seen) == 1
    finally:
        await upstream.close()
        redis.stop()
    print(f"SIGKILL of A -> generation_lost on B after {took:.2f} s")
    assert took < LOST_BOUND


# -- 6. Redis stopped mid-stream and restarted ---------------------------------------------------------------------


async def test_redis_down_mid_stream_degrades_then_recovers(tmp_path: Path) -> None:
    redis = RedisServer(tmp_path)
    redis.start()
    tokens = [f"t{i} " for i in range(150)]
    upstream = FakeUpstream(Behavior(tokens=tokens, delay=0.02))
    await upstream.start()
    try:
        async with instances(tmp_path, upstream.url, redis.url) as (a, b), aiohttp.ClientSession() as http:
            response = await _start(http, a.base, "outage", resume=True)
            stream_id = response.headers["X-Stream-Id"]
            first = await response.content.readline()
            follower = await http.get(f"{b.base}/api/streams/{stream_id}", params={"after": "0"}, headers=NDJSON)
            assert follower.status == 200
            await follower.content.readline()
            redis.stop()
            # A reader on the other instance cannot go on: it ends, in band, instead of waiting forever.
            async with asyncio.timeout(10):
                rest = ndjson_objects(await follower.read())
            follower.close()
            assert rest[-1]["type"] == "error"
            assert rest[-1]["error"]["type"] == "resume_unavailable"
            # The local reader streams on from memory: the whole reply, nothing lost.
            body = first + await response.read()
            response.close()
            assert "".join(o["content"] for o in _deltas(ndjson_objects(body))) == "".join(tokens)
            # Elsewhere it cannot be resumed, and says so at once.
            async with http.get(f"{b.base}/api/streams/{stream_id}", params={"after": "1"}, headers=NDJSON) as r:
                assert r.status == 404
                assert (await r.json())["error"]["type"] == "resume_unavailable"
            redis.start()
            # Redis back: the degraded stream stays unavailable elsewhere (its Redis log would have a gap) ...
            await asyncio.sleep(1.5)
            async with http.get(f"{b.base}/api/streams/{stream_id}", params={"after": "1"}, headers=NDJSON) as r:
                assert r.status == 404
            # ... and new streams are resumable on the other instance again.
            deadline = time.monotonic() + 10
            while True:
                fresh = await _start(http, a.base, "after the outage", resume=True)
                fresh_id = fresh.headers["X-Stream-Id"]
                await fresh.read()
                fresh.close()
                async with http.get(f"{b.base}/api/streams/{fresh_id}", params={"after": "0"}, headers=NDJSON) as r:
                    if r.status == 200:
                        assert "".join(o["content"] for o in _deltas(ndjson_objects(await r.read()))) == "".join(tokens)
                        break
                assert time.monotonic() < deadline, "new streams never became resumable elsewhere again"
                await asyncio.sleep(0.5)
        logs = a.stderr.read_text() + b.stderr.read_text()
    finally:
        await upstream.close()
        redis.stop()
    assert "Traceback" not in logs
    assert logs.count("Redis is unreachable") <= 2, logs  # once per instance and episode
