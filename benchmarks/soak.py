"""Soak benchmark: the shipped config at a steady fraction of its capacity for N minutes.

    python benchmarks/soak.py --minutes 10 --fraction 0.7     # what docs/PERFORMANCE.md reports
    python benchmarks/soak.py --minutes 2                     # a quick check that it works

Capacity is what the config's one model replica holds (``max_num_seqs + max_waiting_seqs``,
docs/OPERATIONS.md, How to size queues); ``--fraction`` of it is kept in flight by a closed loop
of that many clients, each sending its next streaming request (a distinct prompt: no cache, no
coalescing) when the last one ends. Every ``--sample-s`` it records the RSS of every Ray process
of the service, by process title; per minute it reports p50/p99 latency, requests and errors.
Targets (issue 17): RSS growth < 5 % after the first (warm-up) minute, p99 drift < 20 %, 0
errors. Prints tables, writes ``benchmarks/results/soak.json`` and a plot.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import asdict
from itertools import count
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from served import config_label, engine_capacity, ray_rss_mb, serve_run, timed

from serve_app.bench.dataset import LengthRange, random_requests
from serve_app.bench.report import figure, machine, markdown_table, save_figure, write_json
from serve_app.bench.serve_run import ROOT
from serve_app.bench.stats import distribution
from serve_app.bench.trace import RequestTrace

RESULTS = Path(__file__).resolve().parent / "results"


async def soak(
    base_url: str, root: int, clients: int, duration_s: float, sample_s: float, args: Any
) -> tuple[list[RequestTrace], list[dict[str, Any]]]:
    """Run ``clients`` closed-loop clients for ``duration_s``; returns every request's trace
    (``start`` in seconds since the soak began) and the RSS samples."""
    started = time.perf_counter()
    deadline = started + duration_s
    traces: list[RequestTrace] = []
    samples: list[dict[str, Any]] = []
    seeds = count()

    async def client_loop(http: httpx.AsyncClient) -> None:
        while time.perf_counter() < deadline:
            (request,) = random_requests(
                1, LengthRange(args.prompt_len, 0), LengthRange(args.max_tokens, 0), next(seeds)
            )
            traces.append(await timed(http, request, time.perf_counter() - started))

    async def sampler() -> None:
        while time.perf_counter() < deadline:
            rss = await asyncio.to_thread(ray_rss_mb, root)
            samples.append({"t_s": time.perf_counter() - started, "rss_mb": rss})
            await asyncio.sleep(sample_s)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=f"{base_url}/v1", timeout=300, limits=limits) as http:
        await asyncio.gather(sampler(), *(client_loop(http) for _ in range(clients)))
    return traces, samples


def per_minute(traces: list[RequestTrace]) -> list[dict[str, Any]]:
    """Requests, errors and latency percentiles of each minute, by when requests started."""
    minutes: dict[int, list[RequestTrace]] = {}
    for trace in traces:
        minutes.setdefault(int(trace.start // 60), []).append(trace)
    rows = []
    for minute, group in sorted(minutes.items()):
        latency = distribution([t.e2e for t in group if t.ok and t.e2e is not None])
        rows.append(
            {
                "minute": minute + 1,
                "requests": len(group),
                "errors": sum(not t.ok for t in group),
                "p50_s": latency.p50,
                "p99_s": latency.p99,
            }
        )
    return rows


def rss_by_label(samples: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per Ray process: RSS at the end of the warm-up minute (or the first sample), and last."""
    if not samples:
        return {}
    warm = next((s for s in samples if s["t_s"] >= 60), samples[0])
    last = samples[-1]
    labels = sorted(set(warm["rss_mb"]) | set(last["rss_mb"]))
    table = {
        label: {
            "warm_mb": warm["rss_mb"].get(label, 0.0),
            "last_mb": last["rss_mb"].get(label, 0.0),
        }
        for label in labels
    }
    table["total"] = {
        "warm_mb": sum(warm["rss_mb"].values()),
        "last_mb": sum(last["rss_mb"].values()),
    }
    for row in table.values():
        row["growth_pct"] = 100 * (row["last_mb"] / row["warm_mb"] - 1) if row["warm_mb"] else 0.0
    return table


def targets(minutes: list[dict[str, Any]], rss: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Issue 17's soak targets, measured after the first (warm-up) minute."""
    p99s = [m["p99_s"] for m in minutes[1:] if m["p99_s"] is not None]
    # Drift needs two steady minutes; a shorter run only checks that the benchmark works.
    drift = 100 * (max(p99s) / min(p99s) - 1) if len(p99s) >= 2 else None
    # The spread above counts a noisy minute as drift; the least-squares line through the
    # minutes' p99 says whether latency climbs over the run (its rise over the run, in %).
    trend = (
        float(100 * np.polyfit(np.arange(len(p99s)), p99s, 1)[0] * (len(p99s) - 1) / np.mean(p99s))
        if len(p99s) >= 2
        else None
    )
    growth = rss.get("total", {}).get("growth_pct")
    errors = sum(m["errors"] for m in minutes)
    return {
        "rss_growth_pct": growth,
        "rss_growth_under_5pct": growth is not None and growth < 5,
        "p99_drift_pct": drift,
        "p99_drift_under_20pct": drift is not None and drift < 20,
        "p99_trend_pct": trend,
        "errors": errors,
        "zero_errors": errors == 0,
    }


def print_tables(minutes: list[dict[str, Any]], rss: dict[str, dict[str, float]]) -> None:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value * 1000:.0f}"

    rows = [
        [str(m["minute"]), str(m["requests"]), str(m["errors"]), ms(m["p50_s"]), ms(m["p99_s"])]
        for m in minutes
    ]
    print(markdown_table(["minute", "requests", "errors", "p50 ms", "p99 ms"], rows))
    print()
    rss_rows = [
        [label, f"{r['warm_mb']:.0f}", f"{r['last_mb']:.0f}", f"{r['growth_pct']:+.1f}"]
        for label, r in rss.items()
    ]
    print(
        markdown_table(
            ["Ray process", "RSS after warm-up (MiB)", "RSS at end (MiB)", "growth %"], rss_rows
        )
    )


def plot(path: Path, minutes: list[dict[str, Any]], samples: list[dict[str, Any]]) -> None:
    """Total and per-process RSS over time; p50/p99 per minute."""
    fig = figure(12, 4.5)
    memory, latency = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    labels = sorted({label for s in samples for label in s["rss_mb"]})
    times = [s["t_s"] / 60 for s in samples]
    memory.plot(times, [sum(s["rss_mb"].values()) for s in samples], label="total", linewidth=2)
    for label in labels:
        values = [s["rss_mb"].get(label, 0.0) for s in samples]
        if max(values, default=0) > 50:  # the small helpers would only crowd the legend
            memory.plot(times, values, label=label.removeprefix("ray::"))
    memory.set_xlabel("minute")
    memory.set_ylabel("RSS (MiB)")
    memory.set_title("RSS of the Ray processes")
    memory.legend(fontsize=7)
    xs = [m["minute"] for m in minutes]
    for key, name in (("p50_s", "p50"), ("p99_s", "p99")):
        latency.plot(xs, [(m[key] or 0) * 1000 for m in minutes], marker="o", label=name)
    latency.set_xlabel("minute")
    latency.set_ylabel("latency (ms)")
    latency.set_title("Request latency per minute")
    latency.legend()
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=ROOT / "serve_config.yaml")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--fraction", type=float, default=0.7, help="of capacity, in flight")
    parser.add_argument("--sample-s", type=float, default=5.0, help="RSS sampling period")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=RESULTS / "soak.json")
    args = parser.parse_args()

    capacity = engine_capacity(args.config)
    clients = max(1, round(args.fraction * capacity))
    with serve_run(args.config) as (base_url, root):
        traces, samples = asyncio.run(
            soak(base_url, root, clients, args.minutes * 60, args.sample_s, args)
        )
    minutes = per_minute(traces)
    rss = rss_by_label(samples)
    print_tables(minutes, rss)
    summary = {
        "benchmark": "soak",
        "machine": machine(),
        "config": config_label(args.config),
        "minutes": args.minutes,
        "capacity": capacity,
        "fraction": args.fraction,
        "clients": clients,
        "prompt_len": args.prompt_len,
        "max_tokens": args.max_tokens,
        "per_minute": minutes,
        "rss_mb": rss,
        "targets": targets(minutes, rss),
        "rss_samples": samples,
        "error_sample": sorted({f"{t.status}: {t.error}" for t in traces if not t.ok})[:5],
    }
    print()
    print("targets:", summary["targets"])
    write_json(args.out, summary, {**summary, "traces": [asdict(t) for t in traces]})
    plot(args.out.with_suffix(".png"), minutes, samples)
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
