"""The AI SDK's chat endpoint (server/ui_chat.py) over real sockets: POST /api/ui-chat and the resume GET
/api/ui-chat/{chat_id}/stream. The real ``ai`` package reads the same routes in tests/js/ai-sdk.test.mjs."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp

from server.config import Config
from server.events import Delta, Done, Error
from server.ui_chat import ChatStreams

from .conftest import ServeApp
from .scripted import BASE, ScriptedProvider, relay_host, wait_until
from .sse_decoder import SSEDecoder


def chat_body(chat_id: str, text: str = "hi", **extra: Any) -> dict[str, Any]:
    return {
        "id": chat_id,
        "messages": [{"id": "u1", "role": "user", "parts": [{"type": "text", "text": text}]}],
        "trigger": "submit-message",
        **extra,
    }


def parts(wire: bytes) -> list[Any]:
    decoder = SSEDecoder()
    return [e.data if e.data == "[DONE]" else json.loads(e.data) for e in decoder.feed(wire) + decoder.end()]


async def serve_scripted(serve: ServeApp, config: Config = BASE) -> tuple[str, ScriptedProvider]:
    provider = ScriptedProvider()
    host, _ = relay_host(config, provider)
    return await serve(host), provider


async def test_a_reply_as_the_ui_message_stream(serve: ServeApp, http: aiohttp.ClientSession) -> None:
    base, provider = await serve_scripted(serve)
    provider.put([Delta("Hello")], [Done("stop")])
    async with http.post(f"{base}/api/ui-chat", json=chat_body("c1")) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream; charset=utf-8"
        assert resp.headers["x-vercel-ai-ui-message-stream"] == "v1"
        assert resp.headers["Cache-Control"] == "no-cache"
        got = parts(await resp.read())
    assert [p if p == "[DONE]" else p["type"] for p in got] == [
        "start",
        "start-step",
        "text-start",
        "text-delta",
        "text-end",
        "finish-step",
        "finish",
        "[DONE]",
    ]


async def test_resume_replays_the_running_reply_then_204(serve: ServeApp, http: aiohttp.ClientSession) -> None:
    base, provider = await serve_scripted(serve)
    provider.put([Delta("one ")])
    async with http.post(f"{base}/api/ui-chat", json=chat_body("c2")) as resp:
        await resp.content.readuntil(b'"delta":"one "}\n\n')
    # The page reloaded: the reply runs on (useChat's requests are resumable by default).
    async with http.get(f"{base}/api/ui-chat/c2/stream") as resumed:
        assert resumed.status == 200
        assert resumed.headers["x-vercel-ai-ui-message-stream"] == "v1"
        provider.put([Delta("two")], [Done("stop")])
        got = parts(await resumed.read())
    assert "".join(p["delta"] for p in got if isinstance(p, dict) and p["type"] == "text-delta") == "one two"
    assert got[-2:] == [{"type": "finish", "finishReason": "stop"}, "[DONE]"]
    async with http.get(f"{base}/api/ui-chat/c2/stream") as after_end:
        assert after_end.status == 204
    async with http.get(f"{base}/api/ui-chat/never-seen/stream") as unknown:
        assert unknown.status == 204


async def test_resume_false_cancels_when_the_client_leaves(serve: ServeApp, http: aiohttp.ClientSession) -> None:
    base, provider = await serve_scripted(serve)
    provider.put([Delta("one")])
    async with http.post(f"{base}/api/ui-chat", json=chat_body("c3", resume=False)) as resp:
        await resp.content.readuntil(b'"delta":"one"}\n\n')
    async with asyncio.timeout(5):
        await provider.closed.wait()
    async with http.get(f"{base}/api/ui-chat/c3/stream") as resumed:
        assert resumed.status == 204


async def test_a_new_request_of_a_chat_stops_its_previous_reply(serve: ServeApp, http: aiohttp.ClientSession) -> None:
    base, provider = await serve_scripted(serve)
    provider.put([Delta("first")])
    async with http.post(f"{base}/api/ui-chat", json=chat_body("c4")) as old:
        await old.content.readuntil(b'"delta":"first"}\n\n')
        new = asyncio.create_task(http.post(f"{base}/api/ui-chat", json=chat_body("c4", "again")))
        # The old reply is stopped as the new one starts (one provider queue: feed it only the new one).
        await wait_until(lambda: provider.opened == 2)
        rest = parts(await old.read())
        provider.put([Delta("second")], [Done("stop")])
        async with await new as resp:
            assert "second" in await resp.text()
    assert rest[-2:] == [{"type": "error", "errorText": "the stream was stopped"}, "[DONE]"]


async def test_failures_before_the_stream_are_json_errors(serve: ServeApp, http: aiohttp.ClientSession) -> None:
    base, provider = await serve_scripted(serve)
    async with http.post(f"{base}/api/ui-chat", json=chat_body("c5", frobnicate=1)) as resp:
        assert resp.status == 400
        error = (await resp.json())["error"]
        assert error["type"] == "invalid_request"
        assert "unknown field" in error["message"]
        assert "frobnicate" in error["message"]
    provider.put([Error("upstream_error", "down")])
    async with http.post(f"{base}/api/ui-chat", json=chat_body("c5")) as resp:
        assert resp.status == 502
        assert (await resp.json())["error"]["type"] == "upstream_error"
    async with http.get(f"{base}/api/ui-chat/{'x' * 300}/stream") as resp:
        assert resp.status == 400
    async with http.delete(f"{base}/api/ui-chat/c5/stream") as resp:
        assert resp.status == 405


async def test_a_chat_is_found_only_by_its_own_client(
    serve: ServeApp, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    keys = tmp_path / "keys"
    keys.write_text("key-alice-0123456789\nkey-bob-0123456789\n")
    config = Config(provider="demo", limits_enabled=False, heartbeat=0.0, api_keys_file=str(keys))
    base, provider = await serve_scripted(serve, config)
    alice = {"Authorization": "Bearer key-alice-0123456789"}
    bob = {"Authorization": "Bearer key-bob-0123456789"}
    provider.put([Delta("secret")])
    async with http.post(f"{base}/api/ui-chat", json=chat_body("shared-id"), headers=alice) as resp:
        await resp.content.readuntil(b'"delta":"secret"}\n\n')
    async with http.get(f"{base}/api/ui-chat/shared-id/stream") as resp:
        assert resp.status == 401
    async with http.get(f"{base}/api/ui-chat/shared-id/stream", headers=bob) as resp:
        assert resp.status == 204
    async with http.get(f"{base}/api/ui-chat/shared-id/stream", headers=alice) as resp:
        assert resp.status == 200
        await resp.content.readuntil(b'"delta":"secret"}\n\n')
        provider.put([Done("stop")])
        assert (await resp.read()).endswith(b"data: [DONE]\n\n")


def test_chat_streams_are_bounded_and_forget_ended_streams() -> None:
    running = {"s1", "s2", "s3"}
    chats = ChatStreams(running.__contains__, max_chats=2)
    assert chats.set("me", "a", "s1") is None
    assert chats.set("me", "b", "s2") is None
    assert chats.set("me", "a", "s3") == "s1"  # a new stream of chat a replaces its entry
    assert chats.get("you", "a") is None  # another client, another chat
    running.discard("s2")
    assert chats.set("me", "c", "s1") is None  # full: the entry of the ended s2 goes first
    assert chats.get("me", "b") is None
    assert len(chats) == 2
    assert chats.set("me", "d", "s2") is None  # full of running streams: the oldest entry goes
    assert chats.get("me", "a") is None
    chats.drop("me", "c", "other")  # not c's stream: kept
    assert chats.get("me", "c") == "s1"
    chats.drop("me", "c", "s1")
    assert chats.get("me", "c") is None


async def test_a_resumed_reader_leaving_keeps_the_reply_for_the_next(
    serve: ServeApp, http: aiohttp.ClientSession
) -> None:
    base, provider = await serve_scripted(serve)
    provider.put([Delta("x")])
    async with http.post(f"{base}/api/ui-chat", json=chat_body("c6")) as resp:
        await resp.content.readuntil(b'"delta":"x"}\n\n')
    for _ in range(2):
        async with http.get(f"{base}/api/ui-chat/c6/stream") as resp:
            assert resp.status == 200
            await resp.content.readuntil(b'"delta":"x"}\n\n')
    assert provider.opened == 1
    assert provider.finished == 0  # still running: no reader left, and the resume grace holds it
    provider.put([Done("stop")])


def test_docstring_examples() -> None:
    import doctest

    from server import ui_messages, ui_stream

    for module in (ui_messages, ui_stream):
        assert doctest.testmod(module).failed == 0


async def test_a_reply_whose_start_is_gone_cannot_be_replayed(serve: ServeApp, http: aiohttp.ClientSession) -> None:
    config = Config(provider="demo", limits_enabled=False, heartbeat=0.0, log_max_events=4)
    base, provider = await serve_scripted(serve, config)
    provider.put(*([Delta(f"{i} ")] for i in range(10)))
    async with http.post(f"{base}/api/ui-chat", json=chat_body("c7")) as resp:
        await resp.content.readuntil(b'"delta":"9 "}\n\n')
    async with http.get(f"{base}/api/ui-chat/c7/stream") as resumed:
        assert resumed.status == 404
        assert (await resumed.json())["error"]["type"] == "resume_unavailable"
    provider.put([Done("stop")])
