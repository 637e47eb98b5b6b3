"""Per-request metrics and their aggregates over a sweep point: pure functions, no I/O.

Percentiles use numpy's default linear interpolation between the closest ranks.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import numpy as np

from serve_app.bench.trace import ChunkEvent, RequestTrace

PERCENTILES = (50, 90, 99)
PERCENTILE_METHOD = "numpy linear interpolation"  # recorded in every JSON summary
LATENCIES = ("ttft", "itl", "tpot", "e2e")


def itl_samples(chunks: list[ChunkEvent]) -> list[float]:
    """One inter-token latency per token after the first chunk.

    A chunk of n tokens that arrives ``gap`` seconds after the previous one contributes n samples
    of ``gap / n``, so the samples sum to the last chunk's time minus the first chunk's time.
    The first chunk's tokens arrive with the first token and add no sample.
    """
    samples: list[float] = []
    for previous, chunk in pairwise(chunks):
        samples.extend([(chunk.t - previous.t) / chunk.tokens] * chunk.tokens)
    return samples


@dataclass(frozen=True)
class RequestMetrics:
    """The latencies of one successful request, in seconds."""

    ttft: float
    itl: list[float]
    tpot: float | None  # None when fewer than two tokens came back
    e2e: float
    output_tokens: int
    last_token: float  # when the last chunk arrived, since the send


def request_metrics(trace: RequestTrace) -> RequestMetrics | None:
    """Metrics of a successful request; None for a failed one."""
    if not trace.ok or not trace.chunks or trace.e2e is None:
        return None
    ttft = trace.chunks[0].t
    tokens = trace.output_tokens
    tpot = (trace.e2e - ttft) / (tokens - 1) if tokens > 1 else None
    return RequestMetrics(
        ttft=ttft,
        itl=itl_samples(trace.chunks),
        tpot=tpot,
        e2e=trace.e2e,
        output_tokens=tokens,
        last_token=trace.chunks[-1].t,
    )


@dataclass(frozen=True)
class Distribution:
    """Mean and percentiles of a latency, in seconds; all None when there were no samples."""

    mean: float | None
    p50: float | None
    p90: float | None
    p99: float | None


def distribution(values: list[float]) -> Distribution:
    """Mean and p50/p90/p99 with linear interpolation."""
    if not values:
        return Distribution(None, None, None, None)
    p50, p90, p99 = (float(p) for p in np.percentile(values, PERCENTILES, method="linear"))
    return Distribution(mean=float(np.mean(values)), p50=p50, p90=p90, p99=p99)


@dataclass(frozen=True)
class PointSummary:
    """Aggregates of one sweep point."""

    completed: int
    failed: int
    errors: dict[str, int]  # failed requests by status
    wall_s: float
    request_throughput: float  # completed requests per second of wall time
    output_throughput: float  # output tokens of completed requests per second of wall time
    decode_throughput: float  # see decode_throughput()
    ttft: Distribution
    itl: Distribution
    tpot: Distribution
    e2e: Distribution

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PointSummary:
        """The summary ``dataclasses.asdict`` made, read back from JSON."""
        latencies = {name: Distribution(**data[name]) for name in LATENCIES}
        return cls(**{**data, **latencies})


def decode_throughput(measured: list[tuple[RequestTrace, RequestMetrics]]) -> float:
    """Output tokens after each request's first (prefill makes the first), per second.

    The window runs from the earliest first token to the latest last token of the point, so it
    leaves out the time before any decode step could run; 0 when the window is empty.
    """
    if not measured:
        return 0.0
    first = min(t.start + m.ttft for t, m in measured)
    last = max(t.start + m.last_token for t, m in measured)
    tokens = sum(m.output_tokens - 1 for _, m in measured)
    return tokens / (last - first) if last > first else 0.0


def summarize(traces: list[RequestTrace], wall_s: float) -> PointSummary:
    """Aggregate one sweep point; failed requests count in ``errors`` and nowhere else."""
    measured = [(t, request_metrics(t)) for t in traces]
    succeeded = [(t, m) for t, m in measured if m is not None]
    metrics = [m for _, m in succeeded]
    errors = Counter(t.status for t, m in measured if m is None)
    return PointSummary(
        completed=len(metrics),
        failed=sum(errors.values()),
        errors=dict(sorted(errors.items())),
        wall_s=wall_s,
        request_throughput=len(metrics) / wall_s,
        output_throughput=sum(m.output_tokens for m in metrics) / wall_s,
        decode_throughput=decode_throughput(succeeded),
        ttft=distribution([m.ttft for m in metrics]),
        itl=distribution([s for m in metrics for s in m.itl]),
        tpot=distribution([m.tpot for m in metrics if m.tpot is not None]),
        e2e=distribution([m.e2e for m in metrics]),
    )
