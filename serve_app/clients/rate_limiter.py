"""The ingress's view of the rate limiter: admission with a reservation, settled afterwards."""

from __future__ import annotations

from ray.serve.handle import DeploymentHandle

from serve_app.api.auth import ApiKey, KeyLimits
from serve_app.api.errors import ApiError
from serve_app.clients.best_effort import BestEffortHandle
from serve_app.stores.rate_buckets import ALLOW_UNRESERVED, Decision


class RateLimitClient:
    """The ingress's view of the limiter. When it cannot answer, requests go through
    (``fail_open``) or are refused with 503 until it is back."""

    def __init__(
        self, handle: DeploymentHandle | None, timeout_s: float = 0.25, fail_open: bool = True
    ) -> None:
        degraded = "letting the request through" if fail_open else "refusing the request (503)"
        self._limiter = BestEffortHandle(handle, timeout_s, degraded) if handle else None
        self._fail_open = fail_open

    @property
    def errors(self) -> int:
        """Failed limiter calls so far."""
        return self._limiter.errors if self._limiter else 0

    async def admit(self, key: ApiKey, limits: KeyLimits, tokens: int) -> str | None:
        """Admit a request of ``key`` reserving ``tokens``, or raise a 429 ``ApiError``.

        Returns the reservation to ``settle`` once the request is over (None: nothing reserved).
        """
        decision = await self.acquire(key.name, limits, tokens)
        if not decision.allowed:
            raise ApiError(
                429,
                decision.reason or "rate limit exceeded",
                code="rate_limit_exceeded",
                retry_after=decision.retry_after_header,
            )
        return decision.reservation_id

    async def acquire(self, key_name: str, limits: KeyLimits, tokens: int) -> Decision:
        """The limiter's decision; an allow without reservation if unlimited or absent. If the
        limiter fails: the same allow when failing open, else a 503 ``ApiError``."""
        unlimited = limits.requests_per_minute is None and limits.tokens_per_minute is None
        if self._limiter is None or unlimited:
            return ALLOW_UNRESERVED
        try:
            decision: Decision = await self._limiter.call("acquire", key_name, limits, tokens)
        except Exception as exc:
            self._limiter.record_error("rate limiter acquire", exc)
            if not self._fail_open:
                raise ApiError(
                    503,
                    "the rate limiter is unavailable; retry shortly",
                    code="rate_limiter_unavailable",
                ) from None
            # Availability over strictness: limits are for fairness, and API keys still apply.
            return ALLOW_UNRESERVED
        return decision

    async def settle(self, reservation_id: str | None, actual_tokens: int) -> None:
        """Give back the unused part of a reservation; None (nothing reserved) is a no-op."""
        if self._limiter is None or reservation_id is None:
            return
        try:
            await self._limiter.call("settle", reservation_id, actual_tokens)
        except Exception as exc:
            self._limiter.record_error("rate limiter settle", exc)
