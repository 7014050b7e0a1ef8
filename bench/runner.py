"""Processes: start a server pinned to its core, wait until it listens, run the load client, stop what we started.

Only processes this module started are ever signalled, each by its own process group (gunicorn's master and
worker stop together).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench import payload, probe
from bench.client import Spec
from bench.procstat import process_tree

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / ".work"
SERVER_CORE = "0"
CLIENT_CORE = "1"


def raise_fd_limit() -> int:
    """10,000 connections need more descriptors than the default 1024; children inherit the raised limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def environment(upstream: str, uvloop: bool, server_root: str = "", heartbeat: float = 2.0) -> dict[str, str]:
    """`server_root`: a directory whose server/ package the process imports instead of the working tree's;
    `heartbeat`: seconds between the peers' heartbeats on their idle route (bench.peers)."""
    env = dict(os.environ)
    env.update(
        BENCH_PAYLOAD=str(WORK / "payload.json"),
        BENCH_UPSTREAM=upstream,
        BENCH_PROBE_DIR=str(WORK),
        BENCH_HEARTBEAT=f"{heartbeat:g}",
        BENCH_UVLOOP="1" if uvloop else "0",
        PYTHONPATH=str(ROOT),
        PYTHONUNBUFFERED="1",
    )
    if server_root:
        # `python -m` puts the working directory (ROOT, with its own server/) first on sys.path; PYTHONSAFEPATH
        # leaves it out, so the exported package, first on PYTHONPATH, is the one imported. bench.ours checks.
        env.update(BENCH_SERVER_ROOT=server_root, PYTHONPATH=f"{server_root}{os.pathsep}{ROOT}", PYTHONSAFEPATH="1")
    return env


def export_server(rev: str) -> tuple[str, Path]:
    """Export `rev`'s server/ package (and web/, which server/page.py finds beside it) to
    bench/.work/baseline-<commit>/; returns the short commit and that root."""

    def git(*args: str) -> bytes:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, check=True).stdout

    try:
        commit = git("rev-parse", "--short", f"{rev}^{{commit}}").decode().strip()
    except subprocess.CalledProcessError:
        raise SystemExit(f"--baseline: {rev!r} is not a commit of this repository") from None
    root = WORK / f"baseline-{commit}"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(root)], input=git("archive", commit, "server", "web"), check=True)
    return commit, root


def prepare() -> list[str]:
    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / "logs").mkdir(exist_ok=True)
    return payload.write(WORK / "payload.json")


class Server:
    """One server process on loopback, pinned to `core`."""

    def __init__(
        self,
        name: str,
        args: list[str],
        port: int,
        env: dict[str, str],
        core: str = SERVER_CORE,
        interpreter: str = sys.executable,
    ) -> None:
        self.name = name
        self.port = port
        slug = "".join(c if c.isalnum() else "-" for c in name.lower())
        self.log_path = WORK / "logs" / f"{slug}-{port}.log"
        log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            ["taskset", "-c", core, interpreter, *args],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()

    @property
    def pid(self) -> int:
        # taskset execs the interpreter in place, so the pid is the server's own.
        return self.process.pid

    def wait_listening(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited at start; see {self.log_path}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not listen on port {self.port} within {timeout:.0f}s")

    def probe(self) -> dict[str, int] | None:
        """Tasks and suspended generators left in the process (summed over a gunicorn master and worker), or None
        if a process did not answer in time (a busy peer's probe thread waits for the GIL)."""
        total = {"tasks": 0, "generators": 0, "threads": 0}
        for pid in process_tree(self.pid):
            path = probe.socket_path(WORK, pid)
            if not os.path.exists(path):
                continue
            try:
                answer = probe.ask(path, timeout=20.0)
            except OSError:  # TimeoutError included
                return None
            for key, value in answer.items():
                total[key] = total.get(key, 0) + value
        return total

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        for pid_file in WORK.glob("probe-*.sock"):
            # Sockets of processes that are gone; a live server's is recreated at its start.
            pid = int(pid_file.stem.split("-")[1])
            if not os.path.exists(f"/proc/{pid}"):
                pid_file.unlink(missing_ok=True)


def run_client(spec: Spec, timeout: float | None = None) -> dict[str, Any]:
    """Run the load client on its own core and return what it measured."""
    args = ["taskset", "-c", CLIENT_CORE, sys.executable, "-m", "bench.client", json.dumps(asdict(spec))]
    limit = timeout if timeout is not None else spec.deadline + 60
    done = subprocess.run(args, cwd=ROOT, capture_output=True, timeout=limit, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"load client failed ({done.returncode}): {done.stderr.decode()[-2000:]}")
    return dict(json.loads(done.stdout.decode().strip().splitlines()[-1]))
