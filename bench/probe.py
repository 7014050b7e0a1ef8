"""What is still running inside a server process: asked over a Unix socket by the disconnect scenario.

A daemon thread answers each connection with one JSON line. It inspects the process through `gc`, so it needs no
hook in the server's event loop and works the same for aiohttp, uvicorn and gunicorn's threads: live asyncio tasks
that are not done, and unfinished coroutines, async generators and generators whose code is ours or a peer's (a
generator a disconnect left suspended is exactly what "nothing left running" is about). Threads are counted too,
for gunicorn's thread workers.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import socket
import threading
import types
from pathlib import Path

ENV = "BENCH_PROBE_DIR"
# Code of ours (server/, or a baseline's under BENCH_SERVER_ROOT) and of the peers (bench/peers/): the only
# generators a disconnect can strand.
_ROOT = Path(__file__).resolve().parent.parent
_SERVER = Path(os.environ.get("BENCH_SERVER_ROOT") or _ROOT).resolve() / "server"
_WATCHED = (f"{_SERVER}{os.sep}", f"{_ROOT / 'bench' / 'peers'}{os.sep}")


def socket_path(directory: str | Path, pid: int) -> str:
    return str(Path(directory) / f"probe-{pid}.sock")


def _frame(obj: object) -> types.FrameType | None:
    if isinstance(obj, types.CoroutineType):
        return obj.cr_frame
    if isinstance(obj, types.AsyncGeneratorType):
        return obj.ag_frame
    if isinstance(obj, types.GeneratorType):
        return obj.gi_frame
    return None


def snapshot() -> dict[str, int]:
    tasks = 0
    suspended = 0
    for obj in gc.get_objects():
        if isinstance(obj, asyncio.Task):
            if not obj.done():
                tasks += 1
            continue
        frame = _frame(obj)
        # A finished generator or coroutine has no frame; one with a frame has not run to its end.
        if frame is not None and any(part in frame.f_code.co_filename for part in _WATCHED):
            suspended += 1
    return {"tasks": tasks, "generators": suspended, "threads": threading.active_count()}


def _serve(path: str) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen(4)
        while True:
            conn, _ = listener.accept()
            with conn:
                conn.sendall(json.dumps(snapshot()).encode() + b"\n")


def install() -> None:
    """Start answering probes, if the runner asked for them (``BENCH_PROBE_DIR``)."""
    directory = os.environ.get(ENV)
    if not directory:
        return
    path = socket_path(directory, os.getpid())
    if os.path.exists(path):
        os.unlink(path)
    threading.Thread(target=_serve, args=(path,), name="bench-probe", daemon=True).start()


def ask(path: str, timeout: float = 5.0) -> dict[str, int]:
    """The snapshot of the process listening on `path` (from the runner)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout)
        conn.connect(path)
        data = b""
        while not data.endswith(b"\n"):
            part = conn.recv(65536)
            if not part:
                break
            data += part
    return dict(json.loads(data))
