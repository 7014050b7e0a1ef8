"""The openai client's HTTP client (`server.providers.http_client`): what it keeps of httpx's behaviour and what it
drops, with the real `openai` client against small upstreams on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx2
import openai
import pytest
from aiohttp import web

from server.providers.http_client import AiohttpClient, environment_proxy
from server.providers.openai_compat import aiohttp_response, make_openai_client, post_chat_stream

SSE_REPLY = b'data: {"choices":[{"index":0,"delta":{"content":"ok"},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n'
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}

Serve = Callable[[web.Application], Awaitable[str]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    runners: list[web.AppRunner] = []

    async def start(app: web.Application) -> str:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        runners.append(runner)
        host, port = runner.addresses[0][:2]
        return f"http://{host}:{port}"

    yield start
    for runner in runners:
        await runner.cleanup()


def recording_app(seen: list[web.Request], *, cookie: bool = False) -> web.Application:
    async def chat(request: web.Request) -> web.StreamResponse:
        seen.append(request)
        await request.read()
        response = web.Response(body=SSE_REPLY, content_type="text/event-stream")
        if cookie:
            response.set_cookie("__cf_bm", "session-of-someone-else")
        return response

    async def models(request: web.Request) -> web.Response:
        seen.append(request)
        model = {"id": "m", "object": "model", "created": 0, "owned_by": "x"}
        return web.json_response({"object": "list", "data": [model]})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", models)
    return app


async def read_reply(client: openai.AsyncOpenAI) -> bytes:
    response = await post_chat_stream(client, BODY, "req-1")
    try:
        raw = aiohttp_response(response)
        assert raw is not None
        return await raw.content.read()
    finally:
        await response.close()


async def replies(base_url: str | None, count: int = 1) -> list[bytes]:
    """`count` replies read one after the other through the client the relay builds for `base_url`."""
    client = make_openai_client(api_key="sk-x", base_url=base_url)
    try:
        return [await read_reply(client) for _ in range(count)]
    finally:
        await client.close()


async def test_the_upstream_gets_the_request_as_the_openai_client_built_it(serve: Serve) -> None:
    seen: list[web.Request] = []
    base = await serve(recording_app(seen))
    (reply,) = await replies(f"{base}/v1")
    assert b"[DONE]" in reply
    (request,) = seen
    host, port = base.removeprefix("http://").split(":")
    assert request.headers["Host"] == f"{host}:{port}"
    assert request.headers["Authorization"] == "Bearer sk-x"
    assert request.headers["Accept-Encoding"] == "gzip, deflate"  # what server.content_coding decodes
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["User-Agent"].startswith("AsyncOpenAI/Python")
    assert request.headers["X-Request-ID"] == "req-1"
    assert "Cookie" not in request.headers


async def test_an_upstream_cookie_is_never_sent_back(serve: Serve) -> None:
    # One upstream session serves every client of the relay: a cookie set for one is no one's to send.
    seen: list[web.Request] = []
    base = await serve(recording_app(seen, cookie=True))
    await replies(f"{base}/v1", 2)
    assert len(seen) == 2
    assert "Cookie" not in seen[1].headers


async def test_a_redirect_is_followed_to_another_origin_without_the_credentials(serve: Serve) -> None:
    seen: list[web.Request] = []
    target = await serve(recording_app(seen))

    async def moved(request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect(f"{target}/v1/chat/completions")  # 307: the method and body stay

    app = web.Application()
    app.router.add_post("/v1/chat/completions", moved)
    origin = await serve(app)
    (reply,) = await replies(f"{origin}/v1")
    assert b"[DONE]" in reply
    (request,) = seen
    assert request.method == "POST"
    assert request.headers["Host"] == target.removeprefix("http://")  # the new host, not the first one's
    assert "Authorization" not in request.headers  # as httpx: no credentials to another origin
    assert json.loads(await request.read()) == BODY


async def test_a_request_not_streamed_is_read_whole(serve: Serve) -> None:
    seen: list[web.Request] = []
    base = await serve(recording_app(seen))
    client = make_openai_client(api_key="sk-x", base_url=f"{base}/v1")
    try:
        models = await client.models.list()
    finally:
        await client.close()
    assert [model.id for model in models.data] == ["m"]


async def test_what_it_does_not_send_itself_goes_through_httpx(serve: Serve) -> None:
    # Query parameters, a relative URL against a base URL: httpx's own merging, then the same transport.
    seen: list[web.Request] = []
    base = await serve(recording_app(seen))
    async with AiohttpClient(timeout=httpx2.Timeout(5.0), max_connections=0) as http:
        response = await http.get(f"{base}/v1/models", params={"limit": "1"})
        assert response.json()["data"][0]["id"] == "m"
    async with AiohttpClient(timeout=httpx2.Timeout(5.0), max_connections=0) as http:
        http.base_url = httpx2.URL(f"{base}/v1/")
        response = await http.get("models")
        assert response.status_code == 200
    assert [(r.path, r.query_string) for r in seen] == [("/v1/models", "limit=1"), ("/v1/models", "")]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_a_refused_connection_is_a_connect_error_the_openai_client_retries() -> None:
    port = free_port()
    async with AiohttpClient(timeout=httpx2.Timeout(5.0), max_connections=0) as http:
        with pytest.raises(httpx2.ConnectError):
            await http.post(f"http://127.0.0.1:{port}/v1/chat/completions", content=b"{}")
    client = make_openai_client(api_key="sk-x", base_url=f"http://127.0.0.1:{port}/v1", max_retries=0)
    try:
        with pytest.raises(openai.APIConnectionError) as caught:
            await post_chat_stream(client, BODY)
        assert not isinstance(caught.value, openai.APITimeoutError)
    finally:
        await client.close()


@contextlib.asynccontextmanager
async def silent_server() -> AsyncIterator[int]:
    """A server that accepts connections and never answers."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_a_read_timeout_is_a_read_timeout() -> None:
    timeout = httpx2.Timeout(5.0, read=0.2)
    async with silent_server() as port, AiohttpClient(timeout=timeout, max_connections=0) as http:
        with pytest.raises(httpx2.ReadTimeout):
            await http.post(f"http://127.0.0.1:{port}/v1/chat/completions", content=b"{}")


@pytest.mark.parametrize("named_by", ["option", "environment"])
async def test_the_environments_proxy_carries_the_upstream_requests(
    monkeypatch: pytest.MonkeyPatch, named_by: str
) -> None:
    # The upstream named by --base-url, or left to the openai client (OPENAI_BASE_URL, else its default).
    request_lines: list[bytes] = []

    async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        request_lines.append(head.split(b"\r\n", 1)[0])
        lines = head.split(b"\r\n")
        length = next(int(line.split(b":")[1]) for line in lines if line.lower().startswith(b"content-length:"))
        await reader.readexactly(length)
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: %d\r\n\r\n%s"
            % (len(SSE_REPLY), SSE_REPLY)
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(proxy, "127.0.0.1", 0)
    unreachable = f"http://upstream.invalid:{free_port()}/v1"  # reachable only through the proxy
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    if named_by == "environment":
        monkeypatch.setenv("OPENAI_BASE_URL", unreachable)
    try:
        (reply,) = await replies(unreachable if named_by == "option" else None)
        assert b"[DONE]" in reply
    finally:
        server.close()
        await server.wait_closed()
    assert request_lines == [f"POST {unreachable}/chat/completions HTTP/1.1".encode()]


def test_the_environment_names_the_proxy_for_the_upstreams_host(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    assert environment_proxy("https", "api.openai.com") is None
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    assert environment_proxy("https", "api.openai.com") == "http://proxy.internal:3128"
    assert environment_proxy("http", "vllm.internal") is None  # no HTTP_PROXY: plain HTTP goes direct
    monkeypatch.setenv("ALL_PROXY", "http://all.internal:3128")
    assert environment_proxy("http", "vllm.internal") == "http://all.internal:3128"
    monkeypatch.setenv("NO_PROXY", "internal,localhost")
    assert environment_proxy("http", "vllm.internal") is None
    assert environment_proxy("https", "api.openai.com") == "http://proxy.internal:3128"


async def test_a_request_that_asks_not_to_follow_redirects_gets_the_redirect(serve: Serve) -> None:
    async def moved(request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect("/elsewhere")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", moved)
    base = await serve(app)
    async with AiohttpClient(timeout=httpx2.Timeout(5.0), max_connections=0) as http:
        response = await http.post(f"{base}/v1/chat/completions", content=b"{}", follow_redirects=False)
    assert response.status_code == 307
    assert response.headers["Location"] == "/elsewhere"


async def test_a_host_header_the_caller_chose_reaches_the_upstream(serve: Serve) -> None:
    # Some gateways route by a Host that is not the address connected to.
    seen: list[web.Request] = []
    base = await serve(recording_app(seen))
    async with AiohttpClient(timeout=httpx2.Timeout(5.0), max_connections=0) as http:
        await http.get(f"{base}/v1/models", headers={"Host": "models.gateway.internal"})
    assert seen[0].headers["Host"] == "models.gateway.internal"
