"""The five scenarios of issue 6, the reconnect storm of issue 12, resuming, and the load client's own ceiling.
Each returns flat result rows.

Repeats are interleaved (repeat 1 of every target and size, then repeat 2, ...) so that a noisy moment on this
shared machine hurts every target a little rather than one target a lot. Servers are started once per scenario
and reused across its sizes and repeats; the capacity scenario starts each server fresh, since it reads memory.
"""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from bench import targets as t
from bench.client import Spec
from bench.runner import CLIENT_CORE, Server, environment, free_port, run_client

Row = dict[str, Any]
Log = Callable[[str], None]


@dataclass
class Plan:
    """Sizes and durations; `quick()` shrinks them for a smoke run."""

    repeats: int = 3
    uvloop: bool = True
    throughput_levels: tuple[int, ...] = (1, 100, 1000)
    throughput_tokens: int = 200
    warmup: float = 0.5
    duration: float = 1.5
    paced_levels: tuple[int, ...] = (1000, 5000)
    # Sizes at which every server is far past one core: one repeat of these keeps `make bench` near 15 minutes,
    # and their spread is not what they are there to show.
    heavy_from: int = 5000
    heavy_repeats: int = 1
    disconnect_repeats: int = 1  # 200 leavers give 200 samples per run; the latencies are not a noisy ratio
    paced_tokens: int = 50
    paced_delay: float = 0.02
    paced_duration: float = 1.5
    idle_connections: int = 10_000
    idle_repeats: int = 1
    leavers: int = 200
    disconnect_load: int = 500
    disconnect_tokens: int = 100  # 2 s replies: a relay that never closes early shows as "ran to the end"
    relay_tokens: int = 200
    relay_connections: int = 100
    relay_paced_streams: int = 500
    close_wait: float = 3.0
    storm_connections: int = 1000  # clients connecting in the same instant, as after a restart
    storm_deadline: float = 60.0
    what_if: bool = True  # also measure bench.whatif's proposals in the full-relay scenario
    targets: tuple[str, ...] = field(default_factory=tuple)  # names to run; empty: all
    # --baseline: ours from another commit's server/ (exported under baseline_root), in the full-relay scenario.
    baseline: str = ""
    baseline_root: str = ""
    resume_tokens: tuple[int, ...] = (200, 1000)  # reply sizes of the retained streams; replays of each
    resume_streams: int = 200  # retained streams created per size and repeat (the memory per stream)
    resume_replays: int = 200  # reconnecting readers per size and repeat, one at a time (the replay latency)

    @classmethod
    def quick(cls) -> Plan:
        return cls(
            repeats=1,
            throughput_levels=(1, 50, 200),
            warmup=0.3,
            duration=0.8,
            paced_levels=(200, 500),
            paced_duration=1.0,
            idle_connections=1000,
            leavers=50,
            disconnect_load=100,
            relay_connections=20,
            relay_paced_streams=100,
            close_wait=2.0,
            storm_connections=500,
            resume_streams=50,
            resume_replays=50,
        )

    def selected(self, candidates: Sequence[t.Target]) -> list[t.Target]:
        if not self.targets:
            return list(candidates)
        return [c for c in candidates if c.kind == "ours" or any(n.lower() in c.name.lower() for n in self.targets)]


@contextmanager
def servers(
    chosen: Sequence[t.Target], scenario: str, plan: Plan, *, upstream: str = "", threads: int = 1000
) -> Iterator[dict[str, Server]]:
    started: dict[str, Server] = {}
    try:
        for target in chosen:
            port = free_port()
            args = target.command(port, scenario, upstream=upstream, uvloop=plan.uvloop, threads=threads)
            env = environment(upstream, plan.uvloop, target.server_root)
            started[target.name] = Server(target.name, args, port, env)
        for server in started.values():
            server.wait_listening()
        yield started
    finally:
        for server in started.values():
            server.stop()


# -- payload check -------------------------------------------------------------------------------------------


def fetch_tokens(port: int, path: str, accept: str) -> list[str]:
    """Decode one whole stream with http.client (independent of the load client) into its token texts."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path, headers={"Accept": accept})
        response = conn.getresponse()
        body = response.read().decode()
    finally:
        conn.close()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status} from {path}: {body[:200]}")
    texts: list[str] = []
    lines = body.replace("\r\n", "\n").split("\n")
    for line in lines:
        data = line[len("data:") :].strip() if line.startswith("data:") else line.strip()
        if not data.startswith("{"):
            continue
        obj = json.loads(data)
        if isinstance(obj, dict) and isinstance(obj.get("content"), str):
            texts.append(obj["content"])
    return texts


def check_payload(server: Server, target: t.Target, path: str, expected: list[str]) -> bool:
    got = fetch_tokens(server.port, path, target.accept)
    if got != expected:
        raise RuntimeError(f"{target.name} served {len(got)} tokens that differ from the payload's {len(expected)}")
    return True


# -- scenarios -----------------------------------------------------------------------------------------------


def client_ceiling(plan: Plan, log: Log) -> list[Row]:
    """The load client against a server that only writes pre-encoded bytes: the most it can count."""
    rows: list[Row] = []
    levels = sorted({plan.throughput_levels[1], plan.throughput_levels[-1]})
    with servers([t.BLASTER], "throughput", plan) as running:
        server = running[t.BLASTER.name]
        for repeat in range(plan.repeats):
            for level in levels:
                spec = Spec(
                    port=server.port,
                    path=t.BLASTER.stream_path(plan.throughput_tokens, 0),
                    connections=level,
                    warmup=plan.warmup,
                    duration=plan.duration,
                    server_pid=server.pid,
                )
                result = run_client(spec)
                log(f"client ceiling x{level}: {result['frames_per_second']:,.0f} frames/s")
                rows.append(
                    {"scenario": "client", "target": t.BLASTER.name, "level": level, "repeat": repeat, **result}
                )
    return rows


def throughput(plan: Plan, tokens: list[str], log: Log) -> list[Row]:
    chosen = plan.selected(t.ALL)
    rows: list[Row] = []
    n = plan.throughput_tokens
    with servers(chosen, "throughput", plan, threads=max(plan.throughput_levels)) as running:
        for target in chosen:
            check_payload(running[target.name], target, target.stream_path(n, 0), tokens[:n])
        for repeat in range(plan.repeats):
            for level in plan.throughput_levels:
                for target in chosen:
                    server = running[target.name]
                    spec = Spec(
                        port=server.port,
                        path=target.stream_path(n, 0),
                        accept=target.accept,
                        delimiter=target.delimiter,
                        connections=level,
                        warmup=plan.warmup,
                        duration=plan.duration,
                        server_pid=server.pid,
                    )
                    result = run_client(spec)
                    log(
                        f"throughput {target.name} x{level}: {result['frames_per_second']:,.0f} frames/s, "
                        f"{result['server_cpu_us_per_frame'] or 0:.1f} CPU-us/frame"
                    )
                    rows.append(
                        {"scenario": "throughput", "target": target.name, "level": level, "repeat": repeat, **result}
                    )
    return rows


def paced(plan: Plan, tokens: list[str], log: Log) -> list[Row]:
    chosen = plan.selected(t.ALL)
    rows: list[Row] = []
    n, delay = plan.paced_tokens, plan.paced_delay
    stream_seconds = n * delay
    with servers(chosen, "paced", plan, threads=max(plan.paced_levels)) as running:
        for target in chosen:
            check_payload(running[target.name], target, target.stream_path(n, delay), tokens[:n])
        for repeat in range(plan.repeats):
            for level in plan.paced_levels:
                if level >= plan.heavy_from and repeat >= plan.heavy_repeats:
                    continue
                for target in chosen:
                    server = running[target.name]
                    spec = Spec(
                        port=server.port,
                        path=target.stream_path(n, delay),
                        mode="paced",
                        accept=target.accept,
                        delimiter=target.delimiter,
                        connections=level,
                        tokens=n,
                        delay=delay,
                        ramp=stream_seconds,
                        duration=plan.paced_duration,
                        server_pid=server.pid,
                        # An overloaded server stretches streams: give them room, but never unbounded.
                        deadline=stream_seconds + plan.paced_duration + (15 if level >= plan.heavy_from else 40),
                    )
                    result = run_client(spec)
                    log(
                        f"paced {target.name} x{level}: stretch {result['stretch_p50'] or 0:.3f}, "
                        f"ttff p99 {1000 * (result['ttff_p99'] or 0):.0f} ms, "
                        f"last-token lateness p99 {1000 * (result['lateness_p99'] or 0):.0f} ms, "
                        f"CPU {result.get('server_cpu_percent', 0):.0f}%"
                    )
                    rows.append(
                        {"scenario": "paced", "target": target.name, "level": level, "repeat": repeat, **result}
                    )
                    time.sleep(0.5)  # let the server finish closing the last run's connections
    return rows


def capacity(plan: Plan, log: Log) -> list[Row]:
    chosen = [c for c in plan.selected(t.ALL) if c.idles]
    rows: list[Row] = []
    count = plan.idle_connections
    for repeat in range(plan.idle_repeats):
        for target in chosen:
            with servers([target], "idle", plan, threads=count) as running:
                server = running[target.name]
                base = Spec(
                    port=server.port,
                    path=target.idle_path(),
                    mode="idle",
                    accept=target.accept,
                    delimiter=target.delimiter,
                    server_pid=server.pid,
                    hold=0.2,
                    connections=20,
                )
                # Warm up first (lazy imports, first-request caches), so the memory delta is per connection.
                run_client(base)
                time.sleep(0.5)
                spec = Spec(**{**base.__dict__, "connections": count, "hold": 1.0, "heartbeat_wait": 20.0})
                result = run_client(spec)
                log(
                    f"idle {target.name} x{count}: held {result['held']}, "
                    f"{result['kib_per_connection']:.1f} KiB/connection"
                )
                rows.append({"scenario": "idle", "target": target.name, "level": count, "repeat": repeat, **result})
    return rows


def storm(plan: Plan, log: Log) -> list[Row]:
    """Every client connecting in the same instant to a server that has just started, as after a restart."""
    rows: list[Row] = []
    count = plan.storm_connections
    for repeat in range(plan.repeats):
        for target in (t.OURS, t.OURS_BACKLOG_128):
            with servers([target], "storm", plan, threads=count) as running:
                server = running[target.name]
                spec = Spec(
                    port=server.port,
                    path=target.stream_path(plan.paced_tokens, plan.paced_delay),
                    mode="storm",
                    accept=target.accept,
                    delimiter=target.delimiter,
                    connections=count,
                    server_pid=server.pid,
                    deadline=plan.storm_deadline,
                )
                result = run_client(spec)
            overflows = result["listen_overflows"]
            log(
                f"storm {target.name} x{count}: {result['first_frames']} first frames, "
                f"{'unknown' if overflows is None else overflows} listen overflows, first frame "
                f"p50 {1000 * (result['ttff_p50'] or 0):.0f} ms, p99 {1000 * (result['ttff_p99'] or 0):.0f} ms"
            )
            rows.append({"scenario": "storm", "target": target.name, "level": count, "repeat": repeat, **result})
    return rows


def _relay_prompt(n: int, delay: float, first: float = 0.0, ident: str = "") -> str:
    prompt = f"n={n} d={delay:g} f={first:g}"
    return f"{prompt} id={ident}" if ident else prompt


@contextmanager
def fake_upstream(plan: Plan) -> Iterator[tuple[int, str]]:
    """The fake OpenAI-compatible upstream on the client's core: its port and its base URL."""
    port = free_port()
    upstream = Server(
        "fake upstream", ["-m", "bench.upstream", "--port", str(port)], port, environment("", plan.uvloop), CLIENT_CORE
    )
    try:
        upstream.wait_listening()
        yield port, f"http://127.0.0.1:{port}/v1"
    finally:
        upstream.stop()


def relay(plan: Plan, tokens: list[str], log: Log) -> list[Row]:
    """Scenarios 4 and 5: everything that goes through the fake upstream and the openai client."""
    relays = [c for c in plan.selected((t.OURS, *t.PEERS)) if c.relays]
    baselines = [t.baseline(plan.baseline, plan.baseline_root)] if plan.baseline else []
    # The baseline runs right after ours (the first of `relays`), so the two sides of the A/B run back to back.
    measured = [*relays[:1], *baselines, *relays[1:], *(t.WHAT_IF if plan.what_if else ())]
    rows: list[Row] = []
    with fake_upstream(plan) as (upstream_port, url):
        threads = max(plan.relay_paced_streams, plan.disconnect_load + plan.leavers, plan.relay_connections)
        with servers(measured, "relay", plan, upstream=url, threads=threads) as running:
            n_fast = plan.relay_tokens
            for target in measured:
                path = target.relay_path(_relay_prompt(n_fast, 0))
                check_payload(running[target.name], target, path, tokens[:n_fast])
            for repeat in range(plan.repeats):
                for target in measured:
                    rows.append(_relay_fast(plan, target, running[target.name], repeat, log))
                for target in measured:
                    # 500 relayed streams are several cores' work for every peer: like the heavy paced sizes,
                    # one repeat of those; ours and the what-ifs, which the targets are about, get every repeat.
                    if target.kind == "peer" and repeat >= plan.heavy_repeats:
                        continue
                    rows.append(_relay_paced(plan, target, running[target.name], repeat, log))
                if repeat >= plan.disconnect_repeats:
                    continue
                for target in relays:
                    # Under load only for ours (the target): an overloaded peer takes a minute to get its
                    # leavers their first tokens, and the two cases without load already show how peers behave.
                    cases = (
                        ("mid-stream", "under load", "idle stream")
                        if target.kind == "ours"
                        else ("mid-stream", "idle stream")
                    )
                    for case in cases:
                        rows.append(_disconnects(plan, target, running, case, repeat, upstream_port, url, log))
    return rows


def _relay_fast(plan: Plan, target: t.Target, server: Server, repeat: int, log: Log) -> Row:
    spec = Spec(
        port=server.port,
        path=target.relay_path(_relay_prompt(plan.relay_tokens, 0)),
        accept=target.accept,
        delimiter=target.delimiter,
        connections=plan.relay_connections,
        warmup=plan.warmup,
        duration=plan.duration,
        server_pid=server.pid,
    )
    result = run_client(spec)
    log(f"relay {target.name} x{plan.relay_connections}: {result['server_cpu_us_per_frame'] or 0:.1f} CPU-us/token")
    return {
        "scenario": "relay-fast",
        "target": target.name,
        "level": plan.relay_connections,
        "repeat": repeat,
        **result,
    }


def _relay_paced(plan: Plan, target: t.Target, server: Server, repeat: int, log: Log) -> Row:
    n, delay = plan.paced_tokens, plan.paced_delay
    spec = Spec(
        port=server.port,
        path=target.relay_path(_relay_prompt(n, delay)),
        mode="paced",
        accept=target.accept,
        delimiter=target.delimiter,
        connections=plan.relay_paced_streams,
        tokens=n,
        delay=delay,
        ramp=n * delay,
        duration=plan.paced_duration,
        server_pid=server.pid,
        deadline=n * delay + plan.paced_duration + 40,
    )
    result = run_client(spec)
    log(
        f"relay paced {target.name} x{plan.relay_paced_streams}: stretch {result['stretch_p50'] or 0:.3f}, "
        f"ttft p99 {1000 * (result['ttff_p99'] or 0):.0f} ms, CPU {result.get('server_cpu_percent', 0):.0f}%, "
        f"{result.get('server_cpu_us_per_frame') or 0:.1f} CPU-us/token"
    )
    level = plan.relay_paced_streams
    return {"scenario": "relay-paced", "target": target.name, "level": level, "repeat": repeat, **result}


def _disconnects(
    plan: Plan,
    target: t.Target,
    running: dict[str, Server],
    case: str,
    repeat: int,
    upstream_port: int,
    upstream_url: str,
    log: Log,
) -> Row:
    server = running[target.name]
    _get(upstream_port, "/reset")
    before = server.probe()
    load = plan.disconnect_load if case == "under load" else 0
    delay = plan.paced_delay
    first = 30.0 if case == "idle stream" else 0.0
    spec = Spec(
        port=server.port,
        path=target.relay_path(_relay_prompt(plan.disconnect_tokens, delay)),
        leave_path=target.relay_path(_relay_prompt(plan.disconnect_tokens, delay, first, "track{i}")),
        mode="leave",
        accept=target.accept,
        delimiter=target.delimiter,
        connections=load,
        leavers=plan.leavers,
        leave_after_frames=(5, 25),
        leave_after_seconds=0.3 if case == "idle stream" else 0.0,
        tokens=plan.disconnect_tokens,
        delay=delay,
        ramp=1.0 if load else 0.0,
        duration=600.0,  # the background load runs until the leavers are measured
        upstream_port=upstream_port,
        close_wait=plan.close_wait,
        server_pid=server.pid,
        deadline=60.0,
    )
    result = run_client(spec)
    time.sleep(1.0)  # what a server still holds a second after the run is what "left running" means
    after = server.probe()
    leftover = {f"left_{k}": after.get(k, 0) - before.get(k, 0) for k in ("tasks", "generators", "threads")}
    close_max = result.get("close_max")
    log(
        f"disconnect {case} {target.name}: {result['closed']}/{result['leavers']} upstreams closed, "
        f"max {1000 * close_max if close_max is not None else float('nan'):.0f} ms, "
        f"{result['not_closed']} not closed within {plan.close_wait:g}s, left {leftover}"
    )
    if any(leftover.values()) or result["not_closed"]:
        # Restart a server that still holds streams, so the next run starts clean.
        server.stop()
        args = target.command(
            server.port,
            "relay",
            upstream=upstream_url,
            uvloop=plan.uvloop,
            threads=max(plan.disconnect_load + plan.leavers, plan.relay_paced_streams),
        )
        env = environment(upstream_url, plan.uvloop, target.server_root)
        running[target.name] = Server(target.name, args, server.port, env)
        running[target.name].wait_listening()
    level = plan.leavers
    return {
        "scenario": "disconnect",
        "case": case,
        "target": target.name,
        "level": level,
        "repeat": repeat,
        "load": load,
        **result,
        **leftover,
    }


def resume(plan: Plan, log: Log) -> list[Row]:
    """Ours only: ended streams retained for resuming (their memory), and reconnecting readers replaying one from
    its start (``GET /api/streams/{id}?after=0``, SSE), one at a time. Relayed from the fake upstream, which
    repeats the payload's tokens for replies longer than it."""
    rows: list[Row] = []
    with fake_upstream(plan) as (_, url), servers([t.OURS], "resume", plan, upstream=url) as running:
        server = running[t.OURS.name]

        def spec(tokens: int, streams: int, replays: int) -> Spec:
            return Spec(
                port=server.port,
                path=t.OURS.relay_path(_relay_prompt(tokens, 0)) + "&resume=1",
                mode="resume",
                tokens=tokens,
                connections=streams,
                replays=replays,
                server_pid=server.pid,
            )

        # Warm up (lazy imports, first-request caches), so that what grows afterwards is the streams' own.
        run_client(spec(max(plan.resume_tokens), 20, 20))
        for repeat in range(plan.repeats):
            for tokens in plan.resume_tokens:
                result = run_client(spec(tokens, plan.resume_streams, plan.resume_replays))
                log(
                    f"resume {tokens} tokens: replay p50 {1000 * result['replay_p50']:.2f} ms, "
                    f"p99 {1000 * result['replay_p99']:.2f} ms; log {result['log_bytes_per_stream']:,.0f} B and "
                    f"RSS {result['rss_bytes_per_stream']:,.0f} B per retained stream"
                )
                rows.append({"scenario": "resume", "target": t.OURS.name, "level": tokens, "repeat": repeat, **result})
    return rows


def _get(port: int, path: str) -> Any:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST" if path == "/reset" else "GET", path)
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()
