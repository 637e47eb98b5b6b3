"""The response store: an LRU of finished, deterministic completions keyed by model version.

Bounded by entries and bytes, with a TTL. The cluster-wide ``ResponseCache`` deployment holds one,
and each ingress keeps a small near copy in front of it (``clients.response_cache``).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# Rough per-object costs (bytes) so the byte bound tracks memory, not only text length.
_ENTRY_OVERHEAD_BYTES = 256  # key string, OrderedDict slot, response object and its counters
_CHOICE_OVERHEAD_BYTES = 64  # choice object and its finish_reason string
_TOKEN_ID_BYTES = 8  # one int in a list: a pointer to a (usually cached) small int


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
