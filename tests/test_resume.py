"""Resumable streams (server/generation.py, registry.py, reader.py, handlers.py, resume.py), end to end.

Everything runs over real loopback sockets with production runner settings (``handler_cancellation=False``):
the relay in openai mode talks to the fake upstream through the real `openai` client, and the fake upstream
reports how many requests it saw and when the relay closed each one. A cut is a client closing its connection
after exactly k bytes of the body; the reconnect's ``Last-Event-ID`` is computed by the independent spec decoder
as a browser's EventSource would compute it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Coroutine
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.app import create_app
from server.config import Config
from server.generation import EVENT_OVERHEAD_BYTES

from .conftest import ServeApp, upstream_config
from .fake_upstream import Behavior, FakeUpstream
from .sse_decoder import SSEDecoder, SSEEvent
from .streaming import (
    EventSourceModel,
    health,
    ndjson_complete,
    ndjson_lines,
    read_cut,
    relay_with_upstream,
    sse_blocks,
    wait_health,
)
from .wire import ndjson_objects, sse_events

SSE = {"Accept": "text/event-stream"}
NDJSON = {"Accept": "application/x-ndjson"}
MESSAGES = [{"role": "user", "content": "hi"}]
TOKENS = [f"tok{i:02d} " for i in range(20)]
TERMINAL_SEQ = len(TOKENS) + 1  # the deltas, then done
# How long a departed client's upstream may stay open: a liveness bound on a shared 2-core machine, not a benchmark.
PROMPT_CLOSE = 0.5
UPSTREAM_GONE_TIMEOUT = 2.0

# One example takes well under a second; a hung one fails instead of holding the run.
EXAMPLE_TIMEOUT = 20.0
PROPERTY_SETTINGS = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)


def _config(upstream: FakeUpstream, **changes: object) -> Config:
    # A short shutdown grace: a test that leaves a generation running must not hold the runner's cleanup.
    return upstream_config(upstream, **{"shutdown_grace": 0.5, **changes})


async def _within(seconds: float, scenario: Coroutine[Any, Any, None]) -> None:
    async with asyncio.timeout(seconds):
        await scenario


def _error_type(raw: bytes) -> str:
    error_type: str = json.loads(raw)["error"]["type"]
    return error_type


async def _read_events(response: aiohttp.ClientResponse, count: int) -> tuple[bytes, list[Any]]:
    """Read the SSE body until at least `count` reply events are complete; (the bytes read, those events)."""
    body = b""
    while True:
        complete = body[: body.rfind(b"\n\n") + 2] if b"\n\n" in body else b""
        # Not the opening block of an opted-in stream (id <stream>/0): it is no event of the reply.
        events = [event for event in sse_events(complete) if not event[2].endswith("/0")]
        if len(events) >= count:
            return body, events
        chunk = await response.content.readany()
        assert chunk, f"the stream ended after {len(events)} events"
        body += chunk


async def _upstream_closed_since(upstream: FakeUpstream, since: float) -> float:
    """Wait for the relay to close the upstream request; seconds from `since` to the close."""
    seen = upstream.last
    async with asyncio.timeout(UPSTREAM_GONE_TIMEOUT):
        await seen.client_gone.wait()
    assert seen.closed_by_client_at is not None
    return seen.closed_by_client_at - since


# -- 1. a cut anywhere, then resume: the whole reply, exactly once ----------------------------------------------


@given(data=st.data())
@PROPERTY_SETTINGS
def test_sse_cut_at_any_byte_then_last_event_id_resumes_exactly(data: st.DataObject) -> None:
    async def scenario() -> None:
        async with relay_with_upstream(Behavior(tokens=TOKENS), resume_grace=5, shutdown_grace=0.5) as (base, upstream):
            async with aiohttp.ClientSession() as http:
                url = f"{base}/api/chat"
                params = {"prompt": "hi", "resume": "1"}
                async with http.get(url, params=params, headers=SSE) as response:
                    reference = await response.read()
                    reference_id = response.headers["X-Stream-Id"]
                assert "".join(d["content"] for k, d, _ in sse_events(reference) if k == "message") == "".join(TOKENS)

                upstream.behavior = Behavior(tokens=TOKENS, delay=0.01)
                async with http.get(url, params=params, headers=SSE) as response:
                    assert response.status == 200
                    stream_id = response.headers["X-Stream-Id"]
                    # The same reply has the same bytes, but for the stream id.
                    blocks = sse_blocks(reference.replace(reference_id.encode(), stream_id.encode()))
                    cut = data.draw(st.integers(0, len(reference)), label="first cut")
                    body = await read_cut(response, cut)
                assert body == b"".join(blocks)[:cut]
                browser = EventSourceModel()
                browser.connection(body)
                cuts_left = 1
                while True:
                    last_seq = browser.last_seq
                    if browser.last_event_id:
                        # What a reconnecting EventSource sends.
                        resume = http.get(url, headers={**SSE, "Last-Event-ID": browser.last_event_id})
                    else:
                        # Cut inside the opening block: the browser has no id yet; a client that read
                        # X-Stream-Id can still resume the stream from its start.
                        resume = http.get(f"{base}/api/streams/{stream_id}", params={"after": "0"}, headers=SSE)
                    async with resume as response:
                        if last_seq == TERMINAL_SEQ:
                            # The browser has the terminal event: 204 stops it reconnecting.
                            assert response.status == 204
                            break
                        assert response.status == 200
                        tail = b"".join(blocks[(last_seq or 0) + 1 :])
                        if cuts_left and data.draw(st.booleans(), label="cut again"):
                            cuts_left -= 1
                            cut = data.draw(st.integers(0, len(tail)), label="next cut")
                            body = await read_cut(response, cut)
                            assert body == tail[:cut]
                        else:
                            body = await response.read()
                            assert body == tail  # no opening block on a resume, nothing repeated
                    browser.connection(body)
                    if browser.last_seq == TERMINAL_SEQ and body == tail:
                        break

            # What the opening block dispatched (if anything, and if the cut let it arrive) is not part of the reply.
            opening = [event for event in browser.events if event.last_event_id == f"{stream_id}/0"]
            assert len(opening) <= 1
            assert all(event.type != "message" for event in opening)
            reply = browser.events[len(opening) :]
            ids = [event.last_event_id for event in reply]
            assert ids == [f"{stream_id}/{seq}" for seq in range(1, TERMINAL_SEQ + 1)]  # no gap, no duplicate
            assert "".join(json.loads(e.data)["content"] for e in reply if e.type == "message") == "".join(TOKENS)
            assert reply[-1].type == "done"
            assert len(upstream.seen) == 2  # the reference and the one generation the cuts resumed

    asyncio.run(_within(EXAMPLE_TIMEOUT, scenario()))


@given(data=st.data())
@PROPERTY_SETTINGS
def test_ndjson_cut_at_any_byte_then_after_n_resumes_exactly(data: st.DataObject) -> None:
    async def scenario() -> None:
        async with relay_with_upstream(Behavior(tokens=TOKENS), resume_grace=5, shutdown_grace=0.5) as (base, upstream):
            async with aiohttp.ClientSession() as http:
                body_json = {"messages": MESSAGES, "resume": True}
                async with http.post(f"{base}/api/chat", json=body_json, headers=NDJSON) as response:
                    reference = await response.read()
                lines = ndjson_lines(reference)
                assert len(lines) == TERMINAL_SEQ

                upstream.behavior = Behavior(tokens=TOKENS, delay=0.01)
                async with http.post(f"{base}/api/chat", json=body_json, headers=NDJSON) as response:
                    assert response.status == 200
                    stream_id = response.headers["X-Stream-Id"]
                    cut = data.draw(st.integers(0, len(reference)), label="first cut")
                    body = await read_cut(response, cut)
                assert body == reference[:cut]
                received = ndjson_complete(body)
                cuts_left = 1
                while True:
                    after = received[-1]["seq"] if received else 0
                    async with http.get(
                        f"{base}/api/streams/{stream_id}", params={"after": str(after)}, headers=NDJSON
                    ) as response:
                        if after == TERMINAL_SEQ:
                            assert response.status == 204
                            break
                        assert response.status == 200
                        assert response.headers["X-Stream-Id"] == stream_id
                        tail = b"".join(lines[after:])
                        if cuts_left and data.draw(st.booleans(), label="cut again"):
                            cuts_left -= 1
                            cut = data.draw(st.integers(0, len(tail)), label="next cut")
                            body = await read_cut(response, cut)
                            assert body == tail[:cut]
                        else:
                            body = await response.read()
                            assert body == tail
                    received += ndjson_complete(body)
                    if received[-1:] and received[-1]["seq"] == TERMINAL_SEQ and body == tail:
                        break

            assert [obj["seq"] for obj in received] == list(range(1, TERMINAL_SEQ + 1))
            assert "".join(obj["content"] for obj in received if obj["type"] == "delta") == "".join(TOKENS)
            assert received[-1]["type"] == "done"
            assert len(upstream.seen) == 2

    asyncio.run(_within(EXAMPLE_TIMEOUT, scenario()))


# -- 2. several readers of one generation --------------------------------------------------------------------


@pytest.mark.parametrize("resume", [True, False], ids=["opted-in", "not-opted-in"])
async def test_readers_of_one_generation_get_identical_sequences(
    fake_upstream: FakeUpstream, serve: ServeApp, http: aiohttp.ClientSession, resume: bool
) -> None:
    fake_upstream.behavior = Behavior(tokens=TOKENS, delay=0.02)
    base = await serve(create_app(_config(fake_upstream)))
    params = {"prompt": "hi", **({"resume": "1"} if resume else {})}
    async with http.get(f"{base}/api/chat", params=params, headers=SSE) as original:
        stream_id = original.headers["X-Stream-Id"]
        # One reader from the start while the generation runs, one joining after a few events were logged, and
        # one in the other framing: each replays what it missed, then follows live.
        second = await http.get(f"{base}/api/streams/{stream_id}", params={"after": "0"}, headers=SSE)
        head, _ = await _read_events(original, 3)
        third = await http.get(f"{base}/api/streams/{stream_id}", params={"after": "0"}, headers=SSE)
        fourth = await http.get(f"{base}/api/streams/{stream_id}", params={"after": "0"}, headers=NDJSON)
        bodies = [head + await original.read()]
        for response in (second, third, fourth):
            async with response:
                assert response.status == 200
                bodies.append(await response.read())
    # The original response of an opted-in stream opens with a block of id <stream>/0 that is not a reply event.
    first, *others = ([e for e in sse_events(body) if e[2] != f"{stream_id}/0"] for body in bodies[:3])
    assert [event_id for _, _, event_id in first] == [f"{stream_id}/{seq}" for seq in range(1, TERMINAL_SEQ + 1)]
    assert "".join(d["content"] for kind, d, _ in first if kind == "message") == "".join(TOKENS)
    assert first[-1][0] == "done"
    for events in others:
        assert events == first
    objects = ndjson_objects(bodies[3])
    assert [(o["seq"], o.get("content")) for o in objects] == [
        (int(event_id.rpartition("/")[2]), d.get("content")) for _, d, event_id in first
    ]
    assert len(fake_upstream.seen) == 1


# -- 3. the last reader leaves ---------------------------------------------------------------------------------


async def test_without_opt_in_a_client_leaving_before_the_first_token_closes_the_upstream(
    fake_upstream: FakeUpstream, serve: ServeApp, http: aiohttp.ClientSession
) -> None:
    fake_upstream.behavior = Behavior(tokens=TOKENS, first_delay=5.0)
    base = await serve(create_app(_config(fake_upstream)))
    host, port = base.removeprefix("http://").split(":")
    _, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        f"GET /api/chat?prompt=hi HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: text/event-stream\r\n\r\n".encode()
    )
    await writer.drain()
    await fake_upstream.wait_for_request()
    await wait_health(http, base, open_streams=1, readers=1)
    left_at = time.monotonic()
    writer.close()
    await writer.wait_closed()
    assert await _upstream_closed_since(fake_upstream, left_at) < PROMPT_CLOSE
    assert fake_upstream.last.tokens_sent == 0
    # It ended (cancelled) and stays retained for resume's sake; nothing runs on.
    await wait_health(http, base, open_streams=0, readers=0, retained_streams=1)


async def test_without_opt_in_a_client_leaving_mid_stream_closes_the_upstream_and_a_reconnect_gets_cancelled(
    fake_upstream: FakeUpstream, serve: ServeApp, http: aiohttp.ClientSession
) -> None:
    fake_upstream.behavior = Behavior(tokens=TOKENS * 3, delay=0.05)
    base = await serve(create_app(_config(fake_upstream)))
    async with http.get(f"{base}/api/chat", params={"prompt": "hi"}, headers=SSE) as response:
        stream_id = response.headers["X-Stream-Id"]
        _, events = await _read_events(response, 3)
        left_at = time.monotonic()
        response.close()
    assert await _upstream_closed_since(fake_upstream, left_at) < PROMPT_CLOSE
    last_id = events[-1][2]
    assert last_id.startswith(f"{stream_id}/")
    async with http.get(f"{base}/api/chat", headers={**SSE, "Last-Event-ID": last_id}) as response:
        assert response.status == 200
        tail = sse_events(await response.read())
    # The reconnect gets what was logged before the cancellation, then the terminal `cancelled` error in band.
    seqs = [int(event_id.rpartition("/")[2]) for _, _, event_id in tail]
    assert seqs == list(range(int(last_id.rpartition("/")[2]) + 1, seqs[-1] + 1))
    assert all(kind == "message" for kind, _, _ in tail[:-1])
    kind, payload, terminal_id = tail[-1]
    assert (kind, payload["error"]["type"]) == ("error", "cancelled")
    assert seqs[-1] < len(TOKENS) * 3  # it did not run on to the end
    async with http.get(f"{base}/api/chat", headers={**SSE, "Last-Event-ID": terminal_id}) as response:
        assert response.status == 204
    assert len(fake_upstream.seen) == 1


async def test_opted_in_generation_runs_on_for_the_grace_then_closes_the_upstream(
    fake_upstream: FakeUpstream, serve: ServeApp, http: aiohttp.ClientSession
) -> None:
    grace = 0.3
    fake_upstream.behavior = Behavior(tokens=TOKENS * 3, delay=0.05)
    base = await serve(create_app(_config(fake_upstream, resume_grace=grace)))
    async with http.get(f"{base}/api/chat", params={"prompt": "hi", "resume": "1"}, headers=SSE) as response:
        _, events = await _read_events(response, 3)
        left_at = time.monotonic()
        response.close()
    seen = fake_upstream.last
    tokens_when_left = seen.tokens_sent
    await asyncio.sleep(grace / 2)
    # No reader, but within the grace: the upstream stays open and the generation goes on reading it.
    assert not seen.client_gone.is_set()
    assert seen.tokens_sent > tokens_when_left
    report = await health(http, base)
    assert (report["open_streams"], report["readers"]) == (1, 0)
    closed_after = await _upstream_closed_since(fake_upstream, left_at)
    assert grace - 0.01 <= closed_after < grace + 1.0
    assert not seen.completed
    # What was logged stays resumable after the cancellation, ending with `cancelled`.
    async with http.get(f"{base}/api/chat", headers={**SSE, "Last-Event-ID": events[-1][2]}) as response:
        assert response.status == 200
        tail = sse_events(await response.read())
    assert tail[-1][0] == "error"
    assert tail[-1][1]["error"]["type"] == "cancelled"
    assert len(tail) > 1
    assert len(fake_upstream.seen) == 1


async def test_opted_in_reader_back_within_the_grace_gets_the_rest_from_the_same_generation(
    fake_upstream: FakeUpstream, serve: ServeApp, http: aiohttp.ClientSession
) -> None:
    fake_upstream.behavior = Behavior(tokens=TOKENS, delay=0.03)
    base = await serve(create_app(_config(fake_upstream, resume_grace=0.3)))
    async with http.get(f"{base}/api/chat", params={"prompt": "hi", "resume": "1"}, headers=SSE) as response:
        stream_id = response.headers["X-Stream-Id"]
        _, before = await _read_events(response, 3)
        response.close()
    await asyncio.sleep(0.05)
    async with http.get(f"{base}/api/chat", headers={**SSE, "Last-Event-ID": before[-1][2]}) as response:
        assert response.status == 200
        after = sse_events(await response.read())
    events = before + after
    assert [event_id for _, _, event_id in events] == [f"{stream_id}/{seq}" for seq in range(1, TERMINAL_SEQ + 1)]
    assert "".join(d["content"] for kind, d, _ in events if kind == "message") == "".join(TOKENS)
    assert events[-1][0] == "done"
    assert len(fake_upstream.seen) == 1
    assert fake_upstream.last.closed_by_client_at is None


async def test_a_reader_that_comes_back_and_leaves_again_gets_a_whole_new_grace(
    fake_upstream: FakeUpstream, serve: ServeApp, http: aiohttp.ClientSession
) -> None:
    grace = 0.5
    fake_upstream.behavior = Behavior(tokens=TOKENS * 3, delay=0.05)
    base = await serve(create_app(_config(fake_upstream, resume_grace=grace)))
    async with http.get(f"{base}/api/chat", params={"prompt": "hi", "resume": "1"}, headers=SSE) as response:
        _, events = await _read_events(response, 2)
        response.close()
    await asyncio.sleep(0.05)
    async with http.get(f"{base}/api/chat", headers={**SSE, "Last-Event-ID": events[-1][2]}) as response:
        assert response.status == 200
        await _read_events(response, 1)
        left_again_at = time.monotonic()
        response.close()
    # The first departure's grace would end about 0.35 s from here; the generation must outlive it.
    closed_after = await _upstream_closed_since(fake_upstream, left_again_at)
    assert grace - 0.01 <= closed_after < grace + 1.0
    assert len(fake_upstream.seen) == 1


async def test_last_event_id_ahead_of_the_log_is_refused_and_the_stream_goes_on(
    fake_upstream: FakeUpstream, serve: ServeApp, http: aiohttp.ClientSession
) -> None:
    fake_upstream.behavior = Behavior(tokens=TOKENS, delay=0.02)
    base = await serve(create_app(_config(fake_upstream)))
    async with http.get(f"{base}/api/chat", params={"prompt": "hi", "resume": "1"}, headers=SSE) as original:
        stream_id = original.headers["X-Stream-Id"]
        head, _ = await _read_events(original, 1)
        # Events the stream has not produced (yet, or ever): refused, not followed from a place that does not exist.
        for request in (
            http.get(f"{base}/api/streams/{stream_id}", params={"after": str(TERMINAL_SEQ * 10)}),
            http.get(f"{base}/api/chat", headers={**SSE, "Last-Event-ID": f"{stream_id}/{TERMINAL_SEQ * 10}"}),
        ):
            async with request as response:
                assert response.status == 400
                assert _error_type(await response.read()) == "invalid_request"
        events = sse_events(head + await original.read())
    assert events[-1][0] == "done"
    async with http.get(f"{base}/api/streams/{stream_id}", params={"after": str(TERMINAL_SEQ + 1)}) as response:
        assert response.status == 400
        assert _error_type(await response.read()) == "invalid_request"
    assert len(fake_upstream.seen) == 1


# -- 4. DELETE stops -----------------------------------------------------------------------------------------


async def test_delete_stops_the_generation_its_readers_get_stopped_and_the_upstream_is_closed(
    fake_upstream: FakeUpstream, serve: ServeApp, http: aiohttp.ClientSession
) -> None:
    fake_upstream.behavior = Behavior(tokens=TOKENS * 3, delay=0.05)
    base = await serve(create_app(_config(fake_upstream)))
    async with http.get(f"{base}/api/chat", params={"prompt": "hi", "resume": "1"}, headers=SSE) as original:
        stream_id = original.headers["X-Stream-Id"]
        async with http.get(f"{base}/api/streams/{stream_id}", params={"after": "0"}, headers=NDJSON) as other:
            head, _ = await _read_events(original, 2)
            async with http.delete(f"{base}/api/streams/{stream_id}") as response:
                stopped_at = time.monotonic()
                assert response.status == 204
            sse_tail = head + await original.read()
            ndjson_tail = await other.read()
    assert await _upstream_closed_since(fake_upstream, stopped_at) < PROMPT_CLOSE
    events = sse_events(sse_tail)
    assert events[-1][0] == "error"
    assert events[-1][1]["error"]["type"] == "stopped"
    assert len(events) < len(TOKENS) * 3
    objects = ndjson_objects(ndjson_tail)
    assert objects[-1]["type"] == "error"
    assert objects[-1]["error"]["type"] == "stopped"
    assert objects[-1]["seq"] == int(events[-1][2].rpartition("/")[2])
    await wait_health(http, base, open_streams=0)


async def test_delete_stops_a_detached_generation_before_its_grace_ends(
    fake_upstream: FakeUpstream, serve: ServeApp, http: aiohttp.ClientSession
) -> None:
    fake_upstream.behavior = Behavior(tokens=TOKENS * 3, delay=0.05)
    base = await serve(create_app(_config(fake_upstream, resume_grace=10)))
    async with http.get(f"{base}/api/chat", params={"prompt": "hi", "resume": "1"}, headers=SSE) as response:
        stream_id = response.headers["X-Stream-Id"]
        _, events = await _read_events(response, 2)
        response.close()
    await wait_health(http, base, open_streams=1, readers=0)
    async with http.delete(f"{base}/api/streams/{stream_id}") as response:
        stopped_at = time.monotonic()
        assert response.status == 204
    assert await _upstream_closed_since(fake_upstream, stopped_at) < PROMPT_CLOSE
    async with http.get(f"{base}/api/chat", headers={**SSE, "Last-Event-ID": events[-1][2]}) as response:
        assert response.status == 200
        tail = sse_events(await response.read())
    assert tail[-1][0] == "error"
    assert tail[-1][1]["error"]["type"] == "stopped"


@pytest.mark.parametrize(
    "stream_id", ["0123456789abcdef0123456789abcdef", "not-a-stream"], ids=["unknown", "malformed"]
)
async def test_delete_of_an_unknown_stream_is_404(
    fake_upstream: FakeUpstream, serve: ServeApp, http: aiohttp.ClientSession, stream_id: str
) -> None:
    base = await serve(create_app(_config(fake_upstream)))
    async with http.delete(f"{base}/api/streams/{stream_id}") as response:
        assert response.status == 404
        assert response.content_type == "application/json"
        assert _error_type(await response.read()) == "resume_unavailable"


# -- 5. the end of a stream, and what cannot be resumed ------------------------------------------------------


async def test_reconnect_after_the_terminal_event_gets_204(
    fake_upstream: FakeUpstream, serve: ServeApp, http: aiohttp.ClientSession
) -> None:
    fake_upstream.behavior = Behavior(tokens=TOKENS)
    base = await serve(create_app(_config(fake_upstream)))
    async with http.get(f"{base}/api/chat", params={"prompt": "hi"}, headers=SSE) as response:
        stream_id = response.headers["X-Stream-Id"]
        events = sse_events(await response.read())
    assert events[-1][0] == "done"
    terminal_id = events[-1][2]
    assert terminal_id == f"{stream_id}/{TERMINAL_SEQ}"
    async with http.get(f"{base}/api/chat", headers={**SSE, "Last-Event-ID": terminal_id}) as response:
        assert response.status == 204
        assert await response.read() == b""
    for query in ({"after": str(TERMINAL_SEQ)}, {}):
        headers = {**NDJSON, **({} if query else {"Last-Event-ID": terminal_id})}
        async with http.get(f"{base}/api/streams/{stream_id}", params=query, headers=headers) as response:
            assert response.status == 204
    # One before the end: the terminal event alone.
    async with http.get(f"{base}/api/streams/{stream_id}", params={"after": str(TERMINAL_SEQ - 1)}) as response:
        assert response.status == 200
        assert sse_events(await response.read()) == [events[-1]]
    assert len(fake_upstream.seen) == 1


_UNKNOWN = "0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize(
    "last_event_id",
    [
        f"{_UNKNOWN}/3",
        "garbage",
        "",
        "7",
        _UNKNOWN,
        f"{_UNKNOWN}/",
        f"{_UNKNOWN}/-1",
        f"{_UNKNOWN}/01",
        f"{_UNKNOWN}/1/2",
        f"{_UNKNOWN.upper()}/1",
        f"{_UNKNOWN}/1x",
        f"{_UNKNOWN}/{'9' * 19}",
    ],
    ids=["unknown", "garbage", "empty", "seq-only", "no-seq", "empty-seq", "negative", "leading-zero", "two-seqs",
         "upper-case", "junk-seq", "seq-too-long"],
)  # fmt: skip
async def test_unresumable_last_event_id_is_404_and_starts_nothing(
    fake_upstream: FakeUpstream, serve: ServeApp, http: aiohttp.ClientSession, last_event_id: str
) -> None:
    base = await serve(create_app(_config(fake_upstream)))
    async with http.get(
        f"{base}/api/chat", params={"prompt": "hi"}, headers={**SSE, "Last-Event-ID": last_event_id}
    ) as response:
        assert response.status == 404
        assert response.content_type == "application/json"
        assert _error_type(await response.read()) == "resume_unavailable"
    assert fake_upstream.seen == []


@pytest.mark.parametrize("query", [{"after": "0"}, {}], ids=["after", "from-start"])
async def test_unknown_stream_path_is_404(
    fake_upstream: FakeUpstream, serve: ServeApp, http: aiohttp.ClientSession, query: dict[str, str]
) -> None:
    base = await serve(create_app(_config(fake_upstream)))
    for stream_id in (_UNKNOWN, "nope"):
        async with http.get(f"{base}/api/streams/{stream_id}", params=query, headers=NDJSON) as response:
            assert response.status == 404
            assert _error_type(await response.read()) == "resume_unavailable"


async def test_expired_stream_is_404(fake_upstream: FakeUpstream, serve: ServeApp, http: aiohttp.ClientSession) -> None:
    fake_upstream.behavior = Behavior(tokens=TOKENS)
    base = await serve(create_app(_config(fake_upstream, stream_retention=0.5)))
    async with http.get(f"{base}/api/chat", params={"prompt": "hi"}, headers=SSE) as response:
        stream_id = response.headers["X-Stream-Id"]
        events = sse_events(await response.read())
    # Still retained right after its end...
    async with http.get(f"{base}/api/chat", headers={**SSE, "Last-Event-ID": events[-1][2]}) as response:
        assert response.status == 204
    await asyncio.sleep(1.0)
    # ...forgotten after the retention.
    async with http.get(f"{base}/api/chat", headers={**SSE, "Last-Event-ID": events[-2][2]}) as response:
        assert response.status == 404
        assert _error_type(await response.read()) == "resume_unavailable"
    async with http.get(f"{base}/api/streams/{stream_id}", params={"after": "0"}) as response:
        assert response.status == 404
        assert _error_type(await response.read()) == "resume_unavailable"
    report = await health(http, base)
    assert (report["retained_streams"], report["log_bytes"]) == (0, 0)
    assert len(fake_upstream.seen) == 1


async def test_stream_evicted_by_the_total_log_bound_is_404(
    fake_upstream: FakeUpstream, serve: ServeApp, http: aiohttp.ClientSession
) -> None:
    # Each logged event counts EVENT_OVERHEAD_BYTES plus its text: stream A (5 tokens of 4 characters and done)
    # fits alone, A and B together (8 tokens) do not, so A, ended, is forgotten when B's log grows.
    tokens_a = [f"a{i:03d}" for i in range(5)]
    tokens_b = [f"b{i:03d}" for i in range(8)]
    size_a = sum(EVENT_OVERHEAD_BYTES + len(t) for t in tokens_a) + EVENT_OVERHEAD_BYTES
    size_b = sum(EVENT_OVERHEAD_BYTES + len(t) for t in tokens_b) + EVENT_OVERHEAD_BYTES
    bound = size_a + size_b - 50
    assert size_b <= bound
    base = await serve(create_app(_config(fake_upstream, log_total_bytes=bound)))
    ids = []
    for tokens in (tokens_a, tokens_b):
        fake_upstream.behavior = Behavior(tokens=tokens)
        async with http.get(f"{base}/api/chat", params={"prompt": "hi"}, headers=SSE) as response:
            ids.append(response.headers["X-Stream-Id"])
            assert sse_events(await response.read())[-1][0] == "done"
    stream_a, stream_b = ids
    async with http.get(f"{base}/api/chat", headers={**SSE, "Last-Event-ID": f"{stream_a}/1"}) as response:
        assert response.status == 404
        assert _error_type(await response.read()) == "resume_unavailable"
    async with http.get(f"{base}/api/streams/{stream_b}", params={"after": "0"}) as response:
        assert response.status == 200
        assert "".join(d["content"] for k, d, _ in sse_events(await response.read()) if k == "message") == "".join(
            tokens_b
        )
    report = await health(http, base)
    assert (report["retained_streams"], report["log_bytes"]) == (1, size_b)
    assert len(fake_upstream.seen) == 2


async def test_resume_from_before_the_retained_window_is_404_while_live_readers_get_everything(
    fake_upstream: FakeUpstream, serve: ServeApp, http: aiohttp.ClientSession
) -> None:
    tokens = [f"w{i:02d}" for i in range(40)]
    fake_upstream.behavior = Behavior(tokens=tokens, delay=0.01)
    base = await serve(create_app(_config(fake_upstream, log_max_events=10)))
    async with http.get(f"{base}/api/chat", params={"prompt": "hi"}, headers=SSE) as response:
        stream_id = response.headers["X-Stream-Id"]
        events = sse_events(await response.read())
    # The live reader: every event, in order, although the log never held more than 10.
    assert [event_id for _, _, event_id in events] == [f"{stream_id}/{seq}" for seq in range(1, 42)]
    assert "".join(d["content"] for kind, d, _ in events if kind == "message") == "".join(tokens)
    assert events[-1][0] == "done"
    for after in (0, 1, 20):
        async with http.get(f"{base}/api/streams/{stream_id}", params={"after": str(after)}) as response:
            assert response.status == 404, after
            assert _error_type(await response.read()) == "resume_unavailable"
    async with http.get(f"{base}/api/chat", headers={**SSE, "Last-Event-ID": f"{stream_id}/1"}) as response:
        assert response.status == 404
        assert _error_type(await response.read()) == "resume_unavailable"
    # The tail that is retained still resumes.
    async with http.get(f"{base}/api/chat", headers={**SSE, "Last-Event-ID": f"{stream_id}/39"}) as response:
        assert response.status == 200
        assert sse_events(await response.read()) == events[-2:]
    assert len(fake_upstream.seen) == 1


# -- 6. the opening block ------------------------------------------------------------------------------------


async def test_opted_in_sse_opens_with_a_block_that_sets_the_last_event_id_before_any_token(
    fake_upstream: FakeUpstream, serve: ServeApp, http: aiohttp.ClientSession
) -> None:
    fake_upstream.behavior = Behavior(tokens=TOKENS[:3], first_delay=1.0)
    base = await serve(create_app(_config(fake_upstream)))
    async with http.get(f"{base}/api/chat", params={"prompt": "hi", "resume": "1"}, headers=SSE) as response:
        assert response.status == 200
        stream_id = response.headers["X-Stream-Id"]
        decoder = SSEDecoder()
        opening: list[SSEEvent] = []
        received = b""
        while not received.endswith(b"\n\n"):
            chunk = await response.content.readany()
            assert chunk
            received += chunk
            opening += decoder.feed(chunk)
        # The first block is complete while the upstream is still holding back its first token.
        assert all(seen.tokens_sent == 0 for seen in fake_upstream.seen)
        assert received.count(b"\n\n") == 1
        # As a browser reads it: the last event id is now <stream>/0, so a cut from here on reconnects with
        # Last-Event-ID; and whatever it dispatches is not a message (a page listening for tokens sees nothing).
        assert decoder.last_event_id == f"{stream_id}/0"
        assert all(event.type != "message" for event in opening)
        rest = decoder.feed(await response.read()) + decoder.end()
    assert [event.last_event_id for event in rest] == [f"{stream_id}/{seq}" for seq in range(1, 5)]
    assert [event.type for event in rest] == ["message"] * 3 + ["done"]
    # A reconnect right after the opening block gets the whole reply, from the same generation.
    async with http.get(f"{base}/api/chat", headers={**SSE, "Last-Event-ID": f"{stream_id}/0"}) as response:
        assert response.status == 200
        assert [event_id for _, _, event_id in sse_events(await response.read())] == [
            event.last_event_id for event in rest
        ]
    assert len(fake_upstream.seen) == 1


@pytest.mark.parametrize(
    ("params", "headers"),
    [({"prompt": "hi"}, SSE), ({"prompt": "hi", "resume": "1"}, NDJSON)],
    ids=["sse-not-opted-in", "ndjson-opted-in"],
)
async def test_no_opening_block_without_opt_in_or_in_ndjson(
    fake_upstream: FakeUpstream,
    serve: ServeApp,
    http: aiohttp.ClientSession,
    params: dict[str, str],
    headers: dict[str, str],
) -> None:
    fake_upstream.behavior = Behavior(tokens=["x"])
    base = await serve(create_app(_config(fake_upstream)))
    async with http.get(f"{base}/api/chat", params=params, headers=headers) as response:
        stream_id = response.headers["X-Stream-Id"]
        body = await response.read()
    if headers is SSE:
        assert body.startswith(b"id: %s/1\ndata: " % stream_id.encode())
    else:
        assert body.startswith(b'{"type":"delta","seq":1,')


# -- 7. healthz and admission ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/api/healthz", "/healthz"])
async def test_healthz_counts_generations_readers_retained_streams_and_log_bytes(
    fake_upstream: FakeUpstream, serve: ServeApp, http: aiohttp.ClientSession, path: str
) -> None:
    tokens = [f"h{i:02d}" for i in range(30)]
    fake_upstream.behavior = Behavior(tokens=tokens, delay=0.02)
    base = await serve(create_app(_config(fake_upstream, resume_grace=5)))

    async def report() -> dict[str, Any]:
        return await health(http, base, path)

    assert {k: v for k, v in (await report()).items() if k != "provider"} == {
        "status": "ok", "open_streams": 0, "readers": 0, "retained_streams": 0, "log_bytes": 0,
    }  # fmt: skip
    async with http.get(f"{base}/api/chat", params={"prompt": "hi", "resume": "1"}, headers=SSE) as original:
        stream_id = original.headers["X-Stream-Id"]
        await _read_events(original, 2)
        running = await report()
        assert (running["open_streams"], running["readers"], running["retained_streams"]) == (1, 1, 1)
        assert running["log_bytes"] >= 2 * EVENT_OVERHEAD_BYTES
        async with http.get(f"{base}/api/streams/{stream_id}", params={"after": "0"}, headers=SSE) as second:
            await _read_events(second, 2)
            assert ((await report())["readers"]) == 2
            second.close()
        original.close()
    # Detached, within the grace: still a running generation, no reader.
    await wait_health(http, base, open_streams=1, readers=0, retained_streams=1)
    # Then it ends on its own (it was never abandoned): retained, with every event counted.
    expected_bytes = sum(EVENT_OVERHEAD_BYTES + len(t) for t in tokens) + EVENT_OVERHEAD_BYTES
    await wait_health(http, base, timeout=3.0, open_streams=0, readers=0, retained_streams=1, log_bytes=expected_bytes)
    async with http.get(f"{base}/api/streams/{stream_id}", params={"after": "0"}, headers=NDJSON) as response:
        objects = ndjson_objects(await response.read())
    assert [o["seq"] for o in objects] == list(range(1, len(tokens) + 2))
    assert len(fake_upstream.seen) == 1


async def test_a_detached_resumable_generation_holds_its_admission_slot_until_it_ends(
    fake_upstream: FakeUpstream, serve: ServeApp, http: aiohttp.ClientSession
) -> None:
    fake_upstream.behavior = Behavior(tokens=TOKENS, delay=0.04)
    config = _config(
        fake_upstream, limits_enabled=True, max_streams_per_client=1, rate="100/s", burst=100, resume_grace=5
    )
    base = await serve(create_app(config))
    async with http.get(f"{base}/api/chat", params={"prompt": "hi", "resume": "1"}, headers=SSE) as response:
        assert response.status == 200
        _, events = await _read_events(response, 2)
        response.close()
    await wait_health(http, base, open_streams=1, readers=0)
    async with http.get(f"{base}/api/chat", params={"prompt": "again"}, headers=SSE) as response:
        assert response.status == 429
        assert _error_type(await response.read()) == "rate_limited"
    # Resuming is not a new generation: no slot, no rate-limit token; it reads the held generation to its end.
    async with http.get(f"{base}/api/chat", headers={**SSE, "Last-Event-ID": events[-1][2]}) as response:
        assert response.status == 200
        tail = sse_events(await response.read())
    assert tail[-1][0] == "done"
    await wait_health(http, base, open_streams=0)
    async with http.get(f"{base}/api/chat", params={"prompt": "again"}, headers=SSE) as response:
        assert response.status == 200
        assert sse_events(await response.read())[-1][0] == "done"
    assert len(fake_upstream.seen) == 2
