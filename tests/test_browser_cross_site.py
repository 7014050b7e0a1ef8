"""Pages of other sites and DNS rebinding, in a real Chromium: no generation starts, the relay's own page streams.

Chromium maps ``relay.test`` and ``evil.test`` to 127.0.0.1 (``--host-resolver-rules``), so the attacker's page
and the relay are different sites on loopback servers of the test's own event loop. The relay runs in openai
mode against the fake upstream, whose count of requests is the count of generations started.

Browsers send Fetch Metadata only to potentially trustworthy URLs: https, localhost and loopback addresses. The
relay is tested where they do: at ``http://127.0.0.1:PORT`` (the default loopback bind), and at
``http://relay.test:PORT`` with Chromium told to treat that origin as secure (what https would be in production).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from playwright.async_api import Browser, async_playwright

from server.config import Config

from .browser import CHROMIUM, CHROMIUM_ARGS, ChatPage, relay_host_app, reserve_port, serve_on, url_of
from .conftest import upstream_config
from .fake_upstream import Behavior, FakeUpstream

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"no Chromium at {CHROMIUM}: run scripts/system-deps.sh"),
]

RESOLVE_TEST_NAMES = "--host-resolver-rules=MAP relay.test 127.0.0.1, MAP evil.test 127.0.0.1"


@asynccontextmanager
async def chromium(*extra_args: str) -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM, args=[*CHROMIUM_ARGS, RESOLVE_TEST_NAMES, *extra_args]
        )
        try:
            yield browser
        finally:
            await browser.close()


@dataclass
class Arrivals:
    """The chat requests that reached the relay: their prompt (or body) and the headers that decide them."""

    seen: list[dict[str, str | None]] = field(default_factory=list)

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.path == "/api/chat" and request.method in {"GET", "POST"}:
            self.seen.append(
                {
                    "prompt": request.query.get("prompt"),
                    "host": request.headers.get("Host"),
                    "site": request.headers.get("Sec-Fetch-Site"),
                    "dest": request.headers.get("Sec-Fetch-Dest"),
                }
            )
        return await handler(request)

    async def wait_for(self, prompt: str, timeout: float = 10.0) -> dict[str, str | None]:
        async with asyncio.timeout(timeout):
            while True:
                for arrival in self.seen:
                    if arrival["prompt"] == prompt:
                        return arrival
                await asyncio.sleep(0.02)


def _attacker_pages(api: str) -> dict[str, str]:
    """One page per way a page of another site can send a GET to the API, each with the vector as its prompt."""
    url = f"{api}?prompt="
    return {
        "img": f'<img src="{url}img">',
        "script": f'<script src="{url}script"></script>',
        "iframe": f'<iframe src="{url}iframe"></iframe>',
        "link-prefetch": f'<link rel="prefetch" href="{url}link-prefetch">',
        "no-cors-fetch": f'<script>fetch("{url}no-cors-fetch", {{mode: "no-cors"}})</script>',
        "eventsource": f'<script>new EventSource("{url}eventsource")</script>',
        "form-get": f'<form method="get" action="{api}"><input name="prompt" value="form-get"></form>'
        "<script>document.forms[0].submit()</script>",
        "top-level-navigation": f'<script>location.href = "{url}top-level-navigation"</script>',
    }


def _attacker_site(pages: dict[str, str]) -> web.Application:
    async def page(request: web.Request) -> web.Response:
        body = pages[request.match_info["vector"]]
        return web.Response(text=f"<!doctype html><title>evil</title>{body}", content_type="text/html")

    app = web.Application()
    app.router.add_get("/{vector}", page)
    return app


@pytest.mark.parametrize("relay_name", ["127.0.0.1", "relay.test"], ids=["loopback-default", "listed-name"])
async def test_no_page_of_another_site_starts_a_generation(fake_upstream: FakeUpstream, relay_name: str) -> None:
    fake_upstream.behavior = Behavior(tokens=[" one", " two", " three"])
    relay_sock, evil_sock = reserve_port(), reserve_port()
    relay = url_of(relay_sock).replace("127.0.0.1", relay_name)
    evil = url_of(evil_sock).replace("127.0.0.1", "evil.test")
    config: Config = upstream_config(fake_upstream)
    extra: tuple[str, ...] = ()
    if relay_name != "127.0.0.1":
        config = config.with_changes(public_origins=(relay,))
        extra = (f"--unsafely-treat-insecure-origin-as-secure={relay}",)
    arrivals = Arrivals()
    server = relay_host_app(config, middlewares=[arrivals.middleware])
    pages = _attacker_pages(f"{relay}/api/chat")
    runners = [await serve_on(server.app, relay_sock), await serve_on(_attacker_site(pages), evil_sock)]
    try:
        async with chromium(*extra) as browser:
            context = await browser.new_context()
            page = await context.new_page()
            for vector in pages:
                await page.goto(f"{evil}/{vector}")
                arrival = await arrivals.wait_for(vector)
                # It reached the relay, and the browser said whose page sent it.
                assert arrival["site"] == "cross-site", vector
            await asyncio.sleep(0.3)
            assert fake_upstream.seen == []
            assert server.streams_finished == 0

            # The relay's own page, on its own origin, still streams by both transports.
            chat = ChatPage(await context.new_page(), relay)
            await chat.open()
            await chat.send("By EventSource", "sse")
            assert await chat.wait_for_state("done", "error", "connection-error") == "done"
            assert await chat.reply_text() == " one two three"
            await chat.send("By fetch", "ndjson")
            assert await chat.wait_for_state("done", "error", "connection-error") == "done"
            assert len(fake_upstream.seen) == 2
            own = [a for a in arrivals.seen if a["site"] == "same-origin"]
            assert [(a["host"], a["dest"]) for a in own] == [(relay.removeprefix("http://"), "empty")] * 2
            await context.close()
    finally:
        for runner in runners:
            await runner.cleanup()


# A page that the attacker's DNS first served from its own server, then pointed at the relay's address: to the
# browser, the API is now the page's own origin.
REBINDING_PAGE = """<!doctype html><title>rebound</title><script>
window.attack = (async () => {
  const post = await fetch("/api/chat", {
    method: "POST",
    headers: {"Content-Type": "application/json", "Accept": "application/x-ndjson"},
    body: JSON.stringify({prompt: "rebinding-fetch"}),
  });
  const eventsource = await new Promise((resolve) => {
    const source = new EventSource("/api/chat?prompt=rebinding-eventsource");
    source.onmessage = (event) => { source.close(); resolve(`message ${event.data}`); };
    source.onerror = () => { source.close(); resolve("error"); };
  });
  const page = await fetch("/");
  return {status: post.status, body: await post.text(), eventsource, page: page.status};
})();
</script>"""


# Chromium's Local Network Access check refuses a page it loaded from a public address (here: from Playwright, so
# from no address at all) a request to a loopback one. Firefox and Safari have no such check, so the relay must
# refuse on its own; the flag makes Chromium one of them.
WITHOUT_LOCAL_NETWORK_ACCESS_CHECKS = "--disable-features=LocalNetworkAccessChecks"


async def test_a_dns_rebinding_page_cannot_use_the_api(fake_upstream: FakeUpstream) -> None:
    relay_sock = reserve_port()
    relay = url_of(relay_sock)
    rebound = relay.replace("127.0.0.1", "evil.test")
    arrivals = Arrivals()
    server = relay_host_app(upstream_config(fake_upstream), middlewares=[arrivals.middleware])
    runner = await serve_on(server.app, relay_sock)
    try:
        async with chromium(WITHOUT_LOCAL_NETWORK_ACCESS_CHECKS) as browser:
            context = await browser.new_context()
            page = await context.new_page()
            # Before the rebinding, the attacker's server answered for the page (Playwright stands in for it);
            # every later request to evil.test:PORT goes to the relay's address.
            await page.route(
                f"{rebound}/rebound.html",
                lambda route: route.fulfill(body=REBINDING_PAGE, content_type="text/html"),
            )
            await page.goto(f"{rebound}/rebound.html")
            result = await page.evaluate("window.attack")
            await context.close()
    finally:
        await runner.cleanup()
    assert result["status"] == 421
    assert json.loads(result["body"])["error"]["type"] == "misdirected_request"
    assert result["eventsource"] == "error"
    assert result["page"] == 421
    # Both API requests reached the relay, sent to the attacker's name; neither started a generation.
    assert {a["prompt"] for a in arrivals.seen} == {None, "rebinding-eventsource"}
    assert {a["host"] for a in arrivals.seen} == {rebound.removeprefix("http://")}
    assert fake_upstream.seen == []
