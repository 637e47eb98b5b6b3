"""Runs every sweep point against the target, one after the other, with a progress bar each."""

from __future__ import annotations

from functools import partial

import httpx
from tqdm import tqdm

from serve_app.bench.client import Target, stream_request
from serve_app.bench.dataset import BenchRequest
from serve_app.bench.load import LoadShape
from serve_app.bench.report import PointResult
from serve_app.bench.stats import summarize


async def run_sweep(
    base_url: str,
    api_key: str | None,
    target: Target,
    shapes: list[LoadShape],
    requests: list[BenchRequest],
    seed: int,
    transport: httpx.AsyncBaseTransport | None = None,
) -> list[PointResult]:
    """Run each shape over its own slice of ``requests``, so no prompt is sent twice.

    ``transport`` replaces the network, e.g. with an in-process app.
    """
    per_point = len(requests) // len(shapes)
    max_in_flight = max(shape.max_in_flight(per_point) for shape in shapes)
    # A spare connection above the peak, so no request ever waits for one.
    limits = httpx.Limits(max_connections=max_in_flight + 1, max_keepalive_connections=None)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    results: list[PointResult] = []
    async with httpx.AsyncClient(
        base_url=base_url,
        headers=headers,
        limits=limits,
        timeout=target.timeout_s,
        transport=transport,
    ) as client:
        send = partial(stream_request, client, target)
        for index, shape in enumerate(shapes):
            point_requests = requests[index * per_point : (index + 1) * per_point]
            with tqdm(total=len(point_requests), desc=shape.label, unit="req") as bar:
                run = await shape.run(send, point_requests, seed, bar.update)
            summary = summarize(run.traces, run.wall_s)
            results.append(PointResult(base_url, shape, run.traces, summary))
    return results
