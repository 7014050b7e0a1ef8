"""The HTTP API over real sockets, with the built-in demo model: formats, headers, and every refusal."""

from __future__ import annotations

import asyncio
import io
import re

import aiohttp
import pytest
from multidict import CIMultiDict

from server.app import create_app, create_relay_app
from server.chat_request import ChatRequest, Message
from server.config import Config
from server.events import Delta, Done
from server.providers.demo import demo_reply, demo_tokens
from server.state import RELAY

from .conftest import ServeApp, upstream_config
from .fake_upstream import FakeUpstream
from .scripted import ScriptedProvider, relay_host
from .wire import ndjson_objects, ndjson_text, sse_events, sse_text

FAST = Config(provider="demo", demo_delay=0.0, limits_enabled=False, heartbeat=0.0)
# What Chromium sends for <img src> on a page of another site (no Origin).
CHROMIUM_IMG = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors", "Sec-Fetch-Dest": "image"}


def _demo(prompt: str, *history: Message) -> ChatRequest:
    return ChatRequest(messages=(*history, Message("user", prompt)), model="llm-relay-demo")


@pytest.fixture
async def base(serve: ServeApp) -> str:
    return await serve(create_app(FAST))


async def test_sse_get_streams_the_demo_reply_with_ids_and_done(base: str, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{base}/api/chat", params={"prompt": "What is SSE?"}) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream; charset=utf-8"
        assert resp.headers["Cache-Control"] == "no-cache"
        assert resp.headers["X-Accel-Buffering"] == "no"
        stream_id = resp.headers["X-Stream-Id"]
        assert re.fullmatch("[0-9a-f]{32}", stream_id)  # 128 random bits
        assert "Content-Encoding" not in resp.headers
        body = await resp.read()
    events = sse_events(body)
    tokens = demo_tokens(_demo("What is SSE?"))
    assert [kind for kind, _, _ in events] == ["message"] * len(tokens) + ["done"]
    assert [event_id for _, _, event_id in events] == [f"{stream_id}/{i}" for i in range(1, len(tokens) + 2)]
    assert sse_text(body) == demo_reply(_demo("What is SSE?"))
    assert "What is SSE?" in sse_text(body)
    done = events[-1][1]
    assert done["finish_reason"] == "stop"
    assert done["usage"]["completion_tokens"] == len(tokens)
    assert body.startswith(b'id: %s/1\ndata: {"content":"You"}\n\n' % stream_id.encode())


async def test_ndjson_post_keeps_the_conversation(base: str, http: aiohttp.ClientSession) -> None:
    messages = [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "an answer"},
        {"role": "user", "content": "second question"},
    ]
    async with http.post(
        f"{base}/api/chat", json={"messages": messages}, headers={"Accept": "application/x-ndjson"}
    ) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "application/x-ndjson; charset=utf-8"
        body = await resp.read()
    objects = ndjson_objects(body)
    assert {obj["type"] for obj in objects[:-1]} == {"delta"}
    assert objects[-1]["type"] == "done"
    expected = demo_reply(_demo("second question", Message("user", "first"), Message("assistant", "an answer")))
    assert ndjson_text(body) == expected
    assert "(your message 2 in this conversation)" in expected


@pytest.mark.parametrize(
    ("accept", "query", "expected"),
    [
        (None, {}, "text/event-stream"),
        ("*/*", {}, "text/event-stream"),
        ("application/x-ndjson", {}, "application/x-ndjson"),
        ("text/event-stream", {"format": "ndjson"}, "application/x-ndjson"),
        ("application/x-ndjson", {"format": "sse"}, "text/event-stream"),
        ("application/x-ndjson;q=0.4, text/event-stream;q=0.9", {}, "text/event-stream"),
    ],
    ids=["none", "any", "ndjson", "override-ndjson", "override-sse", "q-values"],
)
async def test_framing_is_negotiated_per_request(
    base: str, http: aiohttp.ClientSession, accept: str | None, query: dict[str, str], expected: str
) -> None:
    headers = {"Accept": accept} if accept else {}
    if accept is None:
        headers["Accept"] = ""
    async with http.post(f"{base}/api/chat", params=query, json={"prompt": "hi"}, headers=headers) as resp:
        assert resp.status == 200
        assert resp.content_type == expected
        await resp.read()


async def test_max_tokens_ends_with_length(base: str, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{base}/api/chat", params={"prompt": "hi", "max_tokens": "3", "format": "ndjson"}) as resp:
        objects = ndjson_objects(await resp.read())
    assert [o["type"] for o in objects] == ["delta", "delta", "delta", "done"]
    assert objects[-1]["finish_reason"] == "length"


async def _error(resp: aiohttp.ClientResponse) -> dict[str, str]:
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"type", "message"}
    assert body["error"]["message"]
    return dict(body["error"])


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "type_"),
    [
        ("GET", "/api/chat", {}, 400, "invalid_request"),
        ("GET", "/api/chat?prompt=", {}, 400, "invalid_request"),
        ("GET", "/api/chat?prompt=hi&format=xml", {}, 400, "invalid_request"),
        ("GET", "/api/chat?prompt=hi&max_tokens=0", {}, 400, "invalid_request"),
        ("GET", "/api/chat?prompt=hi&temperature=hot", {}, 400, "invalid_request"),
        ("GET", "/api/chat?prompt=hi&model=gpt-5", {}, 400, "invalid_request"),
        ("GET", "/api/chat?prompt=hi", {"headers": {"Accept": "text/html"}}, 406, "not_acceptable"),
        ("POST", "/api/chat", {"data": b"{not json", "headers": {"Content-Type": "application/json"}}, 400,
         "invalid_request"),
        ("POST", "/api/chat", {"data": b"\xff\xfe", "headers": {"Content-Type": "application/json"}}, 400,
         "invalid_request"),
        ("POST", "/api/chat", {"json": []}, 400, "invalid_request"),
        ("POST", "/api/chat", {"json": {"messages": []}}, 400, "invalid_request"),
        ("POST", "/api/chat", {"json": {"messages": [{"role": "user", "content": 5}]}}, 400, "invalid_request"),
        ("POST", "/api/chat", {"json": {"messages": [{"role": "wizard", "content": "x"}]}}, 400,
         "invalid_request"),
        ("POST", "/api/chat", {"json": {"messages": [{"role": "user", "content": "x"}] * 201}}, 400,
         "invalid_request"),
        ("POST", "/api/chat", {"json": {"messages": [{"role": "user", "content": "x" * 32_001}]}}, 400,
         "invalid_request"),
        ("POST", "/api/chat", {"json": {"prompt": "hi", "n": 2}}, 400, "invalid_request"),
        ("POST", "/api/chat", {"data": "hi", "headers": {"Content-Type": "text/plain"}}, 415,
         "unsupported_media_type"),
        ("POST", "/api/chat", {"data": io.BytesIO(b"{" + b" " * (1 << 20) + b"}"),
                                "headers": {"Content-Type": "application/json"}}, 413, "payload_too_large"),
        ("PUT", "/api/chat", {}, 405, "method_not_allowed"),
        ("DELETE", "/api/chat", {}, 405, "method_not_allowed"),
        ("HEAD", "/api/chat", {}, 405, "method_not_allowed"),
        ("GET", "/api/nothing-here", {}, 404, "not_found"),
        ("GET", "/api", {}, 404, "not_found"),
        ("POST", "/api/chat/", {}, 404, "not_found"),
        ("DELETE", "/api/healthz", {}, 405, "method_not_allowed"),
        ("GET", "/api/chat?prompt=hi", {"headers": {"Origin": "https://evil.example"}}, 403, "forbidden"),
        ("GET", "/api/chat?prompt=hi", {"headers": CHROMIUM_IMG}, 403, "forbidden"),
        ("GET", "/api/chat?prompt=hi", {"headers": {"Host": "evil.example", "Origin": "http://evil.example"}}, 421,
         "misdirected_request"),
        ("GET", "/api/chat?prompt=hi", {"headers": {"Host": "evil.example/"}}, 400, "invalid_request"),
    ],
    ids=[
        "no-prompt", "empty-prompt", "bad-format", "max-tokens-0", "temperature-text", "model-not-allowed",
        "accept-html", "invalid-json", "invalid-utf8", "json-array", "empty-messages", "content-not-string",
        "bad-role", "too-many-messages", "message-too-long", "unknown-field", "text-plain", "too-large",
        "put", "delete", "head", "unknown-path", "the-prefix", "trailing-slash", "healthz-delete", "foreign-origin",
        "cross-site-img", "rebinding-host", "malformed-host",
    ],
)  # fmt: skip
async def test_bad_input_gets_a_json_error_and_the_server_keeps_going(
    base: str,
    http: aiohttp.ClientSession,
    method: str,
    path: str,
    kwargs: dict[str, object],
    status: int,
    type_: str,
) -> None:
    async with http.request(method, f"{base}{path}", **kwargs) as resp:  # type: ignore[arg-type]
        assert resp.status == status
        allow = "GET" if path.endswith("healthz") else "GET,POST"
        if method == "HEAD":
            assert resp.headers["Allow"] == allow
        else:
            assert (await _error(resp))["type"] == type_
            if status == 405:
                assert resp.headers["Allow"] == allow
    async with http.get(f"{base}/api/chat", params={"prompt": "still there?"}) as resp:
        assert resp.status == 200
        assert sse_events(await resp.read())[-1][0] == "done"


async def test_chunked_body_over_the_limit_is_refused_without_reading_it_all(
    base: str, http: aiohttp.ClientSession
) -> None:
    async def body():  # type: ignore[no-untyped-def]
        for _ in range(64):
            yield b" " * 65536

    async with http.post(f"{base}/api/chat", data=body(), headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 413
        assert (await _error(resp))["type"] == "payload_too_large"


async def test_same_origin_browser_requests_are_allowed(base: str, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{base}/api/chat", params={"prompt": "hi"}, headers={"Origin": base}) as resp:
        assert resp.status == 200
        await resp.read()


async def test_healthz(base: str, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{base}/healthz") as resp:
        assert resp.status == 200
        assert await resp.json() == {
            "status": "ok",
            "provider": "demo",
            "open_streams": 0,
            "readers": 0,
            "retained_streams": 0,
            "log_bytes": 0,
        }


async def test_http_10_client_gets_a_close_delimited_body(base: str) -> None:
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"GET /api/chat?prompt=old+client HTTP/1.0\r\nHost: {host}:{port}\r\n\r\n".encode())
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 5)  # until the server closes: that is the body's end
    writer.close()
    await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    head_text = head.decode().lower()
    assert head_text.startswith("http/1.0 200") or head_text.startswith("http/1.1 200")
    assert "transfer-encoding" not in head_text
    events = sse_events(body)
    assert events[-1][0] == "done"
    assert "old client" in "".join(d["content"] for k, d, _ in events if k == "message")


async def test_unicode_round_trip(base: str, http: aiohttp.ClientSession) -> None:
    prompt = "naïve 日本語 🙂 \u2028 <b>"
    async with http.get(f"{base}/api/chat", params={"prompt": prompt}) as resp:
        body = await resp.read()
    body.decode("utf-8")  # strict
    assert prompt.replace("\u2028", " ").split()[0] in sse_text(body)
    assert "🙂" in body.decode()  # sent as UTF-8, not as \u escapes


async def test_a_reconnecting_event_source_gets_204_and_no_second_generation(
    serve: ServeApp, http: aiohttp.ClientSession
) -> None:
    app = create_app(FAST)
    base = await serve(app)
    async with http.get(f"{base}/api/chat", params={"prompt": "hi"}) as resp:
        events = sse_events(await resp.read())
    finished = app[RELAY].streams.finished
    async with http.get(
        f"{base}/api/chat", params={"prompt": "hi"}, headers={"Last-Event-ID": events[-1][2] or ""}
    ) as resp:
        assert resp.status == 204
        assert await resp.read() == b""
    assert app[RELAY].streams.finished == finished  # no stream was started


# -- cross-site requests and Host checks (server/request_origin.py) ----------------------------------------------

# Each way a page of another site can make a browser send a request, as Chromium sends it (see test_browser.py).
CROSS_SITE_VECTORS = {
    "img": CHROMIUM_IMG,
    "script": {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors", "Sec-Fetch-Dest": "script"},
    "iframe": {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "iframe"},
    "prefetch": {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors", "Sec-Fetch-Dest": "empty",
                 "Sec-Purpose": "prefetch"},
    "no-cors-fetch": {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors", "Sec-Fetch-Dest": "empty"},
    "navigation": {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document",
                   "Upgrade-Insecure-Requests": "1"},
    "cors-fetch": {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "cors", "Sec-Fetch-Dest": "empty",
                   "Origin": "http://evil.example"},
}  # fmt: skip


async def test_no_cross_site_vector_reaches_the_upstream_and_a_plain_client_does(
    fake_upstream: FakeUpstream, serve: ServeApp, http: aiohttp.ClientSession
) -> None:
    base = await serve(create_app(upstream_config(fake_upstream)))
    for vector, headers in CROSS_SITE_VECTORS.items():
        async with http.get(f"{base}/api/chat", params={"prompt": vector}, headers=headers) as resp:
            assert (resp.status, (await _error(resp))["type"]) == (403, "forbidden"), vector
    rebinding = {"Host": f"evil.example:{base.rsplit(':', 1)[1]}", "Origin": "http://evil.example"}
    async with http.get(f"{base}/api/chat", params={"prompt": "rebinding"}, headers=rebinding) as resp:
        assert (resp.status, (await _error(resp))["type"]) == (421, "misdirected_request")
    await asyncio.sleep(0.1)
    assert fake_upstream.seen == []
    # The same request without Fetch Metadata is a client like curl or an SDK: it is relayed.
    async with http.get(f"{base}/api/chat", params={"prompt": "curl"}) as resp:
        assert resp.status == 200
        assert sse_events(await resp.read())[-1][0] == "done"
    assert [seen.body["messages"][-1]["content"] for seen in fake_upstream.seen] == ["curl"]


_OWN_PAGE = {"Sec-Fetch-Site": "same-origin", "Sec-Fetch-Mode": "cors", "Sec-Fetch-Dest": "empty"}


async def test_the_pages_own_eventsource_and_fetch_are_served(base: str, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{base}/api/chat", params={"prompt": "hi"}, headers=_OWN_PAGE) as resp:
        assert resp.status == 200
        assert sse_events(await resp.read())[-1][0] == "done"
    headers = {**_OWN_PAGE, "Origin": base, "Accept": "application/x-ndjson"}
    async with http.post(f"{base}/api/chat", json={"prompt": "hi"}, headers=headers) as resp:
        assert resp.status == 200
        assert ndjson_objects(await resp.read())[-1]["type"] == "done"


@pytest.mark.parametrize(
    ("host", "status"),
    [("127.0.0.1", 200), ("localhost:{port}", 200), ("relay.test:{port}", 200), ("relay.test", 200),
     ("RELAY.TEST:1", 200), ("relay.internal:{port}", 421), ("evil.example:{port}", 421)],
    ids=["address", "localhost", "listed-name", "listed-name-no-port", "listed-name-case", "unlisted-name",
         "rebinding"],
)  # fmt: skip
async def test_plain_clients_are_answered_by_address_localhost_and_listed_names(
    serve: ServeApp, http: aiohttp.ClientSession, host: str, status: int
) -> None:
    base = await serve(create_app(FAST.with_changes(public_origins=("http://relay.test:8080",))))
    headers = {"Host": host.format(port=base.rsplit(":", 1)[1])}
    async with http.get(f"{base}/api/chat", params={"prompt": "hi"}, headers=headers) as resp:
        assert resp.status == status
        if status == 200:
            assert sse_events(await resp.read())[-1][0] == "done"
        else:
            error = await _error(resp)
            assert error["type"] == "misdirected_request"
            assert "--public-origin" in error["message"]
            assert "relay" not in error["message"]  # the names it answers for are not told


async def test_a_client_that_sends_no_host_is_answered(base: str) -> None:
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /api/chat?prompt=no+host HTTP/1.0\r\n\r\n")  # HTTP/1.0 has no Host requirement
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.split(b"\r\n", 1)[0].split(b" ")[1] == b"200"
    assert sse_events(body)[-1][0] == "done"


async def test_healthz_answers_any_host(base: str, http: aiohttp.ClientSession) -> None:
    # Probes use addresses and names the relay cannot know, and /healthz starts nothing (docs/security.md).
    for path in ("/healthz", "/api/healthz"):
        async with http.get(f"{base}{path}", headers={"Host": "relay.internal"}) as resp:
            assert resp.status == 200


def test_the_host_check_says_which_names_are_answered() -> None:
    # python -m server logs this once it listens (tests/test_process.py reads its startup lines).
    assert "until the name is listed with --public-origin" in create_relay_app(FAST)[RELAY].origin_policy.describe()
    listed = FAST.with_changes(public_origins=("https://chat.example.com", "http://relay.test:8080"))
    described = create_relay_app(listed)[RELAY].origin_policy.describe()
    assert described.endswith("to localhost or to chat.example.com, relay.test")


def test_a_config_built_in_code_with_a_bad_public_origin_is_refused() -> None:
    with pytest.raises(ValueError, match="--public-origin"):
        create_relay_app(FAST.with_changes(public_origins=("chat.example.com",)))


@pytest.mark.parametrize("resume", ["0", "1"])
async def test_a_stream_asked_for_once_shutdown_has_begun_is_a_503_with_retry_after(
    serve: ServeApp, http: aiohttp.ClientSession, resume: str
) -> None:
    # Resumable or not: an opening block and an in-band error would give a reconnecting browser an id to resume
    # into 204 ("stop reconnecting") when the server comes back.
    provider = ScriptedProvider()
    host, api = relay_host(Config(provider="demo", heartbeat=0.0, limits_enabled=False), provider)
    base = await serve(host)
    provider.put([Delta("still going")])  # (the response head goes with the first frame)
    running = await http.get(f"{base}/api/chat", params={"prompt": "x"})  # keeps the shutdown in its grace
    assert running.status == 200
    await running.content.readuntil(b"\n\n")
    shutdown = asyncio.create_task(api[RELAY].streams.shutdown(5.0))
    await asyncio.sleep(0)  # shutdown has begun
    async with http.get(f"{base}/api/chat", params={"prompt": "x", "resume": resume}) as resp:
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "1"
        assert (await resp.json())["error"]["type"] == "server_shutdown"
    provider.put([Done("stop")], None)
    await asyncio.wait_for(shutdown, 5)
    running.close()


async def test_an_accept_sent_on_two_lines_is_one_list(serve: ServeApp, http: aiohttp.ClientSession) -> None:
    # RFC 9110 §5.3: the same field on several lines is one comma-separated list.
    base = await serve(create_app(Config(provider="demo", demo_delay=0.0, heartbeat=0.0, limits_enabled=False)))
    headers = CIMultiDict([("Accept", "text/html"), ("Accept", "application/x-ndjson")])
    async with http.get(f"{base}/api/chat", params={"prompt": "hi"}, headers=headers) as resp:
        assert resp.status == 200
        assert resp.content_type == "application/x-ndjson"
        assert ndjson_objects(await resp.read())[-1]["type"] == "done"
