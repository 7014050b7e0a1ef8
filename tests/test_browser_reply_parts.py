"""The page shows a reply's reasoning (muted, collapsible, live), tool calls (name and arguments, as text) and
refusals, in both transports and across a resume, in Debian's Chromium; model output never becomes markup."""

from __future__ import annotations

import asyncio
import itertools

import pytest
from playwright.async_api import Browser, Dialog, Page

from server.chat_request import ChatRequest, Message
from server.providers.demo import DEMO_REASONER_MODEL, demo_events, demo_reply

from .browser import ChatPage, relay_host_app
from .conftest import ServeApp, upstream_config
from .fake_upstream import Behavior, FakeUpstream

# The browser fixtures and marks of the page's main tests, shared rather than copied.
from .test_browser import DEMO, StartRelay, _new_page, browser, context, page, pytestmark, start_relay  # noqa: F401

MARKUP = "<img src=x onerror=\"alert('img')\"><script>alert('script')</script><b>bold?</b>"
DONE_STATES = ("done", "error", "connection-error")


async def _reasoning(tab: Page) -> str:
    return await tab.locator(".message.assistant .reasoning-text").last.text_content() or ""


async def _tool_calls(tab: Page) -> list[tuple[str, str]]:
    calls = tab.locator(".message.assistant .tool-call")
    return [
        (await calls.nth(i).locator(".tool-name").text_content() or "",
         await calls.nth(i).locator(".tool-arguments").text_content() or "")
        for i in range(await calls.count())
    ]  # fmt: skip


@pytest.mark.parametrize("transport", ["sse", "ndjson"])
async def test_reasoning_is_shown_live_apart_from_the_answer_and_as_text(
    browser: Browser,  # noqa: F811
    serve: ServeApp,
    fake_upstream: FakeUpstream,
    transport: str,
) -> None:
    thoughts = [f" thought{i}" for i in range(12)] + [MARKUP]
    fake_upstream.behavior = Behavior(reasoning=thoughts, tokens=["The ", "answer ", MARKUP], delay=0.03)
    server = relay_host_app(upstream_config(fake_upstream))
    server.base = await serve(server.app)
    # Without the page's CSP, so that an innerHTML slip would really run the handler (as in test_browser.py).
    context = await browser.new_context(bypass_csp=True)  # noqa: F811
    errors: list[str] = []
    dialogs: list[str] = []

    async def on_dialog(dialog: Dialog) -> None:
        dialogs.append(dialog.message)
        await dialog.dismiss()

    try:
        page = await _new_page(context, errors)
        page.on("dialog", on_dialog)
        chat = ChatPage(page, server.base)
        await chat.open()
        await chat.send("Think first", transport)
        seen: list[tuple[str, str, str | None]] = []
        async with asyncio.timeout(15):
            while (state := await chat.state()) not in DONE_STATES:
                if await page.locator(".reasoning").count():
                    box = page.locator(".reasoning").last
                    seen.append(
                        (await _reasoning(page), await chat.reply_text(), await box.get_attribute("data-state"))
                    )
                await asyncio.sleep(0.005)
        assert state == "done"
        final = "".join(thoughts)
        assert await _reasoning(page) == final
        assert await chat.reply_text() == "The answer " + MARKUP
        # Live: the reasoning grew in several steps, before any of the answer, and was marked as streaming.
        growing = [r for r, answer, s in seen if r != final and not answer and s == "streaming"]
        assert len(set(growing)) >= 3
        for (shorter, _, _), (longer, _, _) in itertools.pairwise(seen):
            assert longer.startswith(shorter)
        # Collapsible, and no longer live once the reply ended.
        box = page.locator(".message.assistant details.reasoning")
        assert await box.get_attribute("data-state") == "ended"
        await page.locator(".reasoning-summary").click()
        assert not await box.evaluate("(node) => node.open")
        # Text, never markup: nothing the model sent became an element or ran.
        assert await page.locator(".turn img, .turn script, .turn b").count() == 0
        await asyncio.sleep(0.1)
        assert dialogs == []
        assert errors == []
        # The tokens line counts every part of the reply.
        assert await chat.status("stat-tokens") == str(len(thoughts) + 3)
    finally:
        await context.close()


@pytest.mark.parametrize("transport", ["sse", "ndjson"])
async def test_tool_calls_and_a_refusal_are_shown_as_text(
    page: Page,  # noqa: F811
    serve: ServeApp,
    fake_upstream: FakeUpstream,
    transport: str,
) -> None:
    fake_upstream.by_prompt["Weather?"] = Behavior(
        tokens=[],
        tool_calls=[
            ("call_1", "get_weather", ['{"city":', '"Paris"}']),
            ("call_2", "get_time", ['{"html":"', MARKUP.replace('"', '\\"'), '"}']),
        ],
        delay=0.01,
    )
    fake_upstream.by_prompt["Something bad"] = Behavior(tokens=[], refusal=["I can't help ", "with that."])
    server = relay_host_app(upstream_config(fake_upstream))
    server.base = await serve(server.app)
    chat = ChatPage(page, server.base)
    await chat.open()

    await chat.send("Weather?", transport)
    assert await chat.wait_for_state(*DONE_STATES) == "done"
    assert (await chat.status("stat-state")).startswith("done · tool_calls")
    assert await _tool_calls(page) == [
        ("get_weather", '{"city":"Paris"}'),
        ("get_time", '{"html":"' + MARKUP.replace('"', '\\"') + '"}'),
    ]
    assert await page.locator(".tool-call").first.get_attribute("data-call-id") == "call_1"
    assert await page.locator(".turn img, .turn script, .turn b").count() == 0
    assert not await chat.reply(-1).is_visible()  # no text, so no "…" placeholder under the calls

    await chat.send("Something bad", transport)
    assert await chat.wait_for_state(*DONE_STATES) == "done"
    refusal = page.locator(".message.assistant").last.locator(".refusal")
    assert await refusal.text_content() == "Refused: I can't help with that."
    assert await page.locator(".message.assistant").last.locator(".tool-call").count() == 0


@pytest.mark.parametrize("transport", ["sse", "ndjson"])
async def test_a_cut_during_reasoning_resumes_and_shows_each_part_once(
    page: Page,  # noqa: F811
    serve: ServeApp,
    fake_upstream: FakeUpstream,
    transport: str,
) -> None:
    thoughts = [f" step{i}" for i in range(40)]
    tokens = [f" word{i}" for i in range(10)]
    fake_upstream.behavior = Behavior(reasoning=thoughts, tokens=tokens, delay=0.03)
    server = relay_host_app(upstream_config(fake_upstream, reconnect_hint_ms=200))
    server.base = await serve(server.app)
    chat = ChatPage(page, server.base)
    await chat.open()
    await chat.send("Think long", transport)
    async with asyncio.timeout(10):
        while (await _reasoning(page) if await page.locator(".reasoning").count() else "").count("step") < 8:
            await asyncio.sleep(0.01)
    server.chat_connections[0].abort()
    assert await chat.wait_for_state(*DONE_STATES) == "done"
    assert await _reasoning(page) == "".join(thoughts)
    assert await chat.reply_text() == "".join(tokens)
    assert await page.locator(".reasoning").count() == 1
    assert len(fake_upstream.seen) == 1  # one generation, resumed


async def test_the_demo_reasoner_shows_its_reasoning_without_a_key(
    page: Page,  # noqa: F811
    start_relay: StartRelay,  # noqa: F811
) -> None:
    server = await start_relay(DEMO.with_changes(model=DEMO_REASONER_MODEL, demo_delay=0.001))
    chat = ChatPage(page, server.base)
    await chat.open()
    await chat.send("Why?", "ndjson")
    assert await chat.wait_for_state(*DONE_STATES) == "done"
    request = ChatRequest(messages=(Message("user", "Why?"),), model=DEMO_REASONER_MODEL)
    before, _, _ = demo_events(request)
    assert await _reasoning(page) == "".join(e.content for e in before)  # type: ignore[union-attr]
    assert await chat.reply_text() == demo_reply(request)
