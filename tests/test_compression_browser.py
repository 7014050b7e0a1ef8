"""Compressed streams in a real browser (Debian's Chromium through Playwright): `EventSource` and `fetch` see every
token of a gzip stream the moment it is produced, as they do without compression."""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web
from playwright.async_api import Browser, Page

from server.app import create_relay_app
from server.config import Config
from server.events import Delta, Done

from .browser import CHROMIUM
from .conftest import ServeApp, upstream_config
from .fake_upstream import Behavior, FakeUpstream
from .scripted import ScriptedProvider, relay_host, wait_until
from .test_browser import browser  # noqa: F401 - the Chromium fixture

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"no Chromium at {CHROMIUM}: run scripts/system-deps.sh"),
]

COMPRESSED = Config(provider="demo", limits_enabled=False, heartbeat=0.0, compression=("gzip", "deflate"))

# Reads a stream in the page as the chat page does, and notes when each token arrived (performance.now(), ms).
START_READING = """
([url, mode]) => {
  const state = { arrivals: [], texts: [], finished: false, failure: null };
  window.__stream = state;
  const arrived = (text) => { state.arrivals.push(performance.now()); state.texts.push(text); };
  if (mode === "eventsource") {
    const source = new EventSource(url);
    source.onmessage = (event) => arrived(JSON.parse(event.data).content);
    source.addEventListener("done", () => { source.close(); state.finished = true; });
    source.onerror = () => { source.close(); state.failure = "EventSource error"; };
    return;
  }
  (async () => {
    const response = await fetch(url);
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffered = "";
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      buffered += decoder.decode(value, { stream: true });
      const lines = buffered.split("\\n");
      buffered = lines.pop();
      for (const line of lines) {
        const object = JSON.parse(line);
        if (object.type === "delta") arrived(object.content);
      }
    }
    state.finished = true;
  })().catch((error) => { state.failure = String(error); });
}
"""
STATE = "() => window.__stream"
URLS = {"eventsource": "/api/chat?prompt=x", "fetch": "/api/chat?prompt=x&format=ndjson"}


@pytest.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:  # noqa: F811 - the fixture imported above
    context = await browser.new_context()
    yield await context.new_page()
    await context.close()


def _record_codings(seen: list[str]) -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def record(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        response = await handler(request)
        if request.path == "/api/chat":
            seen.append(response.headers.get("Content-Encoding", "identity"))
        return response

    return record


async def _state(page: Page) -> dict[str, object]:
    state: dict[str, object] = await page.evaluate(STATE)
    assert state["failure"] is None, state["failure"]
    return state


async def _texts(page: Page) -> list[str]:
    texts = (await _state(page))["texts"]
    assert isinstance(texts, list)
    return texts


@pytest.mark.parametrize("mode", ["eventsource", "fetch"])
async def test_the_browser_shows_each_compressed_token_before_the_next_one_exists(
    page: Page, serve: ServeApp, mode: str
) -> None:
    provider = ScriptedProvider()
    codings: list[str] = []
    host, _ = relay_host(COMPRESSED, provider, middlewares=[_record_codings(codings)])
    base = await serve(host)
    await page.goto(f"{base}/api/healthz")  # any page of the relay's origin
    await page.evaluate(START_READING, [URLS[mode], mode])
    await asyncio.wait_for(provider.started.wait(), 10)
    tokens = ["Every", " token", " shows", " at", " once"]
    for count, token in enumerate(tokens, 1):
        provider.put([Delta(token)])
        # The provider produces nothing more until the page has shown this token: a compressor holding it back
        # would hold it forever, and this would time out.
        async with asyncio.timeout(10):
            while len(texts := await _texts(page)) < count:
                await asyncio.sleep(0.01)
        assert texts == tokens[:count]
    provider.put([Done("stop")])
    async with asyncio.timeout(10):
        while not (await _state(page))["finished"]:
            await asyncio.sleep(0.01)
    assert (await _state(page))["texts"] == tokens
    await wait_until(lambda: bool(codings))
    assert codings == ["gzip"]  # Chromium offers gzip, deflate, br, zstd: the relay chose gzip


def _bursts(arrivals: list[float], gap_ms: float) -> int:
    """How many groups the tokens arrived in, a group ending where the next token came `gap_ms` or more later."""
    return 1 + sum(1 for a, b in itertools.pairwise(arrivals) if b - a >= gap_ms)


@pytest.mark.parametrize("mode", ["eventsource", "fetch"])
async def test_a_paced_reply_arrives_as_spread_out_compressed_as_uncompressed(
    page: Page, serve: ServeApp, fake_upstream: FakeUpstream, mode: str
) -> None:
    delay = 0.08
    tokens = [f" t{i}" for i in range(15)]
    fake_upstream.behavior = Behavior(tokens=tokens, delay=delay)
    spreads: dict[str, float] = {}
    bursts: dict[str, int] = {}
    for coding, compression in (("identity", ()), ("gzip", ("gzip",))):
        codings: list[str] = []
        host = web.Application(middlewares=[_record_codings(codings)])
        host.add_subapp("/api", create_relay_app(upstream_config(fake_upstream, compression=compression)))
        base = await serve(host)
        await page.goto(f"{base}/api/healthz")
        await page.evaluate(START_READING, [URLS[mode], mode])
        async with asyncio.timeout(30):
            while not (state := await _state(page))["finished"]:
                await asyncio.sleep(0.02)
        assert state["texts"] == tokens
        arrivals = state["arrivals"]
        assert isinstance(arrivals, list)
        await wait_until(lambda seen=codings: bool(seen))
        assert codings == [coding]
        spreads[coding] = arrivals[-1] - arrivals[0]
        bursts[coding] = _bursts(arrivals, delay * 1000 / 2)
    # The same paced reply: tokens arrive over as long a time, in as many separate moments, compressed or not
    # (batching would deliver them in one burst at the end). Ratios, not absolute times: the machine is shared.
    assert spreads["gzip"] >= 0.5 * spreads["identity"], spreads
    assert bursts["gzip"] >= 0.5 * bursts["identity"], bursts
    assert bursts["identity"] >= len(tokens) // 2, bursts
