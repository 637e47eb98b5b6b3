"""Service metrics, recorded through Ray's metrics pipeline (``ray.serve.metrics``).

Every replica records its own series; Ray's per-node metrics agent exports them (prefixed
``ray_``, counters suffixed ``_total``) for Prometheus to scrape, and ``GET /metrics`` on the
ingress relays the ``serve_app`` series of its node. Names follow vLLM's conventions; each is
documented in ``docs/METRICS.md``.
"""

from __future__ import annotations

import functools
import logging
import urllib.request

import ray
from ray.serve import metrics

from serve_app.circuit_breaker import CircuitState
from serve_app.engine import StepStats

logger = logging.getLogger("ray.serve")

PREFIX = "serve_app"
EXPORTED_PREFIX = f"ray_{PREFIX}_"
LATENCY_BUCKETS_S = [0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3,
                     0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0]  # fmt: skip
MODEL_TAG = ("model",)  # the served model's name, on every request series
BATCH_BUCKETS = [1.0, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256]


class RequestMetrics:
    """Per-request series of one served model, recorded by the ingress; every series carries
    that model's name as its ``model`` label."""

    def __init__(self, model: str) -> None:
        self.time_to_first_token = metrics.Histogram(
            f"{PREFIX}_time_to_first_token_seconds",
            "Seconds from a request's arrival to its first generated token.",
            boundaries=LATENCY_BUCKETS_S,
            tag_keys=MODEL_TAG,
        )
        self.inter_token_latency = metrics.Histogram(
            f"{PREFIX}_inter_token_latency_seconds",
            "Seconds between consecutive output tokens of a request.",
            boundaries=LATENCY_BUCKETS_S,
            tag_keys=MODEL_TAG,
        )
        self.e2e_latency = metrics.Histogram(
            f"{PREFIX}_e2e_request_latency_seconds",
            "Seconds from a request's arrival to its last token.",
            boundaries=LATENCY_BUCKETS_S,
            tag_keys=MODEL_TAG,
        )
        self.prompt_tokens = metrics.Counter(
            f"{PREFIX}_prompt_tokens", "Prompt tokens of finished requests.", tag_keys=MODEL_TAG
        )
        self.generation_tokens = metrics.Counter(
            f"{PREFIX}_generation_tokens",
            "Tokens generated and returned to clients.",
            tag_keys=MODEL_TAG,
        )
        self.requests = metrics.Counter(
            f"{PREFIX}_requests",
            "Finished requests by finish reason (stop, length).",
            tag_keys=("finish_reason", "model"),  # type: ignore[arg-type]  # Ray types 1 key
        )
        self.cache_hits = metrics.Counter(
            f"{PREFIX}_response_cache_hits",
            "Requests answered from the response cache.",
            tag_keys=MODEL_TAG,
        )
        self.cache_misses = metrics.Counter(
            f"{PREFIX}_response_cache_misses",
            "Cacheable requests the response cache lacked.",
            tag_keys=MODEL_TAG,
        )
        self.coalesced_requests = metrics.Counter(
            f"{PREFIX}_coalesced_requests",
            "Requests that followed an identical one already generating instead of generating.",
            tag_keys=MODEL_TAG,
        )
        self.circuit_state = metrics.Gauge(
            f"{PREFIX}_circuit_state",
            "The model path's circuit breaker: 0 closed, 1 open, 2 half-open.",
            tag_keys=MODEL_TAG,
        )
        self.circuit_opens = metrics.Counter(
            f"{PREFIX}_circuit_opens",
            "Times the circuit breaker opened (from closed or half-open).",
            tag_keys=MODEL_TAG,
        )
        for series in (self.time_to_first_token, self.inter_token_latency, self.e2e_latency,
                       self.prompt_tokens, self.generation_tokens, self.requests,
                       self.cache_hits, self.cache_misses, self.coalesced_requests,
                       self.circuit_state, self.circuit_opens):  # fmt: skip
            series.set_default_tags({"model": model})
        self.circuit_state.set(CircuitState.CLOSED)

    def circuit_changed(self, state: CircuitState) -> None:
        """Record a transition of the circuit breaker."""
        self.circuit_state.set(state)
        if state is CircuitState.OPEN:
            self.circuit_opens.inc()


@functools.cache
def request_metrics(model: str) -> RequestMetrics:
    """This process's request series of ``model`` (created once, inside a Serve replica)."""
    return RequestMetrics(model)


@functools.cache
def request_errors() -> metrics.Counter:
    """Failed requests by error type; not by model, as many fail before one is known."""
    return metrics.Counter(
        f"{PREFIX}_request_errors",
        "Failed requests by error type (the OpenAI error type).",
        tag_keys=("error_type",),
    )


class EngineMetrics:
    """Per-step series, recorded by each model replica after every engine step."""

    def __init__(self) -> None:
        self.running = metrics.Gauge(
            f"{PREFIX}_num_requests_running", "Sequences in the engine's running batch."
        )
        self.waiting = metrics.Gauge(
            f"{PREFIX}_num_requests_waiting", "Sequences waiting for admission to the batch."
        )
        self.kv_cache_usage = metrics.Gauge(
            f"{PREFIX}_kv_cache_usage_ratio", "Fraction of the KV-cache token budget in use."
        )
        self.queue_time = metrics.Histogram(
            f"{PREFIX}_request_queue_time_seconds",
            "Seconds a sequence waited before joining the running batch.",
            boundaries=LATENCY_BUCKETS_S,
        )
        self.batch_size = metrics.Histogram(
            f"{PREFIX}_batch_size",
            "Sequences decoded together in one engine step.",
            boundaries=BATCH_BUCKETS,
        )
        # vLLM's names: prompt tokens looked up in the prefix cache, and of those, reused.
        self.prefix_cache_queries = metrics.Counter(
            f"{PREFIX}_prefix_cache_queries",
            "Prompt tokens of admitted sequences looked up in the prefix cache.",
        )
        self.prefix_cache_hits = metrics.Counter(
            f"{PREFIX}_prefix_cache_hits",
            "Prompt tokens whose KV was reused from the prefix cache.",
        )
        self._last_occupancy: tuple[int, int, float] | None = None

    def record(self, stats: StepStats) -> None:
        """Record one step (called on the engine thread)."""
        occupancy = (stats.num_running, stats.num_waiting, stats.kv_cache_usage)
        if occupancy != self._last_occupancy:  # gauges only need changes; steps are hot
            self._last_occupancy = occupancy
            self.running.set(stats.num_running)
            self.waiting.set(stats.num_waiting)
            self.kv_cache_usage.set(stats.kv_cache_usage)
        if stats.decoded:
            self.batch_size.observe(stats.decoded)
        for seconds in stats.queue_times_s:
            self.queue_time.observe(seconds)
        if stats.prefix_cache_queries:
            self.prefix_cache_queries.inc(stats.prefix_cache_queries)
        if stats.prefix_cache_hits:
            self.prefix_cache_hits.inc(stats.prefix_cache_hits)


def node_metrics_text(timeout_s: float = 2.0) -> str:
    """The ``serve_app`` series this node's Ray metrics agent exports, in Prometheus text."""
    node_id = ray.get_runtime_context().get_node_id()
    node = next(n for n in ray.nodes() if n["NodeID"] == node_id)
    url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        text: str = response.read().decode()
    return "".join(line + "\n" for line in text.splitlines() if _is_ours(line))


def _is_ours(line: str) -> bool:
    if line.startswith("#"):
        return f" {EXPORTED_PREFIX}" in line
    return line.startswith(EXPORTED_PREFIX)
