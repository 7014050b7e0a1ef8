"""server/logs.py and server/observe.py: the access line of every API request, the upstream failure line, the
request id (accepted or made, returned, sent upstream), text and JSON formats; read from caplog after real
streams, and from a real ``python -m server --log-format json``'s stderr."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from server.config import ConfigError, load_config
from server.logs import JSONFormatter, client_hash, configure_logging

from .conftest import ServeStandalone, upstream_config
from .fake_upstream import Behavior, FakeUpstream
from .processes import running_server

SECRET_KEY = "sk-test-secret-key-0123456789"  # the upstream key of upstream_config
CLIENT_KEY = "client-key-that-must-never-be-logged"
SSE = {"Accept": "text/event-stream"}
NDJSON = {"Accept": "application/x-ndjson"}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = getattr(record, "fields", None)
    assert isinstance(fields, dict)
    return fields


def access_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [_fields(r) for r in caplog.records if r.name == "llm_relay.access" and r.levelno == logging.INFO]


def failure_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "llm_relay.upstream"]


async def wait_for(condition: Callable[[], object], timeout: float = 10.0) -> None:
    """Until `condition` holds: the access line is written just after the response's last byte."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the log line never came"
        await asyncio.sleep(0.01)


def sent_upstream(upstream: FakeUpstream) -> str | None:
    """The X-Request-Id of the last request the upstream saw (header names are case-insensitive)."""
    return {name.lower(): value for name, value in upstream.last.headers.items()}.get("x-request-id")


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="llm_relay")
    return caplog


@pytest.fixture
async def relay(fake_upstream: FakeUpstream, serve_standalone: ServeStandalone) -> Callable[..., Awaitable[str]]:
    async def start(**changes: object) -> str:
        return await serve_standalone(upstream_config(fake_upstream, **changes))

    return start


async def test_a_done_stream_has_one_access_line_with_every_field(
    relay: Callable[..., Awaitable[str]],
    fake_upstream: FakeUpstream,
    http: aiohttp.ClientSession,
    logs: pytest.LogCaptureFixture,
) -> None:
    base = await relay()
    async with http.get(f"{base}/api/chat", params={"prompt": "x"}, headers=SSE) as response:
        body = await response.read()
        request_id = response.headers["X-Request-Id"]
        stream_id = response.headers["X-Stream-Id"]
    await wait_for(lambda: access_lines(logs))
    [line] = access_lines(logs)
    assert line["request_id"] == request_id
    assert len(request_id) == 32
    assert line["stream_id"] == stream_id
    assert line["client"] == client_hash("anyone")  # no limits and no keys: every client is one
    assert (line["method"], line["endpoint"], line["framing"]) == ("GET", "/api/chat", "sse")
    assert (line["status"], line["outcome"], line["stream_outcome"]) == (200, "done", "done")
    assert line["events"] == 5  # four tokens and the end
    assert line["bytes"] == len(body)
    assert line["upstream_status"] == 200
    assert (line["prompt_tokens"], line["completion_tokens"]) == (7, 4)  # the usage the fake upstream reports
    assert line["resumed"] is False
    assert 0 <= line["ttft_ms"] <= line["duration_ms"]
    # The request id went upstream with the request.
    assert sent_upstream(fake_upstream) == request_id
    assert not failure_lines(logs)
    text = "\n".join(record.getMessage() for record in logs.records)
    assert f"request_id={request_id} stream_id={stream_id}" in text
    assert SECRET_KEY not in text


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        ("trace-4bf92f3577b34da6a3ce929d0e0e4736", True),
        ("Root=1-5759e988-bd862e3fe1be46a994272793", True),
        ("x" * 128, True),
        ("x" * 129, False),
        ("two words", False),
        ('"quoted"', False),
        ("é", False),
    ],
    ids=["hex", "aws-style", "longest", "too-long", "space", "quote", "non-ascii"],
)
async def test_a_well_formed_request_id_is_kept_and_any_other_replaced(
    relay: Callable[..., Awaitable[str]],
    fake_upstream: FakeUpstream,
    http: aiohttp.ClientSession,
    logs: pytest.LogCaptureFixture,
    sent: str,
    kept: bool,
) -> None:
    base = await relay()
    headers = {"X-Request-Id": sent, **NDJSON}
    async with http.post(f"{base}/api/chat", json={"prompt": "x"}, headers=headers) as response:
        await response.read()
        returned = response.headers["X-Request-Id"]
    assert (returned == sent) is kept
    await wait_for(lambda: access_lines(logs))
    assert access_lines(logs)[0]["request_id"] == returned
    assert sent_upstream(fake_upstream) == returned


async def test_an_unreachable_upstream_is_logged_with_the_stream_and_no_status(
    serve_standalone: ServeStandalone, http: aiohttp.ClientSession, logs: pytest.LogCaptureFixture
) -> None:
    upstream = FakeUpstream()
    await upstream.start()
    await upstream.close()  # nothing listens there any more
    base = await serve_standalone(upstream_config(upstream))
    async with http.get(f"{base}/api/chat", params={"prompt": "x"}, headers={"X-Request-Id": "req-1"}) as response:
        assert response.status == 502
        assert response.headers["X-Request-Id"] == "req-1"
    await wait_for(lambda: access_lines(logs))
    [failure] = failure_lines(logs)
    fields = _fields(failure)
    assert failure.levelno == logging.WARNING
    assert fields["error"] == "upstream_unavailable"
    assert fields["upstream_status"] is None
    assert fields["request_id"] == "req-1"
    [line] = access_lines(logs)
    assert fields["stream_id"] == line["stream_id"]
    assert (line["status"], line["outcome"], line["error"]) == (502, "error", "upstream_unavailable")
    assert line["upstream_status"] is None
    assert line["ttft_ms"] is None


async def test_an_upstream_error_is_logged_with_its_status_never_its_body(
    relay: Callable[..., Awaitable[str]],
    fake_upstream: FakeUpstream,
    http: aiohttp.ClientSession,
    logs: pytest.LogCaptureFixture,
) -> None:
    echo = "your key sk-echoed-secret-123 is invalid"
    fake_upstream.behavior = Behavior(fault="status", status=401, error_body={"error": {"message": echo}})
    base = await relay()
    async with http.get(f"{base}/api/chat", params={"prompt": "x"}) as response:
        assert response.status == 502
    await wait_for(lambda: access_lines(logs) and failure_lines(logs))
    [failure] = failure_lines(logs)
    assert (_fields(failure)["error"], _fields(failure)["upstream_status"]) == ("upstream_error", 401)
    assert access_lines(logs)[0]["upstream_status"] == 401
    text = "\n".join(record.getMessage() for record in logs.records)
    assert "sk-echoed-secret" not in text
    assert "invalid" not in text
    assert SECRET_KEY not in text


async def test_a_client_leaving_and_a_timeout_are_outcomes(
    relay: Callable[..., Awaitable[str]],
    fake_upstream: FakeUpstream,
    http: aiohttp.ClientSession,
    logs: pytest.LogCaptureFixture,
) -> None:
    fake_upstream.by_prompt["slow"] = Behavior(first_delay=30)
    fake_upstream.by_prompt["long"] = Behavior(tokens=["x"] * 10_000, delay=0.01)
    base = await relay(first_token_timeout=0.2)
    response = await http.get(f"{base}/api/chat", params={"prompt": "long"}, headers=SSE)
    await response.content.readuntil(b"\n\n")
    response.close()
    await wait_for(lambda: access_lines(logs))
    [left] = access_lines(logs)
    assert (left["status"], left["outcome"]) == (200, "disconnected")
    assert left["events"] >= 1
    assert left["bytes"] > 0

    async with http.get(f"{base}/api/chat", params={"prompt": "slow"}) as response:
        assert response.status == 504
    await wait_for(lambda: len(access_lines(logs)) == 2)
    timed_out = access_lines(logs)[1]
    assert (timed_out["status"], timed_out["outcome"], timed_out["stream_outcome"]) == (504, "error", "timeout")
    [failure] = failure_lines(logs)
    assert (_fields(failure)["error"], _fields(failure)["upstream_status"]) == ("timeout", 200)


async def test_refusals_have_an_access_line_and_the_client_is_hashed(
    relay: Callable[..., Awaitable[str]],
    http: aiohttp.ClientSession,
    logs: pytest.LogCaptureFixture,
    tmp_path: Any,
) -> None:
    keys = tmp_path / "keys"
    keys.write_text(CLIENT_KEY + "\n")
    base = await relay(api_keys_file=str(keys))
    async with http.get(f"{base}/api/chat", params={"prompt": "x"}) as response:
        assert response.status == 401
    authorized = {"Authorization": f"Bearer {CLIENT_KEY}"}
    async with http.post(f"{base}/api/chat", json={"nope": 1}, headers=authorized) as response:
        assert response.status == 400
        request_id = response.headers["X-Request-Id"]
    await wait_for(lambda: len(access_lines(logs)) == 2)
    unauthorized, invalid = access_lines(logs)
    assert (unauthorized["status"], unauthorized["outcome"], unauthorized["error"]) == (401, "refused", "unauthorized")
    assert unauthorized["client"] is None
    assert unauthorized["stream_id"] is None
    assert (invalid["status"], invalid["error"], invalid["request_id"]) == (400, "invalid_request", request_id)
    assert invalid["client"] is not None
    assert len(invalid["client"]) == 16
    text = "\n".join(record.getMessage() for record in logs.records)
    assert CLIENT_KEY not in text


async def test_a_resume_has_its_own_access_line(
    relay: Callable[..., Awaitable[str]], http: aiohttp.ClientSession, logs: pytest.LogCaptureFixture
) -> None:
    base = await relay(resume_grace=5)
    async with http.get(f"{base}/api/chat", params={"prompt": "x", "resume": "1"}, headers=SSE) as response:
        stream_id = response.headers["X-Stream-Id"]
        await response.read()
    async with http.get(f"{base}/api/streams/{stream_id}", params={"after": "3"}, headers=NDJSON) as response:
        await response.read()
    await wait_for(lambda: len(access_lines(logs)) == 2)
    first, resumed = access_lines(logs)
    assert first["resumed"] is False
    assert resumed["resumed"] is True
    assert resumed["stream_id"] == first["stream_id"] == stream_id
    assert (resumed["endpoint"], resumed["framing"], resumed["events"]) == ("/api/streams/{id}", "ndjson", 2)
    assert first["request_id"] != resumed["request_id"]


def test_the_json_format_is_one_object_per_line_with_the_fields() -> None:
    record = logging.LogRecord("llm_relay.access", logging.INFO, __file__, 1, "%s", ("a=1",), None)
    record.fields = {"a": 1, "b": None, "c": "x\ny"}
    line = JSONFormatter().format(record)
    assert "\n" not in line
    parsed = json.loads(line)
    assert parsed["level"] == "INFO"
    assert parsed["logger"] == "llm_relay.access"
    assert parsed["message"] == "a=1"
    assert (parsed["a"], parsed["b"], parsed["c"]) == (1, None, "x\ny")
    assert parsed["ts"].endswith("Z")


def test_log_options_are_checked() -> None:
    config = load_config(["--log-level", "debug", "--log-format", "json"])
    assert (config.log_level, config.log_format) == ("debug", "json")
    assert load_config([], {"LLM_RELAY_LOG_FORMAT": "json"}).log_format == "json"
    with pytest.raises(SystemExit):
        load_config(["--log-format", "xml"])
    with pytest.raises(ValueError, match="log format"):
        configure_logging("info", "xml")
    assert issubclass(ConfigError, ValueError)


async def test_a_real_process_logs_json_access_lines(tmp_path: Any, http: aiohttp.ClientSession) -> None:
    argv = ("--provider", "demo", "--demo-delay", "0", "--limits", "false", "--log-format", "json")
    async with running_server(tmp_path, *argv) as server:
        async with http.get(f"{server.base}/api/chat", params={"prompt": "hi"}, headers={"X-Request-Id": "r-42"}) as r:
            await r.read()
            stream_id = r.headers["X-Stream-Id"]
        async with http.get(f"{server.base}/api/chat") as r:
            assert r.status == 400

        def lines() -> list[dict[str, Any]]:
            return [json.loads(line) for line in server.stderr.read_text().splitlines() if line.strip()]

        await wait_for(lambda: sum(line["logger"] == "llm_relay.access" for line in lines()) == 2)
    every = lines()
    assert all({"ts", "level", "logger", "message"} <= line.keys() for line in every)
    assert any("listening on" in line["message"] for line in every)
    done, refused = [line for line in every if line["logger"] == "llm_relay.access"]
    assert (done["request_id"], done["stream_id"], done["outcome"], done["status"]) == ("r-42", stream_id, "done", 200)
    assert done["upstream_status"] is None  # the demo model has no upstream
    assert (refused["status"], refused["error"], refused["outcome"]) == (400, "invalid_request", "refused")


def test_docstring_examples() -> None:
    import doctest

    import server.logs

    failures, tried = doctest.testmod(server.logs)
    assert (failures, tried > 0) == (0, True)


@pytest.mark.parametrize("endpoint", ["/v1/chat/completions", "/api/ui-chat"])
async def test_the_openai_and_ui_stream_endpoints_have_access_lines_and_request_ids(
    relay: Callable[..., Awaitable[str]],
    fake_upstream: FakeUpstream,
    http: aiohttp.ClientSession,
    logs: pytest.LogCaptureFixture,
    endpoint: str,
) -> None:
    base = await relay()
    body: dict[str, Any] = (
        {"model": "fake-model", "messages": [{"role": "user", "content": "x"}], "stream": True}
        if endpoint.startswith("/v1")
        else {"id": "chat-1", "messages": [{"id": "m1", "role": "user", "parts": [{"type": "text", "text": "x"}]}]}
    )
    async with http.post(f"{base}{endpoint}", json=body, headers={"X-Request-Id": "trace-1"}) as response:
        assert response.status == 200
        sent = await response.read()
        assert response.headers["X-Request-Id"] == "trace-1"
    await wait_for(lambda: access_lines(logs))
    [line] = access_lines(logs)
    assert (line["request_id"], line["endpoint"], line["status"], line["outcome"]) == ("trace-1", endpoint, 200, "done")
    assert line["bytes"] == len(sent)
    assert sent_upstream(fake_upstream) == "trace-1"
    # A refusal of these endpoints is a line too.
    async with http.post(f"{base}{endpoint}", json={"messages": "nope"}) as refused:
        assert refused.status == 400
    await wait_for(lambda: len(access_lines(logs)) == 2)
    assert access_lines(logs)[1]["status"] == 400
