"""CPU per relayed token in each of our output framings (issue 15): SSE and NDJSON (``GET /api/chat``), OpenAI
``chat.completion.chunk`` SSE (``POST /v1/chat/completions``) and the AI SDK's UI message stream
(``POST /api/ui-chat``), at the paced relay level the targets judge.

One server of ours relays the fake upstream (``--provider openai``, as in the relay scenario); each framing's wave is
`relay_paced_streams` clients at once, each reading one paced reply (100 tokens 20 ms apart), the framings
interleaved repeat by repeat. The load client counts tokens by the upstream's generation stamps, which every framing
carries in the token's text, so the same count works for all four. The target: each framing within 1.2x of SSE's
CPU per token in the same run (`bench.targets.FRAMING_LIMIT`). The UI stream is measured as ``useChat`` posts it:
resumable, which is that endpoint's default (``/api/chat`` and ``/v1`` are not resumable unless asked).

``python -m bench.framings [--streams 500] [--repeats 3]`` runs it alone and writes bench/results/framings.md and
.json; ``python -m bench --scenarios framings`` runs it within the bench.
"""

from __future__ import annotations

import json
import statistics
import time
from functools import partial
from typing import Any

from bench import scenarios, standalone
from bench import targets as t
from bench.client import Spec
from bench.runner import Server, run_client

Row = scenarios.Row
FRAMINGS = ("sse", "ndjson", "openai", "ui")
_ACCEPT = {"sse": "text/event-stream", "ndjson": "application/x-ndjson", "openai": "text/event-stream"}


def request(framing: str, prompt: str, chat: str = "bench-{i}-{s}") -> tuple[str, str, str]:
    """The path, POST body (empty: a GET) and Accept of one stream of `framing`; `chat` is the UI chat's id."""
    if framing in ("sse", "ndjson"):
        return t.OURS.relay_path(prompt), "", _ACCEPT[framing]
    if framing == "openai":
        body = {"model": "fake-model", "messages": [{"role": "user", "content": prompt}], "stream": True}
        return "/v1/chat/completions", json.dumps(body), _ACCEPT[framing]
    if framing == "ui":
        message = {"id": f"m-{chat}", "role": "user", "parts": [{"type": "text", "text": prompt}]}
        body = {"id": chat, "messages": [message], "trigger": "submit-message"}
        return "/api/ui-chat", json.dumps(body), "text/event-stream"
    raise ValueError(f"unknown framing {framing!r}")


def _wave(plan: scenarios.Plan, server: Server, framing: str, streams: int, tokens: int, chat: str) -> dict[str, Any]:
    delay = plan.paced_delay if tokens > 1 else 0.0
    path, body, accept = request(framing, scenarios._relay_prompt(tokens, delay, stamps=True), chat)
    spec = Spec(
        port=server.port,
        path=path,
        body=body,
        accept=accept,
        mode="paced",
        stamps=True,
        one_wave=True,  # CPU per token over the whole wave, setup included, as in the relay scenario
        connections=streams,
        tokens=tokens,
        delay=delay,
        ramp=0.0,
        duration=tokens * delay,
        deadline=tokens * delay + plan.relay_cut_off,
        server_pid=server.pid,
    )
    return run_client(spec)


def scenario(plan: scenarios.Plan, log: scenarios.Log) -> list[Row]:
    streams, n = plan.relay_paced_streams, plan.relay_paced_tokens
    rows: list[Row] = []
    with (
        scenarios.fake_upstream(plan) as (_, url),
        scenarios.servers([t.OURS], "relay", plan, upstream=url, threads=streams) as running,
    ):
        server = running[t.OURS.name]
        # A warm pool and warm code paths before the first measured wave.
        waves = [partial(_wave, plan, server, framing, streams, 1, f"warm-{framing}-{{i}}") for framing in FRAMINGS]
        scenarios.warm_up(plan, waves, 0.5)
        for repeat in range(plan.repeats):
            # Rotated, so that no framing always runs first (or right after another) in a repeat.
            order = FRAMINGS[repeat % len(FRAMINGS) :] + FRAMINGS[: repeat % len(FRAMINGS)]
            for framing in order:
                result = _wave(plan, server, framing, streams, n, f"r{repeat}-{{i}}")
                row = {"scenario": "framings", "target": t.OURS.name, "framing": framing, "level": streams}
                rows.append({**row, "repeat": repeat, **result})
                log(
                    f"framing {framing} x{streams}: {result.get('server_cpu_us_per_frame') or 0:.1f} CPU-us/token, "
                    f"{result['measured_streams']}/{streams} streams whole, {result['bad_status']} bad status, "
                    f"stretch {result['stretch_p50'] or 0:.3f}"
                )
                time.sleep(0.3)  # let the server finish closing the last wave's connections
    return rows


def _median(rows: list[Row], framing: str, metric: str) -> float | None:
    values = [r[metric] for r in rows if r["framing"] == framing and r.get(metric) is not None]
    return statistics.median(values) if values else None


def ratios(rows: list[Row]) -> dict[str, float | None]:
    """Each framing's median CPU per token over SSE's, from the same run's framings rows."""
    mine = [r for r in rows if r["scenario"] == "framings"]
    sse = _median(mine, "sse", "server_cpu_us_per_frame")
    out: dict[str, float | None] = {}
    for framing in FRAMINGS:
        value = _median(mine, framing, "server_cpu_us_per_frame")
        out[framing] = value / sse if value is not None and sse else None
    return out


def section(rows: list[Row]) -> list[str]:
    """The report's section: medians over the repeats, per framing, and each one's ratio to SSE."""
    mine = [r for r in rows if r["scenario"] == "framings"]
    if not mine:
        return []
    streams = mine[0]["level"]
    lines = [
        "",
        f"## Output framings: {streams} paced relayed streams, CPU per token beside SSE (issue 15)",
        "",
        "Ours relaying the fake upstream (openai provider), each framing's wave all clients at once, the framings "
        "interleaved. CPU: the server process's over the whole wave (setup included) per relayed token, tokens "
        "counted by their upstream stamps. The UI stream is resumable, as `useChat` posts it. Medians over the "
        "repeats, [min–max] when they differ; the target is each within "
        f"{t.FRAMING_LIMIT:.1f}x of SSE.",
        "",
        "| framing | endpoint | CPU-µs per token | ratio to SSE | stretch p50 | time to first token p99, ms | "
        "whole streams |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    endpoints = {
        "sse": "GET /api/chat (SSE)",
        "ndjson": "GET /api/chat (NDJSON)",
        "openai": "POST /v1/chat/completions",
        "ui": "POST /api/ui-chat",
    }
    ratio = ratios(rows)
    for framing in FRAMINGS:
        runs = [r for r in mine if r["framing"] == framing]
        if not runs:
            continue
        cpu = [r["server_cpu_us_per_frame"] for r in runs if r.get("server_cpu_us_per_frame") is not None]
        whole = min(r["measured_streams"] for r in runs)  # streams whose every token arrived
        value = ratio[framing]
        lines.append(
            f"| {framing} | {endpoints[framing]} | {_cell(cpu)} | {'–' if value is None else f'{value:.2f}x'} | "
            f"{_fmt(_median(runs, framing, 'stretch_p50'), 3)} | "
            f"{_fmt(_median(runs, framing, 'ttff_p99'), 0, 1000)} | {whole} of {streams} |"
        )
    return lines


def _fmt(value: float | None, digits: int, scale: float = 1.0) -> str:
    return "–" if value is None else f"{value * scale:.{digits}f}"


def _cell(values: list[float]) -> str:
    if not values:
        return "–"
    text = f"{statistics.median(values):.1f}"
    if len(values) > 1 and min(values) != max(values):
        text += f" [{min(values):.1f}–{max(values):.1f}]"
    return text


def main() -> None:
    standalone.main("framings", __doc__.split("\n\n")[0], "Output framings", scenario, section, _introduction)


def _introduction(run: standalone.Run, rows: standalone.Rows) -> str:
    noise = [r["core0_other_percent"] for r in rows if r.get("core0_other_percent") is not None]
    return (
        f"`python -m bench.framings --streams {run.streams} --repeats {run.repeats}`: server on core 0, load client "
        f"and fake upstream on core 1, {run.seconds:.0f} s. `uptime` before: `{run.meta['uptime_before']}`; "
        f"after: `{run.meta['uptime_after']}`. Other processes used a median "
        f"{statistics.median(noise) if noise else 0:.0f}% (up to {max(noise, default=0):.0f}%) of the server's core "
        "during the waves. The machine (2 cores) was shared with other work: compare the framings repeat by repeat "
        "(framings.json) rather than to the digit."
    )


if __name__ == "__main__":
    main()
