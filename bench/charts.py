"""Charts of the relay scenarios, drawn from a results file: ``python -m bench.charts [latest.json] [directory]``.

`report.write` calls `render` after every run, so the PNGs beside latest.md always show latest.json; running this
module redraws them from any saved results. Three charts, each readable at a glance:

* ``cpu-per-token.png``: CPU-µs per relayed token of each relay at each paced level (log scale: LiteLLM's proxy
  and the raw ceiling are two orders of magnitude apart);
* ``first-token.png``: time to first token, p50 and p99, of each relay at each paced level;
* ``relay-lag.png``: the distribution of relay-added lag (receipt minus the upstream's generation stamp), as
  percentile curves, at each paced level.

Every value is the median over the repeats, as in the tables.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

from bench import targets as t

Row = dict[str, Any]
FILES = ("cpu-per-token.png", "first-token.png", "relay-lag.png")
# One colour per relay, stable across charts: ours first and strongest.
_COLOURS = {
    t.OURS.name: "#d62728",
    t.LEAN.name: "#1f77b4",
    t.RELAY_CEILING.name: "#2ca02c",
    t.DIRECT.name: "#7f7f7f",
    t.LITELLM.name: "#9467bd",
}


def _colour(name: str, index: int) -> str:
    palette = ("#ff7f0e", "#8c564b", "#e377c2", "#bcbd22", "#17becf", "#aec7e8")
    return _COLOURS.get(name, palette[index % len(palette)])


def _median(rows: list[Row], metric: str) -> float | None:
    values = [r[metric] for r in rows if r.get(metric) is not None]
    return statistics.median(values) if values else None


def _paced(rows: list[Row]) -> tuple[list[int], list[str], dict[tuple[str, int], list[Row]]]:
    found: dict[tuple[str, int], list[Row]] = {}
    names: list[str] = []
    for row in rows:
        if row["scenario"] != "relay-paced":
            continue
        found.setdefault((row["target"], row["level"]), []).append(row)
        if row["target"] not in names:
            names.append(row["target"])
    levels = sorted({level for _, level in found})
    return levels, names, found


def render(rows: list[Row], directory: Path) -> list[Path]:
    """Write the charts into `directory`; nothing (an empty list) when no paced relay was measured."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a benchmark machine
    import matplotlib.pyplot as plt

    levels, names, found = _paced(rows)
    if not levels:
        return []
    written = []
    width = 0.8 / max(1, len(names))

    def bars(metric: str, scale: float, ax: Any, hatch: str = "", alpha: float = 1.0, label: bool = True) -> None:
        for index, name in enumerate(names):
            xs, ys = [], []
            for position, level in enumerate(levels):
                value = _median(found.get((name, level), []), metric)
                if value is not None and value > 0:
                    xs.append(position + (index - (len(names) - 1) / 2) * width)
                    ys.append(value * scale)
            ax.bar(
                xs,
                ys,
                width,
                color=_colour(name, index),
                hatch=hatch,
                alpha=alpha,
                label=name if label else None,
                edgecolor="white" if not hatch else "black",
            )
        ax.set_xticks(range(len(levels)), [f"{level:,} streams" for level in levels])
        ax.set_yscale("log")
        ax.grid(axis="y", which="both", alpha=0.3)

    fig, ax = plt.subplots(figsize=(10, 5))
    bars("server_cpu_us_per_frame", 1.0, ax)
    ax.set_ylabel("relay CPU-µs per relayed token (log)")
    ax.set_title("CPU per relayed token, paced relay (lower is better)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(directory / FILES[0])
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(10, 5))
    bars("ttff_p99", 1000.0, ax, alpha=0.45, label=False)
    bars("ttff_p50", 1000.0, ax)
    ax.set_ylabel("time to first token, ms (log)")
    ax.set_title("Time to first token, paced relay: p50 solid, p99 light (lower is better)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(directory / FILES[1])
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(levels), figsize=(4.5 * len(levels), 4.5), squeeze=False, sharey=True)
    for ax, level in zip(axes[0], levels, strict=True):
        for index, name in enumerate(names):
            runs = [r for r in found.get((name, level), []) if r.get("relay_lag_percentiles")]
            if not runs:
                continue
            quantiles = [q for q, _ in runs[0]["relay_lag_percentiles"]]
            values = [
                statistics.median(r["relay_lag_percentiles"][i][1] for r in runs) * 1000 for i in range(len(quantiles))
            ]
            ax.plot(quantiles, values, marker="o", markersize=3, color=_colour(name, index), label=name)
        ax.set_title(f"{level:,} streams")
        ax.set_xlabel("percentile")
        ax.set_yscale("log")
        ax.grid(which="both", alpha=0.3)
    axes[0][0].set_ylabel("relay-added lag, ms (log)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Relay-added lag: token receipt minus the upstream's generation stamp")
    fig.tight_layout()
    written.append(directory / FILES[2])
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    return written


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    source = Path(args[0]) if args else Path(__file__).resolve().parent / "results" / "latest.json"
    directory = Path(args[1]) if len(args) > 1 else source.parent
    for path in render(json.loads(source.read_text())["rows"], directory):
        print(path)


if __name__ == "__main__":
    main()
