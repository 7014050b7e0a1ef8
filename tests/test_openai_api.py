"""The OpenAI-compatible endpoint (server/openai_api.py) driven by the real `openai` Python SDK over loopback sockets:
sync and async clients, streamed and not, reasoning, tool calls, refusals, errors as the SDK's own exception types,
our auth and limits, and a client leaving."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web

from server.app import create_app
from server.config import DEMO_MODEL, Config
from server.events import Delta, Done, Error, Usage
from server.providers.demo import DEMO_REASONER_MODEL

from .conftest import ServeApp, upstream_config
from .fake_upstream import Behavior, FakeUpstream
from .processes import running_server
from .raw_http import connect, post_head, read_head, read_response
from .scripted import BASE, ScriptedProvider, relay_host, wait_until
from .scripted_relay import ScriptedByPrompt, scripted_relay_app

KEY = "relay-client-key-0123456789"
USER = [{"role": "user", "content": "text"}]


def ask(prompt: str) -> list[Any]:
    return [{"role": "user", "content": prompt}]


@pytest.fixture
async def scripted_base(serve: ServeApp) -> str:
    """The relay (/api and /v1) around the scripted provider; its base URL."""
    return await serve(scripted_relay_app(BASE, ScriptedByPrompt()))


@pytest.fixture
async def client(scripted_base: str) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=f"{scripted_base}/v1", api_key="sk-anything", max_retries=0) as client:
        yield client


def sync_client(base: str, api_key: str = "sk-anything") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=api_key, max_retries=0)


async def test_async_stream_with_usage(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model=DEMO_MODEL, messages=ask("text"), stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert {chunk.id for chunk in chunks} == {chunks[0].id}
    assert chunks[0].id.startswith("chatcmpl-")
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello, wörld 🦀"
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == 13


async def test_sync_client_stream_and_completion(scripted_base: str) -> None:
    def run() -> tuple[str, openai.types.chat.ChatCompletion]:
        with sync_client(scripted_base) as client:
            stream = client.chat.completions.create(model=DEMO_MODEL, messages=ask("text"), stream=True)
            text = "".join(chunk.choices[0].delta.content or "" for chunk in stream)
            return text, client.chat.completions.create(model=DEMO_MODEL, messages=ask("text"))

    text, completion = await asyncio.to_thread(run)
    assert text == "Hello, wörld 🦀"
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content == "Hello, wörld 🦀"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == 9


async def test_reasoning_is_reachable_as_an_extra_field(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(model=DEMO_MODEL, messages=ask("reasoning"), stream=True)
    reasoning, answer = [], []
    async for chunk in stream:
        delta = chunk.choices[0].delta
        extra = delta.model_extra or {}
        reasoning.append(extra.get("reasoning_content") or "")
        answer.append(delta.content or "")
    assert "".join(reasoning) == "The user asks for 2 + 2."
    assert "".join(answer) == "It is 4."
    completion = await client.chat.completions.create(model=DEMO_MODEL, messages=ask("reasoning"))
    message = completion.choices[0].message
    assert (message.model_extra or {})["reasoning_content"] == "The user asks for 2 + 2."
    assert message.content == "It is 4."


async def test_a_tool_call_streamed_and_assembled(client: openai.AsyncOpenAI) -> None:
    async with client.chat.completions.stream(model=DEMO_MODEL, messages=ask("tool")) as stream:
        final = await stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me look."
    (call,) = choice.message.tool_calls or []
    assert call.id == "call_weather_1"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    completion = await client.chat.completions.create(model=DEMO_MODEL, messages=ask("tool"))
    (whole,) = completion.choices[0].message.tool_calls or []
    assert whole.model_dump() == {
        "id": call.id,
        "type": "function",
        "function": call.function.model_dump(include={"name", "arguments"}),
    }


WEATHER_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.mark.parametrize("echo", ["as-returned", "dumped-with-nulls", "dumped-without-nulls"])
async def test_a_tool_call_round_trip(client: openai.AsyncOpenAI, echo: str) -> None:
    """The SDK sends the tool's result back as a ``tool`` message after the assistant's message as it came (the
    usual ``messages.append(reply.choices[0].message)``, with its ``refusal: null`` and the rest); the relay passes
    the conversation on."""
    messages: list[Any] = ask("tool")
    first = await client.chat.completions.create(model=DEMO_MODEL, messages=messages, tools=[WEATHER_TOOL])
    message = first.choices[0].message
    (call,) = message.tool_calls or []
    messages += [
        {
            "as-returned": message,
            "dumped-with-nulls": message.model_dump(),
            "dumped-without-nulls": message.model_dump(exclude_none=True),
        }[echo],
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"sky": "sunny"})},
    ]
    stream = await client.chat.completions.create(
        model=DEMO_MODEL, messages=messages, tools=[WEATHER_TOOL], stream=True
    )
    answer = "".join([chunk.choices[0].delta.content or "" async for chunk in stream])
    assert answer == "It is sunny in Paris."


async def test_a_refusal(client: openai.AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(model=DEMO_MODEL, messages=ask("refusal"))
    assert completion.choices[0].message.refusal == "I can't help with that."
    assert completion.choices[0].message.content is None
    stream = await client.chat.completions.create(model=DEMO_MODEL, messages=ask("refusal"), stream=True)
    assert "".join([c.choices[0].delta.refusal or "" async for c in stream]) == "I can't help with that."


async def test_a_failure_mid_stream_is_an_api_error(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(model=DEMO_MODEL, messages=ask("error"), stream=True)
    seen: list[str] = []

    async def read_all() -> None:
        async for chunk in stream:
            seen.append(chunk.choices[0].delta.content or "")

    with pytest.raises(openai.APIError) as caught:
        await read_all()
    assert "".join(seen) == "Partial answer"
    assert caught.value.message == "the model provider failed"
    assert caught.value.code == "upstream_error"


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "completion"])
async def test_a_failure_before_any_token_is_a_status(client: openai.AsyncOpenAI, stream: bool) -> None:
    with pytest.raises(openai.InternalServerError) as caught:
        await client.chat.completions.create(model=DEMO_MODEL, messages=ask("error-first"), stream=stream)
    assert caught.value.status_code == 502
    assert caught.value.body == {
        "message": "the model provider failed",
        "type": "server_error",
        "param": None,
        "code": "upstream_error",
    }


async def test_a_failure_after_tokens_of_a_completion_is_a_status(client: openai.AsyncOpenAI) -> None:
    """Nothing of a whole-body reply is written before its end, so a failure mid-reply is still a status."""
    with pytest.raises(openai.InternalServerError) as caught:
        await client.chat.completions.create(model=DEMO_MODEL, messages=ask("error"))
    assert caught.value.status_code == 502
    assert caught.value.code == "upstream_error"


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"model": "gpt-pricey"}, "model must be one of"),
        ({"frobnicate": 1}, "frobnicate"),
        ({"n": 2}, "n must be 1"),
        ({"stream_options": {"include_usage": True}}, "stream_options is only allowed with stream"),
        ({"messages": []}, "messages must not be empty"),
    ],
    ids=["model", "unknown-field", "n", "stream-options", "no-messages"],
)
async def test_refusals_are_bad_request_errors(client: openai.AsyncOpenAI, changes: dict[str, Any], words: str) -> None:
    body: dict[str, Any] = {"model": DEMO_MODEL, "messages": ask("text"), **changes}
    model, messages = body.pop("model"), body.pop("messages")
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(model=model, messages=messages, extra_body=body)
    assert words in caught.value.message
    assert caught.value.type == "invalid_request_error"


async def test_models(client: openai.AsyncOpenAI) -> None:
    page = await client.models.list()
    assert [model.id for model in page.data] == [DEMO_MODEL, DEMO_REASONER_MODEL]
    model = await client.models.retrieve(DEMO_MODEL)
    assert (model.id, model.object, model.owned_by) == (DEMO_MODEL, "model", "llm-relay")
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("gpt-pricey")


async def test_raw_refusals_have_openai_s_shape(scripted_base: str, http: aiohttp.ClientSession) -> None:
    cases = [
        ("POST", "/v1/chat/completions", {"data": b"{", "headers": {"Content-Type": "application/json"}}, 400),
        ("POST", "/v1/chat/completions", {"data": b"{}", "headers": {"Content-Type": "text/plain"}}, 415),
        ("GET", "/v1/chat/completions", {}, 405),
        ("GET", "/v1/embeddings", {}, 404),
    ]
    for method, path, kwargs, status in cases:
        async with http.request(method, scripted_base + path, **kwargs) as resp:
            assert resp.status == status, path
            body = await resp.json()
            assert set(body["error"]) == {"message", "type", "param", "code"}
            assert body["error"]["type"] == "invalid_request_error"


@pytest.fixture
def keys_file(tmp_path: Path) -> str:
    path = tmp_path / "keys"
    path.write_text(f"{KEY}\n")
    return str(path)


async def test_api_keys_apply_and_the_client_key_is_never_forwarded(
    serve: ServeApp, fake_upstream: FakeUpstream, keys_file: str
) -> None:
    config = upstream_config(fake_upstream, api_keys_file=keys_file)
    base = await serve(create_app(config))
    async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="sk-wrong", max_retries=0) as wrong:
        with pytest.raises(openai.AuthenticationError) as caught:
            await wrong.chat.completions.create(model="fake-model", messages=USER)
        assert caught.value.type == "authentication_error"
        with pytest.raises(openai.AuthenticationError):
            await wrong.models.list()
    async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0) as client:
        stream = await client.chat.completions.create(model="fake-model", messages=USER, stream=True)
        raw = "".join([chunk.choices[0].delta.content or "" async for chunk in stream])
        assert raw == "Hello, world!"
        assert [model.id for model in (await client.models.list()).data] == ["fake-model"]
    (seen,) = fake_upstream.seen
    # The upstream sees the relay's own key, never the client's.
    assert seen.headers["Authorization"] == f"Bearer {config.api_key}"
    assert KEY not in json.dumps(seen.headers)
    assert KEY not in json.dumps(seen.body)


async def test_the_upstream_key_never_reaches_the_client(
    serve: ServeApp, fake_upstream: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    config = upstream_config(fake_upstream)
    fake_upstream.behavior = Behavior(fault="status", status=401, error_body={"error": {"message": config.api_key}})
    base = await serve(create_app(config))
    for stream in (True, False):
        body = {"model": "fake-model", "messages": USER, "stream": stream}
        async with http.post(f"{base}/v1/chat/completions", json=body) as resp:
            text = await resp.text()
            assert resp.status >= 500
            assert config.api_key not in text
            assert config.api_key not in str(resp.headers)


async def test_rate_limits_apply(serve: ServeApp) -> None:
    config = Config(provider="demo", demo_delay=0.0, heartbeat=0.0, rate="1/m", burst=1)
    base = await serve(create_app(config))
    async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="k", max_retries=0) as client:
        await client.chat.completions.create(model=DEMO_MODEL, messages=USER)
        with pytest.raises(openai.RateLimitError) as caught:
            await client.chat.completions.create(model=DEMO_MODEL, messages=USER)
    assert caught.value.type == "rate_limit_error"
    assert caught.value.response.headers["Retry-After"]


def _host_with_scripted(provider: ScriptedProvider, config: Config = BASE) -> web.Application:
    """Mounted as a host may: the OpenAI-compatible routes under a prefix of its choosing."""
    host, _ = relay_host(config, provider, openai_prefix="/openai/v1")
    return host


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "completion"])
async def test_a_client_leaving_cancels_the_generation(serve: ServeApp, stream: bool) -> None:
    """Mounted at a prefix of the host's choosing; the SDK's client closes mid-reply, and the provider is closed."""
    provider = ScriptedProvider()
    base = await serve(_host_with_scripted(provider))
    provider.put([Delta("first")])
    async with openai.AsyncOpenAI(base_url=f"{base}/openai/v1", api_key="k", max_retries=0) as client:
        request = asyncio.create_task(client.chat.completions.create(model=DEMO_MODEL, messages=USER, stream=stream))
        await provider.started.wait()
        if stream:
            response = await request
            first = await anext(aiter(response))
            assert first.choices[0].delta.content == "first"
            await response.close()
        else:
            await wait_until(lambda: provider.opened == 1)
            request.cancel()
            with pytest.raises(asyncio.CancelledError):
                await request
        async with asyncio.timeout(5):
            await provider.closed.wait()
    assert provider.finished == 1


async def test_heartbeats_are_skipped_by_the_sdk(serve: ServeApp) -> None:
    """A quiet stream gets `: ping` comments; the SDK's parser skips them (no id: is ever sent)."""
    provider = ScriptedProvider()
    config = Config(provider="demo", limits_enabled=False, heartbeat=0.05)
    base = await serve(_host_with_scripted(provider, config))
    async with openai.AsyncOpenAI(base_url=f"{base}/openai/v1", api_key="k", max_retries=0) as client:
        stream = await client.chat.completions.create(model=DEMO_MODEL, messages=USER, stream=True)
        provider.put([Delta("a")])
        chunks = [await anext(aiter(stream))]
        await asyncio.sleep(0.3)  # several heartbeat intervals with nothing to send
        provider.put([Delta("b")], [Done("stop", Usage(1, 2, 3))])
        chunks += [chunk async for chunk in stream]
    assert [c.choices[0].delta.content for c in chunks[:2]] == ["a", "b"]
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_heartbeat_bytes_on_the_wire(serve: ServeApp, http: aiohttp.ClientSession) -> None:
    provider = ScriptedProvider()
    config = Config(provider="demo", limits_enabled=False, heartbeat=0.05)
    base = await serve(_host_with_scripted(provider, config))
    body = {"model": DEMO_MODEL, "messages": USER, "stream": True}
    provider.put([Delta("a")])
    async with http.post(f"{base}/openai/v1/chat/completions", json=body) as resp:
        await asyncio.sleep(0.3)  # several heartbeat intervals with nothing to send
        provider.put([Error("upstream_error", "gone")])
        wire = await resp.content.read()
    blocks = wire.split(b"\n\n")
    assert blocks[-1] == b""
    assert b": ping" in blocks
    data = [block for block in blocks[:-1] if block != b": ping"]
    assert all(block.startswith(b"data: {") and b"\n" not in block for block in data)
    assert json.loads(data[0][6:])["choices"][0]["delta"] == {"role": "assistant", "content": "a"}
    assert json.loads(data[-1][6:]) == {
        "error": {"message": "gone", "type": "server_error", "param": None, "code": "upstream_error"}
    }


def test_docstring_examples() -> None:
    import doctest

    from server import json_wire, openai_chunks, openai_request

    for module in (json_wire, openai_chunks, openai_request):
        assert doctest.testmod(module).failed == 0


async def test_a_completion_longer_than_the_reader_lead(serve: ServeApp) -> None:
    """A reply that is not streamed writes nothing until its end, yet its reader takes every event as it comes:
    the generation, which waits for a reader more than the reader lead (64 KiB) behind, never waits for it."""
    provider = ScriptedProvider()
    base = await serve(_host_with_scripted(provider))
    piece = "x" * 1000
    provider.put(*([Delta(piece)] for _ in range(200)), [Done("length")])
    async with openai.AsyncOpenAI(base_url=f"{base}/openai/v1", api_key="k", max_retries=0) as client:
        async with asyncio.timeout(30):  # a generation waiting for its reader would wait for the total timeout
            completion = await client.chat.completions.create(model=DEMO_MODEL, messages=USER)
    assert completion.choices[0].message.content == piece * 200
    assert completion.choices[0].finish_reason == "length"


async def test_cors_preflight_of_the_openai_routes(serve: ServeApp, http: aiohttp.ClientSession) -> None:
    origin = "https://app.example"
    base = await serve(create_app(Config(provider="demo", limits_enabled=False, cors_origins=(origin,))))
    headers = {
        "Origin": origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type, authorization",
    }
    for path in ("/v1/chat/completions", "/api/ui-chat"):
        async with http.options(base + path, headers=headers) as resp:
            assert resp.status == 200, path
            assert resp.headers["Access-Control-Allow-Origin"] == origin
    async with http.options(base + "/v1/chat/completions", headers={**headers, "Origin": "https://evil.example"}) as r:
        assert "Access-Control-Allow-Origin" not in r.headers


async def test_expect_100_continue_and_417_in_openai_s_shape(serve: ServeApp) -> None:
    base = await serve(scripted_relay_app(BASE, ScriptedByPrompt()))
    body = json.dumps({"model": DEMO_MODEL, "messages": ask("text")}).encode()
    reader, writer = await connect(base)
    writer.write(post_head("/v1/chat/completions", len(body), extra="Expect: 100-continue\r\n"))
    status, _ = await read_head(reader)
    assert status == 100  # invited once admitted
    writer.write(body)
    status, headers = await read_head(reader)
    assert status == 200
    assert headers["content-type"] == "application/json"
    writer.close()
    reader, writer = await connect(base)
    writer.write(post_head("/v1/chat/completions", len(body), extra="Expect: 200-ok\r\n"))
    response = await read_response(reader)
    assert response.status == 417
    assert response.json()["error"] == {
        "message": "the only expectation this server meets is 100-continue",
        "type": "invalid_request_error",
        "param": None,
        "code": "expectation_failed",
    }
    writer.close()


async def test_python_m_server_serves_v1_with_the_demo_model(tmp_path: Path) -> None:
    """The standalone server (``python -m server``, its own runner settings) mounts /v1 beside /api."""
    async with running_server(tmp_path, "--provider", "demo", "--demo-delay", "0", "--limits", "false") as running:
        client = openai.AsyncOpenAI(base_url=f"{running.base}/v1", api_key="k", max_retries=0)
        async with client:
            stream = await client.chat.completions.create(
                model=DEMO_MODEL, messages=ask("ping"), stream=True, max_tokens=12
            )
            text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream])
    assert text.startswith("You asked: “ping”")


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "completion"])
async def test_the_relay_s_timeouts_apply(serve: ServeApp, stream: bool) -> None:
    """A model that never starts answering: the first-token timeout ends it, as a 504 in OpenAI's shape."""
    provider = ScriptedProvider()
    config = Config(provider="demo", limits_enabled=False, heartbeat=0.0, first_token_timeout=0.2)
    base = await serve(_host_with_scripted(provider, config))
    async with openai.AsyncOpenAI(base_url=f"{base}/openai/v1", api_key="k", max_retries=0) as client:
        with pytest.raises(openai.InternalServerError) as caught:
            await client.chat.completions.create(model=DEMO_MODEL, messages=USER, stream=stream)
    assert caught.value.status_code == 504
    assert caught.value.code == "timeout"
    assert caught.value.message.endswith("the model did not start answering in time")
    async with asyncio.timeout(5):
        await provider.closed.wait()


@pytest.mark.parametrize("endpoint", ["/openai/v1/chat/completions", "/api/chat", "/api/ui-chat"])
async def test_a_failure_before_any_token_keeps_the_admitted_rate_limit_fields(
    serve: ServeApp, http: aiohttp.ClientSession, endpoint: str
) -> None:
    """The status that replaces a 200 when the upstream fails first still says what the client has left."""
    provider = ScriptedProvider()
    base = await serve(_host_with_scripted(provider, BASE.with_changes(limits_enabled=True, rate="10/m", burst=5)))
    provider.put([Error("upstream_error", "the model provider failed")])
    body: dict[str, Any] = {
        "/openai/v1/chat/completions": {"model": DEMO_MODEL, "messages": USER, "stream": True},
        "/api/chat": {"prompt": "x"},
        "/api/ui-chat": {
            "id": "c",
            "messages": [{"id": "m", "role": "user", "parts": [{"type": "text", "text": "x"}]}],
        },
    }[endpoint]
    async with http.post(f"{base}{endpoint}", json=body, headers={"Accept": "application/x-ndjson"}) as response:
        assert response.status == 502
        assert response.headers["RateLimit"].startswith('"rate";r=4')
        assert "RateLimit-Policy" in response.headers
