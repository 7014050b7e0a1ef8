"""``python -m server`` as a real process: it starts on its defaults, serves, and shuts down gracefully on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

from .raw_http import closed_by_server, connect, post_head, read_response
from .wire import ndjson_objects, sse_events

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _wait_up(base: str, http: aiohttp.ClientSession) -> None:
    for _ in range(200):
        try:
            async with http.get(f"{base}/healthz") as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientError:
            await asyncio.sleep(0.05)
    raise AssertionError("the server did not start")


async def test_sigterm_ends_open_streams_in_band_and_exits_within_the_grace_period(tmp_path: Path) -> None:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "LLM_RELAY_"))}
    log = (tmp_path / "stderr").open("wb")
    proc = subprocess.Popen(  # noqa: ASYNC220 - started once; the test then talks to it over sockets
        [sys.executable, "-m", "server", "--port", str(port), "--demo-delay", "0.05", "--shutdown-grace", "3"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            await _wait_up(base, http)
            async with http.get(f"{base}/healthz") as resp:
                assert (await resp.json())["provider"] == "demo"  # the embedded default, no key needed
            sse = await http.get(f"{base}/api/chat", params={"prompt": "x"})
            ndjson = await http.get(f"{base}/api/chat", params={"prompt": "x", "format": "ndjson"})
            await sse.content.readuntil(b"\n\n")
            await ndjson.content.readline()
            signalled = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            sse_body = await asyncio.wait_for(sse.read(), 10)
            ndjson_body = await asyncio.wait_for(ndjson.read(), 10)
        code = await asyncio.to_thread(proc.wait, 10)
        took = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    assert code == 0
    assert took < 3 + 2  # the grace period, plus interpreter exit
    assert b"retry: 3000\n\n" in sse_body
    assert sse_events(sse_body)[-1][1]["error"]["type"] == "server_shutdown"
    assert ndjson_objects(ndjson_body)[-1]["error"]["type"] == "server_shutdown"
    stderr = (tmp_path / "stderr").read_text()
    assert "Traceback" not in stderr
    with socket.socket() as sock:  # no longer accepting
        assert sock.connect_ex(("127.0.0.1", port)) != 0


def test_help_lists_every_option_with_its_environment_variable() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "server", "--help"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    options = (
        "--host", "--port", "--provider", "--base-url", "--api-key", "--model", "--demo-delay",
        "--first-token-timeout", "--idle-timeout", "--total-timeout", "--write-timeout", "--heartbeat",
        "--cors-origin", "--rate", "--burst", "--redis-url", "--trusted-proxy", "--api-keys-file",
        "--request-head-timeout", "--request-body-timeout", "--auth-failures", "--auth-failure-rate",
    )  # fmt: skip
    for option in options:
        assert option in out
        assert "LLM_RELAY_" + option[2:].upper().replace("-", "_") in out.replace("\n", "").replace(" ", "")
    assert "OPENAI_API_KEY" in out


async def test_the_request_timeouts_apply_to_the_standalone_server(tmp_path: Path) -> None:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "LLM_RELAY_"))}
    argv = ["--port", str(port), "--demo-delay", "0", "--request-head-timeout", "1", "--request-body-timeout", "1"]
    log = (tmp_path / "stderr").open("wb")
    proc = subprocess.Popen(  # noqa: ASYNC220 - started once; the test then talks to it over sockets
        [sys.executable, "-m", "server", *argv], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            await _wait_up(base, http)
            # A head that never ends is closed after the head timeout.
            reader, writer = await connect(base)
            writer.write(b"GET /api/chat?prompt=x HTTP/1.1\r\nHost: relay.test\r\n")
            started = time.monotonic()
            assert await closed_by_server(reader, timeout=4)
            assert time.monotonic() - started >= 0.9
            writer.close()
            # A body that never ends gets 408 after the body timeout, and the connection closes.
            reader, writer = await connect(base)
            writer.write(post_head("/api/chat", 100) + b'{"prompt": ')
            response = await read_response(reader, timeout=4)
            assert response.status == 408
            assert response.json()["error"]["type"] == "request_timeout"
            assert await closed_by_server(reader, timeout=4)
            writer.close()
            async with http.post(f"{base}/api/chat", json={"prompt": "hi"}) as resp:
                assert resp.status == 200
                assert sse_events(await resp.read())[-1][0] == "done"
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(proc.wait, 10)
        log.close()
    assert "Traceback" not in (tmp_path / "stderr").read_text()
