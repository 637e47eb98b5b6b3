"""Results out: markdown tables, JSON summaries with the raw traces kept apart, and plots.

The JSON at ``--out`` holds settings and each point's aggregates, small enough to commit; every
request's raw trace goes to ``raw/`` beside it, which git ignores. matplotlib is imported only
inside the plot functions, so the onnxruntime-genai benchmark can use the rest from its venv.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from serve_app.bench.load import Concurrency, LoadShape, shape_from_record
from serve_app.bench.stats import LATENCIES, PERCENTILE_METHOD, Distribution, PointSummary
from serve_app.bench.trace import RequestTrace

if TYPE_CHECKING:
    from matplotlib.figure import Figure

RAW_DIR = "raw"  # beside each summary JSON; git-ignored
DPI = 110


@dataclass(frozen=True)
class PointResult:
    """One measured point: the system that served it, its load, its traces and aggregates."""

    system: str  # "engine", "naive", "service", ...; the base URL for an HTTP sweep
    load: LoadShape
    traces: list[RequestTrace]
    summary: PointSummary

    @property
    def label(self) -> str:
        """How the point is named in the table and plot: ``concurrency 4``, ``rate 2/s``."""
        return self.load.label

    def summary_record(self) -> dict[str, Any]:
        """What the committed JSON keeps of the point: its aggregates, no per-request trace."""
        return {
            "system": self.system,
            "label": self.label,
            **self.load.record(),
            "summary": asdict(self.summary),
        }

    def raw_record(self) -> dict[str, Any]:
        """Every request's trace, for the git-ignored raw JSON."""
        return {
            "system": self.system,
            "label": self.label,
            "requests": list(map(asdict, self.traces)),
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> PointResult:
        """A point read back from its summary record; its traces stay in the raw JSON."""
        summary = PointSummary.from_dict(record["summary"])
        return cls(record["system"], shape_from_record(record), [], summary)


def concurrency(point: PointResult) -> int:
    """The point's concurrency level; in-process rounds and comparisons are closed-loop."""
    if not isinstance(point.load, Concurrency):
        raise ValueError(f"{point.system}: {point.label} is not a concurrency level")
    return point.load.level


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
    }
    try:
        import onnxruntime as ort
    except ImportError:  # an HTTP-only benchmark does not need it
        return info
    return {**info, "onnxruntime": ort.__version__, "providers": ort.get_available_providers()}


# ---------------------------------------------------------------------------------------------
# tables


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}"


def markdown_table(headers: list[str], rows: list[list[str]], text_columns: int = 1) -> str:
    """A GitHub markdown table: the first ``text_columns`` left-aligned, the numbers right."""
    rule = ["---"] * text_columns + ["---:"] * (len(headers) - text_columns)
    return "\n".join("| " + " | ".join(line) + " |" for line in [headers, rule, *rows])


def markdown_tables(points: list[PointResult]) -> str:
    """Throughput per point, then each latency's mean and percentiles in milliseconds."""
    throughput = markdown_table(
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
    latency = markdown_table(
        ["point", "metric", "mean ms", "p50 ms", "p90 ms", "p99 ms"], latency_rows, text_columns=2
    )
    return f"{throughput}\n\n{latency}"


def comparison_table(points: list[PointResult], baseline: str) -> str:
    """One row per system and concurrency, each against ``baseline`` at the same concurrency."""
    base = {concurrency(p): p.summary for p in points if p.system == baseline}
    rows = []
    for p in sorted(points, key=lambda p: (p.system, concurrency(p))):
        ref = base.get(concurrency(p))
        ratio = gap = "-"
        if ref is not None and ref.output_throughput > 0:
            ratio = f"{p.summary.output_throughput / ref.output_throughput:.2f}x"
        if ref is not None and ref.ttft.p50 is not None and p.summary.ttft.p50 is not None:
            gap = f"{(p.summary.ttft.p50 - ref.ttft.p50) * 1000:+.1f} ms"
        rows.append(
            [
                p.system,
                str(concurrency(p)),
                f"{p.summary.output_throughput:.0f}",
                f"{p.summary.decode_throughput:.0f}",
                _ms(p.summary.ttft.p50),
                ratio,
                gap,
            ]
        )
    headers = ["system", "C", "output tok/s", "decode tok/s", "TTFT p50 ms"]
    return markdown_table([*headers, f"vs {baseline}", f"TTFT p50 - {baseline}"], rows)


# ---------------------------------------------------------------------------------------------
# JSON


def raw_path(path: Path) -> Path:
    """Where the raw traces behind the summary at ``path`` go: ``raw/`` beside it."""
    return path.parent / RAW_DIR / path.name


def _dumps(
    document: dict[str, Any], record: Callable[[PointResult], dict[str, Any]], indent: int | None
) -> str:
    def encode(value: object) -> object:
        if isinstance(value, PointResult):
            return record(value)
        if isinstance(value, Path):
            return str(value)
        raise TypeError(f"{type(value).__name__} is not JSON serializable")

    return json.dumps(document, indent=indent, default=encode)


def write_json(path: Path, summary: dict[str, Any], raw: dict[str, Any] | None = None) -> Path:
    """Write ``summary`` to ``path`` and ``raw`` (by default the same document) to its raw path.

    Every ``PointResult`` in them is written as its aggregates in the first and as its traces in
    the second, so the file at ``path`` never holds a per-request trace. The summary also says
    how its percentiles were computed. Returns the raw path.
    """
    raw_out = raw_path(path)
    raw_out.parent.mkdir(parents=True, exist_ok=True)
    summary = {**summary, "percentiles": PERCENTILE_METHOD}
    path.write_text(_dumps(summary, PointResult.summary_record, indent=2) + "\n")
    raw_out.write_text(_dumps(summary if raw is None else raw, PointResult.raw_record, indent=None))
    return raw_out


# ---------------------------------------------------------------------------------------------
# plots


def figure(width: float, height: float) -> Figure:
    """An empty figure; no pyplot, so no GUI backend and no global figure state."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def save_figure(fig: Figure, path: Path) -> None:
    """Lay the figure out and write it as a PNG."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)


def plot(path: Path, points: list[PointResult]) -> None:
    """Latency against output throughput across the sweep: TTFT p50 and ITL p50."""
    x = [p.summary.output_throughput for p in points]
    fig = figure(11, 4.5)
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
    save_figure(fig, path)


def plot_by_concurrency(path: Path, groups: dict[str, list[PointResult]]) -> None:
    """Output tokens/s and TTFT p50 against concurrency, a line per system, a column per group."""
    groups = {name: points for name, points in groups.items() if points}
    if not groups:
        return
    fig = figure(6 * len(groups), 8)
    axes = fig.subplots(2, len(groups), squeeze=False)
    for column, (name, points) in enumerate(groups.items()):
        throughput, ttft = axes[0][column], axes[1][column]
        for system in sorted({p.system for p in points}):
            rows = sorted((p for p in points if p.system == system), key=concurrency)
            levels = [concurrency(p) for p in rows]
            throughput.plot(levels, [p.summary.output_throughput for p in rows], "o-", label=system)
            ms = [float("nan") if p.summary.ttft.p50 is None else p.summary.ttft.p50 * 1e3
                  for p in rows]  # fmt: skip
            ttft.plot(levels, ms, "o-", label=system)
        throughput.set_title(f"{name}: output tokens/s")
        ttft.set_title(f"{name}: time to first token p50 (ms)")
        ttft.set_yscale("log")
        for axis in (throughput, ttft):
            axis.set_xscale("log", base=2)
            axis.set_xlabel("concurrent sequences")
            axis.grid(alpha=0.3)
            axis.legend()
    save_figure(fig, path)
