"""Turn result rows into bench/results/latest.md (tables, ratios, a pass/miss line per target) and latest.json.

Every figure is the median of the interleaved repeats, with the spread (min–max) beside it when there was more
than one repeat. Ratios compare medians measured in the same run.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import compression, framings, stream_store
from bench import targets as t

Row = dict[str, Any]
PEER_NAMES = tuple(p.name for p in t.PEERS)
PEERS_BY_KIND = {"plain": t.PEERS[0].name}  # the plain aiohttp handler (StreamResponse), the idle target's measure


@dataclass(frozen=True)
class Stat:
    median: float | None
    low: float | None
    high: float | None
    count: int

    @classmethod
    def of(cls, values: Iterable[float | None]) -> Stat:
        present = [v for v in values if v is not None]
        if not present:
            return cls(None, None, None, 0)
        return cls(statistics.median(present), min(present), max(present), len(present))


def derive(rows: list[Row]) -> None:
    """Add the metrics computed from others (in place)."""
    for row in rows:
        us = row.get("server_cpu_us_per_frame")
        row["frames_per_cpu_second"] = 1e6 / us if us else None


def _select(rows: list[Row], scenario: str, **match: Any) -> list[Row]:
    return [r for r in rows if r["scenario"] == scenario and all(r.get(k) == v for k, v in match.items())]


def stat(rows: list[Row], scenario: str, metric: str, **match: Any) -> Stat:
    return Stat.of(r.get(metric) for r in _select(rows, scenario, **match))


def _num(value: float | None, digits: int = 0, scale: float = 1.0) -> str:
    if value is None:
        return "–"
    return f"{value * scale:,.{digits}f}"


def cell(s: Stat, digits: int = 0, scale: float = 1.0, unit: str = "") -> str:
    if s.median is None:
        return "–"
    text = f"{_num(s.median, digits, scale)}{unit}"
    if s.count > 1 and s.low != s.high:
        text += f" [{_num(s.low, digits, scale)}–{_num(s.high, digits, scale)}]"
    return text


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "–"
    return f"{a / b:.2f}x"


def _best_peer(rows: list[Row], scenario: str, metric: str, lower_is_better: bool, **match: Any) -> tuple[str, Stat]:
    best: tuple[str, Stat] = ("–", Stat(None, None, None, 0))
    for name in PEER_NAMES:
        s = stat(rows, scenario, metric, target=name, **match)
        if s.median is None:
            continue
        if best[1].median is None or (s.median < best[1].median if lower_is_better else s.median > best[1].median):
            best = (name, s)
    return best


@dataclass(frozen=True)
class Check:
    goal: str
    measured: str
    passed: bool | None  # None: not measured in this run


def _check(goal: str, value: float | None, ok: Callable[[float], bool], shown: str) -> Check:
    """`shown` is a format string of the measured value: ``{v}`` as it is, ``{ms}`` times 1000."""
    if value is None:
        return Check(goal, "not measured", None)
    return Check(goal, shown.format(v=value, ms=1000 * value), ok(value))


def _median(rows: list[Row], scenario: str, metric: str, target: str, **match: Any) -> float | None:
    return stat(rows, scenario, metric, target=target, **match).median


def _ratio_check(
    goal: str, mine: float | None, theirs: float | None, limit: float, unit: str = "µs", scale: float = 1.0
) -> Check:
    """Ours over a peer's median in the same run, passing at or below `limit`."""
    value = mine / theirs if mine is not None and theirs else None
    shown = f"{_num(mine, 1, scale)} / {_num(theirs, 1, scale)} {unit} = {{v:.2f}}x"
    return _check(goal, value, lambda v: v <= limit, shown)


def checks(rows: list[Row], plan: dict[str, Any]) -> list[Check]:
    """Issue 17's targets, each a ratio to a peer measured in the same run where the issue states one."""
    out: list[Check] = []
    ours, lean, ceiling = t.OURS.name, t.LEAN.name, t.RELAY_CEILING.name
    level = plan["relay_paced_streams"]
    if _select(rows, "relay-paced"):

        def paced(metric: str, target: str, at: int = level) -> float | None:
            return _median(rows, "relay-paced", metric, target, level=at)

        cpu = "server_cpu_us_per_frame"
        at = f"paced relay x{level}"
        out.append(
            _ratio_check(f"{at}: CPU per relayed token ≤ 1.0x the lean relay", paced(cpu, ours), paced(cpu, lean), 1.0)
        )
        out.append(
            _ratio_check(f"{at}: CPU per relayed token ≤ 2x the ceiling", paced(cpu, ours), paced(cpu, ceiling), 2.0)
        )
        out.append(
            _ratio_check(
                f"{at}: CPU per relayed token ≤ 0.1x LiteLLM", paced(cpu, ours), paced(cpu, t.LITELLM.name), 0.1
            )
        )
        out.append(
            _ratio_check(
                f"{at}: time to first token p99 ≤ 1.5x no relay",
                paced("ttff_p99", ours),
                paced("ttff_p99", t.DIRECT.name),
                1.5,
                "ms",
                1000,
            )
        )
        out.append(_check(f"{at}: cadence stretch ≤ 1.05", paced("stretch_p50", ours), lambda v: v <= 1.05, "{v:.3f}"))
        low = min(plan["relay_paced_levels"])
        out.append(
            _ratio_check(
                f"time to first token p50 at {low} streams ≤ 1.5x the lean relay",
                paced("ttff_p50", ours, low),
                paced("ttff_p50", lean, low),
                1.5,
                "ms",
                1000,
            )
        )
        lag_level = 100 if 100 in plan["relay_paced_levels"] else low
        out.append(
            _ratio_check(
                f"relay-added lag p99 at {lag_level} paced streams ≤ the lean relay's",
                paced("relay_lag_p99", ours, lag_level),
                paced("relay_lag_p99", lean, lag_level),
                1.0,
                "ms",
                1000,
            )
        )
    if _select(rows, "relay-setup"):
        out.append(
            _ratio_check(
                "request-setup CPU per stream ≤ 1.2x the lean relay",
                _median(rows, "relay-setup", "server_cpu_us_per_stream", ours),
                _median(rows, "relay-setup", "server_cpu_us_per_stream", lean),
                1.2,
            )
        )
    storm = _select(rows, "storm", target=ours)
    if storm:
        count = storm[0]["level"]
        known = [r["listen_overflows"] for r in storm if r["listen_overflows"] is not None]
        out.append(
            _check(
                f"reconnect storm of {count:,}, default settings: zero listen overflows",
                max(known) if known else None,
                lambda v: v == 0,
                "{v:,.0f} overflows (worst repeat)",
            )
        )
        out.append(
            _check(
                f"reconnect storm of {count:,}: first frame p99 < 1 s",
                _median(rows, "storm", "ttff_p99", ours),
                lambda v: v < 1.0,
                "{ms:.0f} ms",
            )
        )
    for lvl in plan.get("disconnect_levels", ()):
        found = _select(rows, "disconnect", target=ours, level=lvl)
        if not found:
            continue
        # A request still open when the wait ended counts as never closed; one never sent closes nothing.
        worst = max(float("inf") if r["not_closed"] else (r["close_max"] or 0.0) for r in found)
        out.append(
            _check(
                f"disconnects x{lvl}: every upstream closed ≤ 100 ms",
                worst,
                lambda v: v <= 0.1,
                "not all closed" if worst == float("inf") else "max {ms:.1f} ms",
            )
        )
        out.append(
            _ratio_check(
                f"disconnects x{lvl}: close p99 ≤ 2x the ceiling's",
                _median(rows, "disconnect", "close_p99", ours, level=lvl),
                _median(rows, "disconnect", "close_p99", ceiling, level=lvl),
                2.0,
                "ms",
                1000,
            )
        )
        probed = all(r.get("left_tasks") is not None for r in found)
        left = max(abs(r["left_tasks"]) + abs(r["left_generators"]) for r in found) if probed else None
        out.append(_check(f"disconnects x{lvl}: nothing left running", left, lambda v: v == 0, "{v:.0f} left"))
    idle = _select(rows, "idle", target=ours)
    if idle:
        held = min(r["held"] for r in idle)
        count = idle[0]["level"]
        out.append(_check(f"{count:,} idle streams: all held", held, lambda v: v >= count, "{v:,.0f} held"))
        plain = PEERS_BY_KIND["plain"]
        out.append(
            _ratio_check(
                "idle memory per connection ≤ 1.2x a plain aiohttp handler's",
                _median(rows, "idle", "kib_per_connection", ours),
                _median(rows, "idle", "kib_per_connection", plain),
                1.2,
                "KiB",
            )
        )
    if plan.get("baseline"):
        out += _baseline_checks(rows, t.baseline_name(plan["baseline"]), level)
    if _select(rows, "resume"):
        out += _resume_checks(rows, max(plan["resume_tokens"]))
    if _select(rows, "framings"):
        out += _framing_checks(rows)
    return out


def _framing_checks(rows: list[Row]) -> list[Check]:
    """Issue 15: each output framing's CPU per relayed token within `FRAMING_LIMIT` of SSE's, in the same run."""
    level = _select(rows, "framings")[0]["level"]
    cpu = "server_cpu_us_per_frame"
    sse = stat(rows, "framings", cpu, framing="sse").median
    return [
        _ratio_check(
            f"{level} relayed streams: CPU per token in {framing} ≤ {t.FRAMING_LIMIT:.1f}x SSE",
            stat(rows, "framings", cpu, framing=framing).median,
            sse,
            t.FRAMING_LIMIT,
        )
        for framing in framings.FRAMINGS
        if framing != "sse"
    ]


def _baseline_checks(rows: list[Row], base: str, level: int) -> list[Check]:
    """The core rebuild's criteria: ours against the baseline's medians in the same run (paced relay)."""
    out = []
    for metric, goal, limit, unit, scale in (
        ("server_cpu_us_per_frame", "CPU per relayed token", 1.15, "µs", 1),
        ("ttff_p50", "time to first token p50", 1.0, "ms", 1000),
        ("ttff_p99", "time to first token p99", 1.0, "ms", 1000),
    ):
        mine = stat(rows, "relay-paced", metric, target=t.OURS.name, level=level).median
        theirs = stat(rows, "relay-paced", metric, target=base, level=level).median
        out.append(
            _check(
                f"{level} relayed streams: {goal} ≤ {limit:.2f}x {base}",
                mine / theirs if mine is not None and theirs else None,
                lambda v, limit=limit: v <= limit,
                f"{_num(mine, 1, scale)} / {_num(theirs, 1, scale)} {unit} = {{v:.2f}}x",
            )
        )
    return out


def _resume_checks(rows: list[Row], tokens: int) -> list[Check]:
    events = tokens + 1  # the tokens and the done event
    out = []
    for metric in ("replay_p50", "replay_p99"):
        out.append(
            _check(
                f"replaying {events:,} logged events to a reconnecting reader: {metric[-3:]} < 5 ms",
                stat(rows, "resume", metric, level=tokens).median,
                lambda v: v < 0.005,
                "{ms:.2f} ms",
            )
        )
    log_bytes = stat(rows, "resume", "log_bytes_per_stream", level=tokens).median
    rss = stat(rows, "resume", "rss_bytes_per_stream", level=tokens).median
    out.append(
        _check(
            f"log memory per stream reported ({tokens:,}-token reply)",
            log_bytes,
            lambda v: True,
            f"{{v:,.0f}} B estimated (/healthz), {_num(rss, 0, 1 / 1024)} KiB RSS per retained stream",
        )
    )
    return out


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines.extend("| " + " | ".join(row) + " |" for row in body)
    return lines


def _targets_in(rows: list[Row], scenario: str) -> list[str]:
    seen: list[str] = []
    for r in rows:
        if r["scenario"] == scenario and r["target"] not in seen:
            seen.append(r["target"])
    return seen


def _cut_off(rows: list[Row], name: str, level: int) -> str:
    return (
        " (hit the time limit)"
        if any(r.get("timed_out") for r in _select(rows, "paced", target=name, level=level))
        else ""
    )


def markdown(rows: list[Row], meta: dict[str, Any]) -> str:
    plan = meta["plan"]
    derive(rows)
    noise = Stat.of(r.get("core0_other_percent") for r in rows)
    lines = [
        "# llm-relay benchmark: latest results",
        "",
        f"Run {meta['started']} on {meta['machine']}, {meta['seconds']:.0f} s in all; server/ at "
        f"{meta.get('commit', 'an unrecorded commit')}; Python {meta['python']}; "
        f"{'uvloop' if plan['uvloop'] else 'asyncio'} event loop for every asyncio server; "
        f"{plan['repeats']} interleaved repeat(s): each cell is the median, [min–max] when repeats differ. "
        f"Servers on core 0, load client and fake upstream on core 1. Load average {meta['load_before']} before, "
        f"{meta['load_after']} after; other processes used {_num(noise.median)}% of the server's core during the "
        f"median measurement (up to {_num(noise.high)}%). Versions: {meta['versions']}.",
        "",
        *_conditions(meta),
        "Reproduce with `make bench`; bench/README.md summarises these results and docs/benchmarks.md says what "
        "each number means. Charts (drawn from latest.json by bench/charts.py): "
        "[CPU per token](cpu-per-token.png), [time to first token](first-token.png), "
        "[relay-added lag](relay-lag.png).",
        "",
        "## Targets",
        "",
    ]
    body = []
    for c in checks(rows, plan):
        verdict = "not measured" if c.passed is None else ("pass" if c.passed else "**MISS**")
        body.append([c.goal, c.measured, verdict])
    lines += _table(["target (issue 17)", "measured", "result"], body)

    if _select(rows, "relay-paced"):
        lines += _relay_section(rows, plan)
        lines += _lag_by_place_section(rows, plan)
    if _select(rows, "relay-setup") or _select(rows, "relay-fast"):
        lines += _setup_section(rows, plan)
        if plan.get("baseline"):
            lines += _baseline_table(rows, t.baseline_name(plan["baseline"]))
    if _select(rows, "storm"):
        lines += [
            "",
            f"## 2. Reconnect storm: {plan['storm_connections']:,} clients connect in the same instant",
            "",
            "As after a restart, when every EventSource reconnects: a freshly started server, every connection "
            "started in one tight loop, each request sent as soon as its connection is up. First frame: from the "
            "start of the storm. Listen overflows: connection attempts the kernel dropped because the listen queue "
            "was full (TcpExtListenOverflows); each such client waits for a SYN retransmit (1 s, 3 s, 7 s...).",
            "",
        ]
        body = []
        for name in _targets_in(rows, "storm"):
            found = _select(rows, "storm", target=name)
            overflows = [r["listen_overflows"] for r in found if r["listen_overflows"] is not None]
            body.append(
                [
                    f"**{name}**" if name == t.OURS.name else name,
                    f"{min(r['first_frames'] for r in found):,} / {found[0]['level']:,}",
                    cell(Stat.of(overflows)),
                    cell(stat(rows, "storm", "ttff_p50", target=name), scale=1000)
                    + " / "
                    + cell(stat(rows, "storm", "ttff_p99", target=name), scale=1000),
                    cell(stat(rows, "storm", "ttff_max", target=name), scale=1000),
                ]
            )
        lines += _table(
            ["server", "first frames / clients", "listen overflows", "first frame p50 / p99 ms", "first frame max ms"],
            body,
        )
    if _select(rows, "disconnect"):
        lines += _disconnect_section(rows, plan)
    if _select(rows, "idle"):
        lines += ["", f"## 4. Idle capacity: {plan['idle_connections']:,} idle streams (heartbeats every 2 s)", ""]
        body = []
        for name in _targets_in(rows, "idle"):
            found = _select(rows, "idle", target=name)
            body.append(
                [
                    f"**{name}**" if name == t.OURS.name else name,
                    f"{min(r['held'] for r in found):,} / {found[0]['level']:,}",
                    cell(stat(rows, "idle", "kib_per_connection", target=name), 1),
                    cell(stat(rows, "idle", "ready_seconds", target=name), 1, unit=" s"),
                ]
            )
        lines += _table(["server", "held / opened", "server memory KiB per connection", "all held after"], body)

    if _select(rows, "resume"):
        lines += _resume_section(rows, plan)
    if _select(rows, "throughput"):
        lines += [
            "",
            "## 6. Zero-delay throughput: the demo model's tokens, streams back to back on keep-alive connections",
            "",
            "Not a relay figure: at zero delay our demo model hands the stream 64 tokens per batch, which one write "
            "carries. Frames per write (the server's write(2)/writev(2) calls, /proc/<pid>/io) shows the batching; "
            "the ceiling runs twice, one frame per write and 64 frames per write, so no ratio credits batching to "
            "the relay.",
            "",
        ]
        body = []
        for level in plan["throughput_levels"]:
            # The ceiling batched like our demo model's stream: the fair "vs ceiling" at zero delay.
            fair = t.CEILING_BATCHED.name
            ceiling = stat(rows, "throughput", "frames_per_second", target=fair, level=level).median
            _, peer = _best_peer(rows, "throughput", "frames_per_second", False, level=level)
            cpu_ceiling = stat(rows, "throughput", "frames_per_cpu_second", target=fair, level=level).median
            _, cpu_peer = _best_peer(rows, "throughput", "frames_per_cpu_second", False, level=level)
            for name in _targets_in(rows, "throughput"):
                fps = stat(rows, "throughput", "frames_per_second", target=name, level=level)
                per_cpu = stat(rows, "throughput", "frames_per_cpu_second", target=name, level=level)
                body.append(
                    [
                        str(level),
                        f"**{name}**" if name == t.OURS.name else name,
                        cell(fps),
                        ratio(fps.median, peer.median),
                        ratio(fps.median, ceiling),
                        cell(stat(rows, "throughput", "server_cpu_us_per_frame", target=name, level=level), 2),
                        cell(stat(rows, "throughput", "frames_per_write", target=name, level=level), 1),
                        cell(per_cpu),
                        ratio(per_cpu.median, cpu_peer.median),
                        ratio(per_cpu.median, cpu_ceiling),
                        cell(stat(rows, "throughput", "server_cpu_percent", target=name, level=level), unit="%"),
                        cell(stat(rows, "throughput", "client_cpu_percent", target=name, level=level), unit="%"),
                    ]
                )
        lines += [
            "Frames/s is wall clock; frames per CPU-second is frames/s divided by the server's CPU use (what one "
            'whole core would deliver). "vs" columns compare medians with the best tutorial peer and the bare '
            "ceiling writing 64 frames per write.",
            "",
        ]
        lines += _table(
            [
                "streams",
                "server",
                "frames/s",
                "vs best peer",
                "vs ceiling",
                "server CPU-µs/frame",
                "frames per write",
                "frames per CPU-s",
                "vs best peer",
                "vs ceiling",
                "server CPU",
                "client CPU",
            ],
            body,
        )

    if _select(rows, "paced"):
        lines += [
            "",
            f"## 7. The demo model's paced streams (no upstream): {plan['paced_tokens']} tokens at "
            f"{1000 * plan['paced_delay']:.0f} ms each",
            "",
            f"From {plan['heavy_from']:,} streams on, every server is several cores' work behind: "
            f"{plan['heavy_repeats']} repeat there. A server that had not finished its measured streams 15 s after "
            f"the window is cut off (hit the time limit); its figures cover the streams that did end.",
            "",
        ]
        body = []
        for level in plan["paced_levels"]:
            for name in _targets_in(rows, "paced"):

                def s(metric: str, level: int = level, name: str = name) -> Stat:
                    return stat(rows, "paced", metric, target=name, level=level)

                body.append(
                    [
                        str(level),
                        f"**{name}**" if name == t.OURS.name else name,
                        cell(s("ttff_p50"), scale=1000) + " / " + cell(s("ttff_p99"), scale=1000),
                        cell(s("lag_p99"), scale=1000),
                        cell(s("stretch_p50"), 3) + " / " + cell(s("stretch_p99"), 3),
                        cell(s("lateness_p99"), scale=1000),
                        cell(s("server_cpu_percent"), unit="%"),
                        cell(s("server_cpu_us_per_frame"), 1),
                        cell(s("measured_streams")) + _cut_off(rows, name, level),
                    ]
                )
        lines += _table(
            [
                "streams",
                "server",
                "first frame p50 / p99 ms",
                "delivery lag p99 ms",
                "cadence stretch p50 / p99",
                "final-token lateness p99 ms",
                "server CPU",
                "CPU-µs/frame",
                "streams measured",
            ],
            body,
        )

    client = _select(rows, "client")
    if client:
        lines += ["", "## 8. Load client ceiling (against a server that writes each whole response pre-encoded)", ""]
        body = []
        for level in sorted({r["level"] for r in client}):
            body.append(
                [
                    str(level),
                    cell(stat(rows, "client", "frames_per_second", level=level)),
                    cell(stat(rows, "client", "client_cpu_percent", level=level), unit="%"),
                ]
            )
        lines += _table(["streams", "frames/s the client can count", "client CPU"], body)

    lines += stream_store.section(rows)
    lines += compression.section(rows)
    lines += framings.section(rows)
    lines.append("")
    return "\n".join(lines)


def _paired(rows: list[Row], scenario: str, metric: str, base: str) -> Stat:
    """Ours over the baseline, repeat by repeat (the two ran back to back in each repeat)."""
    theirs = {r["repeat"]: r.get(metric) for r in _select(rows, scenario, target=base)}
    return Stat.of(
        r[metric] / theirs[r["repeat"]]
        for r in _select(rows, scenario, target=t.OURS.name)
        if r.get(metric) is not None and theirs.get(r["repeat"])
    )


def _baseline_table(rows: list[Row], base: str) -> list[str]:
    lines = [
        "",
        f"### {t.OURS.name} against {base} (our server from that commit's server/, same options, same run)",
        "",
        "Ratios: ours over the baseline, of the medians, and repeat by repeat (each repeat ran the two back to back). "
        "Core 0 shared: CPU time of other processes on the server's core during the window.",
        "",
    ]
    body = []
    # Each paced level on its own rows: a median over levels would mix 10 streams' CPU per token with 1,000's.
    paced = [
        ("relay-paced", level, metric, f"paced x{level}: {label}", digits, scale)
        for level in sorted({r["level"] for r in _select(rows, "relay-paced", target=base)})
        for metric, label, digits, scale in (
            ("server_cpu_us_per_frame", "CPU-µs per token", 1, 1),
            ("ttff_p50", "first token p50 ms", 1, 1000),
            ("ttff_p99", "first token p99 ms", 1, 1000),
            ("lag_p99", "delivery lag p99 ms", 1, 1000),
            ("stretch_p50", "cadence stretch p50", 3, 1),
            ("server_cpu_percent", "server CPU %", 0, 1),
            ("core0_other_percent", "core 0 shared %", 0, 1),
        )
    ]
    for scenario, level, metric, label, digits, scale in [
        ("relay-fast", None, "server_cpu_us_per_frame", "fast: CPU-µs per token", 1, 1),
        *paced,
    ]:
        at = {} if level is None else {"level": level}
        mine = stat(rows, scenario, metric, target=t.OURS.name, **at)
        theirs = stat(rows, scenario, metric, target=base, **at)
        at_level = rows if level is None else [r for r in rows if r.get("level") == level]
        body.append(
            [
                label,
                cell(mine, digits, scale),
                cell(theirs, digits, scale),
                ratio(mine.median, theirs.median),
                cell(_paired(at_level, scenario, metric, base), 2, unit="x"),
            ]
        )
    for level in sorted({r["level"] for r in _select(rows, "disconnect", target=base)}):
        for metric, label in (
            ("close_p50", "close p50 ms"),
            ("close_p99", "close p99 ms"),
            ("close_max", "close max ms"),
        ):
            mine = stat(rows, "disconnect", metric, target=t.OURS.name, level=level)
            theirs = stat(rows, "disconnect", metric, target=base, level=level)
            paired = _paired([r for r in rows if r.get("level") == level], "disconnect", metric, base)
            body.append(
                [
                    f"disconnects x{level}: {label}",
                    cell(mine, 1, 1000),
                    cell(theirs, 1, 1000),
                    ratio(mine.median, theirs.median),
                    cell(paired, 2, unit="x"),
                ]
            )
    return lines + _table(["", t.OURS.name, base, "ratio of medians", "ratio per repeat"], body)


def _resume_section(rows: list[Row], plan: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "## 5. Resume: reconnecting readers replay an ended stream; what a retained stream costs",
        "",
        f"Ours only, relaying the fake upstream (the payload's tokens repeated for long replies). Per size and "
        f"repeat, {plan['resume_streams']} streams opt in to resume (`resume=1`) and are read whole, one at a time; "
        f"then {plan['resume_replays']} reconnecting readers, one at a time, each on a new connection, replay one "
        f"from its start (`GET /api/streams/{{id}}?after=0`, SSE). Replay: from sending the request to the last "
        f"byte of the body (checked to hold every event). Log: the growth of `/healthz`'s `log_bytes` over the "
        f"growth of `retained_streams` (the relay's own estimate); RSS: the server's VmRSS growth over the streams "
        f"created.",
        "",
    ]
    body = []
    for tokens in plan["resume_tokens"]:

        def s(metric: str, tokens: int = tokens) -> Stat:
            return stat(rows, "resume", metric, level=tokens)

        events = tokens + 1
        log_bytes, rss = s("log_bytes_per_stream"), s("rss_bytes_per_stream")
        body.append(
            [
                f"{tokens:,} tokens ({events:,} events)",
                cell(s("replay_p50"), 2, 1000) + " / " + cell(s("replay_p99"), 2, 1000),
                cell(s("replay_max"), 2, 1000),
                cell(s("replay_server_cpu_us")),
                cell(log_bytes),
                _num(log_bytes.median and log_bytes.median / events),
                cell(rss, 1, 1 / 1024),
                _num(rss.median and rss.median / events),
            ]
        )
    return lines + _table(
        [
            "reply",
            "replay p50 / p99 ms",
            "replay max ms",
            "server CPU-µs per replay",
            "log bytes per stream",
            "per event",
            "RSS KiB per stream",
            "RSS bytes per event",
        ],
        body,
    )


def _conditions(meta: dict[str, Any]) -> list[str]:
    """A warning a reader cannot miss when the figures are a smoke run's or were taken on a busy machine; what the
    run left out of `make bench` and why; how long each scenario took."""
    notes = []
    if meta.get("quick"):
        notes.append(
            "**A `--quick` smoke run**: smaller sizes and levels, one repeat; the targets are judged at its levels."
        )
    load = float(str(meta.get("load_before", "0")).split()[0] or 0)
    if load >= 1.0:
        notes.append(
            f"**Taken on a busy machine** (load average {load:.2f} at the start, on {meta.get('machine', '?')}): "
            "other processes shared the server's core, so every figure is noisy, absolute ones most; ratios measured "
            "in the same run are the least unreliable, and even they moved several-fold between runs."
        )
    lines = [line for note in notes for line in (note, "")]
    if meta.get("left_out"):
        lines += ["Left out of this run:", "", *(f"- {note}" for note in meta["left_out"]), ""]
    if meta.get("scenario_seconds"):
        spent = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in meta["scenario_seconds"].items())
        lines += [f"Time per scenario: {spent}.", ""]
    return lines


def _name(name: str) -> str:
    return f"**{name}**" if name == t.OURS.name else name


def _relay_section(rows: list[Row], plan: dict[str, Any]) -> list[str]:
    n, delay = plan["relay_paced_tokens"], plan["paced_delay"]
    once = [name for name in (t.LITELLM.name, *PEER_NAMES) if _select(rows, "relay-paced", target=name)]
    peers = f"LiteLLM and the tutorial relays run once, up to {plan['relay_peer_max']:,} streams"
    if not once:
        peers = "LiteLLM and the tutorial relays were left out of this run"
    elif len(once) < 1 + len(PEER_NAMES):
        peers = f"Run once, up to {plan['relay_peer_max']:,} streams: {', '.join(once)} (the others left out)"
    lines = [
        "",
        f"## 1. Paced relay: {n} tokens per stream at {1000 * delay:.0f} ms, every client at once",
        "",
        "The fake upstream (bench/upstream.py) → each relay → the load client. All clients send their requests in "
        "the same instant on connections opened beforehand (each relay's upstream pool warmed by as many 1-token "
        "streams first). CPU per relayed token: the relay's CPU time over the tokens delivered during the wave "
        f"(request setup included). Relay-added lag: each token's receipt minus the upstream's generation stamp "
        f"(same machine, same clock), so the no-relay row is the floor. Time to first token: request sent → first "
        f"token (the upstream sends it at once). Stretch: first-to-last token time over {n - 1} × "
        f"{1000 * delay:.0f} ms. {peers}; a run still unfinished {plan['relay_cut_off']:g} s after a stream's "
        "length is cut off, and its time figures cover only the streams that ended.",
        "",
    ]
    body = []
    for level in plan["relay_paced_levels"]:

        def med(metric: str, target: str, level: int = level) -> float | None:
            return stat(rows, "relay-paced", metric, target=target, level=level).median

        lean = med("server_cpu_us_per_frame", t.LEAN.name)
        ceiling = med("server_cpu_us_per_frame", t.RELAY_CEILING.name)
        for name in _targets_in(rows, "relay-paced"):

            def s(metric: str, level: int = level, name: str = name) -> Stat:
                return stat(rows, "relay-paced", metric, target=name, level=level)

            found = _select(rows, "relay-paced", target=name, level=level)
            if not found:
                continue
            direct = name == t.DIRECT.name
            cpu = s("server_cpu_us_per_frame")
            cut = " (cut off)" if any(r.get("timed_out") for r in found) else ""
            body.append(
                [
                    f"{level:,}",
                    _name(name),
                    "–" if direct else cell(cpu, 1),
                    "–" if direct else ratio(cpu.median, lean),
                    "–" if direct else ratio(cpu.median, ceiling),
                    cell(s("relay_lag_p50"), 1, 1000) + " / " + cell(s("relay_lag_p99"), 1, 1000),
                    cell(s("ttff_p50"), 1, 1000) + " / " + cell(s("ttff_p99"), 1, 1000),
                    cell(s("stretch_p50"), 3),
                    "–" if direct else cell(s("server_cpu_percent"), unit="%"),
                    cell(s("measured_streams")) + cut,
                ]
            )
    return lines + _table(
        [
            "streams",
            "server",
            "CPU-µs per token",
            "vs lean",
            "vs ceiling",
            "relay lag p50 / p99 ms",
            "first token p50 / p99 ms",
            "stretch",
            "server CPU",
            "streams measured",
        ],
        body,
    )


def _lag_by_place_section(rows: list[Row], plan: dict[str, Any]) -> list[str]:
    """Relay-added lag p99 by the token's place in its stream: where a relay's tail comes from."""
    body = []
    for level in plan["relay_paced_levels"]:
        for name in _targets_in(rows, "relay-paced"):

            def s(metric: str, level: int = level, name: str = name) -> Stat:
                return stat(rows, "relay-paced", metric, target=name, level=level)

            if s("relay_lag_middle_p99").median is None:
                continue  # (rows from before the split, or a run cut off before any stamp)
            # A run cut off has last tokens only from the streams that ended: its last-token figure leans low.
            cut = (
                " (cut off)"
                if any(r.get("timed_out") for r in _select(rows, "relay-paced", target=name, level=level))
                else ""
            )
            body.append(
                [
                    f"{level:,}{cut}",
                    _name(name),
                    cell(s("relay_lag_first_p99"), 1, 1000),
                    cell(s("relay_lag_middle_p99"), 1, 1000),
                    cell(s("relay_lag_last_p99"), 1, 1000),
                    cell(s("relay_lag_p99"), 1, 1000),
                ]
            )
    if not body:
        return []
    n = plan["relay_paced_tokens"]
    lines = [
        "",
        "### Relay-added lag by the token's place in its stream",
        "",
        "The p99 of the lag above, by the token's place in its stream: its first token (the upstream sends it as "
        "soon as the request reaches it, while the relay may still be setting up other clients' requests: every "
        f"client asks at once), its tokens 2 to {n - 1}, and its last (sent with the end of the reply; streams "
        "that started together end together, so the relay may be busy with other streams' ends then: in ours, "
        "the terminal event, the upstream's close, the access line and the metrics).",
        "",
    ]
    return lines + _table(
        ["streams", "server", "first token p99 ms", f"tokens 2–{n - 1} p99 ms", "last token p99 ms", "all p99 ms"],
        body,
    )


def _setup_section(rows: list[Row], plan: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "### Request setup and zero-delay relay",
        "",
        f"Setup: 1-token replies back to back on {plan['setup_connections']} connections, the relay's CPU per "
        f"stream (request in, upstream request, one token, the end). Zero-delay: {plan['relay_connections']} "
        f"streams of {plan['relay_tokens']} tokens the upstream writes at once, CPU per relayed token and tokens "
        f"per write (the relay's write(2)/writev(2) calls).",
        "",
    ]
    lean_setup = stat(rows, "relay-setup", "server_cpu_us_per_stream", target=t.LEAN.name).median
    lean_fast = stat(rows, "relay-fast", "server_cpu_us_per_frame", target=t.LEAN.name).median
    body = []
    for name in _targets_in(rows, "relay-setup") or _targets_in(rows, "relay-fast"):
        setup = stat(rows, "relay-setup", "server_cpu_us_per_stream", target=name)
        fast = stat(rows, "relay-fast", "server_cpu_us_per_frame", target=name)
        body.append(
            [
                _name(name),
                cell(setup),
                ratio(setup.median, lean_setup),
                cell(fast, 1),
                ratio(fast.median, lean_fast),
                cell(stat(rows, "relay-fast", "frames_per_write", target=name), 1),
            ]
        )
    return lines + _table(
        ["server", "setup CPU-µs per stream", "vs lean", "zero-delay CPU-µs per token", "vs lean", "tokens per write"],
        body,
    )


def _disconnect_section(rows: list[Row], plan: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "## 3. Disconnects: every client leaves mid-stream",
        "",
        f"N clients open {plan['disconnect_tokens']}-token paced streams at once and each closes its connection "
        f"after 5–25 tokens. Close: from the client's close to the fake upstream seeing that request's connection "
        f"closed (the wait ends {plan['close_wait']:g} s after the last client left; a relay that lets the upstream "
        f"generate to the end shows there). Left: tasks and suspended generators of the server's code still alive "
        f"a second later (bench/probe.py; LiteLLM runs no probe).",
        "",
    ]
    body = []
    for level in plan.get("disconnect_levels", ()):
        for name in _targets_in(rows, "disconnect"):
            found = _select(rows, "disconnect", target=name, level=level)
            if not found:
                continue
            closed = min(r["closed"] for r in found)
            never = max(r.get("never_requested", 0) for r in found)
            probed = all(r.get("left_tasks") is not None for r in found)
            left = (
                f"{max(r['left_tasks'] for r in found)} / {max(r['left_generators'] for r in found)}" if probed else "–"
            )

            def s(metric: str, name: str = name, level: int = level) -> Stat:
                return stat(rows, "disconnect", metric, target=name, level=level)

            body.append(
                [
                    f"{level:,}",
                    _name(name),
                    f"{closed} / {found[0]['leavers'] - never}",
                    cell(s("close_p50"), 1, 1000) + " / " + cell(s("close_p99"), 1, 1000),
                    cell(s("close_max"), 1, 1000),
                    str(max(r["ran_to_end"] for r in found)),
                    left,
                ]
            )
    return lines + _table(
        [
            "streams",
            "server",
            "upstreams closed early",
            "close p50 / p99 ms",
            "close max ms",
            "replies generated to the end",
            "tasks / generators left",
        ],
        body,
    )


def write(rows: list[Row], meta: dict[str, Any], directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    derive(rows)
    (directory / "latest.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str) + "\n")
    path = directory / "latest.md"
    path.write_text(markdown(rows, meta))
    try:
        from bench import charts

        charts.render(rows, directory)
    except ImportError as error:  # matplotlib comes with the bench extra; the tables do not need it
        print(f"charts not drawn ({error}): pip install -e '.[bench]'")
    return path
