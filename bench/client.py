"""The load client: raw asyncio sockets, one process, pinned by the runner to its own core.

``python -m bench.client SPEC_JSON`` runs one measurement against one server and prints one JSON object.

Each connection is a `Conn` protocol that writes a GET, parses the HTTP/1.1 response head and the chunked body
itself, and counts frames by their delimiter (``\\n\\n`` or ``\\r\\n\\r\\n`` for SSE, ``\\n`` for NDJSON) in the
de-chunked bytes. Every network read is timestamped once, and each frame completed by that read gets its time:
frames that arrive in one read did arrive together. Connections are kept alive and reused stream after stream.

Modes (`Spec.mode`):

* ``throughput``: every connection runs streams back to back; frames received and server CPU are counted inside
  a window that opens after a warm-up.
* ``paced``: stream starts are spread evenly over one intended stream length (``ramp``), then each connection
  runs streams back to back until ``duration`` has passed; streams started after the ramp are measured (and
  every connection gets at least one), so the numbers describe a steady load of `connections` streams.
* ``idle``: open every stream, wait until each has its response head and a heartbeat, hold, read server memory.
* ``leave``: paced background streams plus `leavers` that close their connection after some frames (or seconds)
  and report when they left, so the runner can compare with when the upstream saw its request closed.
* ``storm``: a reconnect storm, as after a server restart: every connection is started in one tight loop (no
  gate), each sends its request as soon as it is connected and leaves at its first frame; reports the first frames'
  times from the start of the storm and how many connection attempts the kernel dropped (listen overflows).
* ``resume``: create `connections` resumable streams (``path``, read whole, one at a time) and report how much
  the server's retained logs (``/healthz``) and memory grew per stream; then `replays` reconnecting readers, one
  at a time on new connections, each replaying one of them from its start (``/api/streams/{id}?after=0``): the
  time from sending the request to the body's last byte, checked to hold every event.

Server CPU and memory are read from /proc at the window's edges by this process, so they line up with its clock.
"""

from __future__ import annotations

import asyncio
import errno
import json
import re
import resource
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any, cast

from bench.procstat import (
    core_busy_seconds,
    cpu_seconds,
    listen_overflows,
    process_tree,
    rss_bytes,
    write_syscalls,
)

_HEAD, _SIZE, _DATA, _DATA_END, _TRAILER, _LENGTH, _UNTIL_EOF = range(7)
# A token's generation stamp from the fake upstream (bench.upstream: ``~t<µs>~`` at the end of its text).
_STAMP = re.compile(rb"~t(\d+)~")
_STAMP_TAIL = 24  # longer than any stamp: what a read keeps for the next one, in case a stamp is split
# Relay-added lag is kept as these percentiles (for the report's distribution chart), plus p50/p99 on their own.
LAG_PERCENTILES = (1, 5, 10, 25, 50, 75, 90, 95, 99, 99.9)


@dataclass
class Spec:
    port: int
    path: str  # "{i}" is the connection's index and "{s}" the stream's sequence number on that connection
    mode: str = "throughput"
    # A JSON body (with the same placeholders) makes the request a POST: an OpenAI-style chat completions request.
    body: str = ""
    # The upstream stamps each token (bench.upstream ``s=1``): count tokens by their stamps instead of frames by
    # their delimiter, and record each one's relay-added lag (receipt minus stamp).
    stamps: bool = False
    # paced: every connection runs one stream, and the CPU window is the whole wave (from the first request to the
    # last stream's end), so an overloaded server's figures cover everything it was asked, not a slice of time.
    one_wave: bool = False
    headers: str = ""  # extra request header lines, each ending with CRLF (LiteLLM's master key)
    connections: int = 1
    delimiter: str = "\n\n"
    accept: str = "text/event-stream"
    tokens: int = 50  # token frames per stream (the paced metrics are about these)
    delay: float = 0.02  # the intended seconds between tokens, for the paced metrics
    warmup: float = 0.5
    duration: float = 2.0
    ramp: float = 1.0
    hold: float = 1.0
    heartbeat_wait: float = 10.0  # idle: longest wait for every stream's first heartbeat
    leavers: int = 0
    leave_path: str = ""
    leave_after_frames: tuple[int, int] = (5, 25)
    leave_after_seconds: float = 0.0  # > 0: leavers leave this long after their request, frames or not
    upstream_port: int = 0  # leave: the fake upstream to ask when it saw each leaver's request closed
    close_wait: float = 3.0  # leave: how long after the last leaver left to wait for the upstream closes
    leave_spread: float = 1.0  # leave: seconds over which the leavers' requests arrive
    replays: int = 0  # resume: reconnecting readers, one after another
    server_pid: int = 0
    # Connection handshakes in flight at once; 0: every connection at once, as real clients do (issue 17: a ramp
    # hid a listen-queue overflow). Only the idle scenario, which is about memory, opens in steps.
    connect_concurrency: int = 0
    deadline: float = 120.0  # hard cap on the whole run


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


@dataclass
class Run:
    spec: Spec
    loop: asyncio.AbstractEventLoop
    pids: list[int]
    started: float = 0.0
    window_start: float = 0.0
    window_end: float = 0.0
    measure_until: float = 0.0  # paced: streams start until then
    window_frames: int = 0
    window_streams: int = 0  # streams that ended inside the window
    streams_done: int = 0
    bad_status: int = 0
    broken: int = 0  # connections lost mid-stream or refused
    ttff: list[float] = field(default_factory=list)
    stretch: list[float] = field(default_factory=list)
    lateness: list[float] = field(default_factory=list)
    lag: list[float] = field(default_factory=list)
    relay_lag: list[float] = field(default_factory=list)  # stamps mode: receipt minus the upstream's stamp
    # The same lags by the token's place in its stream: a stream's first token shares the relay with other streams'
    # request setup, its last with their ends; the middle ones only with other tokens.
    relay_lag_first: list[float] = field(default_factory=list)
    relay_lag_middle: list[float] = field(default_factory=list)
    relay_lag_last: list[float] = field(default_factory=list)
    short_streams: int = 0  # measured streams that ended with fewer token frames than expected
    left: dict[str, float] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)
    writes: dict[str, int | None] = field(default_factory=dict)  # the server's write syscalls at the edges
    active: bool = True
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    pending: int = 0  # connections still running their streams

    def sample(self, name: str) -> None:
        self.cpu[f"core0_{name}"] = core_busy_seconds("cpu0")
        self.cpu[f"server_{name}"] = cpu_seconds(self.pids)
        self.cpu[f"client_{name}"] = time.process_time()
        self.writes[name] = write_syscalls(self.pids)
        self.cpu[f"wall_{name}"] = time.monotonic()

    def conn_finished(self) -> None:
        self.pending -= 1
        if self.pending <= 0:
            self.finished.set()


class Conn(asyncio.Protocol):
    """One client connection running its streams; all parsing is inline for speed (it runs once per read)."""

    def __init__(self, run: Run, index: int, leaver: bool = False) -> None:
        self.run = run
        # In leave mode the run is over when the leavers are: the background load only has to be there.
        self.counts = leaver or run.spec.mode != "leave"
        self.spec = run.spec
        self.index = index
        self.leaver = leaver
        self.delim = self.spec.delimiter.encode()
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.state = _HEAD
        self.need = 0
        self.tail = b""
        self.stamp_tail = b""
        self.stamps_seen = 0  # this stream's stamped tokens so far (a read can hold several chunks, each with some)
        self.seq = 0
        self.frames = 0
        self.status = 0
        self.sent_at = 0.0
        self.head_at = 0.0
        self.measured = False
        self.measured_any = False
        self.arrivals: list[tuple[float, int]] = []
        self.leave_after = 0
        self.done = False

    # -- the stream lifecycle ---------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def start_stream(self) -> None:
        if self.transport is None or self.transport.is_closing():
            self.finish()
            return
        spec = self.spec
        self.seq += 1
        template = spec.leave_path if self.leaver else spec.path
        path = template.replace("{i}", str(self.index)).replace("{s}", str(self.seq))
        self.state = _HEAD
        self.frames = 0
        self.tail = b""
        self.stamp_tail = b""
        self.stamps_seen = 0
        self.arrivals = []
        self.status = 0
        now = time.monotonic()
        self.measured = spec.mode in ("paced", "leave") and not self.leaver and now >= self.run.window_start
        self.measured_any = self.measured_any or self.measured
        self.sent_at = now
        head = f"Host: 127.0.0.1\r\nAccept: {spec.accept}\r\nUser-Agent: bench\r\n{spec.headers}"
        if spec.body:
            body = spec.body.replace("{i}", str(self.index)).replace("{s}", str(self.seq)).encode()
            self.transport.write(
                f"POST {path} HTTP/1.1\r\n{head}Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                f"\r\n".encode()
                + body
            )
        else:
            self.transport.write(f"GET {path} HTTP/1.1\r\n{head}\r\n".encode())
        if self.leaver and spec.leave_after_seconds > 0:
            self.run.loop.call_later(spec.leave_after_seconds, self.leave)

    def stream_done(self, now: float) -> None:
        run = self.run
        run.streams_done += 1
        if run.window_start <= now < run.window_end:
            run.window_streams += 1
        if self.measured:
            self._paced_metrics()
        if self.leaver:  # the reply ended before the leaver meant to leave: nothing to measure
            self.finish()
            return
        if not run.active:
            self.finish()
        elif self.spec.mode == "throughput":
            if now < run.window_end:
                self.start_stream()
            else:
                self.finish()
        elif self.spec.mode == "paced" and self.spec.one_wave:
            self.finish()
        elif self.spec.mode == "paced" or self.spec.mode == "leave":
            if now < run.measure_until or (self.spec.mode == "paced" and not self.measured_any):
                self.start_stream()
            else:
                self.finish()
        else:
            self.finish()

    def leave(self) -> None:
        if self.done or self.transport is None:
            return
        self.run.left[f"track{self.index}"] = time.monotonic()
        # close(), not abort(): a browser tab that closes sends FIN, and the server must notice that.
        self.transport.close()
        self.finish()

    def finish(self) -> None:
        if not self.done:
            self.done = True
            if self.counts:
                self.run.conn_finished()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.done:
            if self.state == _UNTIL_EOF:
                self.stream_done(time.monotonic())
            else:
                self.run.broken += 1
            self.finish()

    # -- metrics ----------------------------------------------------------------------------------------------

    def _paced_metrics(self) -> None:
        run = self.run
        n = self.spec.tokens
        delay = self.spec.delay
        if self.frames < n or not self.arrivals:
            run.short_streams += 1
            return
        token_at: list[float] = []
        for at, total in self.arrivals:
            while len(token_at) < total and len(token_at) < n:
                token_at.append(at)
            if len(token_at) >= n:
                break
        first = token_at[0]
        last = token_at[-1]
        run.ttff.append(first - self.sent_at)
        if n > 1:
            run.stretch.append((last - first) / ((n - 1) * delay))
        # The ideal pacer sends token i (1-based) at request + i * delay, as the paced peers' sleep-before does.
        run.lateness.append(last - (self.sent_at + n * delay))
        run.lag.extend(at - (first + i * delay) for i, at in enumerate(token_at))

    # -- parsing ----------------------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        buf = self.buffer + data if self.buffer else data
        pos = 0
        end = len(buf)
        counted = 0
        state = self.state
        while pos < end:
            if state == _DATA:
                take = min(self.need, end - pos)
                piece = buf[pos : pos + take]
                counted += self._count(piece)
                pos += take
                self.need -= take
                if self.need == 0:
                    state = _DATA_END
            elif state == _SIZE:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    break
                size = int(buf[pos:eol].split(b";", 1)[0], 16)
                pos = eol + 2
                if size:
                    self.need = size
                    state = _DATA
                else:
                    state = _TRAILER
            elif state == _DATA_END:
                if end - pos < 2:
                    break
                pos += 2
                state = _SIZE
            elif state == _HEAD:
                eol = buf.find(b"\r\n\r\n", pos)
                if eol < 0:
                    break
                head = buf[pos:eol].lower()
                pos = eol + 4
                self.status = int(head[9:12])
                self.head_at = now
                if self.status != 200:
                    self.run.bad_status += 1
                if b"transfer-encoding: chunked" in head:
                    state = _SIZE
                elif b"content-length:" in head:
                    start = head.index(b"content-length:") + 15
                    self.need = int(head[start : head.find(b"\r\n", start) if b"\r\n" in head[start:] else None])
                    state = _LENGTH if self.need else _TRAILER
                    if not self.need:
                        self.buffer = buf[pos:]
                        self._end_of_stream(now, counted)
                        return
                else:
                    state = _UNTIL_EOF
            elif state == _TRAILER:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    break
                line_empty = eol == pos
                pos = eol + 2
                if line_empty:
                    self.state = _HEAD
                    self.buffer = buf[pos:]
                    self._end_of_stream(now, counted)
                    return
            elif state == _LENGTH:
                take = min(self.need, end - pos)
                counted += self._count(buf[pos : pos + take])
                pos += take
                self.need -= take
                if self.need == 0:
                    self.state = _HEAD
                    self.buffer = buf[pos:]
                    self._end_of_stream(now, counted)
                    return
            else:  # _UNTIL_EOF
                counted += self._count(buf[pos:])
                pos = end
        self.state = state
        self.buffer = buf[pos:] if pos < end else b""
        if counted:
            self._frames(now, counted)

    def _count(self, piece: bytes) -> int:
        if self.spec.stamps:
            return self._count_stamps(piece)
        delim = self.delim
        if self.tail:
            joined = self.tail + piece
            found = joined.count(delim)
        else:
            joined = piece
            found = piece.count(delim)
        keep = len(delim) - 1
        self.tail = b"" if not keep or joined.endswith(delim) else joined[-keep:]
        return found

    def _count_stamps(self, piece: bytes) -> int:
        """Tokens completed in `piece` (with what the last read kept), each one's lag recorded if measured."""
        joined = self.stamp_tail + piece if self.stamp_tail else piece
        found = 0
        end = 0
        run = self.run
        lags = run.relay_lag if self.measured else None
        now_us = time.monotonic_ns() // 1000
        last = self.spec.tokens - 1
        place = self.stamps_seen
        for match in _STAMP.finditer(joined):
            found += 1
            end = match.end()
            if lags is not None:
                lag = (now_us - int(match.group(1))) / 1e6
                lags.append(lag)
                by_place = run.relay_lag_first if place == 0 else run.relay_lag_last if place == last else None
                (run.relay_lag_middle if by_place is None else by_place).append(lag)
            place += 1
        self.stamps_seen = place
        self.stamp_tail = joined[max(end, len(joined) - _STAMP_TAIL) :]
        return found

    def _frames(self, now: float, counted: int) -> None:
        self.frames += counted
        run = self.run
        if self.spec.mode == "storm":
            if not self.done:
                run.ttff.append(now - run.started)
                self.finish()
                if self.transport is not None:
                    self.transport.abort()
            return
        if run.window_start <= now < run.window_end:
            run.window_frames += counted
        if self.measured:
            self.arrivals.append((now, self.frames))
        if self.leaver and not self.spec.leave_after_seconds and self.frames >= self.leave_after:
            self.leave()

    def _end_of_stream(self, now: float, counted: int) -> None:
        if counted:
            self._frames(now, counted)
        if not self.done:
            self.stream_done(now)


async def _connect(run: Run, index: int, gate: asyncio.Semaphore, leaver: bool = False) -> Conn | None:
    async with gate:
        try:
            _, conn = await run.loop.create_connection(lambda: Conn(run, index, leaver), "127.0.0.1", run.spec.port)
        except OSError:
            run.broken += 1
            return None
    return conn


async def _open(run: Run, count: int, leaver: bool = False) -> list[Conn]:
    gate = asyncio.Semaphore(run.spec.connect_concurrency or max(1, count))
    conns = await asyncio.gather(*(_connect(run, i, gate, leaver) for i in range(count)))
    return [c for c in conns if c is not None]


def _close_all(conns: list[Conn]) -> None:
    for conn in conns:
        if conn.transport is not None:
            conn.transport.abort()  # RST, so no TIME_WAIT is left behind for the next run's ports


def _rates(run: Run) -> dict[str, Any]:
    cpu = run.cpu
    out: dict[str, Any] = {}
    if "wall_start" in cpu and "wall_end" in cpu:
        wall = cpu["wall_end"] - cpu["wall_start"]
        server = cpu["server_end"] - cpu["server_start"]
        client = cpu["client_end"] - cpu["client_start"]
        start, end = run.writes.get("start"), run.writes.get("end")
        writes = end - start if start is not None and end is not None else None
        out.update(
            window_seconds=wall,
            frames=run.window_frames,
            frames_per_second=run.window_frames / wall if wall > 0 else 0.0,
            server_cpu_seconds=server,
            server_cpu_percent=100 * server / wall if wall > 0 else 0.0,
            server_cpu_us_per_frame=1e6 * server / run.window_frames if run.window_frames else None,
            window_streams=run.window_streams,
            server_cpu_us_per_stream=1e6 * server / run.window_streams if run.window_streams else None,
            # write(2)/writev(2) calls of the server process (/proc/<pid>/io syscw): how many frames one write carried.
            server_writes=writes,
            frames_per_write=run.window_frames / writes if writes else None,
            client_cpu_percent=100 * client / wall if wall > 0 else 0.0,
            # Whatever else ran on the server's core meanwhile: this machine is shared, so say how much.
            core0_other_percent=100 * max(0.0, cpu["core0_end"] - cpu["core0_start"] - server) / wall if wall else 0.0,
        )
    return out


def _paced_summary(run: Run) -> dict[str, Any]:
    return {
        "measured_streams": len(run.ttff),
        "short_streams": run.short_streams,
        "ttff_p50": _percentile(run.ttff, 50),
        "ttff_p99": _percentile(run.ttff, 99),
        "stretch_p50": _percentile(run.stretch, 50),
        "stretch_p99": _percentile(run.stretch, 99),
        "lateness_p50": _percentile(run.lateness, 50),
        "lateness_p99": _percentile(run.lateness, 99),
        "lag_p50": _percentile(run.lag, 50),
        "lag_p99": _percentile(run.lag, 99),
        "relay_lag_p50": _percentile(run.relay_lag, 50),
        "relay_lag_p99": _percentile(run.relay_lag, 99),
        "relay_lag_first_p99": _percentile(run.relay_lag_first, 99),
        "relay_lag_middle_p99": _percentile(run.relay_lag_middle, 99),
        "relay_lag_last_p99": _percentile(run.relay_lag_last, 99),
        "relay_lag_percentiles": [[q, _percentile(run.relay_lag, q)] for q in LAG_PERCENTILES] if run.relay_lag else [],
        "relay_lag_samples": len(run.relay_lag),
        "relay_lag_samples_by_place": [len(run.relay_lag_first), len(run.relay_lag_middle), len(run.relay_lag_last)],
    }


async def _throughput(run: Run) -> dict[str, Any]:
    spec = run.spec
    conns = await _open(run, spec.connections)
    run.pending = len(conns)
    run.started = time.monotonic()
    run.window_start = run.started + spec.warmup
    run.window_end = run.window_start + spec.duration
    run.loop.call_at(_loop_time(run, run.window_start), run.sample, "start")
    for conn in conns:
        conn.start_stream()
    await asyncio.sleep(max(0.0, run.window_end - time.monotonic()))
    run.sample("end")
    run.active = False
    _close_all(conns)
    return {"connections": len(conns), **_rates(run)}


def _loop_time(run: Run, monotonic_at: float) -> float:
    return run.loop.time() + (monotonic_at - time.monotonic())


async def _paced(run: Run, leavers: int = 0) -> dict[str, Any]:
    spec = run.spec
    conns = await _open(run, spec.connections)
    leaving = await _open(run, leavers, leaver=True) if leavers else []
    run.pending = len(leaving) if spec.mode == "leave" else len(conns)
    run.started = time.monotonic()
    run.window_start = run.started + spec.ramp
    run.measure_until = run.window_end = run.window_start + spec.duration
    if spec.one_wave:
        run.window_end = run.started + spec.deadline
        run.sample("start")
    else:
        run.loop.call_at(_loop_time(run, run.window_start), run.sample, "start")
        run.loop.call_at(_loop_time(run, run.window_end), run.sample, "end")
    for index, conn in enumerate(conns):
        # Spread the first starts over one intended stream length: arrivals, not a thundering herd.
        run.loop.call_at(_loop_time(run, run.started + spec.ramp * index / max(1, len(conns))), conn.start_stream)
    lo, hi = spec.leave_after_frames
    for index, conn in enumerate(leaving):
        conn.leave_after = lo + index % (hi - lo + 1)
        # Leavers arrive evenly over `leave_spread` seconds once the background load is up (200/s by default):
        # a burst would measure how fast a server starts requests, which the under-load case covers.
        run.loop.call_at(
            _loop_time(run, run.window_start + spec.leave_spread * index / len(leaving)), conn.start_stream
        )
    try:
        await asyncio.wait_for(run.finished.wait(), timeout=max(1.0, spec.deadline - (time.monotonic() - run.started)))
        timed_out = False
    except TimeoutError:
        timed_out = True
    closes: dict[str, Any] = {}
    if leavers:
        # The background load keeps running while the upstream reports: "under load" includes the close.
        closes = await _upstream_closes(run)
    if "wall_end" not in run.cpu:
        run.sample("end")
    run.active = False
    unfinished = sum(1 for c in conns if not c.done)
    _close_all(conns + leaving)
    result = {"connections": len(conns), "timed_out": timed_out, "unfinished": unfinished, **_rates(run)}
    result.update(_paced_summary(run))
    if leavers:
        result.update(leavers=len(leaving), left=len(run.left), **closes)
    return result


async def _get_json(port: int, path: str) -> Any:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        data = await reader.read()
    finally:
        writer.close()
    return json.loads(data.split(b"\r\n\r\n", 1)[1])


async def _upstream_closes(run: Run) -> dict[str, Any]:
    """Ask the fake upstream until every request whose client left is closed (or complete), or time runs out."""
    spec = run.spec
    last_left = max(run.left.values(), default=time.monotonic())
    records: dict[str, dict[str, float | None]] = {}
    while True:
        records = await _get_json(spec.upstream_port, "/stats")
        pending = [
            k for k in run.left if not records.get(k, {}).get("closed") and not records.get(k, {}).get("completed")
        ]
        if not pending or time.monotonic() > last_left + spec.close_wait:
            break
        await asyncio.sleep(0.02)
    latencies: list[float] = []
    not_closed = 0
    ran_to_end = 0
    never_requested = 0
    for key, left_at in run.left.items():
        if key not in records:
            # The client left before the relay sent its upstream request: nothing to close, nothing paid for.
            never_requested += 1
            continue
        record = records[key]
        closed = record.get("closed")
        if closed is not None:
            latencies.append(max(0.0, closed - left_at))
        else:
            not_closed += 1
            if record.get("completed") is not None:
                ran_to_end += 1
    return {
        "closed": len(latencies),
        "not_closed": not_closed,  # still open when the wait ended, or never closed early
        "ran_to_end": ran_to_end,  # the upstream generated the whole reply for a client that had left
        "never_requested": never_requested,
        "close_p50": _percentile(latencies, 50),
        "close_p99": _percentile(latencies, 99),
        "close_max": max(latencies) if latencies else None,
        "close_wait": spec.close_wait,
    }


async def _idle(run: Run) -> dict[str, Any]:
    spec = run.spec
    rss_before = rss_bytes(run.pids)
    cpu_before = cpu_seconds(run.pids)
    conns = await _open(run, spec.connections)
    run.pending = len(conns)
    started = time.monotonic()
    for conn in conns:
        conn.start_stream()
    # A stream is held once its head and its first heartbeat have arrived (our server sends the head lazily,
    # with the first frame); then everyone is held together for `hold` seconds.
    deadline = started + spec.heartbeat_wait
    while time.monotonic() < deadline:
        if all(c.frames > 0 or c.transport is None for c in conns):
            break
        await asyncio.sleep(0.05)
    ready_after = time.monotonic() - started
    await asyncio.sleep(spec.hold)
    rss_after = rss_bytes(run.pids)
    held = sum(1 for c in conns if c.transport is not None and c.status == 200 and c.frames > 0)
    accepted = sum(1 for c in conns if c.status == 200)
    cpu_after = cpu_seconds(run.pids)
    run.active = False
    _close_all(conns)
    return {
        "connections": len(conns),
        "accepted": accepted,
        "held": held,
        "ready_seconds": ready_after,
        "rss_before": rss_before,
        "rss_after": rss_after,
        "kib_per_connection": (rss_after - rss_before) / 1024 / max(1, spec.connections),
        "server_cpu_seconds": cpu_after - cpu_before,
    }


async def _storm(run: Run) -> dict[str, Any]:
    spec = run.spec
    overflows_before = listen_overflows()
    run.started = time.monotonic()
    socks: list[socket.socket] = []
    for _ in range(spec.connections):
        sock = socket.socket()
        sock.setblocking(False)
        code = sock.connect_ex(("127.0.0.1", spec.port))
        if code in (0, errno.EINPROGRESS):
            socks.append(sock)
        else:
            sock.close()
            run.broken += 1
    connect_seconds = time.monotonic() - run.started
    conns: list[Conn] = []
    run.pending = len(socks)  # before the first connection can finish
    for index, sock in enumerate(socks):
        # The connect may still be in progress: the transport holds the request until the socket is writable.
        _, conn = await run.loop.create_connection(lambda index=index: Conn(run, index), sock=sock)
        conns.append(conn)
        conn.start_stream()
    try:
        await asyncio.wait_for(run.finished.wait(), timeout=spec.deadline)
        timed_out = False
    except TimeoutError:
        timed_out = True
    overflows_after = listen_overflows()
    _close_all(conns)
    return {
        "connections": spec.connections,
        "first_frames": len(run.ttff),
        "connect_seconds": connect_seconds,
        "timed_out": timed_out,
        "listen_overflows": (
            overflows_after - overflows_before if overflows_before is not None and overflows_after is not None else None
        ),
        "ttff_p50": _percentile(run.ttff, 50),
        "ttff_p99": _percentile(run.ttff, 99),
        "ttff_max": max(run.ttff, default=None),
    }


_LAST_CHUNK = b"\r\n0\r\n\r\n"  # the previous chunk's end, then the last chunk and an empty trailer


class _Fetch(asyncio.Protocol):
    """One request on a new connection, sent as soon as it is connected; notes when the last chunk of a chunked
    body arrives. Only the time is taken as data arrives: the response is parsed afterwards (`_chunked`)."""

    def __init__(self, request: bytes, done: asyncio.Future[None]) -> None:
        self.request = request
        self.done = done
        self.parts: list[bytes] = []
        self.tail = b""
        self.sent_at = 0.0
        self.ended_at = 0.0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.sent_at = time.monotonic()
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        self.parts.append(data)
        self.tail = (self.tail + data)[-len(_LAST_CHUNK) :]
        if self.tail == _LAST_CHUNK and not self.done.done():
            self.ended_at = now
            self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


def _chunked(raw: bytes) -> tuple[bytes, bytes]:
    """The head (lower-cased) and the de-chunked body of a whole chunked response; ValueError if it is not one."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" not in head.lower():
        raise ValueError(raw[:300])
    body = bytearray()
    pos = 0
    while size := int(rest[pos : rest.index(b"\r\n", pos)], 16):
        start = rest.index(b"\r\n", pos) + 2
        body += rest[start : start + size]
        pos = start + size + 2
    return head.lower(), bytes(body)


async def _fetch(spec: Spec, path: str, frames: int) -> tuple[float, bytes]:
    """GET `path` as SSE on a new connection: the seconds from sending the request to the body's last byte, and
    the response head. Raises unless the answer is a 200 with `frames` SSE blocks."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\nUser-Agent: bench\r\n\r\n"
    _, fetch = await loop.create_connection(lambda: _Fetch(request.encode(), done), "127.0.0.1", spec.port)
    try:
        await asyncio.wait_for(done, timeout=10)
    finally:
        if fetch.transport is not None:
            fetch.transport.abort()  # RST: no TIME_WAIT left behind
    raw = b"".join(fetch.parts)
    head, body = _chunked(raw)
    if not head.startswith(b"http/1.1 200") or not fetch.ended_at or body.count(b"\n\n") != frames:
        raise RuntimeError(f"{path}: expected a 200 with {frames} SSE blocks, got {raw[:300]!r}")
    return fetch.ended_at - fetch.sent_at, head


async def _resume(run: Run) -> dict[str, Any]:
    spec = run.spec
    before, rss_before = await _get_json(spec.port, "/healthz"), rss_bytes(run.pids)
    ids: list[str] = []
    for index in range(spec.connections):
        # A resumable stream opens with `event: stream`, then its tokens and `done`.
        _, head = await _fetch(spec, spec.path.replace("{i}", str(index)), spec.tokens + 2)
        ids.append(head.split(b"x-stream-id: ", 1)[1].split(b"\r\n", 1)[0].decode())
    after, rss_after = await _get_json(spec.port, "/healthz"), rss_bytes(run.pids)
    retained = after["retained_streams"] - before["retained_streams"]
    cpu_before = cpu_seconds(run.pids)
    times = [
        (await _fetch(spec, f"/api/streams/{ids[k % len(ids)]}?after=0", spec.tokens + 1))[0]
        for k in range(spec.replays)
    ]
    cpu = cpu_seconds(run.pids) - cpu_before
    return {
        "streams": spec.connections,
        "events_per_stream": spec.tokens + 1,
        "retained_added": retained,
        "log_bytes_per_stream": (after["log_bytes"] - before["log_bytes"]) / retained if retained else None,
        "rss_bytes_per_stream": (rss_after - rss_before) / max(1, spec.connections),
        "replays": len(times),
        "replay_p50": _percentile(times, 50),
        "replay_p99": _percentile(times, 99),
        "replay_max": max(times, default=None),
        "replay_server_cpu_us": 1e6 * cpu / len(times) if times else None,
    }


async def run_spec(spec: Spec) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    run = Run(spec=spec, loop=loop, pids=process_tree(spec.server_pid) if spec.server_pid else [])
    if spec.mode == "throughput":
        result = await _throughput(run)
    elif spec.mode == "paced":
        result = await _paced(run)
    elif spec.mode == "leave":
        result = await _paced(run, leavers=spec.leavers)
    elif spec.mode == "idle":
        result = await _idle(run)
    elif spec.mode == "storm":
        result = await _storm(run)
    elif spec.mode == "resume":
        result = await _resume(run)
    else:
        raise ValueError(f"unknown mode {spec.mode!r}")
    result.update(
        mode=spec.mode,
        streams_done=run.streams_done,
        bad_status=run.bad_status,
        broken=run.broken,
    )
    return result


def main() -> None:
    raw = json.loads(sys.argv[1])
    if "leave_after_frames" in raw:
        raw["leave_after_frames"] = tuple(raw["leave_after_frames"])
    spec = Spec(**raw)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        import uvloop

        result = uvloop.run(run_spec(spec))
    except ImportError:  # pragma: no cover - uvloop is a dependency of the project
        result = asyncio.run(run_spec(spec))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
