"""``python -m server`` as a real process: it starts on its defaults, serves, and shuts down gracefully on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

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
    # The reconnection hint is jittered per stream, between the configured hint and twice it.
    retry = re.search(rb"\nretry: (\d+)\n\n", sse_body)
    assert retry is not None
    assert 3000 <= int(retry[1]) <= 6000
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
    )  # fmt: skip
    for option in options:
        assert option in out
        assert "LLM_RELAY_" + option[2:].upper().replace("-", "_") in out.replace("\n", "").replace(" ", "")
    assert "OPENAI_API_KEY" in out
