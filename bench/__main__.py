"""``python -m bench`` (``make bench``): run the scenarios and write bench/results/latest.md and latest.json.

python -m bench                         # every default scenario, 3 interleaved repeats (about 15 minutes)
python -m bench --quick                 # a smoke run with small sizes (about 100 s; docs/benchmarks.md)
python -m bench --scenarios relay --relay-levels 100,500 --targets lean,litellm
python -m bench --scenarios throughput,paced --repeats 5
python -m bench --scenarios storm       # the reconnect storm alone (about a minute)
python -m bench --scenarios relay,resume --baseline 00c4d06 --targets none --no-what-if   # A/B of our own code
python -m bench --targets aiohttp,starlette --no-uvloop
python -m bench --scenarios compression # gzip against identity at 500 paced streams (also: python -m bench.compression)
python -m bench --scenarios framings    # CPU per token in SSE, NDJSON, OpenAI chunks and the UI stream at 500 streams
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import compression, framings, report, runner, scenarios, stream_store

SCENARIOS = (
    "client", "relay", "storm", "idle", "resume", "stream-store", "compression", "framings", "throughput", "paced",
)  # fmt: skip
# Realistic first (issue 17); the demo model's paced streams (issue 6) only when asked for.
DEFAULT_SCENARIOS = (
    "client",
    "relay",
    "storm",
    "idle",
    "resume",
    "stream-store",
    "compression",
    "framings",
    "throughput",
)
RESULTS = runner.ROOT / "bench" / "results"
_VERSIONS = ("aiohttp", "uvloop", "openai", "aiohttp-sse", "sse-starlette", "uvicorn", "fastapi", "flask", "gunicorn")


def _levels(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes and one repeat: a smoke run")
    parser.add_argument(
        "--scenarios",
        default=",".join(DEFAULT_SCENARIOS),
        help=f"comma-separated subset of {','.join(SCENARIOS)} (default {','.join(DEFAULT_SCENARIOS)}; relay = "
        "paced relay, request setup, zero-delay relay and disconnects against LiteLLM, the lean and tutorial relays "
        "and the floors; storm = every client connecting at once after a restart; resume = replays of ended streams "
        "and their memory; stream-store = the Redis stream store against memory (needs redis-server); "
        "compression = wire bytes and CPU per token, gzip against identity; framings = CPU per "
        "token in each output framing (SSE, NDJSON, OpenAI chunks, UI stream) against SSE's; paced = the demo "
        "model's paced streams, no upstream)",
    )
    parser.add_argument(
        "--baseline",
        metavar="REV",
        default="",
        help="also run ours from REV's server/ package (target ours@<commit>) in the full relay, beside ours",
    )
    parser.add_argument("--targets", default="", help="comma-separated name fragments of peers to run (ours always)")
    parser.add_argument("--repeats", type=int, help="interleaved repeats per measurement")
    parser.add_argument("--throughput-streams", type=_levels, help="e.g. 1,100,1000")
    parser.add_argument("--paced-streams", type=_levels, help="e.g. 1000,5000")
    parser.add_argument("--idle-streams", type=int, help="e.g. 10000")
    parser.add_argument("--storm-connections", type=int, help="clients of the reconnect storm, e.g. 1000")
    parser.add_argument("--relay-paced-streams", type=int, help="the paced relay level the targets judge, e.g. 500")
    parser.add_argument("--relay-levels", type=_levels, help="paced relay levels, e.g. 10,100,500,1000")
    parser.add_argument("--duration", type=float, help="seconds of each throughput and paced measurement window")
    parser.add_argument("--no-uvloop", action="store_true", help="run every asyncio server on the stdlib loop")
    parser.add_argument("--no-what-if", action="store_true", help="skip the measured proposals (bench/whatif.py)")
    parser.add_argument(
        "--what-if",
        default="",
        help="comma-separated bench/whatif.py variants to measure beside ours in the relay scenario, e.g. "
        "plain-json-framing (default: aiohttp-provider)",
    )
    parser.add_argument("--output", type=Path, default=RESULTS, help="where latest.md and latest.json go")
    parser.add_argument("--render", type=Path, metavar="JSON", help="only rewrite latest.md from a latest.json")
    return parser.parse_args(argv)


def _plan(args: argparse.Namespace) -> scenarios.Plan:
    plan = scenarios.Plan.quick() if args.quick else scenarios.Plan()
    changes: dict[str, Any] = {"uvloop": not args.no_uvloop}
    if args.no_what_if:
        changes["what_if"] = False
    if args.what_if:
        from bench import whatif

        chosen = tuple(v.strip() for v in args.what_if.split(",") if v.strip())
        unknown = set(chosen) - set(whatif.VARIANTS)
        if unknown:
            raise SystemExit(f"unknown --what-if variants: {', '.join(sorted(unknown))}; known: {whatif.VARIANTS}")
        changes.update(what_if=True, what_ifs=chosen)
    if args.targets:
        changes["targets"] = tuple(x.strip() for x in args.targets.split(",") if x.strip())
    for option, name in (
        ("repeats", "repeats"),
        ("throughput_streams", "throughput_levels"),
        ("paced_streams", "paced_levels"),
        ("idle_streams", "idle_connections"),
        ("storm_connections", "storm_connections"),
        ("relay_paced_streams", "relay_paced_streams"),
        ("relay_levels", "relay_paced_levels"),
        ("duration", "duration"),
    ):
        value = getattr(args, option)
        if value is not None:
            changes[name] = value
    if args.duration is not None:
        changes["paced_duration"] = args.duration
    return dataclasses.replace(plan, **changes)


def _versions() -> str:
    found = []
    for name in _VERSIONS:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} missing")
    return ", ".join(found)


def _commit() -> str:
    """The commit the servers ran from, and whether server/ had uncommitted changes."""
    import subprocess

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=runner.ROOT, capture_output=True, text=True, check=False)
        return done.stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + (" + uncommitted changes in server/" if git("status", "--porcelain", "--", "server") else "")


def _machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()} × {model}"


def main(argv: list[str] | None = None) -> None:
    args = _parse(sys.argv[1:] if argv is None else argv)
    if args.render is not None:
        saved = json.loads(args.render.read_text())
        print(report.write(saved["rows"], saved["meta"], args.output))
        return
    plan = _plan(args)
    chosen = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(chosen) - set(SCENARIOS)
    if unknown:
        raise SystemExit(f"unknown scenarios: {', '.join(sorted(unknown))}")
    if (os.cpu_count() or 1) < 2:
        raise SystemExit("the bench pins the servers and the load client to different cores: it needs two")
    limit = runner.raise_fd_limit()
    if "idle" in chosen and limit < plan.idle_connections + 1000:
        raise SystemExit(f"{plan.idle_connections} idle streams need more file descriptors than the limit {limit}")
    tokens = runner.prepare()
    if args.baseline:
        commit, root = runner.export_server(args.baseline)
        plan = dataclasses.replace(plan, baseline=commit, baseline_root=str(root))
    started = time.monotonic()
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())

    def log(message: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {message}", flush=True)

    skipped = scenarios.left_out(plan, chosen)
    for note in skipped:
        log(f"left out: {note}")
    rows: list[report.Row] = []
    steps = {
        "client": lambda: scenarios.client_ceiling(plan, log),
        "throughput": lambda: scenarios.throughput(plan, tokens, log),
        "paced": lambda: scenarios.paced(plan, tokens, log),
        "idle": lambda: scenarios.capacity(plan, log),
        "relay": lambda: scenarios.relay(plan, tokens, log),
        "storm": lambda: scenarios.storm(plan, log),
        "resume": lambda: scenarios.resume(plan, log),
        "stream-store": lambda: stream_store.scenario(plan, log),
        "compression": lambda: compression.scenario(plan, log),
        "framings": lambda: framings.scenario(plan, log),
    }
    seconds: dict[str, float] = {}
    for name in SCENARIOS:
        if name in chosen:
            log(f"scenario {name}")
            began = time.monotonic()
            rows.extend(steps[name]())
            seconds[name] = time.monotonic() - began
            log(f"scenario {name}: {seconds[name]:.1f} s")
    meta = {
        "started": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "seconds": time.monotonic() - started,
        "machine": _machine(),
        "python": platform.python_version(),
        "commit": _commit(),
        "versions": _versions(),
        "load_before": load_before,
        "load_after": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "plan": dataclasses.asdict(plan),
        "scenarios": chosen,
        "scenario_seconds": seconds,
        "left_out": skipped,
        "quick": args.quick,
    }
    path = report.write(rows, meta, args.output)
    log(f"wrote {path}")
    print(path.read_text())


if __name__ == "__main__":
    main()
