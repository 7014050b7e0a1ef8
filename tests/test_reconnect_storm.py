"""A reconnect storm against the real server (``python -m server``): after a restart every EventSource reconnects at
once. 1,000 clients connecting in the same instant are all queued by the kernel (no listen queue overflow, so no
client waits for a SYN retransmit) and every one of them gets its first frame.
"""

from __future__ import annotations

import asyncio
import errno
import os
import resource
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

ROOT = Path(__file__).resolve().parents[1]
CLIENTS = 1000
REQUEST = b"GET /api/chat?prompt=x HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n"


def listen_overflows() -> int | None:
    """The kernel's count of connections dropped because a listen queue was full (``TcpExtListenOverflows``)."""
    try:
        with open("/proc/net/netstat") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:") and values.startswith("TcpExt:"):
            counters = dict(zip(names.split()[1:], values.split()[1:], strict=True))
            if "ListenOverflows" in counters:
                return int(counters["ListenOverflows"])
    return None


def _raise_fd_limit(needed: int) -> None:
    """The clients' sockets live in this process, the server's in its child, which inherits the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"{CLIENTS} connections need {needed} file descriptors; the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _first_frame(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    # The connect started in the storm may still be in progress: the send waits until the socket is writable.
    await loop.sock_sendall(sock, REQUEST)
    received = b""
    while b"\ndata:" not in received:
        chunk = await loop.sock_recv(sock, 65536)
        if not chunk:
            raise ConnectionError(f"closed before the first frame: {received[:200]!r}")
        received += chunk


async def test_a_thousand_clients_connecting_at_once_all_get_their_first_frame(tmp_path: Path) -> None:
    _raise_fd_limit(2 * CLIENTS + 200)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "LLM_RELAY_"))}
    stderr = tmp_path / "stderr"
    with stderr.open("wb") as log:
        # The default backlog, production settings (uvloop), the demo model at a quick pace, no admission limits.
        proc = subprocess.Popen(  # noqa: ASYNC220 - started once; the test then talks to it over sockets
            [sys.executable, "-m", "server", "--port", str(port), "--demo-delay", "0.01", "--limits", "false",
             "--heartbeat", "0"],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log,
        )  # fmt: skip
    socks: list[socket.socket] = []
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(200):
                try:
                    async with http.get(f"http://127.0.0.1:{port}/healthz") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.05)
            else:
                raise AssertionError(f"the server did not start: {stderr.read_text()}")
        loop = asyncio.get_running_loop()
        before = listen_overflows()
        # The same instant: every SYN is sent in one tight loop, before any of them is waited for.
        for _ in range(CLIENTS):
            sock = socket.socket()
            sock.setblocking(False)
            socks.append(sock)
            code = sock.connect_ex(("127.0.0.1", port))
            assert code in (0, errno.EINPROGRESS), os.strerror(code)
        async with asyncio.timeout(60):  # generous: SYN retransmits alone would take 1 s, 3 s, 7 s...
            results = await asyncio.gather(*(_first_frame(loop, sock) for sock in socks), return_exceptions=True)
        after = listen_overflows()
    finally:
        for sock in socks:
            sock.close()
        proc.kill()
        await asyncio.to_thread(proc.wait, 10)
    failed = [result for result in results if result is not None]
    assert not failed, f"{len(failed)} of {CLIENTS} clients got no first frame, e.g. {failed[0]!r}"
    if before is None or after is None:
        pytest.skip("every client got its first frame; listen overflows not checked: /proc/net/netstat is unreadable")
    assert after - before == 0, f"the kernel dropped {after - before} connection attempts (TcpExtListenOverflows)"
