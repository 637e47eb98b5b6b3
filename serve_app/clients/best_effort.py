"""Calls to helper deployments (response cache, rate limiter) that must never fail a request."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ray.serve.handle import DeploymentHandle

logger = logging.getLogger("ray.serve")


class BestEffortHandle:
    """A deployment handle called with a deadline; failures are counted and logged, and the
    caller decides how to degrade (a cache miss, a request let through)."""

    def __init__(self, handle: DeploymentHandle, timeout_s: float, degraded: str) -> None:
        self._handle = handle
        self._timeout_s = timeout_s
        self._degraded = degraded  # what happens instead, for the log line
        self.errors = 0

    async def call(self, method: str, *args: Any) -> Any:
        """``handle.method.remote(*args)`` within the deadline; raises on any failure."""
        response = getattr(self._handle, method).remote(*args)
        try:
            return await asyncio.wait_for(response, self._timeout_s)
        except asyncio.TimeoutError:  # not yet the builtin TimeoutError on Python 3.10
            # Without a live replica the request would wait in the router forever.
            response.cancel()
            raise

    def record_error(self, operation: str, exc: Exception) -> None:
        """Count and log a failed call."""
        self.errors += 1
        logger.warning("%s failed (%s: %s); %s", operation, type(exc).__name__, exc, self._degraded)
