"""The ``ResponseCache`` deployment: the single, cluster-wide replica of the response store.

Model replicas tell it which version is live; ingresses look up and fill it through
``ResponseCacheClient`` and follow the live version with a long poll.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from ray import serve

from serve_app.config import DRAIN_POLL_S, ResponseCacheConfig
from serve_app.stores.response_store import (
    CachedResponse,
    CacheStats,
    LiveLookup,
    LRUResponseStore,
    cache_key,
)


@serve.deployment(
    num_replicas=1,
    ray_actor_options={"num_cpus": 0},
    max_ongoing_requests=1000,
    # Lookups take microseconds; waiting longer would only wait out the ingresses' long polls.
    graceful_shutdown_timeout_s=2.0,
    graceful_shutdown_wait_loop_s=DRAIN_POLL_S,
)
class ResponseCache:
    """The single, cluster-wide replica holding the response store."""

    def __init__(self, config: ResponseCacheConfig) -> None:
        self._config = config
        self._store = LRUResponseStore(
            self._config.max_entries, self._config.max_bytes, self._config.ttl_s
        )
        self._live_version: str | None = None
        self._version_changed = asyncio.Event()

    async def set_live_version(self, version: str) -> None:
        """Model replicas say which version new requests are served by (on load, on swap,
        and again at every health check, so a restarted cache learns it too)."""
        if version != self._live_version:
            self._live_version = version
            self._announce()

    async def watch_live_version(self, known: str | None, timeout_s: float) -> str | None:
        """Long poll: the live version as soon as it differs from ``known``, else after
        ``timeout_s``. None while no version is live or the cache is disabled."""
        changed = self._version_changed
        if self._served_version() == known:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(changed.wait(), timeout_s)
        return self._served_version()

    async def get_live(self, payload: dict[str, Any]) -> LiveLookup:
        """The cached answer to ``payload`` produced by the live model version, if any.

        The version is applied here, in one call, so a lookup can never pair a request with
        a version that is no longer served.
        """
        version = self._served_version()
        if version is None:
            return LiveLookup(None, None)
        return LiveLookup(version, await self.get(cache_key(version, payload)))

    async def get(self, key: str) -> CachedResponse | None:
        """The cached response for ``key``, or None."""
        if not self._config.enabled:
            return None
        return self._store.get(key)

    async def put(self, key: str, value: CachedResponse) -> None:
        """Cache ``value`` under ``key``."""
        if self._config.enabled:
            self._store.put(key, value)

    async def stats(self) -> CacheStats:
        """Occupancy and counters of the store."""
        return self._store.stats()

    async def reconfigure(self, config: dict[str, Any]) -> None:
        """Apply a ``user_config``: fields it names override the current config."""
        self._config = ResponseCacheConfig.model_validate({**self._config.model_dump(), **config})
        self._store.resize(self._config.max_entries, self._config.max_bytes, self._config.ttl_s)
        if not self._config.enabled:
            self._store.clear()
        self._announce()  # near caches follow ``enabled`` through the served version

    def _served_version(self) -> str | None:
        return self._live_version if self._config.enabled else None

    def _announce(self) -> None:
        """Wake every ``watch_live_version`` call."""
        self._version_changed.set()
        self._version_changed = asyncio.Event()
