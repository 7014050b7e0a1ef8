"""The scenarios of issue 17 (realistic first: paced relay, reconnect storm, disconnects, idle capacity, resume,
zero-delay throughput), the demo model's paced streams of issue 6, and the load client's own ceiling. Each
returns flat result rows.

Relayed streams carry the fake upstream's generation stamps (bench.upstream ``s=1``), so the load client measures
each token's relay-added lag whatever the relay's output format; every client opens its connections at once.

Repeats are interleaved (repeat 1 of every target and size, then repeat 2, ...) so that a noisy moment on this
shared machine hurts every target a little rather than one target a lot. Servers are started once per scenario
and reused across its sizes and repeats; the capacity scenario starts each server fresh, since it reads memory.
"""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from bench import targets as t
from bench.client import Spec
from bench.peers import litellm_proxy
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
    # Seconds between heartbeats on the idle streams. Ours sends its response head with the first frame, so each
    # idle run waits this long before a stream counts as held; quick's shorter one saves that wait (twice per
    # server: its warm-up and its run) and changes nothing held in memory.
    idle_heartbeat: float = 2.0
    leavers: int = 200
    disconnect_load: int = 500
    disconnect_tokens: int = 100  # 2 s replies: a relay that never closes early shows as "ran to the end"
    relay_tokens: int = 200
    relay_connections: int = 100
    relay_paced_streams: int = 500  # the level the targets are judged at
    relay_paced_levels: tuple[int, ...] = (10, 100, 500, 1000)
    relay_paced_tokens: int = 100  # issue 17: 100 tokens per stream, 20 ms apart
    # Peers that cannot keep up with the top levels (LiteLLM, the tutorial relays over the SDK's objects) run up to
    # this level, once: at 1,000 streams they need many cores and only show that they are overloaded.
    relay_peer_max: int = 500
    relay_cut_off: float = 20.0  # seconds past a stream's length after which an overloaded relay's run is cut
    setup_connections: int = 10  # request setup: 1-token replies back to back on this many connections
    disconnect_levels: tuple[int, ...] = (100, 500)
    # LiteLLM and the tutorial relays leave at 100 only: at 500 their leavers wait many seconds for the 5–25 tokens
    # they leave after, which only shows again that those relays are overloaded.
    disconnect_peer_max: int = 100
    # The tutorial peers everywhere; quick: none in the relay scenario, and only the plain aiohttp handler (the idle
    # target's measure) elsewhere.
    tutorials: bool = True
    # LiteLLM's proxy in the relay scenario; quick leaves it out unless --targets names it (see `left_out`).
    litellm: bool = True
    close_wait: float = 3.0
    storm_connections: int = 1000  # clients connecting in the same instant, as after a restart
    storm_deadline: float = 60.0
    warm_up_together: bool = False  # quick: every relay's (or framing's) warm-up wave at once (see `warm_up`)
    what_if: bool = True  # also measure bench.whatif's proposals in the full-relay scenario
    what_ifs: tuple[str, ...] = ()  # --what-if: these bench.whatif variants instead of the default proposal
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
            throughput_levels=(1, 200),
            warmup=0.3,
            duration=0.8,
            paced_levels=(200, 500),
            paced_duration=1.0,
            idle_connections=1000,
            idle_heartbeat=0.5,
            leavers=50,
            disconnect_load=100,
            relay_connections=20,
            relay_paced_streams=100,
            relay_paced_levels=(10, 100),
            relay_paced_tokens=50,
            relay_peer_max=100,  # LiteLLM (when --targets names it) at the level the quick targets judge
            tutorials=False,
            litellm=False,
            relay_cut_off=8.0,
            what_if=False,
            warm_up_together=True,
            disconnect_levels=(100,),
            close_wait=2.0,
            storm_connections=500,
            resume_streams=50,
            resume_replays=50,
        )

    def named(self, target: t.Target) -> bool:
        """Whether --targets names `target` (one of its fragments is in the target's name)."""
        return any(n.lower() in target.name.lower() for n in self.targets)

    def selected(self, candidates: Sequence[t.Target]) -> list[t.Target]:
        if not self.tutorials:
            candidates = [c for c in candidates if c.kind != "peer" or c == t.PEERS[0]]
        if not self.litellm and not self.named(t.LITELLM):
            candidates = [c for c in candidates if c.kind != "litellm"]
        if not self.targets:
            return list(candidates)
        return [c for c in candidates if c.kind == "ours" or self.named(c)]


def left_out(plan: Plan, chosen: Sequence[str]) -> list[str]:
    """What `plan` leaves out of the `chosen` scenarios that `make bench` runs, why, and how to run it: the run
    prints these at its start and the results file repeats them, so a quick run never hides a missing peer."""
    notes: list[str] = []
    if "relay" in chosen and not plan.litellm and not plan.named(t.LITELLM):
        notes.append(
            f"{t.LITELLM.name}: not in the relay scenario. It is the slowest peer to start (its proxy imports for "
            "seconds; its venv installs for minutes on first use), and at 100 streams it is overloaded: its runs "
            "end at their cut-off and its disconnects wait out their limit, which would add half again to the "
            "quick run. Run it with `python -m bench --quick --scenarios relay --targets relay,litellm` (beside "
            "the lean relay, the ceiling and no relay) or `make bench`."
        )
    if not plan.tutorials and any(s in chosen for s in ("relay", "idle", "throughput", "paced")):
        notes.append(
            "the tutorial relays (" + ", ".join(p.name for p in t.PEERS) + "): none in the relay scenario, and "
            f"only {t.PEERS[0].name} (the idle target's measure) in the others. `make bench` runs them all."
        )
    if "relay" in chosen and not plan.what_if:
        variant = t.WHAT_IF[0].variant
        notes.append(
            f"the what-if proposal {variant} (bench/whatif.py, a measured proposal for server/, not what ships): "
            f"not in the relay scenario; `--what-if {variant}` adds it."
        )
    return notes


def start(target: t.Target, scenario: str, plan: Plan, port: int, upstream: str, threads: int) -> Server:
    heartbeat = plan.idle_heartbeat
    args = target.command(port, scenario, upstream=upstream, uvloop=plan.uvloop, threads=threads, heartbeat=heartbeat)
    env = environment(upstream, plan.uvloop, target.server_root, heartbeat)
    if target.kind == "litellm":
        env.update(litellm_proxy.environment())
        litellm_proxy.ensure_venv()
    return Server(target.name, args, port, env, interpreter=target.interpreter())


@contextmanager
def servers(
    chosen: Sequence[t.Target],
    scenario: str,
    plan: Plan,
    *,
    upstream: str = "",
    threads: int = 1000,
    upstream_server: Server | None = None,
) -> Iterator[dict[str, Server]]:
    """Start `chosen`; the no-relay target is the running fake upstream (`upstream_server`) itself."""
    started: dict[str, Server] = {}
    running: dict[str, Server] = {}
    try:
        for target in chosen:
            if target.kind != "direct":
                started[target.name] = start(target, scenario, plan, free_port(), upstream, threads)
        for server in started.values():
            server.wait_listening(timeout=120.0)  # LiteLLM's proxy takes ~10 s to import
        running = dict(started)
        if upstream_server is not None:
            running.update({target.name: upstream_server for target in chosen if target.kind == "direct"})
        yield running
    finally:
        # `running` too: a scenario may have replaced a server by a fresh one (bench.scenarios._disconnects).
        for server in [*started.values(), *running.values()]:
            if server is not upstream_server:
                server.stop()


# -- payload check -------------------------------------------------------------------------------------------


def fetch_tokens(port: int, path: str, accept: str, body: str = "", headers: str = "") -> list[str]:
    """Decode one whole stream with http.client (independent of the load client) into its token texts: the
    ``content`` of each JSON object, or of an OpenAI chunk's first choice's delta."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    extra = dict(line.split(": ", 1) for line in headers.split("\r\n") if line)
    try:
        if body:
            conn.request("POST", path, body, headers={"Accept": accept, "Content-Type": "application/json", **extra})
        else:
            conn.request("GET", path, headers={"Accept": accept, **extra})
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
        if isinstance(obj, dict) and obj.get("choices"):
            obj = obj["choices"][0].get("delta") or {}
        if isinstance(obj, dict) and isinstance(obj.get("content"), str) and obj["content"]:
            texts.append(obj["content"])
    return texts


def check_payload(server: Server, target: t.Target, path: str, expected: list[str], body: str = "") -> bool:
    got = fetch_tokens(server.port, path, target.accept, body, target.headers())
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
    chosen = plan.selected((*t.ALL, t.CEILING_BATCHED))
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
    # --baseline: ours from another revision right after ours, so the A/B's two sides run back to back.
    baselines = [t.baseline(plan.baseline, plan.baseline_root)] if plan.baseline else []
    chosen = [*chosen[:1], *baselines, *chosen[1:]]
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
                    # About memory, not connecting: 10,000 at once would only overflow the listen queue (4096).
                    connect_concurrency=1000,
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


def _relay_prompt(n: int, delay: float, first: float = 0.0, ident: str = "", stamps: bool = False) -> str:
    prompt = f"n={n} d={delay:g} f={first:g}"
    if stamps:
        prompt += " s=1"
    return f"{prompt} id={ident}" if ident else prompt


@contextmanager
def fake_upstream(plan: Plan) -> Iterator[tuple[Server, str]]:
    """The fake OpenAI-compatible upstream on the client's core: its process and its base URL."""
    port = free_port()
    upstream = Server(
        "fake upstream", ["-m", "bench.upstream", "--port", str(port)], port, environment("", plan.uvloop), CLIENT_CORE
    )
    try:
        upstream.wait_listening()
        yield upstream, f"http://127.0.0.1:{port}/v1"
    finally:
        upstream.stop()


def _relay_spec(target: t.Target, server: Server, prompt: str, **fields: Any) -> Spec:
    return Spec(
        port=server.port,
        path=target.relay_path(prompt),
        body=target.relay_body(prompt),
        headers=target.headers(),
        accept=target.accept,
        delimiter=target.delimiter,
        # The no-relay floor's server is the upstream itself: its CPU is not a relay's, so none is read.
        server_pid=0 if target.kind == "direct" else server.pid,
        **fields,
    )


def _relay_targets(plan: Plan) -> list[t.Target]:
    chosen = [c for c in plan.selected(t.RELAYS) if c.relays and (plan.tutorials or c.kind != "peer")]
    baselines = [t.baseline(plan.baseline, plan.baseline_root)] if plan.baseline else []
    # The baseline runs right after ours (the first), so the two sides of an A/B run back to back.
    proposals = tuple(t.what_if(v) for v in plan.what_ifs) if plan.what_ifs else t.WHAT_IF
    return [*chosen[:1], *baselines, *chosen[1:], *(proposals if plan.what_if else ())]


def _full_repeats(target: t.Target) -> bool:
    """Ours (and its baseline and what-ifs), the lean relay and the two floors get every repeat: the targets are
    ratios of these. LiteLLM and the tutorial relays, many times slower, run once."""
    return target.kind in ("ours", "lean", "relay-ceiling", "direct")


def relay(plan: Plan, tokens: list[str], log: Log) -> list[Row]:
    """Issue 17's realistic scenarios: the fake upstream → each relay → the load client. Paced relay at each level
    (all clients at once), request setup, zero-delay relay, and disconnects at each disconnect level."""
    measured = _relay_targets(plan)
    rows: list[Row] = []
    with fake_upstream(plan) as (upstream_server, url):
        threads = max(*plan.relay_paced_levels, *plan.disconnect_levels, plan.relay_connections)
        with servers(
            measured, "relay", plan, upstream=url, threads=threads, upstream_server=upstream_server
        ) as running:
            n_fast = plan.relay_tokens
            for target in measured:
                prompt = _relay_prompt(n_fast, 0)
                path, body = target.relay_path(prompt), target.relay_body(prompt)
                check_payload(running[target.name], target, path, tokens[:n_fast], body)
            warm_up(plan, [partial(_warm_up, plan, target, running[target.name]) for target in measured], 1.0)
            for repeat in range(plan.repeats):
                for level in plan.relay_paced_levels:
                    for target in measured:
                        if not _full_repeats(target) and (repeat >= plan.heavy_repeats or level > plan.relay_peer_max):
                            continue
                        rows.append(_relay_paced(plan, target, running[target.name], level, repeat, log))
                for target in measured:
                    if target.kind == "direct" or (not _full_repeats(target) and repeat >= plan.heavy_repeats):
                        continue
                    rows.append(_relay_setup(plan, target, running[target.name], repeat, log))
                    rows.append(_relay_fast(plan, target, running[target.name], repeat, log))
                # An A/B of our own code (--baseline) gets every repeat: its two sides' spread is what it compares.
                if repeat >= (plan.repeats if plan.baseline else plan.disconnect_repeats):
                    continue
                for level in plan.disconnect_levels:
                    for target in measured:
                        if target.kind == "direct" or (not _full_repeats(target) and level > plan.disconnect_peer_max):
                            continue
                        if target.variant:
                            continue  # what-ifs: the relay's hot path, not its disconnects
                        rows.append(_disconnects(plan, target, running, level, repeat, upstream_server, url, log))
    return rows


def warm_up(plan: Plan, waves: Sequence[Callable[[], object]], pause: float) -> None:
    """Run unmeasured warm-up `waves` one at a time, each followed by `pause` (the servers finish closing their
    connections), or with `plan.warm_up_together` (quick) all at once from threads, then one pause. The full run
    keeps them apart: at its sizes, together would be thousands of streams on the servers' core at once."""
    if not plan.warm_up_together:
        for wave in waves:
            wave()
            time.sleep(pause)
        return
    with ThreadPoolExecutor(max_workers=max(1, len(waves))) as pool:
        for future in [pool.submit(wave) for wave in waves]:
            future.result()  # a failed wave fails the run, as it would one at a time
    time.sleep(pause)


def _warm_up(plan: Plan, target: t.Target, server: Server) -> None:
    """As many concurrent 1-token streams as the target will serve at its top level: a server in service has its
    upstream connection pool and caches warm, so the first measured wave should not pay for filling them."""
    top = (
        max(plan.relay_paced_levels)
        if _full_repeats(target)
        else min(plan.relay_peer_max, max(plan.relay_paced_levels))
    )
    # One 1-token stream per connection, each read to its end: streams cut off mid-request would leave the server
    # cleaning up while the first measured wave arrives.
    prompt = _relay_prompt(1, 0, stamps=True)
    spec = _relay_spec(
        target,
        server,
        prompt,
        mode="paced",
        stamps=True,
        one_wave=True,
        connections=top,
        tokens=1,
        ramp=0.0,
        duration=0.0,
        deadline=plan.relay_cut_off + 10,
    )
    run_client(spec)


def _relay_fast(plan: Plan, target: t.Target, server: Server, repeat: int, log: Log) -> Row:
    spec = _relay_spec(
        target,
        server,
        _relay_prompt(plan.relay_tokens, 0, stamps=True),
        stamps=True,
        connections=plan.relay_connections,
        warmup=plan.warmup,
        duration=plan.duration,
    )
    result = run_client(spec)
    log(f"relay {target.name} x{plan.relay_connections}: {result['server_cpu_us_per_frame'] or 0:.1f} CPU-us/token")
    level = plan.relay_connections
    return {"scenario": "relay-fast", "target": target.name, "level": level, "repeat": repeat, **result}


def _relay_setup(plan: Plan, target: t.Target, server: Server, repeat: int, log: Log) -> Row:
    """CPU per stream for request setup: 1-token replies back to back (each stream is a request, one token and
    its end), on `setup_connections` keep-alive connections."""
    spec = _relay_spec(
        target,
        server,
        _relay_prompt(1, 0, stamps=True),
        stamps=True,
        connections=plan.setup_connections,
        warmup=plan.warmup,
        duration=plan.duration,
    )
    result = run_client(spec)
    log(f"relay setup {target.name}: {result.get('server_cpu_us_per_stream') or 0:.0f} CPU-us/stream")
    level = plan.setup_connections
    return {"scenario": "relay-setup", "target": target.name, "level": level, "repeat": repeat, **result}


def _relay_paced(plan: Plan, target: t.Target, server: Server, level: int, repeat: int, log: Log) -> Row:
    n, delay = plan.relay_paced_tokens, plan.paced_delay
    spec = _relay_spec(
        target,
        server,
        _relay_prompt(n, delay, stamps=True),
        mode="paced",
        stamps=True,
        connections=level,
        tokens=n,
        delay=delay,
        ramp=0.0,  # every client at once, as real clients arrive after a deploy or a burst
        one_wave=True,  # CPU per token over the whole wave, setup included
        duration=n * delay,
        deadline=n * delay + plan.relay_cut_off,
    )
    result = run_client(spec)
    log(
        f"relay paced {target.name} x{level}: lag p99 {1000 * (result['relay_lag_p99'] or 0):.1f} ms, "
        f"ttft p50/p99 {1000 * (result['ttff_p50'] or 0):.0f}/{1000 * (result['ttff_p99'] or 0):.0f} ms, "
        f"stretch {result['stretch_p50'] or 0:.3f}, CPU {result.get('server_cpu_percent', 0):.0f}%, "
        f"{result.get('server_cpu_us_per_frame') or 0:.1f} CPU-us/token"
    )
    time.sleep(0.3)  # let the server finish closing the last run's connections
    return {"scenario": "relay-paced", "target": target.name, "level": level, "repeat": repeat, **result}


def _disconnects(
    plan: Plan,
    target: t.Target,
    running: dict[str, Server],
    level: int,
    repeat: int,
    upstream_server: Server,
    upstream_url: str,
    log: Log,
) -> Row:
    """`level` clients open their streams at once and each leaves after 5–25 tokens: from each client's close to
    the fake upstream seeing that request's connection closed; then what the server still runs a second later."""
    server = running[target.name]
    _get(upstream_server.port, "/reset")
    time.sleep(1.0)  # the previous run's streams finish closing first, or "before" counts them
    before = server.probe() if target.probed else None
    delay = plan.paced_delay
    prompt = _relay_prompt(plan.disconnect_tokens, delay, 0.0, "track{i}", stamps=True)
    spec = _relay_spec(
        target,
        server,
        prompt,
        leave_path=target.relay_path(prompt),
        mode="leave",
        stamps=True,
        connections=0,
        leavers=level,
        leave_after_frames=(5, 25),
        leave_spread=0.0,
        tokens=plan.disconnect_tokens,
        delay=delay,
        ramp=0.0,
        duration=600.0,
        upstream_port=upstream_server.port,
        close_wait=plan.close_wait,
        deadline=40.0,
    )
    result = run_client(spec)
    time.sleep(1.0)  # what a server still holds a second after the run is what "left running" means
    after = server.probe() if before is not None else None
    leftover: dict[str, int | None] = {
        f"left_{k}": (after.get(k, 0) - before.get(k, 0)) if before is not None and after is not None else None
        for k in ("tasks", "generators", "threads")
    }
    close_max, close_p99 = result.get("close_max"), result.get("close_p99")
    log(
        f"disconnect x{level} {target.name}: {result['closed']}/{result['leavers']} upstreams closed, "
        f"p99 {1000 * close_p99 if close_p99 is not None else float('nan'):.1f} ms, "
        f"max {1000 * close_max if close_max is not None else float('nan'):.1f} ms, "
        f"{result['not_closed']} not closed within {plan.close_wait:g}s, left {leftover}"
    )
    if any(leftover.values()) or result["not_closed"]:
        # Restart a server that still holds streams, so the next run starts clean.
        server.stop()
        threads = max(*plan.relay_paced_levels, *plan.disconnect_levels)
        running[target.name] = start(target, "relay", plan, server.port, upstream_url, threads)
        running[target.name].wait_listening(timeout=120.0)
    return {
        "scenario": "disconnect",
        "case": f"x{level}",
        "target": target.name,
        "level": level,
        "repeat": repeat,
        "load": 0,
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
