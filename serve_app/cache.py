"""The cluster-wide response cache: exact-match replay of finished, deterministic completions.

One Serve deployment with a single replica holds an LRU store bounded by entries and bytes, with a
TTL. The ingress reaches it through ``ResponseCacheClient``, which turns every cache failure into a
miss so that the cache can never fail a request, and which keeps a small near cache of its own so
that a repeated request is answered without any Ray call. Entries are keyed by model version and
the near cache follows the live version by long-polling the cache replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_app.best_effort import BestEffortHandle

logger = logging.getLogger(__name__)

# Rough per-object costs (bytes) so the byte bound tracks memory, not only text length.
_ENTRY_OVERHEAD_BYTES = 256  # key string, OrderedDict slot, response object and its counters
_CHOICE_OVERHEAD_BYTES = 64  # choice object and its finish_reason string
_TOKEN_ID_BYTES = 8  # one int in a list: a pointer to a (usually cached) small int
WATCH_TIMEOUT_S = 30.0  # a long poll for the live version returns at least this often
WATCH_RETRY_S = 1.0
# Each ingress replica's near cache: the hottest answers, kept briefly (the replica's TTL and
# bounds still govern what the cluster keeps).
NEAR_MAX_ENTRIES = 1024
NEAR_MAX_BYTES = 16 * 2**20
NEAR_TTL_S = 60.0


class ResponseCacheConfig(BaseModel):
    """Bounds of the response cache; every field except ``enabled`` is live-tunable."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(
        default=True,
        description="Cache deterministic completions; when false, every lookup is a miss.",
    )
    max_entries: int = Field(default=10_000, ge=1, description="Most completions kept at once.")
    max_bytes: int = Field(
        default=64 * 1024 * 1024,
        ge=1,
        description="Most estimated bytes kept at once; larger single entries are not stored.",
    )
    ttl_s: float = Field(
        default=600.0, gt=0, description="Seconds an entry stays valid after it is stored."
    )


@dataclass(frozen=True)
class CachedChoice:
    """One finished choice of a completion, enough to replay it."""

    text: str
    finish_reason: str
    token_ids: list[int]


@dataclass(frozen=True)
class CachedResponse:
    """A finished completion as the ingress replays it on a cache hit."""

    choices: list[CachedChoice]
    prompt_tokens: int
    completion_tokens: int

    @property
    def size_bytes(self) -> int:
        """Estimated memory: UTF-8 text, 8 bytes per token id and a fixed cost per object."""
        return _ENTRY_OVERHEAD_BYTES + sum(
            _CHOICE_OVERHEAD_BYTES
            + len(choice.text.encode("utf-8"))
            + _TOKEN_ID_BYTES * len(choice.token_ids)
            for choice in self.choices
        )


@dataclass(frozen=True)
class LiveLookup:
    """A lookup's answer, and the live model version it was looked up under (None: no
    version is live yet, or the cache is disabled)."""

    version: str | None
    response: CachedResponse | None


@dataclass(frozen=True)
class CacheStats:
    """Counters and occupancy of a response store."""

    entries: int
    bytes: int
    hits: int
    misses: int
    evictions: int


@dataclass(frozen=True)
class _Entry:
    value: CachedResponse
    size_bytes: int
    expires_at: float


class LRUResponseStore:
    """An LRU map of cache keys to responses, bounded by entries and bytes, with a TTL."""

    def __init__(
        self,
        max_entries: int,
        max_bytes: int,
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self._clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._bytes = 0
        self._hits = 0
        self._misses = 0
        self._evictions = 0

    def get(self, key: str) -> CachedResponse | None:
        """The live response for ``key``, or None; an expired entry is removed and is a miss."""
        entry = self._entries.get(key)
        if entry is not None and entry.expires_at <= self._clock():
            self._remove(key)
            entry = None
        if entry is None:
            self._misses += 1
            return None
        self._entries.move_to_end(key)
        self._hits += 1
        return entry.value

    def put(self, key: str, value: CachedResponse) -> None:
        """Store ``value`` as the most recent entry, evicting the least recent ones to fit."""
        if key in self._entries:
            self._remove(key)
        size = value.size_bytes
        if size > self.max_bytes:
            return
        self._entries[key] = _Entry(value, size, self._clock() + self.ttl_s)
        self._bytes += size
        self._evict_to_bounds()

    def resize(self, max_entries: int, max_bytes: int, ttl_s: float) -> None:
        """Change the bounds, evicting at once to fit; a new TTL applies to entries stored later."""
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self._evict_to_bounds()

    def clear(self) -> None:
        """Drop every entry; the counters keep their values."""
        self._entries.clear()
        self._bytes = 0

    def stats(self) -> CacheStats:
        """Current occupancy and lifetime counters."""
        return CacheStats(
            entries=len(self._entries),
            bytes=self._bytes,
            hits=self._hits,
            misses=self._misses,
            evictions=self._evictions,
        )

    def _evict_to_bounds(self) -> None:
        while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
            _, entry = self._entries.popitem(last=False)
            self._bytes -= entry.size_bytes
            self._evictions += 1

    def _remove(self, key: str) -> None:
        self._bytes -= self._entries.pop(key).size_bytes


def cache_key(model_version: str, payload: dict[str, Any]) -> str:
    """The SHA-256 hex key of a request for ``model_version``.

    ``payload`` must hold the prompt (or chat messages) and every sampling parameter that can change
    the output, as JSON-serializable values normalized by the request model (so ``0`` and ``0.0``
    do not split a key); anything left out would let different requests share one cached answer.
    """
    if "model_version" in payload:
        raise ValueError("payload must not contain 'model_version'; pass it as model_version")
    canonical = json.dumps(
        {"model_version": model_version, **payload},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def is_cacheable(temperature: float, seed: int | None) -> bool:
    """Whether an output is reproducible: greedy decoding, or sampling with a fixed seed."""
    return temperature == 0 or seed is not None


@serve.deployment(
    num_replicas=1,
    ray_actor_options={"num_cpus": 0},
    max_ongoing_requests=1000,
    # Lookups take microseconds; waiting longer would only wait out the ingresses' long polls.
    graceful_shutdown_timeout_s=2.0,
)
class ResponseCache:
    """The single, cluster-wide replica holding the response store."""

    def __init__(self, config: ResponseCacheConfig | dict[str, Any]) -> None:
        self._config = ResponseCacheConfig.model_validate(config)
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
