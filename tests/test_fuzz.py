"""Hypothesis against the running app: arbitrary requests never get a 5xx or a traceback and the server keeps
serving; arbitrary upstream token sequences are relayed through the real openai client and read back exactly
in both framings."""

from __future__ import annotations

import asyncio
import json
import string
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.app import create_app
from server.config import Config

from .conftest import upstream_config
from .fake_upstream import Behavior, FakeUpstream
from .wire import ndjson_objects, sse_events

FUZZ_SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)


class _Running:
    """An app served on loopback for the length of a block, with production runner settings."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.runner = web.AppRunner(app, access_log=None)
        self.base = ""

    async def __aenter__(self) -> str:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        host, port = self.runner.addresses[0][:2]
        self.base = f"http://{host}:{port}"
        return self.base

    async def __aexit__(self, *exc: object) -> None:
        await self.runner.cleanup()


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
_bodies = st.one_of(
    st.binary(max_size=300),
    _json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {},
        optional={
            "messages": st.lists(
                st.fixed_dictionaries(
                    {},
                    optional={
                        "role": st.sampled_from(["user", "assistant", "system", "tool", "", None]),
                        "content": _json_values,
                    },
                ),
                max_size=4,
            ),
            "prompt": _json_values,
            "model": _json_values,
            "max_tokens": _json_values,
            "temperature": _json_values,
        },
    ).map(lambda v: json.dumps(v).encode()),
)
_header_text = st.text(alphabet=string.digits + string.ascii_letters + string.punctuation + " \t", max_size=40)
_requests = st.tuples(
    st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]),
    st.sampled_from(["/api/chat", "/api/chat/", "/api/x", "/api/healthz", "/healthz", "/api"]),
    st.dictionaries(
        st.sampled_from(["prompt", "format", "model", "max_tokens", "temperature", "x"]), st.text(), max_size=4
    ),
    st.dictionaries(st.sampled_from(["Accept", "Content-Type", "Origin", "Last-Event-ID", "X-Forwarded-For"]),
                    _header_text, max_size=3),
    _bodies,
)  # fmt: skip


@given(st.lists(_requests, min_size=1, max_size=8))
@FUZZ_SETTINGS
def test_arbitrary_requests_never_get_a_5xx_or_a_traceback(requests: list[tuple]) -> None:  # type: ignore[type-arg]
    config = Config(provider="demo", demo_delay=0.0, limits_enabled=False, heartbeat=0.0)

    async def scenario() -> None:
        async with _Running(create_app(config)) as base, aiohttp.ClientSession() as http:
            for method, path, query, headers, body in requests:
                async with http.request(method, base + path, params=query, headers=headers, data=body) as resp:
                    raw = await resp.read()
                    assert resp.status < 500, (resp.status, raw[:300])
                    assert b"Traceback" not in raw
                    if resp.status >= 400 and path.startswith("/api/") and method != "HEAD":
                        error = json.loads(raw)["error"]
                        assert isinstance(error["type"], str)
                        assert isinstance(error["message"], str)
            async with http.get(f"{base}/api/chat", params={"prompt": "still alive?"}) as resp:
                assert resp.status == 200
                assert sse_events(await resp.read())[-1][0] == "done"

    asyncio.run(scenario())


_tokens = st.lists(
    st.text(
        alphabet=st.characters(codec=None, exclude_categories=()),  # surrogates and control characters included
        max_size=30,
    )
    | st.sampled_from(["", "\r\n", "\n\n", "data: x", "event: error", "[DONE]", "\x00", "\ud800", "\udfff"])
    | st.just("x" * 5000),
    max_size=25,
)  # fmt: skip


async def _with_upstream(tokens: list[str]) -> AsyncIterator[tuple[str, FakeUpstream]]:
    upstream = FakeUpstream(Behavior(tokens=tokens))
    await upstream.start()
    try:
        async with _Running(create_app(upstream_config(upstream))) as base:
            yield base, upstream
    finally:
        await upstream.close()


@given(_tokens)
@FUZZ_SETTINGS
def test_any_upstream_text_is_relayed_exactly_in_both_framings(tokens: list[str]) -> None:
    async def scenario() -> None:
        async for base, _ in _with_upstream(tokens):
            async with aiohttp.ClientSession() as http:
                async with http.get(f"{base}/api/chat", params={"prompt": "x"}) as resp:
                    raw_sse = await resp.read()
                    resp_id = resp.headers["X-Stream-Id"]
                async with http.get(f"{base}/api/chat", params={"prompt": "x", "format": "ndjson"}) as resp:
                    raw_ndjson = await resp.read()
            raw_sse.decode("utf-8")  # always valid UTF-8, whatever the upstream sent
            raw_ndjson.decode("utf-8")
            expected = [t for t in tokens if t]  # empty deltas carry nothing and are not relayed
            events = sse_events(raw_sse)
            assert [data["content"] for kind, data, _ in events if kind == "message"] == expected
            assert [kind for kind, _, _ in events][-1] == "done"
            assert [event_id for _, _, event_id in events] == [f"{resp_id}/{seq}" for seq in range(1, len(events) + 1)]
            objects = ndjson_objects(raw_ndjson)
            assert [o["content"] for o in objects if o["type"] == "delta"] == expected
            assert objects[-1]["type"] == "done"

    asyncio.run(scenario())
