"""The chat page on a relay started with ``--api-keys-file``, in a real Chromium: the key field, the key in the
Authorization header of every API request (start, resume, stop) and never in a URL, kept for the tab's session
only, and SSE read with fetch (EventSource cannot send the header)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web
from playwright.async_api import Browser, Page

from server.config import Config
from server.providers.demo import demo_reply

from . import test_browser
from .browser import CHROMIUM, ChatPage, RelayServer, relay_host_app
from .conftest import ServeApp, upstream_config
from .fake_upstream import Behavior, FakeUpstream
from .test_browser import _demo, _new_page

# The page tests' fixtures: a Chromium, a context, and a page that must raise no error and break no CSP rule.
browser = test_browser.browser
context = test_browser.context
page = test_browser.page

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"no Chromium at {CHROMIUM}: run scripts/system-deps.sh"),
]

KEY = "sk-relay-test-Secret-0123456789"
ENDS = ("done", "error", "connection-error", "stopped")


@dataclass
class Seen:
    """Every API request the relay received: its method, path with query, Authorization header and status."""

    requests: list[tuple[str, str, str | None, int]] = field(default_factory=list)
    transports: list[asyncio.BaseTransport] = field(default_factory=list)

    def middleware(self) -> Callable[..., Awaitable[web.StreamResponse]]:
        @web.middleware
        async def record(
            request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
        ) -> web.StreamResponse:
            if request.path == "/api/chat" and request.transport is not None:
                self.transports.append(request.transport)
            response = await handler(request)
            if request.path.startswith("/api/"):
                self.requests.append(
                    (request.method, request.path_qs, request.headers.get("Authorization"), response.status)
                )
            return response

        return record


@pytest.fixture
def keys_file(tmp_path: Path) -> str:
    path = tmp_path / "keys"
    path.write_text(f"{KEY}\nsk-another-key\n")
    return str(path)


async def _start(serve: ServeApp, config: Config, seen: Seen) -> RelayServer:
    server = relay_host_app(config, middlewares=[seen.middleware()])
    server.base = await serve(server.app)
    return server


def _assert_key_only_in_headers(seen: Seen) -> None:
    assert seen.requests
    for method, path_qs, authorization, _ in seen.requests:
        assert KEY not in path_qs, path_qs
        assert authorization == f"Bearer {KEY}", (method, path_qs)


@pytest.mark.parametrize("transport", ["sse", "ndjson"])
async def test_without_a_key_the_page_shows_the_refusal_then_streams_once_it_is_entered(
    page: Page, serve: ServeApp, keys_file: str, transport: str
) -> None:
    seen = Seen()
    config = Config(provider="demo", demo_delay=0.005, limits_enabled=False, heartbeat=0.0, api_keys_file=keys_file)
    server = await _start(serve, config, seen)
    chat = ChatPage(page, server.base)
    await chat.open()
    assert await page.is_visible("#api-key")
    assert await page.get_attribute("#api-key", "type") == "password"
    # EventSource cannot send the key: with keys the SSE transport is read with fetch, and says so.
    assert await page.text_content("label:has(input[value='sse'])") == " SSE (fetch)"

    await chat.send("no key yet", transport)
    assert await chat.wait_for_state(*ENDS) == "error"
    problem = await page.text_content(".message.assistant .problem") or ""
    assert "unauthorized" in problem
    assert [status for *_, status in seen.requests] == [401]
    seen.requests.clear()

    await page.fill("#api-key", KEY)
    await chat.send("with the key", transport)
    assert await chat.wait_for_state(*ENDS) == "done"
    assert await chat.reply_text() == demo_reply(_demo("with the key"))
    _assert_key_only_in_headers(seen)
    assert [(method, status) for method, _, _, status in seen.requests] == [("POST", 200)]
    # No EventSource was opened: it would have had to carry the key in its URL.
    assert (await chat.instrumentation())["sources"] == []


async def test_the_key_is_kept_for_the_tabs_session_only(browser: Browser, serve: ServeApp, keys_file: str) -> None:
    seen = Seen()
    config = Config(provider="demo", demo_delay=0.0, limits_enabled=False, heartbeat=0.0, api_keys_file=keys_file)
    server = await _start(serve, config, seen)
    context = await browser.new_context()
    try:
        errors: list[str] = []
        tab = await _new_page(context, errors)
        chat = ChatPage(tab, server.base)
        await chat.open()
        await tab.fill("#api-key", KEY)
        storage = await tab.evaluate("() => [{...sessionStorage}, {...localStorage}, document.cookie]")
        assert storage == [{"llm-relay.api-key": KEY}, {}, ""]
        await chat.open()  # a reload in the same tab keeps it
        assert await tab.input_value("#api-key") == KEY
        await chat.send("after a reload", "ndjson")
        assert await chat.wait_for_state(*ENDS) == "done"
        await tab.click("#forget-key")
        assert await tab.input_value("#api-key") == ""
        assert await tab.evaluate("() => sessionStorage.length") == 0
        await tab.fill("#api-key", KEY)
        other = await context.new_page()  # another tab has a session of its own
        await ChatPage(other, server.base).open()
        assert await other.input_value("#api-key") == ""
        assert errors == []
    finally:
        await context.close()
    _assert_key_only_in_headers(seen)


@pytest.mark.parametrize("transport", ["sse", "ndjson"])
async def test_with_a_key_a_cut_connection_resumes_and_stop_stops(
    page: Page, serve: ServeApp, fake_upstream: FakeUpstream, keys_file: str, transport: str
) -> None:
    tokens = [f" word{i}" for i in range(400)]
    fake_upstream.behavior = Behavior(tokens=tokens, delay=0.03)
    seen = Seen()
    server = await _start(serve, upstream_config(fake_upstream, api_keys_file=keys_file), seen)
    chat = ChatPage(page, server.base)
    await chat.open()
    await page.fill("#api-key", KEY)
    await chat.send("Tell me a story", transport)
    await chat.wait_for_text(lambda text: text.count("word") >= 5)
    seen.transports[0].abort()  # the server side of the connection goes: the page resumes with the key
    await chat.wait_for_text(lambda text: text.count("word") >= 20, timeout=15)
    await page.click("#stop")
    assert await chat.wait_for_state(*ENDS) == "stopped"
    await asyncio.wait_for(fake_upstream.last.client_gone.wait(), timeout=5)
    text = await chat.reply_text()
    assert "".join(tokens).startswith(text)  # each token once, in order, across the resume
    assert len(fake_upstream.seen) == 1
    methods = [(method, path.split("?")[0].split("/")[2], status) for method, path, _, status in seen.requests]
    # Each request is recorded when its handler returns: the resume's GET ends after Stop's DELETE.
    assert methods[0] == ("POST", "chat", 200)
    assert ("GET", "streams", 200) in methods  # the resume
    assert ("DELETE", "streams", 204) in methods  # Stop, authorised
    _assert_key_only_in_headers(seen)
