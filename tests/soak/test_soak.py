"""Soak and slow-reader runs (``make soak``; not part of the fast suite).

Each starts the fake upstream and the relay as separate processes on loopback, drives them for a while and checks
that nothing is left behind: zero open streams, no leaked file descriptors, memory back near its start. The figures
are printed (run with ``-s``) for the README. ``SOAK_SECONDS`` sets the soak's length (default 120).
"""

from __future__ import annotations

import asyncio
import os
import random
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import aiohttp
import pytest

pytestmark = pytest.mark.soak

ROOT = Path(__file__).resolve().parents[2]
SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "120"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _raise_fd_limit() -> None:
    # A thousand clients and their thousand upstream connections need more than the usual 1024 descriptors.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))


def _start(args: list[str]) -> subprocess.Popen[bytes]:
    # stderr to a file, not a pipe nobody drains: a full pipe would block the server's logging, and so its loop.
    log = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the process, closed with the fixture
    proc = subprocess.Popen(
        [sys.executable, *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log, preexec_fn=_raise_fd_limit
    )
    _LOGS[proc.pid] = log
    return proc


_LOGS: dict[int, IO[bytes]] = {}


def _stderr(proc: subprocess.Popen[bytes]) -> str:
    log = _LOGS[proc.pid]
    log.seek(0)
    return log.read().decode(errors="replace")


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _connections_to(port: int) -> int:
    """Open TCP connections whose local port is `port` (the relay's side of its clients), from /proc/net/tcp."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if int(local.rsplit(":", 1)[1], 16) == port and state != "0A":  # 0A: LISTEN
                count += 1
    return count


def _connections_towards(port: int) -> int:
    """Established TCP connections whose remote port is `port` (on loopback: the relay's upstream connections)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            remote, state = line.split()[2], line.split()[3]
            if int(remote.rsplit(":", 1)[1], 16) == port and state == "01":  # 01: ESTABLISHED
                count += 1
    return count


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _wait_healthy(url: str) -> None:
    async with aiohttp.ClientSession() as http:
        for _ in range(200):
            try:
                async with http.get(url) as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise AssertionError(f"{url} did not come up")


async def _open_streams(base: str) -> int:
    return await _health(base, "open_streams")


async def _health(base: str, field: str) -> int:
    async with aiohttp.ClientSession() as http, http.get(f"{base}/healthz") as resp:
        return int((await resp.json())[field])


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        _LOGS.pop(proc.pid).close()


def _relay_args(port: int, upstream_port: int, *extra: str) -> list[str]:
    return [
        "-m", "server", "--port", str(port), "--provider", "openai",
        "--base-url", f"http://127.0.0.1:{upstream_port}/v1", "--api-key", "soak", "--model", "fake-model",
        "--limits", "false", "--upstream-max-retries", "0", *extra,
    ]  # fmt: skip


async def _normal(http: aiohttp.ClientSession, url: str, fmt: str) -> str:
    async with http.get(url, params={"prompt": "soak", "format": fmt}) as resp:
        await resp.read()
        return f"status-{resp.status}"


async def _leave(http: aiohttp.ClientSession, url: str, rng: random.Random) -> str:
    resp = await http.get(url, params={"prompt": "soak"})
    try:
        for _ in range(rng.randrange(1, 30)):
            await resp.content.readuntil(b"\n\n")
    except (aiohttp.ClientError, asyncio.IncompleteReadError, ValueError):
        pass
    finally:
        resp.close()
    return "left"


async def _slow(host: str, port: int, hold: float) -> str:
    _, writer = await asyncio.open_connection(host, port)
    writer.write(f"GET /api/chat?prompt=soak&format=ndjson HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
    await writer.drain()
    await asyncio.sleep(hold)  # read nothing
    writer.close()
    await writer.wait_closed()
    return "slow"


def test_soak_leaves_nothing_behind(processes: list[subprocess.Popen[bytes]]) -> None:
    upstream_port, port = _free_port(), _free_port()
    processes.append(
        _start(["-m", "tests.fake_upstream", "--port", str(upstream_port), "--tokens", "300", "--delay", "0.005",
                "--chaos", "0.2"])
    )  # fmt: skip
    relay = _start(
        _relay_args(port, upstream_port, "--write-timeout", "1", "--idle-timeout", "2", "--first-token-timeout", "2",
                    "--heartbeat", "0.5", "--stream-retention", "2")
    )  # fmt: skip
    processes.append(relay)
    base = f"http://127.0.0.1:{port}"
    url = f"{base}/api/chat"

    async def run() -> dict[str, object]:
        await _wait_healthy(f"{base}/healthz")
        await _wait_healthy(f"http://127.0.0.1:{upstream_port}/v1/models")
        outcomes: Counter[str] = Counter()
        hung_at: list[float] = []
        rng = random.Random(7)
        deadline = 0.0

        async def worker(http: aiohttp.ClientSession) -> None:
            while time.monotonic() < deadline:
                kind = rng.random()
                started = time.monotonic()
                try:
                    if kind < 0.5:
                        outcomes[await _normal(http, url, rng.choice(["sse", "ndjson"]))] += 1
                    elif kind < 0.85:
                        outcomes[await _leave(http, url, rng)] += 1
                    else:
                        outcomes[await _slow("127.0.0.1", port, rng.uniform(0.2, 3))] += 1
                except (aiohttp.ClientError, asyncio.IncompleteReadError, ConnectionError) as exc:
                    outcomes[type(exc).__name__] += 1
                except TimeoutError:
                    # No stream may outlive the relay's own clocks (2 s to first token, 2 s idle, 1 s write).
                    outcomes[f"hung-{'normal' if kind < 0.5 else 'leave' if kind < 0.85 else 'slow'}"] += 1
                    hung_at.append(time.monotonic() - started)

        # Warm up, then take the baseline the end is compared with.
        async with aiohttp.ClientSession() as http:
            await asyncio.gather(*(_normal(http, url, "sse") for _ in range(20)))
        await asyncio.sleep(1.5)  # the warm-up's keep-alive connections close
        baseline_rss, baseline_fds = _rss_kib(relay.pid), _fds(relay.pid)
        baseline_pool = _connections_towards(upstream_port)
        deadline = time.monotonic() + SOAK_SECONDS
        peak_rss = baseline_rss
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
            workers = [asyncio.create_task(worker(http)) for _ in range(150)]
            while not all(w.done() for w in workers):
                peak_rss = max(peak_rss, _rss_kib(relay.pid))
                await asyncio.sleep(0.5)
            await asyncio.gather(*workers)
        async with asyncio.timeout(15):
            while await _open_streams(base):
                await asyncio.sleep(0.1)
        # Ended streams stay resumable for --stream-retention (2 s here), then their logs go.
        async with asyncio.timeout(15):
            while await _health(base, "retained_streams"):
                await asyncio.sleep(0.1)
        await asyncio.sleep(1.5)  # keep-alive connections of the finished session close
        return {
            "outcomes": dict(outcomes),
            "requests": sum(outcomes.values()),
            "baseline_rss_kib": baseline_rss,
            "peak_rss_kib": peak_rss,
            "end_rss_kib": _rss_kib(relay.pid),
            "baseline_fds": baseline_fds,
            "end_fds": _fds(relay.pid),
            "baseline_upstream_pool": baseline_pool,
            "end_upstream_pool": _connections_towards(upstream_port),
            "end_client_connections": _connections_to(port),
            "relay_cpu_s": _cpu_seconds(relay.pid),
        }

    figures = asyncio.run(run())
    print(f"\nsoak {SOAK_SECONDS:.0f} s: {figures}")
    assert figures["requests"] > 100  # type: ignore[operator]
    assert figures["end_client_connections"] == 0
    # Beyond the start's, the descriptors left may only be the openai client's pool of idle upstream connections.
    assert (
        figures["end_fds"] - figures["end_upstream_pool"]  # type: ignore[operator]
        <= figures["baseline_fds"] - figures["baseline_upstream_pool"]  # type: ignore[operator]
    )
    # "Back near its start": allocator arenas keep some of the peak, but not the load's working set.
    assert (
        figures["end_rss_kib"]
        < figures["baseline_rss_kib"]
        + 0.5
        * (  # type: ignore[operator]
            figures["peak_rss_kib"] - figures["baseline_rss_kib"]  # type: ignore[operator]
        )
        + 16_384
    )
    relay.send_signal(signal.SIGTERM)
    assert relay.wait(15) == 0
    stderr = _stderr(relay)
    assert "Traceback" not in stderr, stderr[-3000:]


def test_a_thousand_clients_that_never_read(processes: list[subprocess.Popen[bytes]]) -> None:
    """1000 clients that stop reading cost bounded memory, and clients that do read are not slowed."""
    upstream_port, port = _free_port(), _free_port()
    # 4000 tokens of 500 bytes: 2 MB per stream, more than loopback socket buffers absorb, so
    # every non-reader really stalls (the upstream is then read only as fast as the relay's buffers drain).
    processes.append(
        _start(["-m", "tests.fake_upstream", "--port", str(upstream_port), "--tokens", "4000", "--token-bytes", "500"])
    )
    relay = _start(
        _relay_args(
            port,
            upstream_port,
            "--write-timeout",
            "300",
            "--heartbeat",
            "0",
            "--send-buffer",
            "65536",
            "--uvloop",
            os.environ.get("SOAK_UVLOOP", "true"),
        )
    )
    processes.append(relay)
    base = f"http://127.0.0.1:{port}"

    async def paced_reader_lag(http: aiohttp.ClientSession) -> float:
        """Seconds from request to done for a normal reader."""
        started = time.monotonic()
        async with http.get(f"{base}/api/chat", params={"prompt": "x"}) as resp:
            await resp.read()
        return time.monotonic() - started

    async def run() -> dict[str, float]:
        _raise_fd_limit()
        await _wait_healthy(f"{base}/healthz")
        await _wait_healthy(f"http://127.0.0.1:{upstream_port}/v1/models")
        async with aiohttp.ClientSession() as http:
            alone = [await paced_reader_lag(http) for _ in range(10)]
        baseline = _rss_kib(relay.pid)
        sockets = []
        for _ in range(1000):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(f"GET /api/chat?prompt=x&format=ndjson HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
            sockets.append((reader, writer))
        # Loopback buffers absorb megabytes per connection, so some replies end inside the kernel; the others
        # stall. Wait until the number of stalled streams stops changing.
        previous, stalled_streams = -1, await _open_streams(base)
        async with asyncio.timeout(120):
            while stalled_streams != previous:
                await asyncio.sleep(3)
                previous, stalled_streams = stalled_streams, await _open_streams(base)
        stalled = _rss_kib(relay.pid)
        async with aiohttp.ClientSession() as http, http.get(f"{base}/healthz") as resp:
            log_bytes = int((await resp.json())["log_bytes"])  # what the stalled streams' logs hold (estimated)
        async with aiohttp.ClientSession() as http:
            loaded = [await paced_reader_lag(http) for _ in range(10)]
        for _, writer in sockets:
            writer.close()
        async with asyncio.timeout(30):
            while await _open_streams(base):
                await asyncio.sleep(0.2)
        return {
            "stalled_streams": stalled_streams,
            "rss_per_stalled_client_kib": (stalled - baseline) / max(1, stalled_streams),
            "log_per_stalled_client_kib": log_bytes / 1024 / max(1, stalled_streams),
            "reader_ms_alone_median": 1000 * statistics.median(alone),
            "reader_ms_with_1000_stalled_median": 1000 * statistics.median(loaded),
        }

    figures = asyncio.run(run())
    print(f"\nslow readers: {figures}")
    assert figures["stalled_streams"] >= 100
    assert figures["rss_per_stalled_client_kib"] < 512
