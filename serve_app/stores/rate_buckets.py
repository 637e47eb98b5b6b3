"""Per-key rate-limit buckets: requests and tokens per minute, with up-front reservations.

Each key has two token buckets, one for requests and one for tokens per minute, refilled
continuously. A request takes one request and reserves ``prompt + max_tokens`` tokens up front;
when it finishes, ``settle`` gives back what it did not use.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from serve_app.api.auth import KeyLimits

_SECONDS_PER_MINUTE = 60.0
_FLOAT_SLACK = 1e-9  # refill rounding must not refuse a request that fits exactly
_RESERVATION_TTL_S = 600.0  # longer than any request; forgets reservations whose settle was lost


@dataclass(frozen=True)
class Decision:
    """Whether a request may start; if not, when to retry and why."""

    allowed: bool
    retry_after_s: float
    reservation_id: str | None
    reason: str | None

    @property
    def retry_after_header(self) -> str:
        """``retry_after_s`` as a ``Retry-After`` value: whole seconds, at least 1."""
        return str(max(1, math.ceil(self.retry_after_s)))


ALLOW_UNRESERVED = Decision(allowed=True, retry_after_s=0.0, reservation_id=None, reason=None)


class _TokenBucket:
    """Holds up to ``capacity`` and refills at ``capacity`` per minute; starts full."""

    def __init__(self, capacity: int, now: float) -> None:
        self.capacity = capacity
        self.level = float(capacity)
        self._updated_at = now

    def refill(self, capacity: int, now: float) -> None:
        """Add what accrued since the last refill; ``capacity`` follows the current limit."""
        self.capacity = capacity
        accrued = (now - self._updated_at) * capacity / _SECONDS_PER_MINUTE
        self.level = min(float(capacity), self.level + accrued)
        self._updated_at = now

    def wait_s(self, amount: int) -> float:
        """Seconds until ``amount`` fits; 0 when it fits now."""
        missing = amount - self.level
        if missing <= _FLOAT_SLACK:
            return 0.0
        return missing * _SECONDS_PER_MINUTE / self.capacity


@dataclass(frozen=True)
class _Reservation:
    bucket: _TokenBucket
    tokens: int
    expires_at: float


class RateLimitStore:
    """Request and token buckets per key name, with up-front token reservations."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        reservation_ttl_s: float = _RESERVATION_TTL_S,
    ) -> None:
        self._clock = clock
        self._reservation_ttl_s = reservation_ttl_s
        self._request_buckets: dict[str, _TokenBucket] = {}
        self._token_buckets: dict[str, _TokenBucket] = {}
        self._reservations: dict[str, _Reservation] = {}  # insertion order is expiry order

    def acquire(self, key_name: str, limits: KeyLimits, tokens: int) -> Decision:
        """Take one request and reserve ``tokens`` for ``key_name``, or take nothing and refuse."""
        if tokens < 0:
            raise ValueError(f"tokens must be >= 0, got {tokens}")
        now = self._clock()
        self._expire_reservations(now)
        rpm, tpm = limits.requests_per_minute, limits.tokens_per_minute
        if tpm is not None and tokens > tpm:
            reason = f"request needs {tokens} tokens, more than this key's {tpm} tokens per minute"
            # Waiting never helps; 60 s is a full refill, the most any retry could hope for.
            return Decision(False, _SECONDS_PER_MINUTE, None, reason)
        requests = self._bucket(self._request_buckets, key_name, rpm, now)
        token_bucket = self._bucket(self._token_buckets, key_name, tpm, now)
        request_wait = requests.wait_s(1) if requests is not None else 0.0
        token_wait = token_bucket.wait_s(tokens) if token_bucket is not None else 0.0
        if request_wait > 0 or token_wait > 0:
            return _refusal(request_wait, rpm, token_wait, tpm)
        if requests is not None:
            requests.level -= 1
        if token_bucket is None or tokens == 0:
            return ALLOW_UNRESERVED
        token_bucket.level -= tokens
        reservation_id = uuid.uuid4().hex
        expires_at = now + self._reservation_ttl_s
        self._reservations[reservation_id] = _Reservation(token_bucket, tokens, expires_at)
        return Decision(True, 0.0, reservation_id, None)

    def settle(self, reservation_id: str, actual_tokens: int) -> None:
        """Give back the unused part of a reservation; unknown or settled ids are ignored.

        A request that used more than it reserved is charged the difference, down to at most one
        minute's worth of debt, so a wrong estimate cannot lock a key out for long.
        """
        now = self._clock()
        self._expire_reservations(now)
        reservation = self._reservations.pop(reservation_id, None)
        if reservation is None:
            return
        bucket = reservation.bucket
        bucket.refill(bucket.capacity, now)
        level = bucket.level + reservation.tokens - max(0, actual_tokens)
        bucket.level = min(float(bucket.capacity), max(-float(bucket.capacity), level))

    @staticmethod
    def _bucket(
        buckets: dict[str, _TokenBucket], key_name: str, capacity: int | None, now: float
    ) -> _TokenBucket | None:
        if capacity is None:
            return None
        bucket = buckets.get(key_name)
        if bucket is None:
            bucket = buckets[key_name] = _TokenBucket(capacity, now)
        else:
            bucket.refill(capacity, now)
        return bucket

    def _expire_reservations(self, now: float) -> None:
        while self._reservations:
            reservation_id, reservation = next(iter(self._reservations.items()))
            if reservation.expires_at > now:
                return
            # Its tokens stay spent: without a settle nobody knows how many were used.
            del self._reservations[reservation_id]


def _refusal(request_wait: float, rpm: int | None, token_wait: float, tpm: int | None) -> Decision:
    if request_wait >= token_wait:
        return Decision(False, request_wait, None, f"limit of {rpm} requests per minute reached")
    return Decision(False, token_wait, None, f"limit of {tpm} tokens per minute reached")
