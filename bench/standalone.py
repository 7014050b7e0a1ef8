"""One scenario run on its own (``python -m bench.compression``, ``python -m bench.framings``): its options, its
log, and its results written beside the full run's as ``<name>.json`` and ``<name>.md``."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import runner, scenarios

Rows = list[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Run:
    """What a standalone run's introduction can tell: its options, when and where it ran, how long it took."""

    streams: int
    repeats: int
    meta: dict[str, str]
    seconds: float


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(
    name: str,
    description: str,
    title: str,
    scenario: Callable[[scenarios.Plan, Callable[[str], None]], Rows],
    section: Callable[[Rows], list[str]],
    introduction: Callable[[Run, Rows], str],
) -> None:
    """Parse ``--streams``, ``--repeats`` and ``--output``, run `scenario`, write its results and print them."""
    parser = argparse.ArgumentParser(prog=f"python -m bench.{name}", description=description)
    parser.add_argument("--streams", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, default=runner.ROOT / "bench" / "results")
    args = parser.parse_args()
    runner.raise_fd_limit()
    runner.prepare()
    plan = scenarios.Plan(repeats=args.repeats, relay_paced_streams=args.streams)
    started = time.monotonic()
    uptime_before, load_before = _uptime(), _load()

    def log(message: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {message}", flush=True)

    rows = scenario(plan, log)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=runner.ROOT, capture_output=True, text=True, check=False
    ).stdout.strip()
    meta = {
        "started": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit,
        "uptime_before": uptime_before,
        "uptime_after": _uptime(),
        "load_before": load_before,
        "load_after": _load(),
    }
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    run = Run(args.streams, args.repeats, meta, time.monotonic() - started)
    heading = f"# {title}: bench results ({meta['started']}, commit {meta['commit']})"
    text = "\n".join([heading, "", introduction(run, rows), *section(rows)]) + "\n"
    (args.output / f"{name}.md").write_text(text)
    print(text)
