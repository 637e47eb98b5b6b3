"""The RateLimiter deployment in a real Ray Serve application, shared through separate handles."""

from __future__ import annotations

import asyncio
from typing import cast

import pytest
from ray import serve
from ray.serve import Deployment

from serve_app.api.auth import KeyLimits
from serve_app.api.errors import ApiError
from serve_app.clients.rate_limiter import RateLimitClient
from serve_app.deployments.rate_limiter import RateLimiter
from serve_app.stores.rate_buckets import Decision

APP = "rate-test"
LIMITER = cast(Deployment, RateLimiter)  # mypy ignores what a class decorator returns


pytestmark = pytest.mark.usefixtures("ray_cluster")


def two_ingress_clients(
    timeout_s: float = 5.0, fail_open: bool = True
) -> tuple[RateLimitClient, RateLimitClient]:
    """Clients over two distinct handles to one limiter, as two ingress replicas hold them."""
    first = serve.run(LIMITER.bind(), name=APP, route_prefix=None)
    second = serve.get_deployment_handle("RateLimiter", app_name=APP)
    assert first is not second
    return (
        RateLimitClient(first, timeout_s, fail_open),
        RateLimitClient(second, timeout_s, fail_open),
    )


def test_clients_on_different_handles_share_one_request_budget() -> None:
    a, b = two_ingress_clients()
    limits = KeyLimits(requests_per_minute=3)

    async def exercise() -> tuple[list[Decision], Decision, Decision]:
        used = [await a.acquire("alice", limits, 0) for _ in range(3)]
        return used, await b.acquire("alice", limits, 0), await b.acquire("bob", limits, 0)

    used, refused, other_key = asyncio.run(exercise())
    assert all(decision.allowed for decision in used)
    assert not refused.allowed
    assert 0 < refused.retry_after_s <= 20.0  # one request comes back every 20 s
    assert refused.reason is not None and "requests per minute" in refused.reason
    assert other_key.allowed
    assert a.errors == b.errors == 0


def test_settle_through_one_client_frees_tokens_for_the_other() -> None:
    a, b = two_ingress_clients()
    limits = KeyLimits(tokens_per_minute=1000)

    async def exercise() -> tuple[Decision, Decision, Decision]:
        reserved = await a.acquire("alice", limits, 1000)
        refused = await b.acquire("alice", limits, 500)
        await a.settle(reserved.reservation_id, 400)
        return reserved, refused, await b.acquire("alice", limits, 500)

    reserved, refused, after_settle = asyncio.run(exercise())
    assert reserved.allowed and reserved.reservation_id is not None
    assert not refused.allowed
    assert after_settle.allowed
    assert a.errors == b.errors == 0


def test_client_fails_open_when_the_limiter_is_gone() -> None:
    a, _ = two_ingress_clients(timeout_s=0.5)
    serve.delete(APP)

    async def exercise() -> Decision:
        await a.settle("some-reservation", 10)
        return await a.acquire("alice", KeyLimits(requests_per_minute=1), 0)

    assert asyncio.run(exercise()) == Decision(True, 0.0, None, None)
    assert a.errors == 2


def test_client_failing_closed_refuses_with_503_when_the_limiter_is_gone() -> None:
    a, _ = two_ingress_clients(timeout_s=0.5, fail_open=False)
    assert asyncio.run(a.acquire("alice", KeyLimits(requests_per_minute=5), 0)).allowed
    serve.delete(APP)

    with pytest.raises(ApiError) as refused:
        asyncio.run(a.acquire("alice", KeyLimits(requests_per_minute=5), 0))
    assert (refused.value.status, refused.value.code) == (503, "rate_limiter_unavailable")
    assert a.errors == 1
