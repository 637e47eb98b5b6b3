"""Overload benchmark: the shipped config at its capacity, then a burst of 10x that at once.

    python benchmarks/overload.py                          # serve_config.yaml, 10x burst
    python benchmarks/overload.py --config configs/cpu_demo.yaml --burst 5

Capacity is what the config's one model replica holds: ``max_num_seqs + max_waiting_seqs``
(docs/OPERATIONS.md, How to size queues). Phase 1 sends that many streaming requests at once
(``--rounds`` times) and takes their p99 latency; phase 2 sends ``--burst`` x capacity at once.
Targets (issue 17): the shed requests (503) answered in < 100 ms p99, every accepted one
complete, accepted p99 <= 2x the capacity p99, and the RSS of the Ray processes bounded
(before/after). Prints a table, writes ``benchmarks/results/overload.json`` and a plot.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import asdict
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
REJECTION_TARGET_S = 0.1


async def at_once(
    base_url: str, count: int, prompt_len: int, max_tokens: int, seed: int
) -> list[RequestTrace]:
    """``count`` streaming requests sent together (distinct prompts: no cache, no coalescing)."""
    requests = random_requests(count, LengthRange(prompt_len, 0), LengthRange(max_tokens, 0), seed)
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    async with httpx.AsyncClient(base_url=f"{base_url}/v1", timeout=300, limits=limits) as client:
        return list(await asyncio.gather(*(timed(client, r, 0.0) for r in requests)))


def _latencies(traces: list[RequestTrace], status: str) -> list[float]:
    return [t.e2e for t in traces if t.status == status and t.e2e is not None]


def summarize(capacity_runs: list[list[RequestTrace]], burst: list[RequestTrace]) -> dict[str, Any]:
    """Latencies by outcome, and the targets checked."""
    at_capacity = [t for run in capacity_runs for t in run]
    capacity = distribution(_latencies(at_capacity, "200"))
    accepted = distribution(_latencies(burst, "200"))
    shed = distribution(_latencies(burst, "503"))
    others = sorted({t.status for t in burst} - {"200", "503"})
    return {
        "capacity": {
            "requests": len(at_capacity),
            "errors": sum(not t.ok for t in at_capacity),
            "latency_s": capacity.__dict__,
        },
        "burst": {
            "requests": len(burst),
            "accepted": sum(t.status == "200" for t in burst),
            "shed_503": sum(t.status == "503" for t in burst),
            "other_outcomes": {s: sum(t.status == s for t in burst) for s in others},
            "accepted_latency_s": accepted.__dict__,
            "shed_latency_s": shed.__dict__,
        },
        "targets": {
            "shed_p99_under_100ms": shed.p99 is not None and shed.p99 < REJECTION_TARGET_S,
            "every_accepted_completed": not others,
            "accepted_p99_within_2x_capacity_p99": (
                accepted.p99 is not None
                and capacity.p99 is not None
                and accepted.p99 <= 2 * capacity.p99
            ),
        },
    }


def print_table(
    summary: dict[str, Any], rss_before: dict[str, float], rss_after: dict[str, float]
) -> None:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value * 1000:.0f}"

    burst = summary["burst"]
    rows = [
        [
            "at capacity (200)",
            str(summary["capacity"]["requests"]),
            *(ms(summary["capacity"]["latency_s"][k]) for k in ("p50", "p90", "p99")),
        ],
        [
            "burst: accepted (200)",
            str(burst["accepted"]),
            *(ms(burst["accepted_latency_s"][k]) for k in ("p50", "p90", "p99")),
        ],
        [
            "burst: shed (503)",
            str(burst["shed_503"]),
            *(ms(burst["shed_latency_s"][k]) for k in ("p50", "p90", "p99")),
        ],
    ]
    print(markdown_table(["requests", "count", "p50 ms", "p90 ms", "p99 ms"], rows))
    print()
    labels = sorted(set(rss_before) | set(rss_after))
    rss_rows = [
        [label, f"{rss_before.get(label, 0):.0f}", f"{rss_after.get(label, 0):.0f}"]
        for label in labels
    ]
    rss_rows.append(["total", f"{sum(rss_before.values()):.0f}", f"{sum(rss_after.values()):.0f}"])
    print(markdown_table(["Ray process", "RSS before (MiB)", "RSS after (MiB)"], rss_rows))
    print()
    print("targets:", summary["targets"])


def plot(path: Path, capacity_runs: list[list[RequestTrace]], burst: list[RequestTrace]) -> None:
    """Latency of every request, by outcome, on a log scale."""
    fig = figure(9, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    series = {
        "at capacity (200)": _latencies([t for run in capacity_runs for t in run], "200"),
        "burst: accepted (200)": _latencies(burst, "200"),
        "burst: shed (503)": _latencies(burst, "503"),
    }
    every = [v * 1000 for values in series.values() for v in values]
    # Log-spaced bins: latencies span milliseconds (refusals) to minutes (a starved burst).
    bins = np.geomspace(max(min(every), 1.0), max(every) * 1.01, 50) if every else 10
    for label, values in series.items():
        if values:
            ax.hist(
                [v * 1000 for v in values],
                bins=bins,
                histtype="step",
                linewidth=1.5,
                label=f"{label}, n={len(values)}",
            )
    ax.axvline(REJECTION_TARGET_S * 1000, color="red", linestyle="--", label="shed target 100 ms")
    ax.set_xscale("log")
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("requests")
    ax.set_title("Overload: capacity, then a burst of 10x capacity at once")
    ax.legend()
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=ROOT / "serve_config.yaml")
    parser.add_argument(
        "--burst", type=int, default=10, help="burst size, in multiples of capacity"
    )
    parser.add_argument("--rounds", type=int, default=2, help="rounds at capacity")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=RESULTS / "overload.json")
    args = parser.parse_args()

    capacity = engine_capacity(args.config)
    with serve_run(args.config) as (base_url, root):
        asyncio.run(at_once(base_url, 8, args.prompt_len, args.max_tokens, seed=999))  # warm-up
        rss_before = ray_rss_mb(root)
        capacity_runs = [
            asyncio.run(at_once(base_url, capacity, args.prompt_len, args.max_tokens, seed=i))
            for i in range(args.rounds)
        ]
        started = time.perf_counter()
        burst = asyncio.run(
            at_once(base_url, args.burst * capacity, args.prompt_len, args.max_tokens, seed=100)
        )
        burst_wall_s = time.perf_counter() - started
        rss_after = ray_rss_mb(root)

    summary = summarize(capacity_runs, burst)
    print_table(summary, rss_before, rss_after)
    document = {
        "benchmark": "overload",
        "machine": machine(),
        "config": config_label(args.config),
        "capacity": capacity,
        "burst_multiple": args.burst,
        "prompt_len": args.prompt_len,
        "max_tokens": args.max_tokens,
        "burst_wall_s": burst_wall_s,
        **summary,
        "rss_mb_before": rss_before,
        "rss_mb_after": rss_after,
        "shed_errors_sample": sorted({t.error or "" for t in burst if t.status == "503"})[:3],
    }
    raw = {
        **document,
        "capacity_traces": [[asdict(t) for t in run] for run in capacity_runs],
        "burst_traces": [asdict(t) for t in burst],
    }
    write_json(args.out, document, raw)
    plot(args.out.with_suffix(".png"), capacity_runs, burst)
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
