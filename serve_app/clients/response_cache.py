"""The ingress's view of the response cache: a near cache in front of the cluster-wide replica.

A cache failure never fails a request: every failure becomes a miss or a skipped store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from ray.serve.handle import DeploymentHandle

from serve_app.clients.best_effort import BestEffortHandle
from serve_app.stores.response_store import (
    CachedResponse,
    LiveLookup,
    LRUResponseStore,
    cache_key,
)

logger = logging.getLogger(__name__)

WATCH_TIMEOUT_S = 30.0  # a long poll for the live version returns at least this often
WATCH_RETRY_S = 1.0
# Each ingress replica's near cache: the hottest answers, kept briefly (the replica's TTL and
# bounds still govern what the cluster keeps).
NEAR_MAX_ENTRIES = 1024
NEAR_MAX_BYTES = 16 * 2**20
NEAR_TTL_S = 60.0


class ResponseCacheClient:
    """The ingress's view of the cache: a near cache in front of the cluster-wide replica.

    Every failure is logged and becomes a miss or a no-op. The near cache holds answers of the
    live version only, which a background long poll keeps current; while that poll is failing,
    the near cache is bypassed, and after a swap it serves nothing of the old version once the
    poll returns (the cache replica itself learns of a swap from the model replicas).
    """

    def __init__(self, handle: DeploymentHandle | None, timeout_s: float = 0.5) -> None:
        self._handle = handle
        self._cache = (
            BestEffortHandle(handle, timeout_s, "serving without the cache") if handle else None
        )
        self._near = LRUResponseStore(NEAR_MAX_ENTRIES, NEAR_MAX_BYTES, NEAR_TTL_S)
        self._live_version: str | None = None
        self._follower: asyncio.Task[None] | None = None
        self.hits = 0
        self.near_hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        """Whether there is a cache to ask at all."""
        return self._cache is not None

    @property
    def errors(self) -> int:
        """Failed cache calls so far."""
        return self._cache.errors if self._cache else 0

    @property
    def live_version(self) -> str | None:
        """The live model version as last heard; None bypasses the near cache."""
        return self._live_version

    async def lookup(self, payload: dict[str, Any]) -> CachedResponse | None:
        """The cached answer to ``payload`` (prompt and sampling parameters) from the live
        model version; None on a miss, an error, or with no cache."""
        if self._cache is None:
            return None
        self._follow_live_version()
        version = self._live_version
        if version is not None:
            near = self._near.get(cache_key(version, payload))
            if near is not None:
                self.hits += 1
                self.near_hits += 1
                return near
        try:
            found: LiveLookup = await self._cache.call("get_live", payload)
        except Exception as exc:
            self._cache.record_error("response cache lookup", exc)
            return None
        if found.response is None:
            self.misses += 1
            return None
        self.hits += 1
        if found.version is not None and found.version == self._live_version:
            self._near.put(cache_key(found.version, payload), found.response)
        return found.response

    async def store(
        self, model_version: str, payload: dict[str, Any], value: CachedResponse
    ) -> None:
        """Cache ``value`` as the answer of ``model_version`` to ``payload``; a failure only
        skips the store."""
        if self._cache is None:
            return
        key = cache_key(model_version, payload)
        if model_version == self._live_version:
            self._near.put(key, value)
        try:
            await self._cache.call("put", key, value)
        except Exception as exc:
            self._cache.record_error("response cache store", exc)

    def _follow_live_version(self) -> None:
        """Start (or restart) the long poll that keeps ``_live_version`` current."""
        if self._follower is None or self._follower.done():
            self._follower = asyncio.get_running_loop().create_task(self._poll_live_version())

    async def _poll_live_version(self) -> None:
        assert self._handle is not None
        while True:
            call = None
            try:
                call = self._handle.watch_live_version.remote(self._live_version, WATCH_TIMEOUT_S)
                # The margin covers the hop; a call with no live cache replica would wait forever.
                version = await asyncio.wait_for(call, WATCH_TIMEOUT_S + 5.0)
            except BaseException as exc:
                if call is not None:
                    with contextlib.suppress(Exception):  # a failed call re-raises on cancel
                        call.cancel()
                if isinstance(exc, asyncio.CancelledError):
                    raise
                self._set_live_version(None)
                logger.warning("following the live model version failed (%s); retrying", exc)
                await asyncio.sleep(WATCH_RETRY_S)
                continue
            self._set_live_version(version)

    def _set_live_version(self, version: str | None) -> None:
        if version != self._live_version:
            self._near.clear()  # keys name their version; this only frees the memory
            self._live_version = version
