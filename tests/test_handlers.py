"""The HTTP API over real sockets, with the built-in demo model: formats, headers, and every refusal."""

from __future__ import annotations

import asyncio
import io
import re

import aiohttp
import pytest

from server.app import create_app
from server.chat_request import ChatRequest, Message
from server.config import Config
from server.providers.demo import demo_reply, demo_tokens
from server.state import RELAY

from .conftest import ServeApp
from .wire import ndjson_objects, ndjson_text, sse_events, sse_text

FAST = Config(provider="demo", demo_delay=0.0, limits_enabled=False, heartbeat=0.0)


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
        ("POST", "/api/chat", {"json": {"prompt": "hi", "stream": True}}, 400, "invalid_request"),
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
    ],
    ids=[
        "no-prompt", "empty-prompt", "bad-format", "max-tokens-0", "temperature-text", "model-not-allowed",
        "accept-html", "invalid-json", "invalid-utf8", "json-array", "empty-messages", "content-not-string",
        "bad-role", "too-many-messages", "message-too-long", "unknown-field", "text-plain", "too-large",
        "put", "delete", "head", "unknown-path", "the-prefix", "trailing-slash", "healthz-delete", "foreign-origin",
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
    writer.write(b"GET /api/chat?prompt=old+client HTTP/1.0\r\nHost: x\r\n\r\n")
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
