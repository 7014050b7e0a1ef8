"""Helpers for the browser tests: the relay in a host app that logs requests, and a page object for the chat page.

The browser is Debian's Chromium (``scripts/system-deps.sh`` installs it), driven by Playwright from PyPI; no
browser is downloaded. The server runs in the test's own event loop, so a test can look at server state (the
requests received, the fake upstream's view of the connection) between two browser actions.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware
from playwright.async_api import Locator, Page

from server.app import API_PREFIX, setup
from server.config import Config
from server.handlers import healthz
from server.page import setup_page
from server.state import RELAY

CHROMIUM = os.environ.get("LLM_RELAY_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "screenshot.png"
UPDATE_SCREENSHOT_ENV = "LLM_RELAY_UPDATE_SCREENSHOT"

# Runs before the page's own scripts: records every EventSource the page opens (to check that it was closed) and
# every Content-Security-Policy violation (the page must work under its own policy).
INSTRUMENT = """
(() => {
  const seen = { sources: [], violations: [] };
  Object.defineProperty(window, "__relayTest", { value: seen });
  const Original = window.EventSource;
  window.EventSource = class extends Original {
    constructor(...args) {
      super(...args);
      seen.sources.push(this);
    }
  };
  document.addEventListener("securitypolicyviolation", (event) => {
    seen.violations.push(`${event.violatedDirective} ${event.blockedURI}`);
  });
})();
"""


@dataclass
class RelayServer:
    """The relay as a test serves it: its URL, every request it received, in order, and the connection of each
    chat request (a test cuts one from the server's side)."""

    app: web.Application
    requests: list[tuple[str, str]] = field(default_factory=list)
    chat_connections: list[asyncio.BaseTransport] = field(default_factory=list)
    base: str = ""

    def chat_requests(self, *methods: str) -> list[tuple[str, str]]:
        return [(m, p) for m, p in self.requests if p == f"{API_PREFIX}/chat" and (not methods or m in methods)]

    @property
    def streams_finished(self) -> int:
        return self.app[RELAY].streams.finished


def relay_host_app(
    config: Config,
    *,
    page: bool = True,
    api_base: str = API_PREFIX,
    middlewares: Iterable[Middleware] = (),
) -> RelayServer:
    """What `create_app` builds, on a host app whose first middleware logs each request the server receives."""
    server_ref: list[RelayServer] = []

    @web.middleware
    async def log_requests(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        server = server_ref[0]
        server.requests.append((request.method, request.path))
        if request.path == f"{api_base}/chat" and request.transport is not None:
            server.chat_connections.append(request.transport)
        return await handler(request)

    host = web.Application(middlewares=[log_requests, *middlewares])
    api = setup(host, config)
    host[RELAY] = api[RELAY]
    host.router.add_get("/healthz", healthz, allow_head=False)
    if page:
        setup_page(host, config, api_base=api_base)
    server = RelayServer(host)
    server_ref.append(server)
    return server


def reserve_port() -> socket.socket:
    """A listening-ready socket on a free loopback port, for a server whose URL must be known before it is built
    (a cross-origin test needs each origin in the other's configuration)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{host}:{port}"


async def serve_on(app: web.Application, sock: socket.socket) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    return runner


def screenshot_wanted() -> bool:
    """Take docs/screenshot.png when it is missing or asked for, so the suite leaves the tree clean."""
    return not SCREENSHOT.exists() or os.environ.get(UPDATE_SCREENSHOT_ENV) == "1"


class ChatPage:
    """The chat page as a person uses it: type, pick a transport, send, watch the reply and the status line."""

    def __init__(self, page: Page, base: str) -> None:
        self.page = page
        self.base = base

    async def open(self) -> None:
        await self.page.goto(f"{self.base}/")
        await self.page.wait_for_selector("html[data-ready='true']")

    async def send(self, prompt: str, transport: str) -> None:
        await self.page.check(f"input[name='transport'][value='{transport}']")
        await self.page.fill("#prompt", prompt)
        await self.page.press("#prompt", "Enter")

    def reply(self, index: int = -1) -> Locator:
        return self.page.locator(".message.assistant .reply").nth(index)

    async def reply_text(self, index: int = -1) -> str:
        return await self.reply(index).text_content() or ""

    async def replies(self) -> int:
        return await self.page.locator(".message.assistant").count()

    async def state(self) -> str:
        return await self.page.get_attribute("#status", "data-state") or ""

    async def status(self, field_id: str) -> str:
        return await self.page.text_content(f"#{field_id}") or ""

    async def wait_for_state(self, *states: str, timeout: float = 15.0) -> str:
        async with asyncio.timeout(timeout):
            while (state := await self.state()) not in states:
                await asyncio.sleep(0.01)
        return state

    async def wait_for_text(self, predicate: Callable[[str], bool], timeout: float = 10.0) -> str:
        async with asyncio.timeout(timeout):
            while not predicate(text := await self.reply_text()):
                await asyncio.sleep(0.01)
        return text

    async def watch_reply(self, *until: str, timeout: float = 15.0) -> list[str]:
        """Snapshots of the growing reply, taken every few milliseconds until the status reaches one of `until`."""
        snapshots: list[str] = []
        async with asyncio.timeout(timeout):
            while True:
                state = await self.state()
                text = await self.reply_text() if await self.replies() else ""
                if not snapshots or text != snapshots[-1]:
                    snapshots.append(text)
                if state in until:
                    return snapshots
                await asyncio.sleep(0.005)

    async def instrumentation(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.page.evaluate(
            """() => ({
                sources: window.__relayTest.sources.map((s) => ({ url: s.url, readyState: s.readyState })),
                violations: [...window.__relayTest.violations],
            })"""
        )
        return result
