"""Load shapes: Poisson arrival times, and how many requests each shape keeps in flight."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from serve_app.bench.dataset import BenchRequest
from serve_app.bench.load import Concurrency, RequestRate, poisson_arrivals
from serve_app.bench.trace import RequestTrace

REQUESTS = [BenchRequest(prompt=f"p{i}", input_len=1, output_len=1) for i in range(10)]


def test_poisson_arrivals_are_seeded_and_have_the_right_mean_gap() -> None:
    arrivals = poisson_arrivals(4000, rate=8.0, seed=3)
    assert arrivals == poisson_arrivals(4000, rate=8.0, seed=3)
    assert arrivals != poisson_arrivals(4000, rate=8.0, seed=4)
    assert arrivals[0] == 0.0
    gaps = np.diff(arrivals)
    assert (gaps >= 0).all()
    # Standard error of the mean gap is 1/8 / sqrt(4000) ~ 0.002; allow about five of them.
    assert gaps.mean() == pytest.approx(1 / 8, abs=0.01)
    assert gaps.std() == pytest.approx(1 / 8, rel=0.1)  # exponential: std equals the mean


def test_an_infinite_rate_sends_everything_at_once() -> None:
    assert poisson_arrivals(5, rate=float("inf"), seed=0) == [0.0] * 5


class FakeServer:
    """Answers every request after a short sleep and records how many were open at once."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.peak = 0
        self.done = 0

    async def send(self, request: BenchRequest, start: float) -> RequestTrace:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        await asyncio.sleep(0.01)
        self.in_flight -= 1
        return RequestTrace(start=start, input_len=request.input_len, max_tokens=1)

    def on_done(self) -> None:
        self.done += 1


def test_closed_loop_keeps_exactly_the_concurrency_in_flight() -> None:
    server = FakeServer()
    run = asyncio.run(Concurrency(4).run(server.send, REQUESTS, 0, server.on_done))
    assert server.peak == 4
    assert server.done == len(run.traces) == len(REQUESTS)
    # Three waves of at most four 10 ms requests.
    assert 0.03 <= run.wall_s < 0.5


def test_open_loop_sends_each_request_at_its_arrival_time() -> None:
    server = FakeServer()
    run = asyncio.run(RequestRate(50.0).run(server.send, REQUESTS, 1, server.on_done))
    arrivals = poisson_arrivals(len(REQUESTS), 50.0, 1)
    assert server.done == len(REQUESTS)
    starts = [t.start for t in run.traces]
    assert all(start >= at - 0.005 for start, at in zip(starts, arrivals, strict=True))
    assert starts == sorted(starts)


def test_an_infinite_rate_has_every_request_in_flight_at_once() -> None:
    server = FakeServer()
    asyncio.run(RequestRate(float("inf")).run(server.send, REQUESTS, 0, server.on_done))
    assert server.peak == len(REQUESTS)
