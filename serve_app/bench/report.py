"""Results out: a markdown table, a JSON file with every raw measurement, and a plot."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from serve_app.bench.stats import Distribution, PointSummary
from serve_app.bench.trace import RequestTrace

LATENCIES = ("ttft", "itl", "tpot", "e2e")


@dataclass(frozen=True)
class PointResult:
    """One sweep point: its label (``concurrency 4``, ``rate 2/s``), traces and aggregates."""

    label: str
    traces: list[RequestTrace]
    summary: PointSummary


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    lines = [headers, ["---"] * len(headers), *rows]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def markdown_tables(points: list[PointResult]) -> str:
    """Throughput per point, then each latency's mean and percentiles in milliseconds."""
    throughput = _table(
        ["point", "ok", "failed", "errors", "wall s", "req/s", "output tok/s"],
        [
            [
                p.label,
                str(p.summary.completed),
                str(p.summary.failed),
                ", ".join(f"{status}: {n}" for status, n in p.summary.errors.items()) or "-",
                f"{p.summary.wall_s:.2f}",
                f"{p.summary.request_throughput:.2f}",
                f"{p.summary.output_throughput:.1f}",
            ]
            for p in points
        ],
    )
    latency_rows = []
    for p in points:
        for name in LATENCIES:
            d: Distribution = getattr(p.summary, name)
            latency_rows.append([p.label, name.upper(), *map(_ms, (d.mean, d.p50, d.p90, d.p99))])
    latency = _table(["point", "metric", "mean ms", "p50 ms", "p90 ms", "p99 ms"], latency_rows)
    return f"{throughput}\n\n{latency}"


def write_json(path: Path, settings: dict[str, Any], points: list[PointResult]) -> None:
    """Settings, then per point its aggregates and every request's raw trace."""
    document = {
        "settings": settings,
        "percentiles": "numpy linear interpolation",
        "points": [
            {
                "label": p.label,
                "summary": asdict(p.summary),
                "requests": list(map(asdict, p.traces)),
            }
            for p in points
        ],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2))


def plot(path: Path, points: list[PointResult]) -> None:
    """Latency against output throughput across the sweep: TTFT p50 and ITL p50."""
    x = [p.summary.output_throughput for p in points]
    fig = Figure(figsize=(11, 4.5))  # no pyplot: no GUI backend, no global figure state
    axes = fig.subplots(1, 2, sharex=True)
    for ax, name in zip(axes, ("ttft", "itl"), strict=True):
        y = [getattr(p.summary, name).p50 for p in points]
        ms = [float("nan") if v is None else v * 1000 for v in y]
        ax.plot(x, ms, marker="o")
        for p, xi, yi in zip(points, x, ms, strict=True):
            ax.annotate(p.label, (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("output tokens / s")
        ax.set_ylabel(f"{name.upper()} p50 (ms)")
        ax.grid(alpha=0.3)
    fig.suptitle("Latency vs throughput across the sweep")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
