"""server/intake.py over real sockets: who is asking is settled from the head, before the body is invited, read
or parsed; the body has a deadline; what cannot travel on to the model is refused; a client that goes away
mid-body is a debug line. The relay runs with the runner settings of ``python -m server``."""

from __future__ import annotations

import asyncio
import json
import logging
import zlib
from pathlib import Path

import aiohttp
import pytest
from yarl import URL

from server.config import Config

from .conftest import ServeStandalone, upstream_config
from .fake_upstream import FakeUpstream
from .raw_http import closed_by_server, connect, post_head, read_head, read_response, reset
from .wire import sse_events

KEY = "sk-client-0123456789abcdef"
DEMO = Config(provider="demo", demo_delay=0.0, heartbeat=0.0, rate="100/s", burst=100)
CHAT = "/api/chat"


@pytest.fixture
def keyed(tmp_path: Path) -> Config:
    keys = tmp_path / "keys"
    keys.write_text(f"{KEY}\n")
    return DEMO.with_changes(api_keys_file=str(keys))


async def test_a_refused_client_is_answered_before_it_sends_its_body(
    serve_standalone: ServeStandalone, keyed: Config
) -> None:
    base = await serve_standalone(keyed)
    reader, writer = await connect(base)
    writer.write(post_head(CHAT, 512 * 1024))  # the head only: the body would come after it
    response = await read_response(reader)
    assert response.status == 401
    assert response.json()["error"]["type"] == "unauthorized"
    # RFC 9110 §10.1.1: refusing before the content is read, say whether the connection stays; it does not.
    assert response.headers["connection"] == "close"
    assert await closed_by_server(reader, timeout=5)
    writer.close()


async def test_a_key_that_is_not_utf8_is_refused_and_counted_as_a_failure(
    serve_standalone: ServeStandalone, keyed: Config
) -> None:
    """A key sent with a byte that is not UTF-8 (an accent in Latin-1, as Python's `requests` sends it) is an
    invalid key like any other: 401 as JSON, and a failure the per-address limit counts (10 by default)."""
    base = await serve_standalone(keyed)
    statuses = []
    for _ in range(11):
        reader, writer = await connect(base)
        writer.write(
            b"GET /api/chat?prompt=hi HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            + b"Authorization: Bearer sk-tw\xe9\xa0\r\nConnection: close\r\n\r\n"
        )
        response = await read_response(reader)
        writer.close()
        statuses.append(response.status)
        assert set(response.json()["error"]) == {"type", "message"}
    assert statuses == [401] * 10 + [429]
    assert response.json()["error"]["type"] == "auth_rate_limited"


@pytest.mark.parametrize("authorized", [False, True], ids=["refused", "admitted"])
async def test_100_continue_is_sent_only_to_an_admitted_client(
    serve_standalone: ServeStandalone, keyed: Config, authorized: bool
) -> None:
    base = await serve_standalone(keyed)
    body = json.dumps({"prompt": "hi"}).encode()
    auth = f"Authorization: Bearer {KEY}\r\n" if authorized else ""
    reader, writer = await connect(base)
    writer.write(post_head(CHAT, len(body), extra=f"Expect: 100-continue\r\n{auth}"))
    status, headers = await asyncio.wait_for(read_head(reader), 5)
    if not authorized:
        assert status == 401  # and no 100 Continue before it: the body is never invited
        assert headers["connection"] == "close"
        assert await closed_by_server(reader, timeout=5)
        writer.close()
        return
    assert status == 100
    writer.write(body)
    status, headers = await asyncio.wait_for(read_head(reader), 5)
    assert status == 200
    assert headers["content-type"].startswith("text/event-stream")
    writer.close()


@pytest.mark.parametrize("coding", ["gzip, gzip", "x-gzip", "compress", "foo"])
async def test_a_body_in_a_coding_the_relay_does_not_read_is_415(
    serve_standalone: ServeStandalone, coding: str
) -> None:
    # aiohttp decodes only a single gzip or deflate itself: any other value would reach the JSON parser undecoded,
    # or be read as if it were none. (br and zstd, without their optional packages, aiohttp's parser refuses with
    # its own 400 before any handler runs.)
    base = await serve_standalone(DEMO)
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{base}{CHAT}",
            data=b'{"prompt": "hi"}',
            headers={"Content-Type": "application/json", "Content-Encoding": coding},
        ) as resp,
    ):
        assert resp.status == 415
        assert (await resp.json())["error"]["type"] == "unsupported_media_type"


@pytest.mark.parametrize("coding", ["gzip", "deflate", "identity"])
async def test_a_body_in_gzip_or_deflate_is_read(serve_standalone: ServeStandalone, coding: str) -> None:
    body = json.dumps({"prompt": "hi"}).encode()
    if coding != "identity":
        packer = zlib.compressobj(wbits=31 if coding == "gzip" else 15)
        body = packer.compress(body) + packer.flush()
    base = await serve_standalone(DEMO)
    headers = {"Content-Type": "application/json", "Content-Encoding": coding, "Accept": "application/x-ndjson"}
    async with aiohttp.ClientSession() as http, http.post(f"{base}{CHAT}", data=body, headers=headers) as resp:
        assert resp.status == 200
        assert (await resp.read()).endswith(b"}\n")


async def test_a_body_broken_in_its_coding_is_400_and_says_so(serve_standalone: ServeStandalone) -> None:
    base = await serve_standalone(DEMO)
    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{base}{CHAT}", data=b"not gzip at all", headers=headers) as resp,
    ):
        assert resp.status == 400
        error = (await resp.json())["error"]
    assert error == {"type": "invalid_request", "message": "the body is not valid in its Content-Encoding"}


async def test_an_expectation_other_than_100_continue_is_417(serve_standalone: ServeStandalone) -> None:
    base = await serve_standalone(DEMO)
    reader, writer = await connect(base)
    writer.write(post_head(CHAT, 16, extra="Expect: 200-ok\r\n"))
    response = await read_response(reader)
    assert response.status == 417
    assert response.json()["error"]["type"] == "expectation_failed"
    writer.close()


@pytest.mark.parametrize(
    ("method", "path", "dialect"),
    [
        ("GET", "/api/streams/0123456789abcdef0123456789abcdef", "relay"),
        ("DELETE", "/api/streams/0123456789abcdef0123456789abcdef", "relay"),
        ("GET", "/api/ui-chat/chat-1/stream", "relay"),
        ("GET", "/api/healthz", "relay"),
        ("GET", "/v1/models", "openai"),
        ("GET", "/v1/models/llm-relay-demo", "openai"),
    ],
)
async def test_every_api_route_refuses_another_expectation_as_json(
    serve_standalone: ServeStandalone, http: aiohttp.ClientSession, method: str, path: str, dialect: str
) -> None:
    base = await serve_standalone(DEMO)
    async with http.request(method, f"{base}{path}", headers={"Expect": "200-ok"}) as resp:
        assert resp.status == 417
        error = (await resp.json())["error"]
    assert error["type"] == ("expectation_failed" if dialect == "relay" else "invalid_request_error")


async def test_only_a_known_client_is_told_the_allowed_models(
    serve_standalone: ServeStandalone, keyed: Config, http: aiohttp.ClientSession
) -> None:
    query = {"prompt": "hi", "model": "no-such-model"}
    base = await serve_standalone(keyed)
    async with http.get(f"{base}{CHAT}", params=query) as resp:
        assert resp.status == 401
        assert "llm-relay-demo" not in await resp.text()
    async with http.get(f"{base}{CHAT}", params=query, headers={"Authorization": f"Bearer {KEY}"}) as resp:
        assert resp.status == 400
        assert "llm-relay-demo" in (await resp.json())["error"]["message"]
    open_base = await serve_standalone(DEMO)  # no API keys: anyone may use the relay, and may know its models
    async with http.get(f"{open_base}{CHAT}", params=query) as resp:
        assert resp.status == 400
        assert "llm-relay-demo" in (await resp.json())["error"]["message"]


async def test_an_invalid_request_costs_a_token_and_gives_its_slot_back(
    serve_standalone: ServeStandalone, http: aiohttp.ClientSession
) -> None:
    base = await serve_standalone(DEMO.with_changes(rate="1/m", burst=3, max_streams_per_client=1))
    bad = {"data": b"{not json", "headers": {"Content-Type": "application/json"}}
    async with http.post(f"{base}{CHAT}", **bad) as resp:  # type: ignore[arg-type]
        assert resp.status == 400
        assert resp.headers["RateLimit"].startswith('"rate";r=2;')  # reading and checking the body was work
    async with http.get(f"{base}{CHAT}", params={"prompt": "hi"}) as resp:
        assert resp.status == 200  # the one stream slot came back when the invalid request was refused
        await resp.read()
    async with http.post(f"{base}{CHAT}", **bad) as resp:  # type: ignore[arg-type]
        assert resp.status == 400
    async with http.get(f"{base}{CHAT}", params={"prompt": "hi"}) as resp:
        assert resp.status == 429  # three requests, three tokens
        assert (await resp.json())["error"]["type"] == "rate_limited"


@pytest.mark.parametrize("pace", ["stalled", "trickling"])
async def test_a_body_that_does_not_arrive_in_time_is_408(
    serve_standalone: ServeStandalone, http: aiohttp.ClientSession, pace: str
) -> None:
    base = await serve_standalone(DEMO.with_changes(request_body_timeout=0.5))
    body = json.dumps({"prompt": "a slow hello"}).encode()
    reader, writer = await connect(base)
    writer.write(post_head(CHAT, len(body)) + body[:3])

    async def trickle() -> None:
        for byte in body[3:]:
            await asyncio.sleep(0.1)
            writer.write(bytes([byte]))

    trickling = asyncio.create_task(trickle()) if pace == "trickling" else None
    response = await read_response(reader, timeout=3)
    assert response.status == 408
    assert response.json()["error"]["type"] == "request_timeout"
    assert response.headers["connection"] == "close"
    assert await closed_by_server(reader, timeout=3)
    if trickling is not None:
        trickling.cancel()
    writer.close()
    # A client that sends its body at once is not affected.
    async with http.post(f"{base}{CHAT}", data=body, headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 200
        assert sse_events(await resp.read())[-1][0] == "done"


async def test_a_client_that_resets_mid_body_is_a_debug_line(
    serve_standalone: ServeStandalone, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    base = await serve_standalone(DEMO)
    _reader, writer = await connect(base)
    writer.write(post_head(CHAT, 1000) + b'{"prompt": "cut')
    await writer.drain()
    await asyncio.sleep(0.1)  # the handler is reading the body
    reset(writer)
    async with asyncio.timeout(5):
        while not any(r.name in ("llm_relay.intake", "aiohttp.server") for r in caplog.records):
            await asyncio.sleep(0.01)
    async with http.get(f"{base}{CHAT}", params={"prompt": "still there?"}) as resp:
        assert resp.status == 200
        await resp.read()
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert loud == []
    assert any(r.name == "llm_relay.intake" and "cut short" in r.getMessage() for r in caplog.records)


# -- what the model provider could not be sent ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "target", "body"),
    [
        ("POST", CHAT, b'{"prompt": "x \\ud800"}'),
        ("POST", CHAT, b'{"messages": [{"role": "user", "content": "\\udc00 hi"}]}'),
        ("GET", f"{CHAT}?prompt=x%ED%A0%80", None),
        ("GET", f"{CHAT}?prompt=%FF", None),
    ],
    ids=["json-prompt", "json-message", "query-encoded-surrogate", "query-not-utf8"],
)
async def test_text_that_is_not_unicode_is_400_and_never_reaches_the_upstream(
    serve_standalone: ServeStandalone, fake_upstream: FakeUpstream, method: str, target: str, body: bytes | None
) -> None:
    base = await serve_standalone(upstream_config(fake_upstream))
    async with aiohttp.ClientSession() as http:
        kwargs = {"data": body, "headers": {"Content-Type": "application/json"}} if body else {}
        async with http.request(method, URL(f"{base}{target}", encoded=True), **kwargs) as resp:  # type: ignore[arg-type]
            assert resp.status == 400
            error = (await resp.json())["error"]
            assert error["type"] == "invalid_request"
            assert "surrogate" in error["message"] or "UTF-8" in error["message"]
        async with http.get(f"{base}{CHAT}", params={"prompt": "fine"}) as resp:
            assert resp.status == 200
            await resp.read()
    assert len(fake_upstream.seen) == 1  # only the well-formed request was relayed
