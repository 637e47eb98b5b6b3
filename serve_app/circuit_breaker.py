"""A circuit breaker in front of the model path: when calls to it keep failing, shed at once.

``CircuitBreaker`` is the pure state machine (an injected clock, no I/O): closed, it counts the
outcomes of a sliding window and opens when failures pass the threshold; open, it refuses every
call until the cool-down has passed; half-open, it lets a few probes through, closes when they
succeed and re-opens at the first that fails. ``guarded`` applies it to one stream of the model
path, and ``is_model_path_failure`` says which errors count: server-side failures and timeouts,
never what the client did (4xx), overload (503 ``overloaded``) or a client that went away.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from enum import IntEnum
from typing import TypeVar

from ray.serve.exceptions import BackPressureError

from serve_app.api.errors import ApiError
from serve_app.config import CircuitBreakerConfig

T = TypeVar("T")

# 503 codes of a broken model path; other 503s (``overloaded``) say it works but is full.
MODEL_PATH_FAILURE_CODES = frozenset({"no_replica", "model_failed", "engine_dead"})
BUCKETS_PER_WINDOW = 10  # the window slides in tenths, so its memory is bounded at any rate


class CircuitState(IntEnum):
    """The breaker's state; the values are those of the ``serve_app_circuit_state`` gauge."""

    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2

    @property
    def label(self) -> str:
        """``closed``, ``open`` or ``half_open``."""
        return self.name.lower()


@dataclass
class Permit:
    """One admitted call. ``epoch`` is the breaker state it was admitted in: its outcome
    counts only while that state lasts (a call admitted before the breaker opened says
    nothing about the probes that follow)."""

    epoch: int
    probe: bool
    settled: bool = False  # a probe's slot was given back


@dataclass
class _Bucket:
    start: float
    successes: int = 0
    failures: int = 0


class CircuitBreaker:
    """Closed / open / half-open over the outcomes of calls to the model path."""

    def __init__(
        self,
        config: CircuitBreakerConfig,
        clock: Callable[[], float] = time.monotonic,
        on_transition: Callable[[CircuitState], None] = lambda state: None,
    ) -> None:
        self.config = config
        self._clock = clock
        self._on_transition = on_transition
        self._state = CircuitState.CLOSED
        self._epoch = 0
        self._opened_at = 0.0
        self._buckets: deque[_Bucket] = deque()
        self._probes_admitted = 0
        self._probe_successes = 0

    @property
    def state(self) -> CircuitState:
        """The state now (open turns half-open once its cool-down has passed)."""
        if (
            self._state is CircuitState.OPEN
            and self._clock() - self._opened_at >= self.config.cooldown_s
        ):
            self._enter(CircuitState.HALF_OPEN)
        return self._state

    def retry_after_s(self) -> int:
        """Whole seconds until the breaker lets calls through again (at least 1)."""
        if self.state is CircuitState.OPEN:
            remaining = self.config.cooldown_s - (self._clock() - self._opened_at)
            return max(1, math.ceil(remaining))
        return 1

    def admit(self) -> Permit | None:
        """A permit for one call, or None when the breaker refuses it (open, or every probe
        slot of half-open taken)."""
        state = self.state
        if state is CircuitState.CLOSED:
            return Permit(self._epoch, probe=False)
        if state is CircuitState.HALF_OPEN and self._probes_admitted < self.config.half_open_probes:
            self._probes_admitted += 1
            return Permit(self._epoch, probe=True)
        return None

    def succeeded(self, permit: Permit) -> None:
        """The call's model path worked."""
        if permit.epoch != self._epoch:
            return
        if not permit.probe:
            self._bucket().successes += 1
            return
        if not permit.settled:
            permit.settled = True
            self._probe_successes += 1
            if self._probe_successes >= self.config.half_open_probes:
                self._enter(CircuitState.CLOSED)

    def failed(self, permit: Permit) -> None:
        """The call's model path failed (an error of the service, or a timeout)."""
        if permit.epoch != self._epoch:
            return
        if permit.probe:
            self._open()
            return
        self._bucket().failures += 1
        successes, failures = self._window_counts()
        ratio = failures / (successes + failures)
        if failures >= self.config.failure_threshold and ratio >= self.config.failure_ratio:
            self._open()

    def release(self, permit: Permit) -> None:
        """The call ended telling nothing about the model path (a client error, the client
        gone): a probe's slot goes to the next call."""
        if permit.epoch == self._epoch and permit.probe and not permit.settled:
            permit.settled = True
            self._probes_admitted -= 1

    def _open(self) -> None:
        self._opened_at = self._clock()
        self._enter(CircuitState.OPEN)

    def _enter(self, state: CircuitState) -> None:
        self._state = state
        self._epoch += 1
        self._buckets.clear()
        self._probes_admitted = 0
        self._probe_successes = 0
        self._on_transition(state)

    def _bucket(self) -> _Bucket:
        """The newest bucket of the window, after dropping those that slid out of it."""
        now = self._clock()
        width = self.config.window_s / BUCKETS_PER_WINDOW
        while self._buckets and self._buckets[0].start <= now - self.config.window_s:
            self._buckets.popleft()
        if not self._buckets or now - self._buckets[-1].start >= width:
            self._buckets.append(_Bucket(now))
        return self._buckets[-1]

    def _window_counts(self) -> tuple[int, int]:
        return (
            sum(b.successes for b in self._buckets),
            sum(b.failures for b in self._buckets),
        )


def is_model_path_failure(exc: BaseException) -> bool:
    """Whether an error says the model path is broken. A client's mistake (4xx), a full
    queue (503 ``overloaded``) and a client that went away (cancellation) do not."""
    if isinstance(exc, ApiError):
        return (exc.status >= 500 and exc.status != 503) or exc.code in MODEL_PATH_FAILURE_CODES
    return isinstance(exc, Exception) and not isinstance(exc, BackPressureError)


async def guarded(breaker: CircuitBreaker, stream: AsyncIterator[T]) -> AsyncIterator[T]:
    """``stream`` through ``breaker``: refused with 503 ``circuit_open`` (and Retry-After)
    while it is open, before anything is sent. A stream's first item counts as a success (the
    model path answered); a failure, even after it, counts as one."""
    permit = breaker.admit()
    if permit is None:
        raise ApiError(
            503,
            "the model is failing; requests are refused until it recovers, retry later",
            code="circuit_open",
            retry_after=str(breaker.retry_after_s()),
        )
    try:
        async with aclosing(stream) as items:  # type: ignore[type-var]
            answered = False
            async for item in items:
                if not answered:
                    answered = True
                    breaker.succeeded(permit)
                yield item
    except Exception as exc:
        if is_model_path_failure(exc):
            breaker.failed(permit)
        raise
    finally:
        breaker.release(permit)
