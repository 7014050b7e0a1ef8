"""server/descriptors.py, and the relay at its file-descriptor limit: a real ``python -m server`` whose
RLIMIT_NOFILE is set low, filled up with idle connections until its last descriptor is a client's."""

from __future__ import annotations

import asyncio
import doctest
import errno
import logging
import os
import resource
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

import server.descriptors
from server.descriptors import EpisodeLog, install_accept_warning, warn_out_of_descriptors

from .fake_upstream import Behavior, FakeUpstream
from .raw_http import connect, read_response

ROOT = Path(__file__).resolve().parents[1]
EMFILE = OSError(errno.EMFILE, "Too many open files")


def test_docstring_examples_run() -> None:
    failures, tried = doctest.testmod(server.descriptors)
    assert tried
    assert not failures


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_one_warning_per_episode(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="llm_relay.descriptors")
    episodes, clock = EpisodeLog(quiet=30.0), Clock()
    for now in (0.0, 0.5, 20.0, 49.0, 80.0, 80.1):
        clock.now = now
        warn_out_of_descriptors("testing", episodes=episodes, clock=clock)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.getMessage().split(" while ")[0] for r in warnings] == ["out of file descriptors (EMFILE/ENFILE)"] * 2
    assert all(not r.exc_info for r in caplog.records)


async def test_the_loops_accept_failures_become_the_episode_warning(caplog: pytest.LogCaptureFixture) -> None:
    loop = asyncio.get_running_loop()
    others: list[dict[str, object]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: others.append(context))
    try:
        install_accept_warning(loop, episodes=EpisodeLog())
        # What asyncio's accept loop reports at the limit (selector_events.py, _accept_connection).
        for _ in range(100):
            loop.call_exception_handler({"message": "socket.accept() out of system resource", "exception": EMFILE})
        loop.call_exception_handler({"message": "something else", "exception": ValueError("x")})
    finally:
        loop.set_exception_handler(previous)
    warnings = [r for r in caplog.records if r.name == "llm_relay.descriptors" and r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert "accepting connections" in warnings[0].getMessage()
    assert [context["message"] for context in others] == ["something else"]  # the rest goes where it went before


# -- a relay at its limit ------------------------------------------------------------------------------------------

LIMIT = 64
_WRAPPER = "import resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, ({0}, {0})); " \
    "from server.__main__ import main; main(sys.argv[1:])"  # fmt: skip


def _open_descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def _until(predicate: object, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():  # type: ignore[operator]
            await asyncio.sleep(0.01)


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    fake = FakeUpstream(Behavior(keep_alive=False))  # every relayed request needs a new upstream socket
    await fake.start()
    yield fake
    await fake.close()


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts a process's descriptors in /proc")
@pytest.mark.skipif(resource.getrlimit(resource.RLIMIT_NOFILE)[1] < LIMIT, reason="the hard limit is lower")
@pytest.mark.parametrize(
    ("loop", "warm"), [("asyncio", True), ("uvloop", True), ("asyncio", False)], ids=["asyncio", "uvloop", "cold"]
)
async def test_at_the_descriptor_limit_clients_get_503_and_the_log_one_warning(
    upstream: FakeUpstream, tmp_path: Path, loop: str, warm: bool
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = [
        "--port", str(port), "--provider", "openai", "--base-url", upstream.url, "--api-key", "sk-test",
        "--model", "fake-model", "--upstream-max-retries", "0", "--limits", "off", "--heartbeat", "0",
        "--request-head-timeout", "60", "--uvloop", "on" if loop == "uvloop" else "off",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "LLM_RELAY_"))}
    stderr = (tmp_path / "stderr").open("wb")
    proc = subprocess.Popen(  # noqa: ASYNC220 - started once; the test then talks to it over sockets
        [sys.executable, "-c", _WRAPPER.format(LIMIT), *argv], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
        stderr=stderr,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    idle: list[socket.socket] = []
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
            for _ in range(200):
                try:
                    async with http.get(f"{base}/healthz") as resp:
                        assert resp.status == 200
                        break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.05)
            else:
                raise AssertionError(f"the relay did not start: {(tmp_path / 'stderr').read_text()}")
            if warm:  # else the first upstream request fails earlier: the openai client imports a module for it
                async with http.get(f"{base}/api/chat", params={"prompt": "warm up"}) as resp:
                    assert resp.status == 200
                    await resp.read()
            await asyncio.sleep(0.2)
            # Fill the process up with idle connections until one descriptor is left, then take that one.
            while _open_descriptors(proc.pid) < LIMIT - 1:
                before = _open_descriptors(proc.pid)
                idle.append(socket.create_connection(("127.0.0.1", port)))
                await _until(lambda before=before: _open_descriptors(proc.pid) > before)
            reader, writer = await connect(base)
            await _until(lambda: _open_descriptors(proc.pid) == LIMIT)
            for _ in range(3):  # every request on it: the relay cannot open the upstream connection
                writer.write(b"GET /api/chat?prompt=hi HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                response = await read_response(reader)
                assert response.status == 503
                assert response.json() == {
                    "error": {"type": "server_overloaded", "message": "the server is out of capacity for a moment; "
                              "try again shortly"}
                }  # fmt: skip
                assert response.headers["retry-after"] == "1"
            # Clients the process cannot accept (asyncio retries every second and reports each failure).
            waiting = [socket.create_connection(("127.0.0.1", port)) for _ in range(5)]
            await asyncio.sleep(2.5)
            writer.close()
            for sock in idle + waiting:
                sock.close()
            idle.clear()
            await _until(lambda: _open_descriptors(proc.pid) < LIMIT - 10)
            async with http.get(f"{base}/api/chat", params={"prompt": "and again"}) as resp:
                assert resp.status == 200  # the episode is over: descriptors came back
                await resp.read()
            # Plain asyncio re-arms a failed accept one second later, and a server closed before that logs a
            # ValueError from the re-arm (CPython gh-151615, docs/request-limits.md): stop after it.
            await asyncio.sleep(1.5)
    finally:
        for sock in idle:
            sock.close()
        proc.terminate()
        await asyncio.to_thread(proc.wait, 10)
        stderr.close()
    log = (tmp_path / "stderr").read_text()
    assert "Traceback" not in log
    assert "socket.accept() out of system resource" not in log
    assert log.count("out of file descriptors") == 1, log
    assert " 500 " not in log
