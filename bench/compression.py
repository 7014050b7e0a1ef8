"""Compressed streams against uncompressed ones (issue 19): bytes on the wire and server CPU per token, at paced
relayed streams.

Ours relays the fake upstream with ``--compression gzip,deflate``; the same paced reply (the payload's tokens, 20 ms
apart) is read by `connections` clients at once, asking for gzip or not (interleaved repeats). The load client is a
raw HTTP/1.1 client on the client's core: it counts every byte it receives (head, chunk framing, body), undoes the
chunked encoding and the gzip stream as they arrive, and notes when each token's frame became readable, so it also
shows whether compression delayed tokens (the spread of a reply's tokens over the intended spread, "stretch").

``python -m bench.compression [--streams 500] [--repeats 3]`` runs it alone and writes
bench/results/compression.md and .json; ``python -m bench --scenarios compression`` runs it within the bench.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from typing import Any

from bench import runner, scenarios, standalone
from bench import targets as t
from bench.procstat import cpu_seconds, process_tree

Row = dict[str, Any]
CODINGS = ("identity", "gzip")
_TOKEN = b'data: {"content"'


@dataclass(frozen=True)
class LoadSpec:
    port: int
    path: str
    connections: int
    accept_encoding: str
    tokens: int
    delay: float
    ramp: float
    deadline: float


@dataclass
class StreamResult:
    wire_bytes: int = 0
    body_bytes: int = 0  # after undoing the content coding
    token_times: list[float] | None = None
    coding: str = "identity"
    complete: bool = False


async def _read_stream(spec: LoadSpec, start_at: float) -> StreamResult:
    await asyncio.sleep(start_at)
    result = StreamResult(token_times=[])
    times = result.token_times
    assert times is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", spec.port)
    accept = f"Accept-Encoding: {spec.accept_encoding}\r\n" if spec.accept_encoding != "identity" else ""
    writer.write(f"GET {spec.path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{accept}Connection: close\r\n\r\n".encode())
    buffer = bytearray()
    text = b""  # decoded body not yet split into SSE blocks
    inflater: Any = None
    head_done = False
    size: int | None = None
    try:
        while data := await reader.read(65536):
            result.wire_bytes += len(data)
            buffer += data
            if not head_done:
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    continue
                head = bytes(buffer[:end]).decode("latin-1").lower()
                del buffer[: end + 4]
                head_done = True
                if "content-encoding: gzip" in head:
                    result.coding = "gzip"
                    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
            while True:  # the chunked encoding (RFC 9112 §7.1)
                if size is None:
                    line_end = buffer.find(b"\r\n")
                    if line_end < 0:
                        break
                    size = int(bytes(buffer[:line_end]).split(b";")[0], 16)
                    del buffer[: line_end + 2]
                    if size == 0:
                        result.complete = True
                        return result
                if len(buffer) < size + 2:
                    break
                piece = bytes(buffer[:size])
                del buffer[: size + 2]
                size = None
                decoded = inflater.decompress(piece) if inflater is not None else piece
                result.body_bytes += len(decoded)
                text += decoded
                *blocks, text = text.split(b"\n\n")
                now = time.monotonic()
                times.extend(now for block in blocks if _TOKEN in block)
    finally:
        writer.close()
    return result


async def _load(spec: LoadSpec) -> dict[str, Any]:
    step = spec.ramp / max(1, spec.connections)
    started = time.monotonic()
    async with asyncio.timeout(spec.deadline):
        results = await asyncio.gather(*(_read_stream(spec, i * step) for i in range(spec.connections)))
    wall = time.monotonic() - started
    complete = [r for r in results if r.complete]
    stretches = sorted(
        (r.token_times[-1] - r.token_times[0]) / ((spec.tokens - 1) * spec.delay)
        for r in complete
        if r.token_times and len(r.token_times) == spec.tokens
    )
    tokens = sum(len(r.token_times or ()) for r in results)
    return {
        "streams": len(results),
        "complete_streams": len(complete),
        "codings": sorted({r.coding for r in results}),
        "tokens": tokens,
        "wire_bytes": sum(r.wire_bytes for r in results),
        "body_bytes": sum(r.body_bytes for r in results),
        "wall_seconds": wall,
        "stretch_p50": stretches[len(stretches) // 2] if stretches else None,
        "stretch_p99": stretches[min(len(stretches) - 1, int(len(stretches) * 0.99))] if stretches else None,
    }


def _run_load(spec: LoadSpec) -> dict[str, Any]:
    args = ["taskset", "-c", runner.CLIENT_CORE, sys.executable, "-m", "bench.compression", "--client"]
    done = subprocess.run(
        [*args, json.dumps(asdict(spec))], cwd=runner.ROOT, capture_output=True, timeout=spec.deadline + 30, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"compression load client failed: {done.stderr.decode()[-2000:]}")
    return dict(json.loads(done.stdout.decode().strip().splitlines()[-1]))


def scenario(plan: scenarios.Plan, log: scenarios.Log) -> list[Row]:
    streams, n, delay = plan.relay_paced_streams, plan.paced_tokens, plan.paced_delay
    ours = t.Target(
        "llm-relay --compression gzip,deflate", "ours", "bench.ours", options=("--compression", "gzip,deflate")
    )
    rows: list[Row] = []
    with (
        scenarios.fake_upstream(plan) as (_, url),
        scenarios.servers([ours], "relay", plan, upstream=url, threads=streams) as running,
    ):
        server = running[ours.name]
        path = ours.relay_path(f"n={n} d={delay:g} f=0")
        for repeat in range(plan.repeats):
            for coding in CODINGS:
                spec = LoadSpec(server.port, path, streams, coding, n, delay, ramp=n * delay, deadline=n * delay + 60)
                pids = process_tree(server.pid)
                before = cpu_seconds(pids)
                result = _run_load(spec)
                cpu = cpu_seconds(pids) - before
                tokens = result["tokens"] or 1
                row = {
                    "scenario": "compression",
                    "target": ours.name,
                    "level": streams,
                    "repeat": repeat,
                    "coding": coding,
                    **result,
                    "server_cpu_seconds": cpu,
                    "wire_bytes_per_token": result["wire_bytes"] / tokens,
                    "server_cpu_us_per_token": 1e6 * cpu / tokens,
                }
                rows.append(row)
                log(
                    f"compression {coding} x{streams}: {row['wire_bytes_per_token']:.1f} wire bytes/token, "
                    f"{row['server_cpu_us_per_token']:.1f} CPU-us/token, stretch p50 {result['stretch_p50'] or 0:.3f}, "
                    f"{result['complete_streams']}/{streams} complete"
                )
    return rows


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if ordered else float("nan")


def _cell(values: list[float], digits: int) -> str:
    """The median, and [min–max] when the repeats differ."""
    text = f"{_median(values):.{digits}f}"
    if len(values) > 1 and min(values) != max(values):
        text += f" [{min(values):.{digits}f}–{max(values):.{digits}f}]"
    return text


def section(rows: list[Row]) -> list[str]:
    """The report's section: medians over the repeats, per coding."""
    mine = [r for r in rows if r["scenario"] == "compression"]
    if not mine:
        return []
    streams = mine[0]["level"]
    lines = [
        "",
        f"## Compression: {streams} paced relayed streams, gzip against identity (issue 19)",
        "",
        "Ours with `--compression gzip,deflate`, the fake upstream's paced reply; half the runs ask for gzip. Wire "
        "bytes: everything the client received (head, chunk framing, body) per token; CPU: the server process's "
        "over the whole run per token; stretch: a reply's token spread over the intended one (1.0 = no batching). "
        "Medians over the repeats, [min–max] when they differ.",
        "",
        "| coding | wire bytes per token | server CPU-µs per token | stretch p50 / p99 | complete streams |",
        "| --- | --- | --- | --- | --- |",
    ]
    medians: dict[str, dict[str, float]] = {}
    for coding in CODINGS:
        runs = [r for r in mine if r["coding"] == coding]
        if not runs:
            continue
        values = {key: [r[key] for r in runs if r[key] is not None] for key in (
            "wire_bytes_per_token", "server_cpu_us_per_token", "stretch_p50", "stretch_p99", "complete_streams"
        )}  # fmt: skip
        m = medians[coding] = {key: _median(v) for key, v in values.items()}
        lines.append(
            f"| {coding} | {_cell(values['wire_bytes_per_token'], 1)} | "
            f"{_cell(values['server_cpu_us_per_token'], 1)} | {m['stretch_p50']:.3f} / {m['stretch_p99']:.3f} | "
            f"{m['complete_streams']:.0f} of {streams} |"
        )
    if len(medians) == 2:
        plain, gzip = medians["identity"], medians["gzip"]
        lines += [
            "",
            f"gzip: {plain['wire_bytes_per_token'] / gzip['wire_bytes_per_token']:.2f}x fewer bytes on the wire, "
            f"{gzip['server_cpu_us_per_token'] / plain['server_cpu_us_per_token']:.2f}x the CPU per token.",
        ]
    return lines


def main() -> None:
    if sys.argv[1:2] == ["--client"]:
        spec = LoadSpec(**json.loads(sys.argv[2]))
        print(json.dumps(asyncio.run(_load(spec))), flush=True)
        return
    standalone.main("compression", __doc__.split("\n\n")[0], "Compression", scenario, section, _introduction)


def _introduction(run: standalone.Run, rows: standalone.Rows) -> str:
    return (
        f"`python -m bench.compression --streams {run.streams} --repeats {run.repeats}`: server on core 0, load "
        f"client and fake upstream on core 1; load average {run.meta['load_before']} before, "
        f"{run.meta['load_after']} after. The machine was shared with other work while this ran: CPU figures are "
        "noisy, compare them repeat by repeat (compression.json) rather than to the digit."
    )


if __name__ == "__main__":
    main()
