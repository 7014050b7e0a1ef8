"""The chat page in a real browser: Debian's Chromium, headless, driven through Playwright against the relay.

Each test serves the relay (demo model or the fake upstream) on loopback in the test's own event loop, opens the
page, and checks what a person would see (the reply growing, the status line) and what the server saw (requests,
disconnects).
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.typedefs import Middleware
from playwright.async_api import Browser, BrowserContext, Dialog, Page, async_playwright

from server.chat_request import ChatRequest, Message
from server.config import Config
from server.errors import RateLimited
from server.providers.demo import demo_reply, demo_tokens
from server.responses import error_response

from .browser import (
    CHROMIUM,
    CHROMIUM_ARGS,
    INSTRUMENT,
    SCREENSHOT,
    ChatPage,
    RelayServer,
    relay_host_app,
    reserve_port,
    screenshot_wanted,
    serve_on,
    url_of,
)
from .conftest import ServeApp, upstream_config
from .fake_upstream import Behavior, FakeUpstream

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"no Chromium at {CHROMIUM}: run scripts/system-deps.sh"),
]

DEMO = Config(provider="demo", demo_delay=0.01, limits_enabled=False, heartbeat=0.0)
StartRelay = Callable[[Config], Awaitable[RelayServer]]


def _demo(prompt: str, *history: Message) -> ChatRequest:
    return ChatRequest(messages=(*history, Message("user", prompt)), model="llm-relay-demo")


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        await chromium.close()


async def _new_page(context: BrowserContext, errors: list[str]) -> Page:
    await context.add_init_script(INSTRUMENT)
    page = await context.new_page()
    page.on("pageerror", lambda error: errors.append(str(error)))
    return page


@pytest.fixture
async def context(browser: Browser) -> AsyncIterator[BrowserContext]:
    context = await browser.new_context(viewport={"width": 1100, "height": 760})
    yield context
    await context.close()


@pytest.fixture
async def page(context: BrowserContext) -> AsyncIterator[Page]:
    """A page that must raise no uncaught exception and break no rule of its Content-Security-Policy."""
    errors: list[str] = []
    page = await _new_page(context, errors)
    yield page
    if not page.is_closed() and page.url.startswith("http"):
        violations = await page.evaluate("() => [...window.__relayTest.violations]")
        assert violations == []
    assert errors == []


@pytest.fixture
def start_relay(serve: ServeApp) -> StartRelay:
    async def start(config: Config) -> RelayServer:
        server = relay_host_app(config)
        server.base = await serve(server.app)
        return server

    return start


def _assert_grew_live(snapshots: list[str], final: str) -> None:
    """The reply was seen in several intermediate states, each a longer prefix of the final text."""
    partial = [text for text in snapshots if text and text != final]
    assert len(partial) >= 5, f"only {len(partial)} intermediate states seen"
    for shorter, longer in itertools.pairwise(snapshots):
        assert longer.startswith(shorter)
        assert len(longer) > len(shorter)
    assert snapshots[-1] == final


# -- EventSource -------------------------------------------------------------------------------------------------


async def test_eventsource_streams_live_and_closes_after_done(page: Page, start_relay: StartRelay) -> None:
    server = await start_relay(DEMO)
    chat = ChatPage(page, server.base)
    await chat.open()
    await chat.send("What is SSE?", "sse")
    snapshots = await chat.watch_reply("done", "error", "connection-error")

    expected = demo_reply(_demo("What is SSE?"))
    _assert_grew_live(snapshots, expected)
    assert await chat.state() == "done"
    assert (await chat.status("stat-state")).startswith("done · stop")
    assert await chat.status("stat-transport") == "EventSource"
    assert await chat.status("stat-tokens") == str(len(demo_tokens(_demo("What is SSE?"))))
    assert (await chat.status("stat-ttft")).endswith(" ms")
    assert float(await chat.status("stat-rate")) > 0

    # The page closed its EventSource on `done`; left open, the browser would reconnect and generate again.
    instrumented = await chat.instrumentation()
    assert [source["readyState"] for source in instrumented["sources"]] == [2]  # EventSource.CLOSED
    await asyncio.sleep(0.5)
    assert server.chat_requests() == [("GET", "/api/chat")]
    assert server.streams_finished == 1


# -- fetch NDJSON ------------------------------------------------------------------------------------------------


async def test_fetch_ndjson_streams_live_and_keeps_the_conversation(page: Page, start_relay: StartRelay) -> None:
    server = await start_relay(DEMO)
    chat = ChatPage(page, server.base)
    posted: list[object] = []
    page.on("request", lambda request: posted.append(request.post_data_json) if request.method == "POST" else None)
    await chat.open()

    await chat.send("What is NDJSON?", "ndjson")
    first_snapshots = await chat.watch_reply("done", "error", "connection-error")
    first = demo_reply(_demo("What is NDJSON?"))
    _assert_grew_live(first_snapshots, first)
    assert await chat.state() == "done"
    assert await chat.status("stat-transport") == "fetch NDJSON"

    # The second turn sends the whole conversation; the demo model counts the user's messages.
    await chat.send("And a second question?", "ndjson")
    if screenshot_wanted():
        await chat.wait_for_text(lambda text: len(text) > 420)
        await page.screenshot(path=str(SCREENSHOT), animations="disabled")
    second_snapshots = await chat.watch_reply("done", "error", "connection-error")
    second = demo_reply(
        _demo("And a second question?", Message("user", "What is NDJSON?"), Message("assistant", first))
    )
    assert "(your message 2 in this conversation)" in second
    assert second_snapshots[-1] == second
    assert len([text for text in second_snapshots if text and text != second]) >= 3
    assert await chat.replies() == 2
    assert await chat.reply_text(0) == first

    assert posted == [
        {"messages": [{"role": "user", "content": "What is NDJSON?"}], "resume": True},
        {
            "messages": [
                {"role": "user", "content": "What is NDJSON?"},
                {"role": "assistant", "content": first},
                {"role": "user", "content": "And a second question?"},
            ],
            "resume": True,
        },
    ]
    await asyncio.sleep(0.2)
    assert server.chat_requests() == [("POST", "/api/chat"), ("POST", "/api/chat")]


@pytest.mark.parametrize("transport", ["ndjson", "sse"])
async def test_stop_mid_stream_cancels_the_upstream(
    page: Page, serve: ServeApp, fake_upstream: FakeUpstream, transport: str
) -> None:
    fake_upstream.behavior = Behavior(tokens=[f" word{i}" for i in range(400)], delay=0.05)
    server = relay_host_app(upstream_config(fake_upstream))
    server.base = await serve(server.app)
    chat = ChatPage(page, server.base)
    await chat.open()
    await chat.send("Tell me a long story", transport)
    await chat.wait_for_text(lambda text: text.count("word") >= 5)
    seen = fake_upstream.last
    assert not seen.client_gone.is_set()

    await page.click("#stop")
    # The page's streams opt in to resume, so closing the connection alone would leave the generation running
    # for the resume grace (15 s): Stop's DELETE cancels it at once.
    await asyncio.wait_for(seen.client_gone.wait(), timeout=3)
    assert await chat.wait_for_state("stopped") == "stopped"
    stopped_at = await chat.reply_text()
    await asyncio.sleep(0.3)
    assert await chat.reply_text() == stopped_at
    assert seen.tokens_sent < 400
    assert not seen.completed
    assert len(server.chat_requests("GET", "POST")) == 1
    assert [m for m, p in server.requests if p.startswith("/api/streams/")] == ["DELETE"]


@pytest.mark.parametrize("transport", ["sse", "ndjson"])
async def test_a_connection_cut_by_the_server_resumes_and_shows_the_whole_reply_once(
    page: Page, serve: ServeApp, fake_upstream: FakeUpstream, transport: str
) -> None:
    tokens = [f" word{i}" for i in range(60)]
    fake_upstream.behavior = Behavior(tokens=tokens, delay=0.03)
    # A short reconnection delay (the stream's first event sets it with `retry:`), so the test does not wait 3 s.
    config = upstream_config(fake_upstream, reconnect_hint_ms=200)
    server = relay_host_app(config)
    server.base = await serve(server.app)
    chat = ChatPage(page, server.base)
    await chat.open()
    await chat.send("Tell me a story", transport)
    await chat.wait_for_text(lambda text: text.count("word") >= 10)
    server.chat_connections[0].abort()  # the server side of the connection goes (a proxy's idle cut, a network change)
    states = set()
    async with asyncio.timeout(15):
        while (state := await chat.state()) not in ("done", "error", "connection-error"):
            states.add(state)
            await asyncio.sleep(0.005)
    assert state == "done"
    assert "reconnecting" in states  # the page said so while it resumed
    assert await chat.reply_text() == "".join(tokens)  # the whole reply, each token once
    assert len(fake_upstream.seen) == 1  # one generation, never a second
    resumes = [(m, p) for m, p in server.requests if p.startswith("/api/streams/")] + server.chat_requests("GET")
    assert resumes  # the page came back for the rest: EventSource to /api/chat, fetch to /api/streams/{id}


# -- what the model says is text ---------------------------------------------------------------------------------

XSS_PROMPT = "<img src=x onerror=\"alert('img')\"><script>alert('script')</script><b>bold?</b>"


@pytest.mark.parametrize("transport", ["sse", "ndjson"])
async def test_model_markup_is_shown_as_text_and_runs_nothing(
    browser: Browser, start_relay: StartRelay, transport: str
) -> None:
    server = await start_relay(DEMO.with_changes(demo_delay=0.001))
    # Without the page's CSP, so that an innerHTML slip would really run the handler: this test is about the
    # page's own handling of text; the CSP is the second line of defence.
    context = await browser.new_context(bypass_csp=True)
    errors: list[str] = []
    dialogs: list[str] = []
    requested: list[str] = []
    page = await _new_page(context, errors)

    async def on_dialog(dialog: Dialog) -> None:
        dialogs.append(dialog.message)
        await dialog.dismiss()

    page.on("dialog", on_dialog)
    page.on("request", lambda request: requested.append(request.url))
    try:
        chat = ChatPage(page, server.base)
        await chat.open()
        await chat.send(XSS_PROMPT, transport)
        assert await chat.wait_for_state("done", "error", "connection-error") == "done"
        text = await chat.reply_text()
        assert text == demo_reply(_demo(XSS_PROMPT))
        assert XSS_PROMPT in text
        assert await page.locator(".turn img, .turn script, .turn b").count() == 0
        # The question is shown as typed too.
        assert await page.locator(".message.user .text").text_content() == XSS_PROMPT
        await asyncio.sleep(0.1)
        assert dialogs == []
        assert not [url for url in requested if url.endswith("/x")]
        assert errors == []
    finally:
        await context.close()


# -- text that is not well-formed Unicode ------------------------------------------------------------------------

LONE_SURROGATE_PROMPT = "() => { document.querySelector('#prompt').value = 'tell me \\ud800 more'; }"


@pytest.mark.parametrize(
    ("first", "native"),
    [("typed-fetch", True), ("typed-eventsource", True), ("in-the-reply", True), ("typed-fetch", False)],
    ids=["typed-fetch", "typed-eventsource", "in-the-reply", "typed-fetch-without-toWellFormed"],
)
async def test_a_lone_surrogate_does_not_break_the_conversation(
    browser: Browser, serve: ServeApp, fake_upstream: FakeUpstream, first: str, native: bool
) -> None:
    """A JavaScript string can hold a lone surrogate, which the server refuses (400): the page sends U+FFFD in its
    place, in the prompt and in the history it sends again, so the next turn streams."""
    if first == "in-the-reply":
        fake_upstream.behavior = Behavior(tokens=["half of a pair: ", "\ud83d", " and on"])
    server = relay_host_app(upstream_config(fake_upstream))
    server.base = await serve(server.app)
    context = await browser.new_context()
    if not native:  # an older browser: the page's own replacement runs instead
        await context.add_init_script("delete String.prototype.toWellFormed;")
    errors: list[str] = []
    page = await _new_page(context, errors)
    try:
        chat = ChatPage(page, server.base)
        await chat.open()
        if first == "in-the-reply":
            await chat.send("say something odd", "ndjson")
        else:
            await page.check(f"input[name='transport'][value='{'sse' if first == 'typed-eventsource' else 'ndjson'}']")
            await page.evaluate(LONE_SURROGATE_PROMPT)
            await page.press("#prompt", "Enter")
        assert await chat.wait_for_state("done", "error", "connection-error") == "done"
        fake_upstream.behavior = Behavior(tokens=["fine"])
        await chat.send("and now?", "ndjson")
        assert await chat.wait_for_state("done", "error", "connection-error") == "done"
        assert await chat.reply_text() == "fine"
        assert errors == []
    finally:
        await context.close()
    assert len(fake_upstream.seen) == 2
    history = [m["content"] for m in fake_upstream.seen[1].body["messages"]]
    if first == "in-the-reply":
        assert history == ["say something odd", "half of a pair: \ufffd and on", "and now?"]
    else:
        assert history[0] == "tell me \ufffd more"
        assert history[2] == "and now?"


# -- accessibility and small screens -----------------------------------------------------------------------------


async def test_keyboard_labels_and_a_phone_width(browser: Browser, start_relay: StartRelay) -> None:
    server = await start_relay(DEMO.with_changes(demo_delay=0.01))
    context = await browser.new_context(viewport={"width": 360, "height": 740}, is_mobile=True, has_touch=True)
    errors: list[str] = []
    page = await _new_page(context, errors)
    try:
        chat = ChatPage(page, server.base)
        await chat.open()
        prompt = page.get_by_label("Message")
        assert await prompt.evaluate("(node) => node.id") == "prompt"
        for name in ("EventSource", "fetch NDJSON"):
            assert await page.get_by_role("radio", name=name).count() == 1
        for name in ("Send", "Stop", "New chat"):
            assert await page.get_by_role("button", name=name).is_visible()
        transcript = page.locator("#transcript")
        assert await transcript.get_attribute("aria-live") == "polite"

        # Keyboard only: type, Enter sends, Escape stops. A long unbroken word must wrap, not widen the page.
        await prompt.focus()
        await page.keyboard.type("a-very-long-unbroken-word-" * 8)
        await page.keyboard.press("Enter")
        await chat.wait_for_text(lambda text: len(text) > 300)
        assert await transcript.get_attribute("aria-busy") == "true"
        await page.keyboard.press("Escape")
        assert await chat.wait_for_state("stopped") == "stopped"
        assert await transcript.get_attribute("aria-busy") == "false"
        assert await page.evaluate("() => document.activeElement.id") == "prompt"
        overflow = await page.evaluate(
            "() => [document.documentElement.scrollWidth - window.innerWidth,"
            " document.getElementById('transcript').scrollWidth - document.getElementById('transcript').clientWidth]"
        )
        assert overflow == [0, 0]
        box = await page.get_by_role("button", name="Send").bounding_box()
        assert box is not None
        assert box["x"] + box["width"] <= 360
        assert box["y"] + box["height"] <= 740
        assert errors == []
    finally:
        await context.close()


# -- failures are shown, and shown apart ---------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["sse", "ndjson"])
async def test_server_error_mid_stream_is_shown_as_an_error(
    page: Page, serve: ServeApp, fake_upstream: FakeUpstream, transport: str
) -> None:
    fake_upstream.behavior = Behavior(
        tokens=[f" t{i}" for i in range(20)], delay=0.05, fault="error_chunk", fault_after=5
    )
    server = relay_host_app(upstream_config(fake_upstream))
    server.base = await serve(server.app)
    chat = ChatPage(page, server.base)
    await chat.open()
    await chat.send("Fail half way", transport)
    assert await chat.wait_for_state("done", "error", "connection-error", "stopped") == "error"

    assert await chat.reply_text() == " t0 t1 t2 t3 t4"
    problem = page.locator(".message.assistant .problem")
    assert await problem.count() == 1
    assert await problem.get_attribute("class") == "problem error"
    assert await problem.get_attribute("role") == "alert"
    shown = await problem.text_content() or ""
    assert shown.startswith("The server reported an error: upstream")
    assert "secret detail" not in shown
    assert (await chat.status("stat-state")).startswith("error · upstream")
    await asyncio.sleep(0.3)  # and the page does not try again
    assert len(server.chat_requests()) == 1
    assert await page.is_enabled("#send")


def _refuse_chat(retry_after: float) -> Middleware:
    @web.middleware
    async def refuse(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.path == "/api/chat" and request.method != "OPTIONS":
            return error_response(RateLimited("too many requests from this client", retry_after=retry_after))
        return await handler(request)

    return refuse


@pytest.mark.parametrize(
    ("transport", "state", "kind", "message"),
    [
        ("sse", "connection-error", "problem connection-error", "Connection error: the server refused the stream"),
        ("ndjson", "error", "problem error", "The server reported an error: rate_limited: too many requests"),
    ],
    ids=["eventsource-cannot-see-why", "fetch-shows-the-reason"],
)
async def test_refusal_before_streaming(
    page: Page, serve: ServeApp, transport: str, state: str, kind: str, message: str
) -> None:
    # A 429 as the limiter sends it: EventSource only learns that the connection failed, fetch reads the JSON.
    server = relay_host_app(DEMO, middlewares=[_refuse_chat(7)])
    server.base = await serve(server.app)
    chat = ChatPage(page, server.base)
    await chat.open()
    await chat.send("Am I allowed?", transport)
    assert await chat.wait_for_state("done", "error", "connection-error", "stopped") == state
    problem = page.locator(".message.assistant .problem")
    assert await problem.get_attribute("class") == kind
    shown = await problem.text_content() or ""
    assert shown.startswith(message)
    if transport == "ndjson":
        assert shown.endswith("(retry after 7 s)")
    await asyncio.sleep(0.3)
    assert len(server.chat_requests()) == 1  # EventSource did not retry on its own
    assert await chat.reply_text() == ""


# -- another origin ----------------------------------------------------------------------------------------------


async def test_page_on_another_origin_uses_the_api_when_that_origin_is_allowed(page: Page) -> None:
    page_sock, api_sock = reserve_port(), reserve_port()
    page_origin, api_origin = url_of(page_sock), url_of(api_sock)
    fast = DEMO.with_changes(demo_delay=0.001)
    api = relay_host_app(fast.with_changes(cors_origins=(page_origin,)), page=False)
    site = relay_host_app(fast, api_base=f"{api_origin}/api")
    runners = [await serve_on(api.app, api_sock), await serve_on(site.app, page_sock)]
    try:
        chat = ChatPage(page, page_origin)
        await chat.open()
        await chat.send("Across origins, by EventSource", "sse")
        assert await chat.wait_for_state("done", "error", "connection-error") == "done"
        assert await chat.reply_text() == demo_reply(_demo("Across origins, by EventSource"))
        await chat.send("Across origins, by fetch", "ndjson")
        assert await chat.wait_for_state("done", "error", "connection-error") == "done"
        assert "(your message 2 in this conversation)" in await chat.reply_text()
        # The JSON POST needed a CORS preflight; the page's own server never saw an API call.
        assert api.chat_requests() == [("GET", "/api/chat"), ("OPTIONS", "/api/chat"), ("POST", "/api/chat")]
        assert site.chat_requests() == []
    finally:
        for runner in runners:
            await runner.cleanup()


async def test_page_on_a_foreign_origin_starts_no_generation(page: Page) -> None:
    page_sock, api_sock = reserve_port(), reserve_port()
    page_origin, api_origin = url_of(page_sock), url_of(api_sock)
    api = relay_host_app(DEMO.with_changes(cors_origins=("http://somewhere.else.example",)), page=False)
    site = relay_host_app(DEMO, api_base=f"{api_origin}/api")
    runners = [await serve_on(api.app, api_sock), await serve_on(site.app, page_sock)]
    try:
        chat = ChatPage(page, page_origin)
        await chat.open()
        for transport in ("sse", "ndjson"):
            await chat.send(f"From {page_origin}", transport)
            assert await chat.wait_for_state("done", "error", "connection-error") == "connection-error"
        # The GET reached the server and was refused with 403; the POST's preflight was refused, so no POST.
        assert api.chat_requests() == [("GET", "/api/chat"), ("OPTIONS", "/api/chat")]
        assert api.streams_finished == 0
    finally:
        for runner in runners:
            await runner.cleanup()
