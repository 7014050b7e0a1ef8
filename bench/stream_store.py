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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.stream_store", description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=500, help="paced relayed streams at once")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    prepare()
    plan = dataclasses.replace(scenarios.Plan(), relay_paced_streams=args.streams, repeats=args.repeats, what_if=False)
    lines: list[str] = []

    def log(text: str) -> None:
        print(text, flush=True)

    rows: list[dict[str, Any]] = []
    with redis_server() as redis_port, scenarios.fake_upstream(plan) as (_, upstream):
        memory = t.Target("memory store", "ours", "bench.ours")
        shared = t.Target(
            "redis store",
            "ours",
            "bench.ours",
            options=("--stream-store", "redis", "--redis-url", f"redis://127.0.0.1:{redis_port}/0"),
        )
        with scenarios.servers([memory, shared], "relay", plan, upstream=upstream, threads=args.streams) as running:
            for repeat in range(plan.repeats):
                for target in (memory, shared):
                    server = running[target.name]
                    calls_before = command_calls(redis_port)
                    health_before = healthz(server.port)
                    row = scenarios._relay_paced(plan, target, server, args.streams, repeat, log)
                    # The last flushes of the run's streams.
                    time.sleep(0.5)
                    calls = {
                        name: count - calls_before.get(name, 0)
                        for name, count in command_calls(redis_port).items()
                        if count - calls_before.get(name, 0) > 0
                    }
                    store = healthz(server.port).get("stream_store")
                    if store is not None:
                        events = store["events_written"] - health_before["stream_store"]["events_written"]
                        batches = store["batches_written"] - health_before["stream_store"]["batches_written"]
                        flushes = store["flushes"] - health_before["stream_store"]["flushes"]
                        row.update(events_written=events, batches_written=batches, flushes=flushes, calls=calls)
                    rows.append(row)

    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines += [
        "# Stream store: Redis against memory",
        "",
        f"`python -m bench.stream_store --streams {args.streams} --repeats {args.repeats}`, {when}. "
        f"{args.streams} paced streams of {plan.relay_paced_tokens} tokens every {1000 * plan.paced_delay:g} ms "
        "through the fake upstream and the openai client, all started at once (the full relay's paced scenario); "
        "the relay pinned to its core, the load client and redis-server to the other.",
        "",
        "| repeat | store | CPU-µs/token | ratio | CPU % | other load on the relay's core % | ttft p99 ms |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for repeat in range(args.repeats):
        pair = [r for r in rows if r["repeat"] == repeat]
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
        "Redis, per token written (whole run, `INFO commandstats` against the relay's `events_written`):",
        "",
        "| repeat | events | entries (XADD) | events per entry | flushes | sent by the relay per token "
        "| run inside Redis per token |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        if "calls" not in row:
            continue
        seen: dict[str, int] = row["calls"]
        events = max(1, row["events_written"])
        inside = {"xadd", "hset", "hmget", "pexpire", "exists", "zadd", "zremrangebyscore", "zcard", "time"}
        sent = sum(v for k, v in seen.items() if k not in inside and k != "info")
        ran = sum(v for k, v in seen.items() if k in inside)
        lines.append(
            f"| {row['repeat'] + 1} | {row['events_written']} | {row['batches_written']} "
            f"| {row['events_written'] / max(1, row['batches_written']):.2f} | {row['flushes']} "
            f"| {sent / events:.3f} | {ran / events:.3f} |"
        )
    lines += ["", "Commands seen (last repeat): " + ", ".join(f"{k} {v}" for k, v in sorted(rows[-1]["calls"].items()))]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
