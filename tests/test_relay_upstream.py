"""The full path: the real `openai` client against a fake OpenAI-compatible upstream, relayed to our clients.

Disconnect tests run the relay with aiohttp's production default ``handler_cancellation=False`` and observe the
fake upstream: it must see its connection close although the relay never writes to the departed client again.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time

import aiohttp
import openai
import pytest
from aiohttp import web

from server.app import _rules, build_provider, create_app, setup
from server.chat_request import from_query
from server.config import Config
from server.events import Delta, Done
from server.providers import OpenAIProvider
from server.providers.openai_compat import aiohttp_response, make_openai_client, post_chat_stream
from server.state import RELAY

from .conftest import ServeApp, upstream_config
from .fake_upstream import Behavior, FakeUpstream
from .wire import ndjson_objects, sse_events, sse_text

SECRET = "sk-test-secret-key-0123456789"


def _provider_tasks() -> list[asyncio.Task[object]]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("llm-relay provider")]


async def test_relays_tokens_usage_and_request_fields(
    fake_upstream: FakeUpstream, serve: ServeApp, http: aiohttp.ClientSession
) -> None:
    fake_upstream.behavior = Behavior(tokens=["Hel", "lo", " wor", "ld", " \n\n", "data: x"])
    base = await serve(create_app(upstream_config(fake_upstream)))
    async with http.post(
        f"{base}/api/chat",
        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 50, "temperature": 0.5},
        headers={"Accept": "text/event-stream"},
    ) as resp:
        assert resp.status == 200
        body = await resp.read()
    events = sse_events(body)
    assert sse_text(body) == "Hello world \n\ndata: x"
    assert events[-1] == (
        "done",
        {"finish_reason": "stop", "usage": {"prompt_tokens": 7, "completion_tokens": 6, "total_tokens": 13}},
        f"{resp.headers['X-Stream-Id']}/7",
    )
    seen = fake_upstream.last
    assert seen.body["model"] == "fake-model"
    assert seen.body["messages"] == [{"role": "user", "content": "hi"}]
    assert seen.body["stream"] is True
    assert seen.body["stream_options"] == {"include_usage": True}
    assert seen.body["max_tokens"] == 50
    assert seen.body["temperature"] == 0.5
    assert seen.headers["Authorization"] == f"Bearer {SECRET}"
    # No telemetry of the relay's platform goes upstream (OS, architecture, runtime, package version, retry count);
    # only the marker the client reads back to return the response unread.
    assert [h for h in seen.headers if h.lower().startswith("x-stainless-")] == ["x-stainless-raw-response"]
    assert seen.completed


@pytest.mark.parametrize("crlf", [False, True], ids=["lf", "crlf"])
async def test_ndjson_relay(
    fake_upstream: FakeUpstream, serve: ServeApp, http: aiohttp.ClientSession, crlf: bool
) -> None:
    fake_upstream.behavior = Behavior(tokens=["a", "b\r\n", "c"], crlf=crlf)
    base = await serve(create_app(upstream_config(fake_upstream, include_usage=False)))
    async with http.get(f"{base}/api/chat", params={"prompt": "x"}, headers={"Accept": "application/x-ndjson"}) as r:
        objects = ndjson_objects(await r.read())
    assert objects == [
        {"type": "delta", "seq": 1, "content": "a"},
        {"type": "delta", "seq": 2, "content": "b\r\n"},
        {"type": "delta", "seq": 3, "content": "c"},
        {"type": "done", "seq": 4, "finish_reason": "stop"},
    ]
    assert "stream_options" not in fake_upstream.last.body


async def test_a_compressed_upstream_body_is_decoded(
    fake_upstream: FakeUpstream, serve: ServeApp, http: aiohttp.ClientSession
) -> None:
    # The body is read straight from aiohttp only when it is not compressed; a gzip body (some proxies compress
    # event streams) takes the client's decoding path and still relays exactly.
    fake_upstream.behavior = Behavior(tokens=["zip", "ped", " reply"], gzip=True)
    base = await serve(create_app(upstream_config(fake_upstream)))
    async with http.get(f"{base}/api/chat", params={"prompt": "x", "format": "ndjson"}) as resp:
        assert resp.status == 200
        objects = ndjson_objects(await resp.read())
    assert "".join(o["content"] for o in objects if o["type"] == "delta") == "zipped reply"
    assert objects[-1]["type"] == "done"
    assert fake_upstream.seen[0].headers.get("Accept-Encoding", "")  # the client did offer compression


@pytest.mark.parametrize(
    ("behavior", "status", "type_", "retry_after"),
    [
        (Behavior(fault="status", status=401), 502, "upstream_error", None),
        (Behavior(fault="status", status=403), 502, "upstream_error", None),
        (Behavior(fault="status", status=400), 502, "upstream_error", None),
        (Behavior(fault="status", status=404), 502, "upstream_error", None),
        (Behavior(fault="status", status=429, retry_after="7"), 503, "upstream_rate_limited", "7"),
        (Behavior(fault="status", status=500), 502, "upstream_error", None),
        (Behavior(fault="status", status=503), 502, "upstream_error", None),
        (Behavior(fault="malformed", fault_after=0), 502, "upstream_protocol_error", None),
        (Behavior(fault="no_done", tokens=[]), 502, "upstream_protocol_error", None),
        (Behavior(fault="error_chunk", fault_after=0), 502, "upstream_error", None),
        (Behavior(fault="reset", fault_after=0), 502, "upstream_unavailable", None),
    ],
    ids=["401", "403", "400", "404", "429", "500", "503", "malformed", "no-done", "error-chunk", "reset"],
)
async def test_upstream_failure_before_any_token_is_an_http_error(
    fake_upstream: FakeUpstream,
    serve: ServeApp,
    http: aiohttp.ClientSession,
    behavior: Behavior,
    status: int,
    type_: str,
    retry_after: str | None,
) -> None:
    fake_upstream.behavior = behavior
    base = await serve(create_app(upstream_config(fake_upstream)))
    async with http.get(f"{base}/api/chat", params={"prompt": "x"}) as resp:
        assert resp.status == status
        text = await resp.text()
        assert resp.headers.get("Retry-After") == retry_after
    body = await _json(text)
    assert body["error"]["type"] == type_
    assert SECRET not in text
    assert "sk-" not in text
    assert "secret" not in text
    assert "Traceback" not in text


async def _json(text: str) -> dict[str, dict[str, str]]:
    import json

    value = json.loads(text)
    assert isinstance(value, dict)
    return value


@pytest.mark.parametrize(
    ("fault", "type_", "text"),
    [
        ("malformed", "upstream_protocol_error", "one two"),
        ("error_chunk", "upstream_error", "one two"),
        ("reset", "upstream_unavailable", "one two"),
        ("no_done", "upstream_protocol_error", "one two three"),
    ],
)
@pytest.mark.parametrize("fmt", ["sse", "ndjson"])
async def test_upstream_failure_mid_stream_is_an_in_band_error(
    fake_upstream: FakeUpstream,
    serve: ServeApp,
    http: aiohttp.ClientSession,
    fault: str,
    type_: str,
    text: str,
    fmt: str,
) -> None:
    fake_upstream.behavior = Behavior(tokens=["one", " two", " three"], fault=fault, fault_after=2)
    base = await serve(create_app(upstream_config(fake_upstream)))
    async with http.get(f"{base}/api/chat", params={"prompt": "x", "format": fmt}) as resp:
        assert resp.status == 200
        body = await resp.read()
    assert b"secret" not in body
    assert SECRET.encode() not in body
    if fmt == "sse":
        events = sse_events(body)
        assert sse_text(body) == text
        assert events[-1][0] == "error"
        assert events[-1][1]["error"]["type"] == type_
    else:
        objects = ndjson_objects(body)
        assert "".join(o.get("content", "") for o in objects) == text
        assert [o["type"] for o in objects][-2:] == ["delta", "error"]
        assert objects[-1]["error"]["type"] == type_


async def test_connection_refused_is_502(serve: ServeApp, http: aiohttp.ClientSession) -> None:
    upstream = FakeUpstream()
    await upstream.start()
    url = upstream.url
    await upstream.close()  # nothing listens there any more
    config = upstream_config(upstream).with_changes(base_url=url)
    base = await serve(create_app(config))
    async with http.get(f"{base}/api/chat", params={"prompt": "x"}) as resp:
        assert resp.status == 502
        assert (await resp.json())["error"]["type"] == "upstream_unavailable"


async def _leave_after(http: aiohttp.ClientSession, url: str, frames: int, fmt: str = "sse") -> None:
    """Open a stream, read `frames` frames (0: only wait for the upstream to be asked), then drop the connection."""
    resp = await http.get(url, params={"prompt": "x", "format": fmt})
    try:
        for _ in range(frames):
            await resp.content.readuntil(b"\n\n" if fmt == "sse" else b"\n")
    finally:
        resp.close()  # closes the TCP connection without reading the rest


@pytest.mark.parametrize(
    ("behavior", "frames"),
    [
        (Behavior(fault="hang_headers"), 0),
        (Behavior(tokens=["a"] * 5, first_delay=30), 0),
        (Behavior(tokens=["a", "b", "c"], fault="stall", fault_after=2), 2),
        (Behavior(tokens=["x"] * 100_000, delay=0.001), 3),
    ],
    ids=["before-upstream-headers", "before-first-token", "mid-stream-upstream-quiet", "mid-stream-busy"],
)
async def test_client_leaving_closes_the_upstream_without_handler_cancellation(
    fake_upstream: FakeUpstream, serve: ServeApp, behavior: Behavior, frames: int
) -> None:
    fake_upstream.behavior = behavior
    app = create_app(upstream_config(fake_upstream))
    base = await serve(app)
    async with aiohttp.ClientSession() as http:
        task = asyncio.create_task(_leave_after(http, f"{base}/api/chat", frames))
        seen = await fake_upstream.wait_for_request()
        if frames == 0:
            await asyncio.sleep(0.05)  # the relay is now waiting on the upstream, writing nothing
            assert not task.done()
            task.cancel()
        left_at = time.monotonic()
        with pytest.raises(asyncio.CancelledError) if frames == 0 else _no_error():
            await task
        left_at = left_at if frames == 0 else time.monotonic()
        # Generous bound for a loaded CI machine; the latency itself is measured by the benchmark.
        await asyncio.wait_for(seen.client_gone.wait(), 5)
    assert seen.closed_by_client_at is not None
    print(f"upstream closed {1000 * (seen.closed_by_client_at - left_at):.1f} ms after the client left")
    assert not seen.completed
    state = app[RELAY]
    async with asyncio.timeout(5):
        while len(state.streams):
            await asyncio.sleep(0.005)
    assert _provider_tasks() == []


class _no_error:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


async def test_embedded_in_a_host_app_with_default_handler_cancellation(
    fake_upstream: FakeUpstream, serve: ServeApp, http: aiohttp.ClientSession
) -> None:
    host = web.Application(handler_args={"handler_cancellation": False})

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="host says hi")

    host.router.add_get("/hello", hello)
    api = setup(host, upstream_config(fake_upstream), prefix="/relay")
    base = await serve(host)

    async with http.get(f"{base}/hello") as resp:
        assert await resp.text() == "host says hi"
    async with http.get(f"{base}/relay/chat", params={"prompt": "x"}) as resp:
        assert sse_text(await resp.read()) == "Hello, world!"
    async with http.get(f"{base}/relay/nope") as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["type"] == "not_found"
    async with http.get(f"{base}/nope") as resp:  # the host's own 404 is left alone
        assert resp.status == 404
        assert resp.content_type == "text/plain"

    fake_upstream.behavior = Behavior(tokens=["a"] * 5, first_delay=30)
    task = asyncio.create_task(_leave_after(http, f"{base}/relay/chat", 0))
    seen = await fake_upstream.wait_for_request(2)
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(seen.client_gone.wait(), 5)
    async with asyncio.timeout(5):
        while len(api[RELAY].streams):
            await asyncio.sleep(0.005)


async def test_no_generator_or_task_survives_many_disconnects(fake_upstream: FakeUpstream, serve: ServeApp) -> None:
    fake_upstream.behavior = Behavior(tokens=["tok"] * 10_000, delay=0.002)
    app = create_app(upstream_config(fake_upstream))
    base = await serve(app)
    async with aiohttp.ClientSession() as http:
        await asyncio.gather(*(_leave_after(http, f"{base}/api/chat", 2 + i % 3) for i in range(20)))
        async with asyncio.timeout(5):
            while not all(s.client_gone.is_set() for s in fake_upstream.seen):
                await asyncio.sleep(0.005)
    assert len(fake_upstream.seen) == 20
    async with asyncio.timeout(5):
        while len(app[RELAY].streams):
            await asyncio.sleep(0.005)
    assert _provider_tasks() == []
    # Without a GC pass, no provider generator may still be alive (a leaked frame would hold one).
    alive = [o for o in gc.get_objects() if type(o).__name__ == "async_generator" and "stream" in repr(o)]
    assert not [g for g in alive if getattr(g, "ag_frame", None) is not None and "openai_compat" in repr(g.ag_code)]


async def test_api_key_never_reaches_the_client(
    fake_upstream: FakeUpstream, serve: ServeApp, http: aiohttp.ClientSession
) -> None:
    fake_upstream.behavior = Behavior(fault="status", status=401)
    base = await serve(create_app(upstream_config(fake_upstream)))
    for fmt in ("sse", "ndjson"):
        async with http.get(f"{base}/api/chat", params={"prompt": "x", "format": fmt}) as resp:
            raw = await resp.read()
            assert SECRET.encode() not in raw
            assert SECRET not in str(resp.headers)
    async with http.get(f"{base}/healthz") as resp:
        assert SECRET not in await resp.text()


async def test_dns_failure_is_502(serve: ServeApp, http: aiohttp.ClientSession, fake_upstream: FakeUpstream) -> None:
    config = upstream_config(fake_upstream, base_url="http://upstream.invalid/v1")
    base = await serve(create_app(config))
    async with http.get(f"{base}/api/chat", params={"prompt": "x"}) as resp:
        assert resp.status == 502
        body = await resp.json()
    assert body["error"]["type"] == "upstream_unavailable"
    assert "invalid" not in body["error"]["message"]  # no internal detail


@pytest.mark.parametrize("status", [429, 500, 503])
async def test_the_openai_client_retries_only_before_the_first_byte(
    fake_upstream: FakeUpstream, serve: ServeApp, http: aiohttp.ClientSession, status: int
) -> None:
    fake_upstream.behavior = Behavior(fault="status", status=status, retry_after="0")
    base = await serve(create_app(upstream_config(fake_upstream, upstream_max_retries=2)))
    async with http.get(f"{base}/api/chat", params={"prompt": "x"}) as resp:
        assert resp.status in (502, 503)
        await resp.read()
    assert len(fake_upstream.seen) == 3  # the first try and two retries

    fake_upstream.seen.clear()
    fake_upstream.behavior = Behavior(tokens=["a", "b", "c"], fault="reset", fault_after=2)
    async with http.get(f"{base}/api/chat", params={"prompt": "x"}) as resp:
        assert sse_events(await resp.read())[-1][1]["error"]["type"] == "upstream_unavailable"
    assert len(fake_upstream.seen) == 1  # tokens were relayed: never retried


async def test_the_upstream_body_is_read_from_the_aiohttp_response_it_can_close(fake_upstream: FakeUpstream) -> None:
    # The provider reads the body from the aiohttp response its HTTP client leaves in the response's extensions,
    # and closes that socket synchronously when a client leaves. With the same client the server builds, the
    # response must be there: otherwise the provider silently takes httpx's slower path without the close.
    client = make_openai_client(base_url=fake_upstream.url, api_key=SECRET)
    try:
        response = await post_chat_stream(
            client, {"model": "fake-model", "messages": [{"role": "user", "content": "x"}], "stream": True}
        )
        raw = aiohttp_response(response)
        assert isinstance(raw, aiohttp.ClientResponse)
        assert b"[DONE]" in await raw.content.read()
        await response.close()
    finally:
        await client.close()


async def test_a_batch_holds_at_most_one_bounded_read_of_the_upstream(fake_upstream: FakeUpstream) -> None:
    # A stalled client holds what the stream has taken from the upstream but not yet written: the transport's
    # high-water mark plus one batch. So a batch must stay small even when the upstream has sent far more than
    # that meanwhile (2 MB here, read while the relay is busy elsewhere).
    fake_upstream.behavior = Behavior(tokens=["x" * 500] * 4000)
    provider = build_provider(upstream_config(fake_upstream))
    largest = total = 0
    try:
        async with contextlib.aclosing(provider.stream(from_query({"prompt": "x"}, _rules(Config())))) as batches:
            async for batch in batches:
                size = sum(len(event.content) for event in batch if isinstance(event, Delta))
                largest = max(largest, size)
                total += size
                await asyncio.sleep(0.01)  # a slow consumer: the upstream's bytes pile up in the meantime
    finally:
        await provider.aclose()
    assert total == 500 * 4000
    assert largest <= 20_000


# --- upstream streams that end oddly --------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["sse", "ndjson"])
async def test_an_sse_error_field_mid_reply_is_an_in_band_upstream_error(
    fake_upstream: FakeUpstream, serve: ServeApp, http: aiohttp.ClientSession, fmt: str
) -> None:
    # Older llama.cpp servers: ``error: {"code":400,"message":...}`` then ``data: [DONE]``. Read as a failure (not
    # as an empty, finished reply), naming the code, never the upstream's text (it quotes a key here).
    fake_upstream.behavior = Behavior(tokens=["one", " two", " three"], fault="error_field", fault_after=2)
    base = await serve(create_app(upstream_config(fake_upstream)))
    async with http.get(f"{base}/api/chat", params={"prompt": "x", "format": fmt}) as resp:
        assert resp.status == 200
        body = await resp.read()
    assert b"secret" not in body
    assert b"Incorrect" not in body
    last = sse_events(body)[-1] if fmt == "sse" else ("error", ndjson_objects(body)[-1], None)
    text = sse_text(body) if fmt == "sse" else "".join(o.get("content", "") for o in ndjson_objects(body))
    assert text == "one two"
    assert last[0] == "error"
    assert last[1]["error"]["type"] == "upstream_error"
    assert "code 400" in last[1]["error"]["message"]


async def test_an_sse_error_field_before_any_token_is_a_502(
    fake_upstream: FakeUpstream, serve: ServeApp, http: aiohttp.ClientSession
) -> None:
    fake_upstream.behavior = Behavior(fault="error_field", fault_after=0)
    base = await serve(create_app(upstream_config(fake_upstream)))
    async with http.get(f"{base}/api/chat", params={"prompt": "x"}) as resp:
        assert resp.status == 502
        assert resp.content_type == "application/json"
        text = await resp.text()
    assert "secret" not in text
    assert (await _json(text))["error"]["type"] == "upstream_error"
    assert "code 400" in (await _json(text))["error"]["message"]


async def test_done_without_any_text_or_finish_reason_is_a_502(
    fake_upstream: FakeUpstream, serve: ServeApp, http: aiohttp.ClientSession
) -> None:
    # A role chunk, a usage chunk, [DONE]: the model never answered. Not an empty, finished reply.
    fake_upstream.behavior = Behavior(tokens=[], fault="no_finish")
    base = await serve(create_app(upstream_config(fake_upstream)))
    async with http.get(f"{base}/api/chat", params={"prompt": "x"}) as resp:
        assert resp.status == 502
        body = await resp.json()
    assert body["error"]["type"] == "upstream_protocol_error"
    assert "without a reply" in body["error"]["message"]


async def test_done_after_text_without_a_finish_reason_is_done(
    fake_upstream: FakeUpstream, serve: ServeApp, http: aiohttp.ClientSession
) -> None:
    fake_upstream.behavior = Behavior(tokens=["a", "b"], fault="no_finish")
    base = await serve(create_app(upstream_config(fake_upstream)))
    async with http.get(f"{base}/api/chat", params={"prompt": "x"}) as resp:
        body = await resp.read()
    assert sse_text(body) == "ab"
    assert sse_events(body)[-1][0] == "done"
    assert sse_events(body)[-1][1]["finish_reason"] is None


@pytest.mark.parametrize("done_line", ["data: [DONE]  ", "data:[DONE]\t", "data:  [DONE]"])
async def test_done_with_whitespace_ends_the_reply(
    fake_upstream: FakeUpstream, serve: ServeApp, http: aiohttp.ClientSession, done_line: str
) -> None:
    fake_upstream.behavior = Behavior(tokens=["a", "b"], done_line=done_line)
    base = await serve(create_app(upstream_config(fake_upstream)))
    async with http.get(f"{base}/api/chat", params={"prompt": "x"}) as resp:
        body = await resp.read()
    assert sse_text(body) == "ab"
    assert sse_events(body)[-1][:2] == (
        "done",
        {"finish_reason": "stop", "usage": {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}},
    )


@pytest.mark.parametrize("fmt", ["sse", "ndjson"])
async def test_only_choice_0_is_relayed_when_an_upstream_sends_several(
    fake_upstream: FakeUpstream, serve: ServeApp, http: aiohttp.ClientSession, fmt: str
) -> None:
    # Each content chunk holds choices 2, 1, 0 in that order: choice 0 is found by its index, not its position.
    fake_upstream.behavior = Behavior(tokens=["Hel", "lo", "!"], choices=3)
    base = await serve(create_app(upstream_config(fake_upstream)))
    async with http.get(f"{base}/api/chat", params={"prompt": "x", "format": fmt}) as resp:
        body = await resp.read()
    assert b"choice" not in body
    text = sse_text(body) if fmt == "sse" else "".join(o.get("content", "") for o in ndjson_objects(body))
    assert text == "Hello!"


@pytest.mark.parametrize(
    ("retry_after", "header"),
    [("inf", "1"), ("nan", "1"), ("1e400", "1"), ("-5", "1"), ("99999999999", "3600"),
     ("9" * 5000, "3600"), ("4000", "3600"), ("7.2", "8"), ("Fri, 31 Dec 1999 23:59:59 GMT", "1"), ("", "1"),
     (None, "1")],
    ids=["inf", "nan", "1e400", "negative", "huge", "5000-digits", "over-max", "fraction", "http-date", "empty",
         "none"],
)  # fmt: skip
async def test_an_insane_upstream_retry_after_is_ignored_or_clamped(
    fake_upstream: FakeUpstream, serve: ServeApp, http: aiohttp.ClientSession, retry_after: str | None, header: str
) -> None:
    # ``inf`` once crashed the relay into a text/plain 500 with a traceback. A value that is not delay-seconds, or
    # none at all, leaves the client the relay's default: a 503 always says when to try again.
    fake_upstream.behavior = Behavior(fault="status", status=429, retry_after=retry_after)
    base = await serve(create_app(upstream_config(fake_upstream)))
    async with http.get(f"{base}/api/chat", params={"prompt": "x"}) as resp:
        assert resp.status == 503
        assert resp.content_type == "application/json"
        assert resp.headers.get("Retry-After") == header
        body = await resp.json()
    assert body["error"]["type"] == "upstream_rate_limited"


@pytest.mark.parametrize("coding", ["br", "zstd", "gzip, gzip"])
async def test_a_body_in_a_coding_the_relay_did_not_offer_is_a_502(
    fake_upstream: FakeUpstream, serve: ServeApp, http: aiohttp.ClientSession, coding: str
) -> None:
    fake_upstream.behavior = Behavior(content_encoding=coding)
    base = await serve(create_app(upstream_config(fake_upstream)))
    async with http.get(f"{base}/api/chat", params={"prompt": "x"}) as resp:
        assert resp.status == 502
        body = await resp.json()
    assert body["error"]["type"] == "upstream_protocol_error"
    assert fake_upstream.seen[0].headers.get("Accept-Encoding") == "gzip, deflate"


def test_docstring_examples() -> None:
    import doctest

    import server.providers.openai_compat

    failures, tried = doctest.testmod(server.providers.openai_compat)
    assert (failures, tried > 0) == (0, True)


@pytest.mark.parametrize("gzip", [False, True], ids=["identity", "gzip"])
async def test_another_http_transport_reads_the_raw_body_and_inflates_it_in_bounded_pieces(
    fake_upstream: FakeUpstream, gzip: bool
) -> None:
    # A provider given a client on the package's httpx transport (an embedding app's choice) reads the body
    # through httpx's public aiter_raw, and inflates it as the aiohttp path does: never the client's iter_bytes,
    # which inflates a whole read at once.
    fake_upstream.behavior = Behavior(tokens=["zip", "ped"] * 50, gzip=gzip)
    client = openai.AsyncOpenAI(
        api_key=SECRET, base_url=fake_upstream.url, max_retries=0, http_client=openai.DefaultAsyncHttpxClient()
    )
    provider = OpenAIProvider(client)
    events: list[object] = []
    try:
        async with contextlib.aclosing(provider.stream(from_query({"prompt": "x"}, _rules(Config())))) as batches:
            async for batch in batches:
                assert batch  # never an empty batch
                events.extend(batch)
    finally:
        await provider.aclose()
    assert "".join(e.content for e in events if isinstance(e, Delta)) == "zipped" * 50
    assert isinstance(events[-1], Done)
    assert events[-1].finish_reason == "stop"


async def test_with_no_stream_cap_every_stream_gets_its_own_upstream_connection(
    fake_upstream: FakeUpstream, serve: ServeApp
) -> None:
    # `--max-streams 0` means no cap: 120 streams at once are 120 upstream requests at once. (The client's pool took
    # "no limit" for aiohttp's default of 100: the rest waited for a stream to end, on their first-token clock.)
    streams = 120
    fake_upstream.behavior = Behavior(tokens=["a"] * 1000, first_delay=30.0)
    base = await serve(create_app(upstream_config(fake_upstream, max_streams=0)))
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        requests = [
            asyncio.create_task(http.get(f"{base}/api/chat?prompt=x", headers={"Accept": "text/event-stream"}))
            for _ in range(streams)
        ]
        try:
            async with asyncio.timeout(20):
                while len(fake_upstream.seen) < streams:
                    await asyncio.sleep(0.05)
        finally:
            for request in requests:
                request.cancel()
            for response in await asyncio.gather(*requests, return_exceptions=True):
                if isinstance(response, aiohttp.ClientResponse):
                    response.close()
    assert len(fake_upstream.seen) == streams
