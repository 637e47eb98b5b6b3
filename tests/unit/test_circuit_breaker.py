"""Unit tests of the circuit breaker: the state machine on a fake clock (no sleeps), which
errors count as failures of the model path, and ``guarded`` over a stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from ray.serve.exceptions import BackPressureError

from serve_app.api import render
from serve_app.api.errors import ApiError
from serve_app.circuit_breaker import (
    CircuitBreaker,
    CircuitState,
    Permit,
    guarded,
    is_model_path_failure,
)
from serve_app.config import CircuitBreakerConfig

CLOSED, OPEN, HALF_OPEN = CircuitState.CLOSED, CircuitState.OPEN, CircuitState.HALF_OPEN


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def breaker(clock: FakeClock, **fields: Any) -> tuple[CircuitBreaker, list[CircuitState]]:
    """A breaker on ``clock`` (threshold 3 of a 10 s window, 5 s cool-down, 2 probes unless
    ``fields`` say otherwise) and the transitions it reports."""
    settings = {"failure_threshold": 3, "window_s": 10, "cooldown_s": 5, "half_open_probes": 2}
    transitions: list[CircuitState] = []
    config = CircuitBreakerConfig(**{**settings, **fields})
    return CircuitBreaker(config, clock, transitions.append), transitions


def fail(b: CircuitBreaker, times: int) -> None:
    for _ in range(times):
        permit = b.admit()
        assert permit is not None
        b.failed(permit)


def succeed(b: CircuitBreaker, times: int) -> None:
    for _ in range(times):
        permit = b.admit()
        assert permit is not None
        b.succeeded(permit)


def admit(b: CircuitBreaker) -> Permit:
    permit = b.admit()
    assert permit is not None
    return permit


def opened(clock: FakeClock) -> tuple[CircuitBreaker, list[CircuitState]]:
    b, transitions = breaker(clock)
    fail(b, 3)
    assert b.state is OPEN
    return b, transitions


# The state machine


def test_it_opens_when_failures_reach_the_threshold_within_the_window() -> None:
    b, transitions = breaker(FakeClock())
    fail(b, 2)
    assert b.state is CLOSED
    fail(b, 1)
    assert b.state is OPEN
    assert transitions == [OPEN]
    assert b.admit() is None


def test_failures_that_slid_out_of_the_window_do_not_count() -> None:
    clock = FakeClock()
    b, _ = breaker(clock)
    fail(b, 2)
    clock.advance(10.5)  # both are now older than the 10 s window
    fail(b, 2)
    assert b.state is CLOSED
    fail(b, 1)
    assert b.state is OPEN


def test_a_few_failures_among_many_successes_do_not_open_it() -> None:
    b, _ = breaker(FakeClock(), failure_ratio=0.5)
    succeed(b, 10)
    fail(b, 5)  # 5 of 15 fail: past the threshold, under the ratio
    assert b.state is CLOSED
    fail(b, 5)  # 10 of 20
    assert b.state is OPEN


def test_open_refuses_until_the_cool_down_then_half_opens() -> None:
    clock = FakeClock()
    b, transitions = opened(clock)
    clock.advance(3.2)
    assert b.admit() is None
    assert b.retry_after_s() == 2  # 1.8 s left, rounded up
    clock.advance(1.8)
    assert b.state is HALF_OPEN
    assert transitions == [OPEN, HALF_OPEN]
    assert b.retry_after_s() == 1


def test_half_open_lets_only_its_probes_through_and_closes_when_they_succeed() -> None:
    clock = FakeClock()
    b, transitions = opened(clock)
    clock.advance(5)
    probes = [admit(b), admit(b)]
    assert all(p.probe for p in probes)
    assert b.admit() is None  # both probe slots are taken
    b.succeeded(probes[0])
    assert b.state is HALF_OPEN
    b.succeeded(probes[1])
    assert b.state is CLOSED
    assert transitions == [OPEN, HALF_OPEN, CLOSED]
    # Closed again with a fresh window: the failures before it opened are forgotten.
    fail(b, 2)
    assert b.state is CLOSED


def test_a_failed_probe_reopens_it_for_a_new_cool_down() -> None:
    clock = FakeClock()
    b, transitions = opened(clock)
    clock.advance(5)
    probe = admit(b)
    b.failed(probe)
    assert b.state is OPEN
    assert transitions == [OPEN, HALF_OPEN, OPEN]
    clock.advance(4.9)
    assert b.admit() is None
    clock.advance(0.1)
    assert b.state is HALF_OPEN


def test_a_probe_that_tells_nothing_gives_its_slot_to_the_next_call() -> None:
    clock = FakeClock()
    b, _ = opened(clock)
    clock.advance(5)
    first, second = admit(b), admit(b)
    assert b.admit() is None
    b.release(first)  # e.g. a 400, or its client went away
    third = admit(b)
    b.succeeded(second)
    b.succeeded(third)
    assert b.state is CLOSED


def test_outcomes_of_calls_admitted_before_a_transition_do_not_count_after_it() -> None:
    clock = FakeClock()
    b, _ = breaker(clock)
    slow = admit(b)  # admitted while closed, still running
    fail(b, 3)
    clock.advance(5)
    probe = admit(b)
    b.failed(slow)  # says nothing about the probes
    assert b.state is HALF_OPEN
    b.release(slow)
    assert b.admit() is not None  # the second probe slot is still free
    b.succeeded(probe)


def test_a_success_then_a_failure_of_one_call_count_both() -> None:
    b, _ = breaker(FakeClock(), failure_threshold=1, failure_ratio=0.5)
    permit = admit(b)
    b.succeeded(permit)  # its stream began
    b.failed(permit)  # then its replica died: 1 of 2
    assert b.state is OPEN


def test_the_window_keeps_a_bounded_number_of_buckets_at_any_rate() -> None:
    clock = FakeClock()
    b, _ = breaker(clock, failure_threshold=10_000)
    for _ in range(5000):
        clock.advance(0.01)
        succeed(b, 1)
        fail(b, 1)
    assert len(b._buckets) <= 11  # tenths of the window, one partly slid out


# Which errors count


@pytest.mark.parametrize(
    ("error", "counts"),
    [
        (ApiError(500, "internal error"), True),
        (ApiError(503, "the model replica failed", code="model_failed"), True),
        (ApiError(503, "no replica took it", code="no_replica"), True),
        (ApiError(503, "engine loop died", code="engine_dead"), True),
        (RuntimeError("the batcher's actor died"), True),
        (TimeoutError(), True),
        (ApiError(400, "prompt too long", param="prompt"), False),
        (ApiError(429, "rate limited"), False),
        (ApiError(503, "queue full", code="overloaded"), False),
        (ApiError(503, "queue full"), False),  # the engine's own rejection
        (ApiError(503, "refused", code="circuit_open"), False),
        (BackPressureError(num_queued_requests=9, max_queued_requests=8), False),
        (asyncio.CancelledError(), False),  # the client went away
    ],
)
def test_only_failures_of_the_model_path_count(error: BaseException, counts: bool) -> None:
    assert is_model_path_failure(error) is counts


# guarded


async def items(*values: Any, then: BaseException | None = None) -> AsyncIterator[Any]:
    for value in values:
        yield value
    if then is not None:
        raise then


async def drain(stream: AsyncIterator[Any]) -> list[Any]:
    return [item async for item in stream]


def test_guarded_refuses_at_once_with_503_circuit_open_and_retry_after() -> None:
    clock = FakeClock()
    b, _ = opened(clock)
    clock.advance(1.5)
    with pytest.raises(ApiError) as raised:
        asyncio.run(drain(guarded(b, items(1, 2))))
    error = raised.value
    assert (error.status, error.code, error.type) == (503, "circuit_open", "service_unavailable")
    assert error.retry_after == "4"
    assert error.body().error.message  # the documented shape


def test_guarded_counts_a_stream_that_answered_as_a_success() -> None:
    clock = FakeClock()
    b, _ = opened(clock)
    clock.advance(5)
    assert asyncio.run(drain(guarded(b, items(1, 2)))) == [1, 2]
    assert asyncio.run(drain(guarded(b, items(3)))) == [3]
    assert b.state is CLOSED


def test_guarded_counts_failures_of_the_model_path_and_passes_them_on() -> None:
    b, _ = breaker(FakeClock())
    for _ in range(3):
        with pytest.raises(ApiError, match="replica failed"):
            asyncio.run(
                drain(guarded(b, items(then=ApiError(503, "replica failed", code="model_failed"))))
            )
    assert b.state is OPEN


def test_guarded_ignores_client_errors_and_closed_streams() -> None:
    b, _ = breaker(FakeClock(), failure_threshold=1)
    with pytest.raises(ApiError):
        asyncio.run(drain(guarded(b, items(then=ApiError(400, "bad", param="prompt")))))

    async def closed_after_one() -> None:
        stream = guarded(b, items(1, 2, then=RuntimeError("never reached")))
        assert await anext(stream) == 1
        await stream.aclose()  # type: ignore[attr-defined]  # the client went away

    asyncio.run(closed_after_one())
    assert b.state is CLOSED


def test_guarded_closes_the_stream_it_wraps() -> None:
    closed = []

    async def tracked() -> AsyncIterator[int]:
        try:
            yield 1
            yield 2
        finally:
            closed.append(True)

    async def scenario() -> None:
        stream = guarded(breaker(FakeClock())[0], tracked())
        await anext(stream)
        await stream.aclose()  # type: ignore[attr-defined]

    asyncio.run(scenario())
    assert closed == [True]


# /health


def test_health_is_unavailable_while_a_models_breaker_is_open() -> None:
    stats = {"num_running": 0.0, "num_waiting": 0.0}
    assert render.health(stats, {"a": "closed", "b": "half_open"}).status == "ok"
    opened_one = render.health(stats, {"a": "closed", "b": "open"})
    assert opened_one.status == "unavailable"
    assert opened_one.model_dump()["circuit_breakers"] == {"a": "closed", "b": "open"}
