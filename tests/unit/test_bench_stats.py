"""The benchmark's arithmetic on hand-made traces: percentiles, ITL, TPOT, errors, throughput."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from serve_app.bench.stats import (
    PointSummary,
    distribution,
    itl_samples,
    request_metrics,
    summarize,
)
from serve_app.bench.trace import ChunkEvent, RequestTrace

# The brief's example: the second chunk carries three coalesced tokens.
COALESCED = [ChunkEvent(0.10, 1), ChunkEvent(0.30, 3), ChunkEvent(0.35, 1)]


def trace(
    chunks: list[ChunkEvent],
    e2e: float,
    status: str = "200",
    completion_tokens: int | None = None,
) -> RequestTrace:
    return RequestTrace(
        start=0.0,
        input_len=8,
        max_tokens=8,
        status=status,
        e2e=e2e,
        chunks=chunks,
        completion_tokens=completion_tokens,
    )


def test_percentiles_interpolate_linearly_between_ranks() -> None:
    d = distribution([float(v) for v in range(1, 11)])
    assert d.mean == pytest.approx(5.5)
    assert d.p50 == pytest.approx(5.5)
    assert d.p90 == pytest.approx(9.1)
    assert d.p99 == pytest.approx(9.91)


def test_no_samples_give_no_percentiles() -> None:
    d = distribution([])
    assert (d.mean, d.p50, d.p90, d.p99) == (None, None, None, None)


def test_a_multi_token_chunk_spreads_its_gap_over_its_tokens() -> None:
    samples = itl_samples(COALESCED)
    assert samples == pytest.approx([0.2 / 3, 0.2 / 3, 0.2 / 3, 0.05])
    assert sum(samples) == pytest.approx(0.35 - 0.10)


def test_the_first_chunk_adds_no_itl_sample_even_with_several_tokens() -> None:
    samples = itl_samples([ChunkEvent(0.5, 4), ChunkEvent(0.7, 2)])
    assert samples == pytest.approx([0.1, 0.1])


def test_ttft_and_tpot_use_the_exact_completion_count() -> None:
    metrics = request_metrics(trace(COALESCED, e2e=0.40, completion_tokens=5))
    assert metrics is not None
    assert metrics.ttft == pytest.approx(0.10)
    assert metrics.tpot == pytest.approx((0.40 - 0.10) / (5 - 1))
    assert metrics.output_tokens == 5


def test_the_usage_count_wins_over_the_chunk_count() -> None:
    metrics = request_metrics(trace(COALESCED, e2e=0.40, completion_tokens=9))
    assert metrics is not None
    assert metrics.output_tokens == 9
    assert metrics.tpot == pytest.approx(0.30 / 8)


def test_a_single_token_has_no_tpot() -> None:
    metrics = request_metrics(trace([ChunkEvent(0.1, 1)], e2e=0.12, completion_tokens=1))
    assert metrics is not None
    assert metrics.tpot is None


def test_failed_requests_count_as_errors_and_stay_out_of_latencies() -> None:
    traces = [
        trace(COALESCED, e2e=0.40, completion_tokens=5),
        trace([ChunkEvent(0.2, 1), ChunkEvent(0.3, 2)], e2e=0.3, completion_tokens=3),
        trace([], e2e=0.01, status="503"),
        # A stream that broke after some text: its slow chunks must not reach the latencies.
        trace([ChunkEvent(9.0, 1), ChunkEvent(19.0, 1)], e2e=20.0, status="sse_error"),
        trace([], e2e=30.0, status="timeout"),
        trace([], e2e=0.02, status="503"),
    ]
    summary = summarize(traces, wall_s=2.0)
    assert summary.completed == 2
    assert summary.failed == 4
    assert summary.errors == {"503": 2, "sse_error": 1, "timeout": 1}
    assert summary.ttft.p99 is not None and summary.ttft.p99 < 0.3
    assert summary.e2e.mean == pytest.approx((0.40 + 0.3) / 2)
    assert summary.itl.mean == pytest.approx((0.25 + 0.1) / 6)


def test_throughput_is_over_the_points_wall_time() -> None:
    traces = [
        trace(COALESCED, e2e=0.40, completion_tokens=5),
        trace([ChunkEvent(0.2, 1), ChunkEvent(0.3, 2)], e2e=0.3, completion_tokens=3),
        trace([], e2e=0.01, status="500"),
    ]
    summary = summarize(traces, wall_s=2.0)
    assert summary.request_throughput == pytest.approx(2 / 2.0)
    assert summary.output_throughput == pytest.approx((5 + 3) / 2.0)


def test_decode_throughput_spans_earliest_first_token_to_latest_last_token() -> None:
    # Sent 0.5 s apart: first tokens at 0.1 and 0.6, last tokens at 0.35 and 0.9 of the point.
    early = trace(COALESCED, e2e=0.40, completion_tokens=5)
    late = trace([ChunkEvent(0.1, 1), ChunkEvent(0.4, 2)], e2e=0.45, completion_tokens=3)
    late.start = 0.5
    summary = summarize([early, late], wall_s=1.0)
    assert summary.decode_throughput == pytest.approx(((5 - 1) + (3 - 1)) / (0.9 - 0.1))


def test_failed_requests_stay_out_of_decode_throughput() -> None:
    ok = trace([ChunkEvent(0.1, 1), ChunkEvent(0.3, 1)], e2e=0.3, completion_tokens=2)
    broken = trace([ChunkEvent(0.1, 1), ChunkEvent(9.0, 5)], e2e=9.0, status="sse_error")
    assert summarize([ok, broken], wall_s=1.0).decode_throughput == pytest.approx(1 / 0.2)


def test_no_decode_window_gives_no_decode_throughput() -> None:
    single = trace([ChunkEvent(0.1, 1)], e2e=0.1, completion_tokens=1)
    assert summarize([single], wall_s=1.0).decode_throughput == 0.0
    assert summarize([trace([], e2e=0.1, status="503")], wall_s=1.0).decode_throughput == 0.0


def test_in_process_token_times_are_chunks_and_the_last_one_ends_the_request() -> None:
    recorded = RequestTrace(start=0.0, input_len=8, max_tokens=4)
    recorded.record(0.1)
    recorded.record(0.2, tokens=3)
    assert recorded.chunks == [ChunkEvent(0.1, 1), ChunkEvent(0.2, 3)]
    assert recorded.e2e == 0.2 and recorded.output_tokens == 4


def test_a_summary_reads_back_from_its_json() -> None:
    summary = summarize([trace(COALESCED, e2e=0.40, completion_tokens=5)], wall_s=2.0)
    assert PointSummary.from_dict(json.loads(json.dumps(asdict(summary)))) == summary
