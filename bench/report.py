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

from bench import compression
from bench import targets as t

Row = dict[str, Any]
PEER_NAMES = tuple(p.name for p in t.PEERS)


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


def checks(rows: list[Row], plan: dict[str, Any]) -> list[Check]:
    out: list[Check] = []
    ours = t.OURS.name
    for level in plan["throughput_levels"][1:]:
        # Wall-clock frames/s, and frames per second of server CPU (what one whole core would do), which the
        # other processes on this shared machine disturb far less. Both are judged; neither is hidden.
        for metric, label in (("frames_per_second", "frames/s"), ("frames_per_cpu_second", "frames per CPU-s")):
            mine = stat(rows, "throughput", metric, target=ours, level=level).median
            ceiling = stat(rows, "throughput", metric, target=t.CEILING.name, level=level).median
            peer_name, peer = _best_peer(rows, "throughput", metric, False, level=level)
            if mine is not None and ceiling:
                out.append(
                    _check(
                        f"throughput x{level}, {label}: ≥ bare-protocol ceiling",
                        mine / ceiling,
                        lambda v: v >= 1.0,
                        f"{mine:,.0f} = {{v:.2f}}x ceiling",
                    )
                )
            if mine is not None and peer.median:
                out.append(
                    _check(
                        f"throughput x{level}, {label}: ≥ 2x best peer",
                        mine / peer.median,
                        lambda v: v >= 2.0,
                        f"{{v:.2f}}x {peer_name}",
                    )
                )
    paced_level = 1000 if 1000 in plan["paced_levels"] else plan["paced_levels"][0]
    s = stat(rows, "paced", "stretch_p50", target=ours, level=paced_level).median
    out.append(_check(f"paced x{paced_level}: cadence stretch ≤ 1.05", s, lambda v: v <= 1.05, "{v:.3f}"))
    s = stat(rows, "paced", "lateness_p99", target=ours, level=paced_level).median
    out.append(
        _check(
            f"paced x{paced_level}: final-token lateness p99 < 100 ms",
            s,
            lambda v: v < 0.1,
            "{ms:.0f} ms",
        )
    )
    s = stat(rows, "paced", "ttff_p99", target=ours, level=paced_level).median
    out.append(
        _check(
            f"paced x{paced_level}: time to first frame p99 < 100 ms",
            s,
            lambda v: v < 0.1,
            "{ms:.0f} ms",
        )
    )
    idle = _select(rows, "idle", target=ours)
    if idle:
        held = min(r["held"] for r in idle)
        count = idle[0]["level"]
        out.append(_check(f"{count:,} idle streams: all held", held, lambda v: v >= count, "{v:,.0f} held"))
        kib = stat(rows, "idle", "kib_per_connection", target=ours).median
        out.append(_check("idle streams: ≤ 8 KiB per connection", kib, lambda v: v <= 8.0, "{v:.1f} KiB"))
    for case, goal in (
        ("mid-stream", "disconnects"),
        ("idle stream", "disconnects from idle streams"),
        ("under load", "disconnects under load"),
    ):
        found = _select(rows, "disconnect", target=ours, case=case)
        if not found:
            continue
        # A request still open when the wait ended counts as never closed; one never sent closes nothing.
        worst = max(float("inf") if r["not_closed"] else (r["close_max"] or 0.0) for r in found)
        out.append(
            _check(
                f"{goal}: every upstream closed ≤ 100 ms",
                worst,
                lambda v: v <= 0.1,
                "not all closed" if worst == float("inf") else "max {ms:.0f} ms",
            )
        )
        if case != "under load":
            left = max(abs(r["left_tasks"]) + abs(r["left_generators"]) for r in found)
            out.append(_check(f"{goal}: zero tasks or generators left", left, lambda v: v == 0, "{v:.0f} left"))
    for scenario, label in (("relay-fast", "full relay"), ("relay-paced", "paced relay")):
        mine = stat(rows, scenario, "server_cpu_us_per_frame", target=ours).median
        peer_name, peer = _best_peer(rows, scenario, "server_cpu_us_per_frame", True)
        if mine is not None and peer.median:
            out.append(
                _check(
                    f"{label}: ≤ 1/4 of best peer's CPU per token",
                    mine / peer.median,
                    lambda v: v <= 0.25,
                    f"{mine:.1f} µs = {{v:.2f}}x {peer_name}",
                )
            )
    storm = _select(rows, "storm", target=ours)
    if storm:
        count = storm[0]["level"]
        known = [r["listen_overflows"] for r in storm if r["listen_overflows"] is not None]
        out.append(
            _check(
                f"reconnect storm, {count:,} clients at once: no listen queue overflow",
                max(known) if known else None,
                lambda v: v == 0,
                "{v:,.0f} overflows (worst repeat)",
            )
        )
        out.append(
            _check(
                f"reconnect storm, {count:,} clients at once: every client's first frame",
                min(r["first_frames"] for r in storm),
                lambda v: v >= count,
                "{v:,.0f} (fewest in a repeat)",
            )
        )
    level = plan["relay_paced_streams"]
    s = stat(rows, "relay-paced", "stretch_p50", target=ours).median
    out.append(_check(f"{level} relayed streams: cadence stretch ≤ 1.05", s, lambda v: v <= 1.05, "{v:.3f}"))
    s = stat(rows, "relay-paced", "ttff_p99", target=ours).median
    out.append(
        _check(
            f"{level} relayed streams: time to first token p99 < 200 ms",
            s,
            lambda v: v < 0.2,
            "{ms:.0f} ms",
        )
    )
    if plan.get("baseline"):
        out += _baseline_checks(rows, t.baseline_name(plan["baseline"]), level)
    if _select(rows, "resume"):
        out += _resume_checks(rows, max(plan["resume_tokens"]))
    return out


def _baseline_checks(rows: list[Row], base: str, level: int) -> list[Check]:
    """The core rebuild's criteria: ours against the baseline's medians in the same run (paced relay)."""
    out = []
    for metric, goal, limit, unit, scale in (
        ("server_cpu_us_per_frame", "CPU per relayed token", 1.15, "µs", 1),
        ("ttff_p50", "time to first token p50", 1.0, "ms", 1000),
        ("ttff_p99", "time to first token p99", 1.0, "ms", 1000),
    ):
        mine = stat(rows, "relay-paced", metric, target=t.OURS.name).median
        theirs = stat(rows, "relay-paced", metric, target=base).median
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
        "Reproduce with `make bench` (the README's Benchmarks section says what each number means).",
        "",
        "## Targets",
        "",
    ]
    body = []
    for c in checks(rows, plan):
        verdict = "not measured" if c.passed is None else ("pass" if c.passed else "**MISS**")
        body.append([c.goal, c.measured, verdict])
    lines += _table(["target (issues 6 and 12)", "measured", "result"], body)

    client = _select(rows, "client")
    if client:
        lines += ["", "## Load client ceiling (against a server that writes each whole response pre-encoded)", ""]
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

    if _select(rows, "throughput"):
        lines += ["", "## 1. Throughput: zero-delay tokens, streams back to back on keep-alive connections", ""]
        body = []
        for level in plan["throughput_levels"]:
            ceiling = stat(rows, "throughput", "frames_per_second", target=t.CEILING.name, level=level).median
            _, peer = _best_peer(rows, "throughput", "frames_per_second", False, level=level)
            cpu_ceiling = stat(rows, "throughput", "frames_per_cpu_second", target=t.CEILING.name, level=level).median
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
                        cell(per_cpu),
                        ratio(per_cpu.median, cpu_peer.median),
                        ratio(per_cpu.median, cpu_ceiling),
                        cell(stat(rows, "throughput", "server_cpu_percent", target=name, level=level), unit="%"),
                        cell(stat(rows, "throughput", "client_cpu_percent", target=name, level=level), unit="%"),
                    ]
                )
        lines += [
            "Frames/s is wall clock; frames per CPU-second is frames/s divided by the server's CPU use (what one "
            'whole core would deliver). "vs" columns compare medians with the best peer and the bare ceiling.',
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
            f"## 2. Paced streams: {plan['paced_tokens']} tokens at {1000 * plan['paced_delay']:.0f} ms each",
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

    if _select(rows, "idle"):
        lines += ["", f"## 3. Capacity: {plan['idle_connections']:,} idle streams (heartbeats every 2 s)", ""]
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

    if _select(rows, "disconnect"):
        lines += [
            "",
            f"## 4. Disconnects: {plan['leavers']} clients leave (relaying the fake upstream)",
            "",
            f"Leavers arrive over 1 s. Mid-stream clients leave after 5–25 tokens of a "
            f"{plan['disconnect_tokens']}-token reply paced at {1000 * plan['paced_delay']:.0f} ms; idle-stream "
            f"clients leave 0.3 s into a reply whose first token is 30 s away; under load (ours only), "
            f"{plan['disconnect_load']} paced relayed streams run meanwhile. "
            f"Latency: from the client's close to the upstream seeing its request closed; the wait ends "
            f"{plan['close_wait']:g} s after the last client left.",
            "",
        ]
        body = []
        for case in ("mid-stream", "idle stream", "under load"):
            for name in _targets_in(rows, "disconnect"):
                found = _select(rows, "disconnect", target=name, case=case)
                if not found:
                    continue
                closed = min(r["closed"] for r in found)
                ran = max(r["ran_to_end"] for r in found)
                never = max(r.get("never_requested", 0) for r in found)
                left = max(r["left_tasks"] for r in found), max(r["left_generators"] for r in found)
                body.append(
                    [
                        case,
                        f"**{name}**" if name == t.OURS.name else name,
                        f"{closed} / {found[0]['leavers'] - never}",
                        cell(stat(rows, "disconnect", "close_p50", target=name, case=case), 1, 1000),
                        cell(stat(rows, "disconnect", "close_max", target=name, case=case), 1, 1000),
                        str(ran),
                        f"{left[0]} / {left[1]}",
                    ]
                )
        lines += _table(
            [
                "case",
                "server",
                "upstreams closed early",
                "close p50 ms",
                "close max ms",
                "upstream replies generated to the end",
                "tasks / generators left after 1 s",
            ],
            body,
        )

    if _select(rows, "relay-fast") or _select(rows, "relay-paced"):
        lines += [
            "",
            "## 5. Full relay: fake upstream → openai client → server → load client",
            "",
            f"Fast: {plan['relay_connections']} streams of {plan['relay_tokens']} zero-delay tokens. Paced: "
            f"{plan['relay_paced_streams']} streams of {plan['paced_tokens']} tokens at "
            f"{1000 * plan['paced_delay']:.0f} ms ({plan['heavy_repeats']} repeat for the peers, which it overloads "
            f"several times over). CPU is the relay server's own (the upstream runs on core 1). The what-if rows "
            f"are proposals for server/ (bench/whatif.py), not what ships.",
            "",
        ]
        _, fast_peer = _best_peer(rows, "relay-fast", "server_cpu_us_per_frame", True)
        _, paced_peer = _best_peer(rows, "relay-paced", "server_cpu_us_per_frame", True)
        body = []
        for name in _targets_in(rows, "relay-fast") or _targets_in(rows, "relay-paced"):
            fast = stat(rows, "relay-fast", "server_cpu_us_per_frame", target=name)
            slow = stat(rows, "relay-paced", "server_cpu_us_per_frame", target=name)
            body.append(
                [
                    f"**{name}**" if name == t.OURS.name else name,
                    cell(fast, 1),
                    ratio(fast.median, fast_peer.median),
                    cell(slow, 1),
                    ratio(slow.median, paced_peer.median),
                    cell(stat(rows, "relay-paced", "stretch_p50", target=name), 3),
                    cell(stat(rows, "relay-paced", "ttff_p99", target=name), scale=1000),
                    cell(stat(rows, "relay-paced", "server_cpu_percent", target=name), unit="%"),
                ]
            )
        lines += _table(
            [
                "server",
                "fast: CPU-µs/token",
                "vs best peer",
                "paced: CPU-µs/token",
                "vs best peer",
                "paced: stretch p50",
                "paced: first token p99 ms",
                "paced: server CPU",
            ],
            body,
        )
        if plan.get("baseline"):
            lines += _baseline_table(rows, t.baseline_name(plan["baseline"]))
    if _select(rows, "storm"):
        lines += [
            "",
            f"## 6. Reconnect storm: {plan['storm_connections']:,} clients connect in the same instant",
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
    if _select(rows, "resume"):
        lines += _resume_section(rows, plan)
    lines += compression.section(rows)
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
    for scenario, metric, label, digits, scale in (
        ("relay-fast", "server_cpu_us_per_frame", "fast: CPU-µs per token", 1, 1),
        ("relay-paced", "server_cpu_us_per_frame", "paced: CPU-µs per token", 1, 1),
        ("relay-paced", "ttff_p50", "paced: first token p50 ms", 1, 1000),
        ("relay-paced", "ttff_p99", "paced: first token p99 ms", 1, 1000),
        ("relay-paced", "lag_p99", "paced: delivery lag p99 ms", 1, 1000),
        ("relay-paced", "stretch_p50", "paced: cadence stretch p50", 3, 1),
        ("relay-paced", "server_cpu_percent", "paced: server CPU %", 0, 1),
        ("relay-paced", "core0_other_percent", "paced: core 0 shared %", 0, 1),
    ):
        mine = stat(rows, scenario, metric, target=t.OURS.name)
        theirs = stat(rows, scenario, metric, target=base)
        body.append(
            [
                label,
                cell(mine, digits, scale),
                cell(theirs, digits, scale),
                ratio(mine.median, theirs.median),
                cell(_paired(rows, scenario, metric, base), 2, unit="x"),
            ]
        )
    return lines + _table(["", t.OURS.name, base, "ratio of medians", "ratio per repeat"], body)


def _resume_section(rows: list[Row], plan: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "## 7. Resume: reconnecting readers replay an ended stream; what a retained stream costs",
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


def write(rows: list[Row], meta: dict[str, Any], directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    derive(rows)
    (directory / "latest.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str) + "\n")
    path = directory / "latest.md"
    path.write_text(markdown(rows, meta))
    return path
