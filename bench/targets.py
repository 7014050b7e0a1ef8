"""The servers under test: how to start each one and which request gets the shared payload from it.

Ours runs through `bench.ours` (our real ``python -m server`` entry point plus the probe); every peer is a module
of `bench.peers`. Each server is started fresh for a scenario, because ours takes its demo pace and provider from
the command line, and is kept for all of that scenario's sizes and repeats. A baseline (``--baseline REV``) is ours
run the same way from another revision's ``server/`` package, exported by `bench.runner.export_server`.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from bench.payload import PROMPT
from bench.peers import litellm_proxy

SSE = "\n\n"
SSE_CRLF = "\r\n\r\n"  # aiohttp-sse and sse-starlette end lines with CRLF, which the SSE spec allows
NDJSON = "\n"
# Issue 15: CPU per relayed token in each of our output framings (bench.framings) at most this many times SSE's.
FRAMING_LIMIT = 1.2


@dataclass(frozen=True)
class Target:
    name: str
    # ours | peer (a tutorial relay) | lean (the hand-written aiohttp relay) | relay-ceiling | litellm | direct (no
    # relay: the load client reads the fake upstream itself) | ceiling | blaster
    kind: str
    module: str  # what `python -m` runs
    delimiter: str = SSE
    accept: str = "text/event-stream"
    relays: bool = True  # has an openai-based relay route
    idles: bool = True  # has a heartbeat-only route
    variant: str = ""  # ours only: a what-if of bench.whatif
    options: tuple[str, ...] = ()  # ours only: options added to the scenario's own
    server_root: str = ""  # ours only: a directory holding the server/ package to run instead of the working tree's
    streams: bool = True  # has the demo payload's /stream route (the throughput and paced scenarios)
    query: str = ""  # added to the stream route's query (the batched ceiling's ``&batch=64``)

    @property
    def openai_style(self) -> bool:
        """Clients POST /v1/chat/completions and read OpenAI chunk SSE back (LiteLLM, and the upstream itself)."""
        return self.kind in ("litellm", "direct")

    @property
    def probed(self) -> bool:
        """Runs bench.probe, which counts the tasks and generators left after a disconnect."""
        return self.kind not in ("litellm", "direct")

    def interpreter(self) -> str:
        return str(litellm_proxy.python()) if self.kind == "litellm" else sys.executable

    def command(
        self, port: int, scenario: str, *, upstream: str, uvloop: bool, threads: int, heartbeat: float = 2.0
    ) -> list[str]:
        """`heartbeat`: ours' heartbeat interval in the idle scenario (the peers take theirs from the environment)."""
        if self.kind == "ours":
            variant = ["--bench-variant", self.variant] if self.variant else []
            return [
                "-m",
                self.module,
                *variant,
                "--port",
                str(port),
                *ours_arguments(scenario, upstream, uvloop, heartbeat),
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
                "4096",  # bench.peers._common.BACKLOG
                "--log-level",
                "warning",
                "-b",
                f"127.0.0.1:{port}",
                "bench.peers.flask_peer:app",
            ]
        if self.kind == "litellm":
            config = Path(__file__).resolve().parent / ".work" / f"litellm-{port}.yaml"
            loop = [] if uvloop else ["--loop", "asyncio"]
            return ["-m", self.module, "--port", str(port), "--config", str(config), "--upstream", upstream, *loop]
        mode = ["--mode", "blast"] if self.kind == "blaster" else []
        return ["-m", self.module, "--port", str(port), *mode]

    def stream_path(self, n: int, delay: float) -> str:
        if self.kind == "ours":
            return f"/api/chat?prompt={PROMPT}&max_tokens={n}"
        return f"/stream?n={n}&delay={delay:g}{self.query}"

    def idle_path(self) -> str:
        return f"/api/chat?prompt={PROMPT}" if self.kind == "ours" else "/idle"

    def relay_path(self, prompt: str) -> str:
        """`prompt` may hold the client's ``{i}``/``{s}`` placeholders; everything else is URL-quoted."""
        if self.openai_style:
            return "/v1/chat/completions"
        quoted = quote(prompt, safe="{}")
        return f"/api/chat?prompt={quoted}" if self.kind == "ours" else f"/relay?prompt={quoted}"

    def relay_body(self, prompt: str) -> str:
        """The POST body of an OpenAI-style target (empty for the others, which take the prompt in the query)."""
        if not self.openai_style:
            return ""
        messages = [{"role": "user", "content": prompt}]
        return json.dumps({"model": "fake-model", "messages": messages, "stream": True})

    def headers(self) -> str:
        """Extra request header lines: LiteLLM's master key."""
        return f"Authorization: Bearer {litellm_proxy.MASTER_KEY}\r\n" if self.kind == "litellm" else ""


def ours_arguments(scenario: str, upstream: str, uvloop: bool, heartbeat: float = 2.0) -> list[str]:
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
            f"{heartbeat:g}",
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
# The ceiling given the batching our demo model gives the zero-delay stream (server/providers/demo.py hands 64
# tokens per batch at full speed), so that no throughput figure credits batching to the relay (issue 17).
CEILING_BATCHED = Target(
    "bare asyncio.Protocol, 64 frames per write",
    "ceiling",
    "bench.peers.bare_protocol",
    relays=False,
    idles=False,
    query="&batch=64",
)
BLASTER = Target("blaster (pre-encoded)", "blaster", "bench.peers.bare_protocol", relays=False, idles=False)
PEERS = (
    Target("aiohttp StreamResponse", "peer", "bench.peers.aiohttp_plain"),
    Target("aiohttp-sse", "peer", "bench.peers.aiohttp_sse_peer", delimiter=SSE_CRLF),
    Target("sse-starlette/uvicorn", "peer", "bench.peers.sse_starlette_peer", delimiter=SSE_CRLF),
    Target("FastAPI NDJSON/uvicorn", "peer", "bench.peers.fastapi_ndjson", NDJSON, "application/x-ndjson"),
    Target("Flask/gunicorn gthread", "peer", "gunicorn"),
)
ALL = (OURS, *PEERS, CEILING)
# The relays of issue 17 beside the tutorial ones (PEERS): what a team would run otherwise, and the floors.
LEAN = Target("lean aiohttp relay", "lean", "bench.peers.lean_relay", idles=False, streams=False)
RELAY_CEILING = Target(
    "raw asyncio relay (ceiling)", "relay-ceiling", "bench.peers.relay_ceiling", idles=False, streams=False
)
LITELLM = Target("LiteLLM proxy", "litellm", "bench.peers.litellm_proxy", idles=False, streams=False)
DIRECT = Target("no relay (upstream direct)", "direct", "bench.upstream", idles=False, streams=False)
RELAYS = (OURS, LEAN, RELAY_CEILING, DIRECT, LITELLM, *PEERS)


def baseline(commit: str, server_root: str) -> Target:
    """Ours as of `commit` (its server/ exported under `server_root`): the A side of an A/B of our own code."""
    return Target(baseline_name(commit), "ours", "bench.ours", server_root=server_root)


def baseline_name(commit: str) -> str:
    return f"ours@{commit}"


# Measured proposals for server/ (see bench.whatif), shown beside ours in the full-relay tables only.
WHAT_IF = (Target("what-if: llm-relay + aiohttp provider", "ours", "bench.ours", variant="aiohttp-provider"),)


def what_if(variant: str) -> Target:
    """Ours with one of bench.whatif's variants applied (``--what-if NAME``)."""
    return Target(f"what-if: llm-relay, {variant}", "ours", "bench.ours", variant=variant)
