"""Unit tests of the per-key token buckets and the limiter client's fail-open policy (no Ray)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from serve_app.api.auth import KeyLimits
from serve_app.api.errors import ApiError
from serve_app.clients.rate_limiter import RateLimitClient
from serve_app.stores.rate_buckets import Decision, RateLimitStore
from tests.unit.fakes import HangingHandle


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def store(clock: FakeClock | None = None) -> RateLimitStore:
    return RateLimitStore(clock=clock or FakeClock())


RPM_6 = KeyLimits(requests_per_minute=6)  # one request back every 10 s
TPM_600 = KeyLimits(tokens_per_minute=600)  # ten tokens back every second


def test_rpm_refuses_the_request_after_the_limit_and_says_when_to_retry() -> None:
    clock = FakeClock()
    s = store(clock)
    assert all(s.acquire("alice", RPM_6, 0).allowed for _ in range(6))
    clock.now += 4.0
    refused = s.acquire("alice", RPM_6, 0)
    assert not refused.allowed
    assert refused.retry_after_s == pytest.approx(6.0)  # 4 s of the 10 s refill already passed
    assert refused.reservation_id is None
    assert refused.reason is not None and "6 requests per minute" in refused.reason


def test_rpm_refills_continuously() -> None:
    clock = FakeClock()
    s = store(clock)
    for _ in range(6):
        s.acquire("alice", RPM_6, 0)
    clock.now += 9.9
    assert not s.acquire("alice", RPM_6, 0).allowed
    clock.now += 0.1
    assert s.acquire("alice", RPM_6, 0).allowed
    assert not s.acquire("alice", RPM_6, 0).allowed
    clock.now += 3600  # a long idle time refills only up to the limit
    assert sum(s.acquire("alice", RPM_6, 0).allowed for _ in range(10)) == 6


def test_a_refused_request_consumes_nothing() -> None:
    clock = FakeClock()
    s = store(clock)
    both = KeyLimits(requests_per_minute=2, tokens_per_minute=100)
    assert s.acquire("alice", both, 80).allowed
    assert not s.acquire("alice", both, 50).allowed  # tokens do not fit: the request is not taken
    assert s.acquire("alice", both, 20).allowed  # so the second request still fits


def test_tpm_reservation_refuses_until_settle_returns_unused_tokens() -> None:
    s = store()
    first = s.acquire("alice", TPM_600, 500)  # e.g. prompt 100 + max_tokens 400
    assert first.allowed and first.reservation_id is not None
    refused = s.acquire("alice", TPM_600, 200)
    assert not refused.allowed
    assert refused.retry_after_s == pytest.approx(10.0)  # 100 tokens missing at 10 per second
    assert refused.reason is not None and "600 tokens per minute" in refused.reason
    s.settle(first.reservation_id, 150)  # 350 reserved tokens were never generated
    assert s.acquire("alice", TPM_600, 200).allowed
    assert s.acquire("alice", TPM_600, 250).allowed
    assert not s.acquire("alice", TPM_600, 1).allowed


def test_settle_never_fills_beyond_capacity() -> None:
    clock = FakeClock()
    s = store(clock)
    decision = s.acquire("alice", TPM_600, 600)
    assert decision.reservation_id is not None
    clock.now += 120  # the bucket is full again
    s.settle(decision.reservation_id, 0)
    assert s.acquire("alice", TPM_600, 600).allowed
    assert not s.acquire("alice", TPM_600, 1).allowed


def test_settle_charges_tokens_used_beyond_the_reservation() -> None:
    s = store()
    decision = s.acquire("alice", TPM_600, 100)
    assert decision.reservation_id is not None
    s.settle(decision.reservation_id, 300)
    assert s.acquire("alice", TPM_600, 300).allowed
    assert not s.acquire("alice", TPM_600, 1).allowed


def test_settle_is_idempotent_and_ignores_unknown_ids() -> None:
    s = store()
    decision = s.acquire("alice", TPM_600, 400)
    assert decision.reservation_id is not None
    s.settle(decision.reservation_id, 100)
    s.settle(decision.reservation_id, 100)  # a duplicate must not return the 300 tokens twice
    s.settle("no-such-reservation", 0)
    assert s.acquire("alice", TPM_600, 500).allowed
    assert not s.acquire("alice", TPM_600, 1).allowed


def test_unsettled_reservations_expire_and_keep_their_tokens_spent() -> None:
    clock = FakeClock()
    s = RateLimitStore(clock=clock, reservation_ttl_s=30.0)
    decision = s.acquire("alice", TPM_600, 600)
    assert decision.reservation_id is not None
    clock.now += 30.0
    s.settle(decision.reservation_id, 0)  # too late: the reservation is forgotten
    assert s.acquire("alice", TPM_600, 300).allowed  # only the 30 s refill is there
    assert not s.acquire("alice", TPM_600, 1).allowed


def test_request_larger_than_the_whole_minute_budget_is_refused_with_a_reason() -> None:
    s = store()
    decision = s.acquire("alice", TPM_600, 601)
    assert not decision.allowed
    assert decision.retry_after_s == 60.0
    assert decision.reason is not None
    assert "601 tokens" in decision.reason and "600 tokens per minute" in decision.reason
    assert s.acquire("alice", TPM_600, 600).allowed  # the refusal consumed nothing


def test_unlimited_limits_always_allow_without_reservation() -> None:
    s = store()
    for _ in range(10_000):
        decision = s.acquire("alice", KeyLimits(), 1_000_000)
        assert decision == Decision(True, 0.0, None, None)


def test_limits_are_per_key() -> None:
    s = store()
    for _ in range(6):
        s.acquire("alice", RPM_6, 0)
    assert s.acquire("alice", TPM_600, 600).allowed
    assert not s.acquire("alice", RPM_6, 0).allowed
    assert not s.acquire("alice", TPM_600, 1).allowed
    assert all(s.acquire("bob", RPM_6, 0).allowed for _ in range(6))
    assert s.acquire("bob", TPM_600, 600).allowed


def test_negative_tokens_are_an_error() -> None:
    with pytest.raises(ValueError, match="tokens"):
        store().acquire("alice", TPM_600, -1)


@pytest.mark.parametrize(
    ("retry_after_s", "header"), [(0.0, "1"), (0.2, "1"), (1.0, "1"), (6.01, "7")]
)
def test_retry_after_header_is_whole_seconds_at_least_one(
    retry_after_s: float, header: str
) -> None:
    assert Decision(False, retry_after_s, None, "limited").retry_after_header == header


def test_client_fails_open_on_timeout_and_cancels_the_call(
    caplog: pytest.LogCaptureFixture,
) -> None:
    handle = HangingHandle()
    client = RateLimitClient(handle, timeout_s=0.05)  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="serve_app.clients.rate_limiter"):
        decision = asyncio.run(client.acquire("alice", RPM_6, 10))
        asyncio.run(client.settle("some-reservation", 5))  # must not raise
    assert decision == Decision(True, 0.0, None, None)
    assert client.errors == 2
    assert all(r.cancelled for r in handle.responses)
    assert "TimeoutError" in caplog.text


def test_client_configured_to_fail_closed_answers_503_when_the_limiter_hangs() -> None:
    handle = HangingHandle()
    client = RateLimitClient(handle, timeout_s=0.05, fail_open=False)  # type: ignore[arg-type]
    with pytest.raises(ApiError) as refused:
        asyncio.run(client.acquire("alice", RPM_6, 10))
    assert (refused.value.status, refused.value.code) == (503, "rate_limiter_unavailable")
    assert refused.value.retry_after == "1"
    assert client.errors == 1
    assert all(r.cancelled for r in handle.responses)


def test_client_skips_the_limiter_for_unlimited_keys_and_empty_reservations() -> None:
    handle = HangingHandle()
    client = RateLimitClient(handle, timeout_s=0.05)  # type: ignore[arg-type]
    assert asyncio.run(client.acquire("alice", KeyLimits(), 10)).allowed
    asyncio.run(client.settle(None, 5))
    assert handle.responses == []
    assert client.errors == 0


def test_client_without_a_limiter_allows_everything() -> None:
    client = RateLimitClient(None)
    assert asyncio.run(client.acquire("alice", RPM_6, 10)) == Decision(True, 0.0, None, None)
    asyncio.run(client.settle("r", 1))
    assert client.errors == 0
