"""Load shapes: closed-loop concurrency and open-loop Poisson arrivals."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from serve_app.bench.dataset import BenchRequest
from serve_app.bench.trace import RequestTrace

# Sends one request; the float is its send time in seconds since the sweep point began.
Send = Callable[[BenchRequest, float], Awaitable[RequestTrace]]


@dataclass(frozen=True)
class PointRun:
    """The traces of one sweep point, in dataset order, and its wall time."""

    traces: list[RequestTrace]
    wall_s: float


def poisson_arrivals(count: int, rate: float, seed: int) -> list[float]:
    """Send times in seconds of ``count`` requests arriving at ``rate`` per second on average.

    Inter-arrival times are exponential, so arrivals form a Poisson process; ``inf`` sends
    everything at once.
    """
    if math.isinf(rate):
        return [0.0] * count
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=max(count - 1, 0))
    return [0.0, *(float(t) for t in np.cumsum(gaps))][:count]  # the first one goes at once


async def closed_loop(
    send: Send, requests: list[BenchRequest], concurrency: int, on_done: Callable[[], object]
) -> PointRun:
    """Keep exactly ``concurrency`` requests in flight until the dataset runs out."""
    traces: list[RequestTrace | None] = [None] * len(requests)
    queue = iter(enumerate(requests))
    began = time.perf_counter()

    async def worker() -> None:
        for index, request in queue:  # the shared iterator hands each request to one worker
            traces[index] = await send(request, time.perf_counter() - began)
            on_done()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return PointRun(traces=[t for t in traces if t is not None], wall_s=time.perf_counter() - began)


async def open_loop(
    send: Send, requests: list[BenchRequest], arrivals: list[float], on_done: Callable[[], object]
) -> PointRun:
    """Send each request at its arrival time, however many are still in flight."""
    began = time.perf_counter()

    async def arrive(request: BenchRequest, at: float) -> RequestTrace:
        await asyncio.sleep(at - (time.perf_counter() - began))
        trace = await send(request, time.perf_counter() - began)
        on_done()
        return trace

    traces = await asyncio.gather(
        *(arrive(r, at) for r, at in zip(requests, arrivals, strict=True))
    )
    return PointRun(traces=list(traces), wall_s=time.perf_counter() - began)


@dataclass(frozen=True)
class Concurrency:
    """A closed-loop sweep point: ``level`` requests in flight at all times."""

    level: int

    @property
    def label(self) -> str:
        """How the point is named in the table and plot."""
        return f"concurrency {self.level}"

    def max_in_flight(self, num_requests: int) -> int:
        """The most requests this point ever has open at once."""
        return min(self.level, num_requests)

    def record(self) -> dict[str, Any]:
        """The shape as JSON, for a point's summary."""
        return {"concurrency": self.level}

    async def run(
        self, send: Send, requests: list[BenchRequest], seed: int, on_done: Callable[[], object]
    ) -> PointRun:
        """Run the point over ``requests``; the seed is unused, nothing is random."""
        return await closed_loop(send, requests, self.level, on_done)


@dataclass(frozen=True)
class RequestRate:
    """An open-loop sweep point: Poisson arrivals at ``per_s`` requests per second."""

    per_s: float

    @property
    def label(self) -> str:
        """How the point is named in the table and plot."""
        return f"rate {self.per_s:g}/s"

    def max_in_flight(self, num_requests: int) -> int:
        """The most requests this point ever has open at once: all of them, at worst."""
        return num_requests

    def record(self) -> dict[str, Any]:
        """The shape as JSON, for a point's summary (an infinite rate is written as "inf")."""
        return {"request_rate": self.per_s if math.isfinite(self.per_s) else "inf"}

    async def run(
        self, send: Send, requests: list[BenchRequest], seed: int, on_done: Callable[[], object]
    ) -> PointRun:
        """Run the point over ``requests`` with arrival times drawn from ``seed``."""
        arrivals = poisson_arrivals(len(requests), self.per_s, seed)
        return await open_loop(send, requests, arrivals, on_done)


LoadShape = Concurrency | RequestRate


def shape_from_record(record: dict[str, Any]) -> LoadShape:
    """The load shape a point's summary names: the inverse of ``record()``."""
    if "concurrency" in record:
        return Concurrency(int(record["concurrency"]))
    return RequestRate(float(record["request_rate"]))
