"""The servers under test: how to start each one and which request gets the shared payload from it.

Ours runs through `bench.ours` (our real ``python -m server`` entry point plus the probe); every peer is a module
of `bench.peers`. Each server is started fresh for a scenario, because ours takes its demo pace and provider from
the command line, and is kept for all of that scenario's sizes and repeats. A baseline (``--baseline REV``) is ours
run the same way from another revision's ``server/`` package, exported by `bench.runner.export_server`.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote

from bench.payload import PROMPT

SSE = "\n\n"
SSE_CRLF = "\r\n\r\n"  # aiohttp-sse and sse-starlette end lines with CRLF, which the SSE spec allows
NDJSON = "\n"


@dataclass(frozen=True)
class Target:
    name: str
    kind: str  # ours | peer | ceiling | blaster
    module: str  # what `python -m` runs
    delimiter: str = SSE
    accept: str = "text/event-stream"
    relays: bool = True  # has an openai-based relay route
    idles: bool = True  # has a heartbeat-only route
    variant: str = ""  # ours only: a what-if of bench.whatif
    options: tuple[str, ...] = ()  # ours only: options added to the scenario's own
    server_root: str = ""  # ours only: a directory holding the server/ package to run instead of the working tree's

    def command(self, port: int, scenario: str, *, upstream: str, uvloop: bool, threads: int) -> list[str]:
        if self.kind == "ours":
            variant = ["--bench-variant", self.variant] if self.variant else []
            return [
                "-m",
                self.module,
                *variant,
                "--port",
                str(port),
                *ours_arguments(scenario, upstream, uvloop),
                *self.options,
            ]
        if self.module == "gunicorn":
            # One worker, like every other target; a WSGI stream holds a thread, so give it one per stream.
            return [
                "-m",
                "gunicorn",
                "-k",
                "gthread",
                "-w",
                "1",
                "--threads",
                str(threads),
                "--worker-connections",
                str(max(1000, 2 * threads)),
                "--backlog",
                "2048",
                "--log-level",
                "warning",
                "-b",
                f"127.0.0.1:{port}",
                "bench.peers.flask_peer:app",
            ]
        mode = ["--mode", "blast"] if self.kind == "blaster" else []
        return ["-m", self.module, "--port", str(port), *mode]

    def stream_path(self, n: int, delay: float) -> str:
        if self.kind == "ours":
            return f"/api/chat?prompt={PROMPT}&max_tokens={n}"
        return f"/stream?n={n}&delay={delay:g}"

    def idle_path(self) -> str:
        return f"/api/chat?prompt={PROMPT}" if self.kind == "ours" else "/idle"

    def relay_path(self, prompt: str) -> str:
        """`prompt` may hold the client's ``{i}``/``{s}`` placeholders; everything else is URL-quoted."""
        quoted = quote(prompt, safe="{}")
        return f"/api/chat?prompt={quoted}" if self.kind == "ours" else f"/relay?prompt={quoted}"


def ours_arguments(scenario: str, upstream: str, uvloop: bool) -> list[str]:
    # Admission limits off: the bench measures the relay, not the rate limiter. Heartbeats off except when idle.
    common = ["--limits", "false", "--uvloop", "true" if uvloop else "false"]
    if scenario == "throughput":
        return [*common, "--provider", "demo", "--demo-delay", "0", "--heartbeat", "0"]
    if scenario in ("paced", "storm"):
        return [*common, "--provider", "demo", "--demo-delay", "0.02", "--heartbeat", "0"]
    if scenario == "idle":
        # The demo model waits an hour before its first token: the stream carries heartbeats only.
        return [
            *common,
            "--provider",
            "demo",
            "--demo-delay",
            "3600",
            "--heartbeat",
            "2",
            "--first-token-timeout",
            "0",
            "--idle-timeout",
            "0",
            "--total-timeout",
            "0",
        ]
    if scenario in ("relay", "resume"):
        # resume: ended streams stay resumable for the whole scenario (the retention is 60 s by default).
        retention = ["--stream-retention", "3600"] if scenario == "resume" else []
        return [
            *common,
            "--provider",
            "openai",
            "--base-url",
            upstream,
            "--api-key",
            "bench",
            "--model",
            "fake-model",
            "--heartbeat",
            "0",
            *retention,
        ]
    raise ValueError(f"unknown scenario {scenario!r}")


OURS = Target("llm-relay", "ours", "bench.ours")
# The reconnect storm's contrast: the listen backlog aiohttp (and most servers) default to.
OURS_BACKLOG_128 = Target("llm-relay --backlog 128", "ours", "bench.ours", options=("--backlog", "128"))
CEILING = Target("bare asyncio.Protocol", "ceiling", "bench.peers.bare_protocol", relays=False)
BLASTER = Target("blaster (pre-encoded)", "blaster", "bench.peers.bare_protocol", relays=False, idles=False)
PEERS = (
    Target("aiohttp StreamResponse", "peer", "bench.peers.aiohttp_plain"),
    Target("aiohttp-sse", "peer", "bench.peers.aiohttp_sse_peer", delimiter=SSE_CRLF),
    Target("sse-starlette/uvicorn", "peer", "bench.peers.sse_starlette_peer", delimiter=SSE_CRLF),
    Target("FastAPI NDJSON/uvicorn", "peer", "bench.peers.fastapi_ndjson", NDJSON, "application/x-ndjson"),
    Target("Flask/gunicorn gthread", "peer", "gunicorn"),
)
ALL = (OURS, *PEERS, CEILING)


def baseline(commit: str, server_root: str) -> Target:
    """Ours as of `commit` (its server/ exported under `server_root`): the A side of an A/B of our own code."""
    return Target(baseline_name(commit), "ours", "bench.ours", server_root=server_root)


def baseline_name(commit: str) -> str:
    return f"ours@{commit}"


# Measured proposals for server/ (see bench.whatif), shown beside ours in the full-relay tables only.
WHAT_IF = (Target("what-if: llm-relay + aiohttp provider", "ours", "bench.ours", variant="aiohttp-provider"),)
