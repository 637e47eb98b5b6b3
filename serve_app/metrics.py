"""Prometheus series of the ingress, in the names vLLM users know."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, generate_latest

from serve_app.cache import ResponseCacheClient
from serve_app.completions import ChoiceDelta, Generation

PREFIX = "serve_app"


class IngressMetrics:
    """Counters of one ingress replica, rendered by ``GET /metrics``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.generation_tokens = Counter(
            f"{PREFIX}_generation_tokens", "Tokens returned to clients.", registry=self.registry
        )
        self.prompt_tokens = Counter(
            f"{PREFIX}_prompt_tokens", "Prompt tokens of finished requests.", registry=self.registry
        )
        self.cache_lookups = Counter(
            f"{PREFIX}_response_cache_lookups",
            "Response-cache lookups by result (hit, miss, error).",
            ["result"],
            registry=self.registry,
        )
        self._cache_seen = {"hit": 0, "miss": 0, "error": 0}

    def count_tokens(self, delta: ChoiceDelta) -> None:
        """Count a streamed delta's tokens (and its prompt, once, on its final chunk)."""
        self.generation_tokens.inc(len(delta.chunk.token_ids))
        if delta.chunk.finish_reason is not None:
            self.prompt_tokens.inc(delta.chunk.prompt_tokens)

    def count_generation(self, generation: Generation) -> None:
        """Count a finished, non-streamed request."""
        self.generation_tokens.inc(generation.completion_tokens)
        self.prompt_tokens.inc(generation.prompt_tokens)

    def observe_cache(self, cache: ResponseCacheClient) -> None:
        """Bring the cache client's counts into the registry."""
        for result, total in (("hit", cache.hits), ("miss", cache.misses), ("error", cache.errors)):
            self.cache_lookups.labels(result).inc(total - self._cache_seen[result])
            self._cache_seen[result] = total

    def render(self) -> bytes:
        """Prometheus text exposition."""
        return generate_latest(self.registry)
