"""``python -m bench.stream_store``: the Redis stream store against the memory store (issue 14).

Two of our servers relay the fake upstream's paced streams (the full relay's paced scenario, `scenarios._relay_paced`),
one with ``--stream-store memory`` (the default), one with ``--stream-store redis`` on a redis-server started here
(no persistence, pinned to the client's core so the relay's core measures the relay alone). Reported per repeat:
the relay's CPU per token for each store and their ratio (target: at most 1.3x), and from the Redis side what it
cost: commands per token as ``INFO commandstats`` counts them (the script calls the relay sends, and every command
they run inside Redis), against the events the relay says it wrote (``/api/healthz`` ``stream_store``).

python -m bench.stream_store                      # 500 paced streams, 2 interleaved repeats
python -m bench.stream_store --streams 100 --repeats 1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import scenarios
from bench import targets as t
from bench.runner import CLIENT_CORE, ROOT, free_port, prepare

OUTPUT = ROOT / "bench" / "results" / "stream-store.md"


@contextmanager
def redis_server() -> Iterator[int]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("bench.stream_store needs redis-server (make system-deps)")
    port = free_port()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    process = subprocess.Popen(["taskset", "-c", CLIENT_CORE, *argv], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while redis_info(port, "server") is None:
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
        yield port
    finally:
        process.terminate()
        process.wait(10)


def redis_info(port: int, section: str) -> dict[str, str] | None:
    """``INFO section`` as a dict, over a plain socket (no client library needed here)."""
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.sendall(f"INFO {section}\r\n".encode())
            data = b""
            while not data.endswith(b"\r\n") or data.count(b"\r\n") < 2:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
                header, _, rest = data.partition(b"\r\n")
                if header.startswith(b"$") and len(rest) >= int(header[1:]) + 2:
                    break
    except OSError:
        return None
    body = data.partition(b"\r\n")[2].decode()
    return dict(line.split(":", 1) for line in body.splitlines() if ":" in line and not line.startswith("#"))


def command_calls(port: int) -> dict[str, int]:
    """Calls per command since Redis started (``cmdstat_xadd:calls=12,...``)."""
    stats = redis_info(port, "commandstats") or {}
    return {name.removeprefix("cmdstat_"): int(value.split(",")[0].split("=")[1]) for name, value in stats.items()}


def healthz(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/healthz", timeout=10) as response:
        result: dict[str, Any] = json.load(response)
        return result


SCENARIO = "stream-store"
# Commands the relay's scripts run inside Redis (the rest of INFO commandstats is what the relay itself sent).
_INSIDE = frozenset({"xadd", "hset", "hmget", "pexpire", "exists", "zadd", "zremrangebyscore", "zcard", "time"})


def scenario(plan: scenarios.Plan, log: scenarios.Log) -> list[dict[str, Any]]:
    """The paced relay through two of our servers, memory store and Redis store, interleaved per repeat."""
    if shutil.which("redis-server") is None:
        log("stream-store: skipped, redis-server is not installed (make system-deps)")
        return []
    streams = plan.relay_paced_streams
    rows: list[dict[str, Any]] = []
    with redis_server() as redis_port, scenarios.fake_upstream(plan) as (_, upstream):
        memory = t.Target("memory store", "ours", "bench.ours")
        shared = t.Target(
            "redis store",
            "ours",
            "bench.ours",
            options=("--stream-store", "redis", "--redis-url", f"redis://127.0.0.1:{redis_port}/0"),
        )
        with scenarios.servers([memory, shared], "relay", plan, upstream=upstream, threads=streams) as running:
            for repeat in range(plan.repeats):
                for target in (memory, shared):
                    server = running[target.name]
                    calls_before = command_calls(redis_port)
                    health_before = healthz(server.port)
                    row = scenarios._relay_paced(plan, target, server, streams, repeat, log)
                    time.sleep(0.5)  # the last flushes of the run's streams
                    calls = {
                        name: count - calls_before.get(name, 0)
                        for name, count in command_calls(redis_port).items()
                        if count - calls_before.get(name, 0) > 0
                    }
                    row.update(scenario=SCENARIO, level=streams)
                    store = healthz(server.port).get("stream_store")
                    if store is not None:
                        before = health_before["stream_store"]
                        row.update(
                            events_written=store["events_written"] - before["events_written"],
                            batches_written=store["batches_written"] - before["batches_written"],
                            flushes=store["flushes"] - before["flushes"],
                            calls=calls,
                        )
                    rows.append(row)
    return rows


def ratio_and_writes(rows: list[dict[str, Any]]) -> tuple[float | None, float | None]:
    """The median per-repeat CPU-per-token ratio (Redis over memory), and the most flushes the relay sent per
    entry (batch of one stream's events) Redis appended: at most 1 means at most one write per batch."""
    mine = [r for r in rows if r.get("scenario") == SCENARIO]
    ratios = []
    for repeat in sorted({r["repeat"] for r in mine}):
        pair = {r["target"]: r.get("server_cpu_us_per_frame") for r in mine if r["repeat"] == repeat}
        if pair.get("memory store") and pair.get("redis store"):
            ratios.append(pair["redis store"] / pair["memory store"])
    writes = [r["flushes"] / max(1, r["batches_written"]) for r in mine if "calls" in r and r["batches_written"]]
    ratio = sorted(ratios)[len(ratios) // 2] if ratios else None
    return ratio, (max(writes) if writes else None)


def section(rows: list[dict[str, Any]]) -> list[str]:
    """The report's section: per repeat, CPU per token of each store, and what Redis ran per token."""
    mine = [r for r in rows if r.get("scenario") == SCENARIO]
    if not mine:
        return []
    streams = mine[0]["level"]
    lines = [
        "",
        f"## Stream store: Redis against memory, {streams} paced relayed streams (issue 14)",
        "",
        "Two of our servers relay the same paced streams, one with the memory store, one with `--stream-store redis` "
        "on a redis-server pinned to the client's core; interleaved per repeat.",
        "",
        "| repeat | store | CPU-µs/token | ratio | CPU % | other load on the relay's core % | first token p99 ms |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for repeat in sorted({r["repeat"] for r in mine}):
        pair = [r for r in mine if r["repeat"] == repeat]
        base = pair[0].get("server_cpu_us_per_frame") or 0.0
        for row in pair:
            us = row.get("server_cpu_us_per_frame") or 0.0
            lines.append(
                f"| {repeat + 1} | {row['target']} | {us:.1f} | {us / base if base else 0:.2f}x "
                f"| {row.get('server_cpu_percent', 0):.0f} | {row.get('core0_other_percent', 0):.0f} "
                f"| {1000 * (row.get('ttff_p99') or 0):.0f} |"
            )
    lines += [
        "",
        "Redis, per token written (`INFO commandstats` against the relay's `events_written`):",
        "",
        "| repeat | events | entries (XADD) | events per entry | flushes | sent by the relay per token "
        "| run inside Redis per token |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in mine:
        if "calls" not in row:
            continue
        seen: dict[str, int] = row["calls"]
        events = max(1, row["events_written"])
        sent = sum(v for k, v in seen.items() if k not in _INSIDE and k != "info")
        ran = sum(v for k, v in seen.items() if k in _INSIDE)
        lines.append(
            f"| {row['repeat'] + 1} | {row['events_written']} | {row['batches_written']} "
            f"| {row['events_written'] / max(1, row['batches_written']):.2f} | {row['flushes']} "
            f"| {sent / events:.3f} | {ran / events:.3f} |"
        )
    ratio, writes = ratio_and_writes(rows)
    if ratio is not None:
        verdict = "pass" if ratio <= 1.3 else "MISS"
        lines += [
            "",
            f"Redis store over memory store, median of the repeats: {ratio:.2f}x CPU per token "
            f"(target <= 1.3x: {verdict}).",
        ]
    if writes is not None:
        verdict = "pass" if writes <= 1 else "MISS"
        lines += [f"Relay writes per entry appended: at most {writes:.3f} (target <= 1 write per batch: {verdict})."]
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.stream_store", description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=500, help="paced relayed streams at once")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    prepare()
    plan = dataclasses.replace(scenarios.Plan(), relay_paced_streams=args.streams, repeats=args.repeats, what_if=False)
    if shutil.which("redis-server") is None:
        raise SystemExit("bench.stream_store needs redis-server (make system-deps)")
    rows = scenario(plan, lambda text: print(text, flush=True))
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Stream store: Redis against memory",
        "",
        f"`python -m bench.stream_store --streams {args.streams} --repeats {args.repeats}`, {when}.",
        *section(rows),
    ]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
