"""The ``RateLimiter`` deployment: one replica holds every key's buckets, so all ingress
replicas draw on one budget."""

from __future__ import annotations

from ray import serve

from serve_app.api.auth import KeyLimits
from serve_app.config import DRAIN_POLL_S
from serve_app.stores.rate_buckets import Decision, RateLimitStore


@serve.deployment(
    num_replicas=1,
    ray_actor_options={"num_cpus": 0},
    max_ongoing_requests=1000,
    graceful_shutdown_wait_loop_s=DRAIN_POLL_S,
)
class RateLimiter:
    """The single, cluster-wide replica holding every key's buckets."""

    def __init__(self) -> None:
        self._store = RateLimitStore()

    async def acquire(self, key_name: str, limits: KeyLimits, tokens: int) -> Decision:
        """Take one request and reserve ``tokens`` for ``key_name``, or refuse."""
        return self._store.acquire(key_name, limits, tokens)

    async def settle(self, reservation_id: str, actual_tokens: int) -> None:
        """Give back the unused part of a reservation."""
        self._store.settle(reservation_id, actual_tokens)
