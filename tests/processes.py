"""The relay as a real process in tests (``python -m server``), and what the kernel says of its listening socket."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

ROOT = Path(__file__).resolve().parents[1]

needs_ss = pytest.mark.skipif(shutil.which("ss") is None, reason="reading a listener's backlog needs ss (iproute2)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without the relay's settings (``LLM_RELAY_*``, ``OPENAI_*``), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "LLM_RELAY_"))}
    return {**env, **extra}


def start_server(
    port: int,
    *argv: str,
    stderr: Path,
    command: Sequence[str] = (sys.executable, "-m", "server"),
    cwd: Path = ROOT,
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """``python -m server --port PORT ARGV`` (or another `command` for the relay, in `cwd`), its stderr written to
    the file `stderr`."""
    with stderr.open("wb") as log:
        return subprocess.Popen(
            [*command, "--port", str(port), *argv],
            cwd=cwd,
            env=clean_env() if env is None else dict(env),
            stdout=subprocess.DEVNULL,
            stderr=log,
        )


async def wait_up(base: str, http: aiohttp.ClientSession) -> None:
    for _ in range(200):
        try:
            async with http.get(f"{base}/healthz") as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientError:
            await asyncio.sleep(0.05)
    raise AssertionError("the server did not start")


@dataclass(frozen=True, slots=True)
class Running:
    port: int
    base: str
    stderr: Path


@asynccontextmanager
async def running_server(
    tmp_path: Path,
    *argv: str,
    command: Sequence[str] = (sys.executable, "-m", "server"),
    cwd: Path = ROOT,
    env: Mapping[str, str] | None = None,
) -> AsyncIterator[Running]:
    """``python -m server ARGV`` (or `command`, in `cwd`, with `env`) on a free port, once it answers /healthz;
    killed at the end."""
    port = free_port()
    running = Running(port, f"http://127.0.0.1:{port}", tmp_path / "stderr")
    proc = start_server(port, *argv, stderr=running.stderr, command=command, cwd=cwd, env=env)
    try:
        async with aiohttp.ClientSession() as http:
            try:
                await wait_up(running.base, http)
            except AssertionError:
                raise AssertionError(f"the server did not start: {running.stderr.read_text()[-2000:]}") from None
        yield running
    finally:
        proc.kill()
        await asyncio.to_thread(proc.wait, 10)


def listen_backlog(port: int) -> int | None:
    """The backlog of the socket listening on `port` as the kernel reports it (``ss``: a listener's Send-Q)."""
    out = subprocess.run(
        ["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True, timeout=10
    ).stdout
    lines = out.splitlines()
    return int(lines[0].split()[2]) if lines else None
