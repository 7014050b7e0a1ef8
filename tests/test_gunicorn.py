"""server/gunicorn.py and server/gunicorn_worker.py: under gunicorn the relay listens with gunicorn's ``backlog``.

aiohttp's own gunicorn workers listen again with 128 whatever ``--backlog`` says (aio-libs/aiohttp#5283); the
relay's workers set gunicorn's backlog back once their sites have started. The real gunicorn runs these tests
(it is in the test extra); the kernel's own figure (``ss``) is what they read.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from server.backlog import read_kernel_limit

from .processes import ROOT, clean_env, free_port, listen_backlog, needs_ss, start_gunicorn, stop_gunicorn

SOMAXCONN = read_kernel_limit()


def _settings(**env: str) -> dict[str, object]:
    probe = "import json, server.gunicorn as g; print(json.dumps({'backlog': g.backlog, 'worker': g.worker_class}))"
    done = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=ROOT,
        env=clean_env(**env),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def test_the_config_module_sets_the_relays_backlog_and_worker() -> None:
    assert _settings() == {"backlog": 4096, "worker": "server.gunicorn_worker.RelayUVLoopWebWorker"}
    assert _settings(LLM_RELAY_BACKLOG="1000", LLM_RELAY_UVLOOP="false") == {
        "backlog": 1000,
        "worker": "server.gunicorn_worker.RelayWebWorker",
    }


@contextmanager
def _gunicorn(tmp_path: Path, *argv: str) -> Iterator[tuple[int, Path]]:
    port = free_port()
    log = tmp_path / "gunicorn.log"
    proc = start_gunicorn(port, log, clean_env(LLM_RELAY_LIMITS="false"), "--workers", "1", *argv)
    try:
        yield port, log
    finally:
        stop_gunicorn(proc)


def _serving(port: int, log: Path) -> None:
    """Wait until the worker answers: its sites have started, and its first heartbeat came right after."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                if sock.recv(64).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"gunicorn did not serve: {log.read_text()[-2000:]}")


@needs_ss
@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], min(4096, SOMAXCONN or 4096)),  # the config module's default, the relay's own
        (["--backlog", "1000"], 1000),  # gunicorn's command line wins over its config file
        (["--backlog", "1000", "--worker-class", "server.gunicorn_worker.RelayWebWorker"], 1000),
    ],
    ids=["default-uvloop", "option-uvloop", "option-asyncio"],
)
def test_gunicorn_listens_with_its_backlog(tmp_path: Path, argv: list[str], expected: int) -> None:
    pytest.importorskip("gunicorn", reason="gunicorn is in the test extra: pip install -e '.[test]'")
    with _gunicorn(tmp_path, *argv) as (port, log):
        _serving(port, log)
        assert listen_backlog(port) == expected, log.read_text()[-2000:]
