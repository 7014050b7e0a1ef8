"""An upstream must never freeze the server: floods of lines, comments, empty events and compressed newlines.

Each flood runs against the real relay (the openai client, the fake upstream, loopback sockets) while a second
client streams a normal reply and ``/healthz`` is polled: every poll is answered within a second (a liveness bound,
not a benchmark), the other stream completes, and the flooding stream ends with its documented error within its
timeouts. One test runs ``python -m server`` as a process: its memory stays bounded mid-flood and SIGTERM ends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest

from server.app import _rules, build_provider, create_app
from server.chat_request import from_query
from server.config import Config
from server.events import Delta, Done, Usage

from .conftest import ServeApp, upstream_config
from .fake_upstream import Behavior, FakeUpstream
from .processes import ROOT, free_port, wait_up
from .wire import sse_events, sse_text

# Small timeouts where a timeout is the expected end (valid events without text: no bound applies); long ones where
# a bound must end the stream first (the test then shows the bound, not a timeout, stopped it).
FIRST_TOKEN_TIMEOUT = 3.0
IDLE_TIMEOUT = 1.5
LONG_TIMEOUT = 15.0
POLL_BOUND = 1.0  # /healthz answers come at most this far apart (generous, for a loaded 2-core machine)
EMPTY_CHUNK = b'data: {"choices":[]}\n\n'  # a valid event that carries no text (as Azure's filter chunks)

FLOODS: dict[str, tuple[Behavior, str]] = {
    # 40,000 short data lines (625 KiB) in one event: the quadratic decoder froze the loop for 24 s.
    "40k-short-data-lines": (Behavior(fault="flood", flood=b"data: 012345678\n", flood_bytes=40_000 * 16),
                             "upstream_protocol_error"),
    # 5 MB of empty data lines: no bytes for the byte bound; minutes of a frozen loop.
    "5mb-empty-data-lines": (Behavior(fault="flood", flood=b"data:\n", flood_bytes=5_000_000),
                             "upstream_protocol_error"),
    # 52 MB of comments, each a block of its own: no event ever, refused by the gap bound.
    "52mb-comments": (Behavior(fault="flood", flood=b":\n\n", flood_bytes=52_000_000), "upstream_protocol_error"),
    # A gzip body that inflates to 1 GiB of newlines (about 1 MB on the wire, compressed as it is sent).
    "gzip-1gb-newlines": (Behavior(fault="flood", flood=b"\n", flood_bytes=1 << 30, gzip=True),
                          "upstream_protocol_error"),
    # Valid events without text: no bound applies; the idle clock, which only text moves, ends the stream.
    "52mb-empty-events": (Behavior(fault="flood", flood=EMPTY_CHUNK, flood_bytes=52_000_000), "timeout"),
    "gzip-1gb-empty-events": (Behavior(fault="flood", flood=EMPTY_CHUNK, flood_bytes=1 << 30, gzip=True),
                              "timeout"),
}  # fmt: skip
NORMAL = Behavior(tokens=[f" t{i}" for i in range(30)], delay=0.04)


async def _poll_health(http: aiohttp.ClientSession, base: str, stop: asyncio.Event) -> list[float]:
    """Poll /healthz every 50 ms until `stop`; the time between consecutive answers (a frozen loop shows there,
    whether it froze during a request or while the poller slept)."""
    gaps: list[float] = []
    last = time.monotonic()
    while not stop.is_set():
        async with asyncio.timeout(60), http.get(f"{base}/healthz") as resp:
            assert resp.status == 200
            await resp.read()
        now = time.monotonic()
        gaps.append(now - last)
        last = now
        await asyncio.sleep(0.05)
    return gaps


async def _stream(http: aiohttp.ClientSession, base: str, prompt: str) -> tuple[int, bytes, float]:
    started = time.monotonic()
    async with http.get(f"{base}/api/chat", params={"prompt": prompt}) as resp:
        body = await resp.read()
    return resp.status, body, time.monotonic() - started


@pytest.mark.parametrize("flood", list(FLOODS))
@pytest.mark.parametrize("before_first_token", [False, True], ids=["mid-reply", "before-first-token"])
async def test_a_flooding_upstream_does_not_freeze_the_server(
    fake_upstream: FakeUpstream, serve: ServeApp, flood: str, before_first_token: bool
) -> None:
    behavior, error_type = FLOODS[flood]
    fake_upstream.by_prompt = {
        "flood": replace(behavior, fault_after=0 if before_first_token else 1),
        "normal": NORMAL,
    }
    short = error_type == "timeout"
    first_token_timeout = FIRST_TOKEN_TIMEOUT if short else LONG_TIMEOUT
    idle_timeout = IDLE_TIMEOUT if short else LONG_TIMEOUT
    config = upstream_config(fake_upstream, first_token_timeout=first_token_timeout, idle_timeout=idle_timeout)
    base = await serve(create_app(config))
    stop = asyncio.Event()
    async with aiohttp.ClientSession() as http:
        polls = asyncio.create_task(_poll_health(http, base, stop))
        try:
            await asyncio.sleep(0.1)
            flooding, normal = await asyncio.gather(_stream(http, base, "flood"), _stream(http, base, "normal"))
        finally:
            stop.set()
            took = await polls
    status, body, duration = flooding
    print(f"{flood}: ended after {duration:.2f} s; {len(took)} polls, slowest {max(took) * 1000:.0f} ms")
    assert max(took) < POLL_BOUND
    assert normal[0] == 200
    assert sse_text(normal[1]) == "".join(NORMAL.tokens)
    assert sse_events(normal[1])[-1][0] == "done"
    if before_first_token:
        # Nothing was relayed yet: a status code with a JSON body.
        assert status == (504 if error_type == "timeout" else 502)
        assert json.loads(body)["error"]["type"] == error_type
        assert duration < first_token_timeout + 3
    else:
        assert status == 200
        events = sse_events(body)
        assert sse_text(body) == "Hello"
        assert events[-1][0] == "error"
        assert events[-1][1]["error"]["type"] == error_type
        assert duration < idle_timeout + 3


async def test_a_flood_after_done_ends_the_reply_and_drops_the_connection(
    fake_upstream: FakeUpstream, serve: ServeApp, http: aiohttp.ClientSession
) -> None:
    # The relay reads on after [DONE] only so the connection can be reused; an upstream that keeps sending there
    # costs its connection after a little, not the relay's time (nor the client's: its reply is already whole).
    fake_upstream.behavior = Behavior(fault="flood_after_done", flood=b"\n", flood_bytes=1 << 30)
    base = await serve(create_app(upstream_config(fake_upstream)))
    status, body, _ = await _stream(http, base, "x")
    assert status == 200
    assert sse_text(body) == "Hello, world!"
    assert sse_events(body)[-1][0] == "done"
    await asyncio.wait_for(fake_upstream.last.client_gone.wait(), 5)
    assert not fake_upstream.last.completed


def _memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a Linux process, in KiB."""
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0])
    return fields


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc for the server's memory")
@pytest.mark.parametrize("flood", ["52mb-empty-events", "gzip-1gb-empty-events"])
async def test_the_server_process_stays_small_and_stops_on_sigterm_mid_flood(
    fake_upstream: FakeUpstream, tmp_path: Path, flood: str
) -> None:
    # Long timeouts: the flood is still running when SIGTERM arrives. Before the fix the loop never ran while the
    # upstream's bytes were buffered, so neither the signal handler nor /healthz got a turn.
    behavior, _ = FLOODS[flood]
    fake_upstream.behavior = replace(behavior, fault_after=1, flood_bytes=1 << 40)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "LLM_RELAY_"))}
    log = (tmp_path / "stderr").open("wb")
    command = [
        sys.executable, "-m", "server", "--port", str(port), "--provider", "openai", "--base-url", fake_upstream.url,
        "--api-key", "x", "--upstream-max-retries", "0", "--first-token-timeout", "60", "--idle-timeout", "60",
        "--shutdown-grace", "2",
    ]  # fmt: skip
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log)  # noqa: ASYNC220
    base = f"http://127.0.0.1:{port}"
    memory: dict[str, int] = {}
    took: list[float] = []
    try:
        async with aiohttp.ClientSession() as http:
            await wait_up(base, http)
            idle = _memory_kib(proc.pid)["VmRSS"]
            stream = await http.get(f"{base}/api/chat", params={"prompt": "x"})
            assert stream.status == 200
            await stream.content.readuntil(b"\n\n")  # the first token: the flood follows it
            await fake_upstream.wait_for_request()
            last = time.monotonic()
            for _ in range(15):
                await asyncio.sleep(0.1)
                async with asyncio.timeout(60), http.get(f"{base}/healthz") as resp:
                    assert (await resp.json())["open_streams"] == 1
                took.append(time.monotonic() - last - 0.1)  # the sleep is the test's, the rest the server's
                last = time.monotonic()
            memory = _memory_kib(proc.pid)
            signalled = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            body = await asyncio.wait_for(stream.read(), 10)
        code = await asyncio.to_thread(proc.wait, 10)
        exited = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    print(f"{flood}: RSS idle {idle} KiB, mid-flood {memory}; slowest poll {max(took) * 1000:.0f} ms; "
          f"exited {exited:.2f} s after SIGTERM")  # fmt: skip
    assert max(took) < POLL_BOUND
    assert memory["VmHWM"] < idle + 100 * 1024  # generous: a bounded flood costs a few MiB
    assert code == 0
    assert exited < 2 + 3  # the grace period, plus interpreter exit
    assert sse_events(body)[-1][1]["error"]["type"] == "server_shutdown"
    assert "Traceback" not in (tmp_path / "stderr").read_text()


async def test_the_provider_yields_no_empty_batch_for_bytes_without_text(fake_upstream: FakeUpstream) -> None:
    # The relay's idle clock moves on every batch it gets; bytes that carry no text must not reach it as one.
    fake_upstream.behavior = Behavior(tokens=["a", "b"], fault="flood", fault_after=1, flood=EMPTY_CHUNK,
                                      flood_bytes=2_000_000)  # fmt: skip
    provider = build_provider(upstream_config(fake_upstream))
    batches: list[list[object]] = []
    try:
        async with contextlib.aclosing(provider.stream(from_query({"prompt": "x"}, _rules(Config())))) as stream:
            async for batch in stream:
                batches.append(list(batch))
    finally:
        await provider.aclose()
    assert all(batches)
    assert [event for batch in batches for event in batch] == [Delta("a"), Delta("b"), Done("stop", Usage(7, 2, 9))]
