"""``build_app``: the Ray Serve application graph, configured by one strict ``AppArgs`` model.

serve run serve_config.yaml          # import_path: serve_app.app:build_app
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application
from ray.serve.config import BackpressureConfig

from serve_app.api.auth import AuthConfig
from serve_app.config import AppArgs, IngressSettings, ModelEntry, ModelSource
from serve_app.deployments.batcher import Batcher
from serve_app.deployments.ingress import Ingress
from serve_app.deployments.model_server import LLMModel
from serve_app.deployments.rate_limiter import RateLimiter
from serve_app.deployments.response_cache import ResponseCache
from serve_app.model_catalog import ServedModel

# Deployments stream one message per engine step to each other; Serve's gRPC transport carries
# them with about a third more throughput than Ray actor calls (docs/PERFORMANCE.md, section 3).
# The shipped configs set it as the application's runtime_env; Python callers set it in the
# environment of the Ray cluster.
SERVE_ENV = {"RAY_SERVE_USE_GRPC_BY_DEFAULT": "1"}


def build_app(args: dict[str, Any]) -> Application:
    """The application ``serve run`` / ``serve deploy`` start (``import_path``)."""
    return compose(AppArgs.model_validate(args))


def compose(settings: AppArgs, model_options: dict[str, Any] | None = None) -> Application:
    """Ingress -> Batcher -> LLMModel per model, each with its ResponseCache beside the ingress.

    ``model_options`` are Ray Serve deployment options for every ``LLMModel`` (e.g.
    ``autoscaling_config``), for Python callers; config files use each model's ``deployment``
    or ``deployments:`` instead.
    """
    models = [_bind_model(settings, entry, model_options) for entry in settings.model_entries()]
    rate_limiter = RateLimiter.bind() if _has_limits(settings.auth) else None  # type: ignore[attr-defined]
    ingress_settings = IngressSettings(
        default_max_tokens=settings.default_max_tokens,
        auth=settings.auth,
        max_request_body_bytes=settings.max_request_body_bytes,
        body_read_timeout_s=settings.body_read_timeout_s,
        sse_keep_alive_s=settings.sse_keep_alive_s,
        tracing=settings.tracing,
        circuit_breaker=settings.circuit_breaker,
        coalesce_requests=settings.coalesce_requests,
        tool_call_parser=settings.tool_call_parser,
    )
    return Ingress.bind(models, rate_limiter, ingress_settings)  # type: ignore[attr-defined, no-any-return]


def _bind_model(
    settings: AppArgs, entry: ModelEntry, model_options: dict[str, Any] | None
) -> ServedModel:
    """One model's deployments, each named after the model (``AppArgs.deployment_name``), so
    that adding, removing or changing one model leaves the others' deployments as they are."""
    cache = None
    if settings.cache.enabled:
        # One cache per model: each follows its own model's live version.
        cache = ResponseCache.options(  # type: ignore[attr-defined]
            name=settings.deployment_name("ResponseCache", entry),
            user_config=settings.cache.model_dump(),
        ).bind(settings.cache)
    source = ModelSource(model_path=entry.model_path, model_version=entry.version())
    # The single-model form leaves scaling to ``deployments:`` overrides and model_options.
    options = entry.deployment.serve_options() if settings.models else {}
    options = {**options, **(model_options or {})}
    model = LLMModel.options(  # type: ignore[attr-defined]
        name=settings.deployment_name("LLMModel", entry),
        user_config=source.model_dump(mode="json"),
        **options,
    ).bind(entry.engine, cache, settings.tracing)
    batcher_replicas = (
        {"num_replicas": entry.deployment.batcher_replicas} if settings.models else {}
    )
    batcher = Batcher.options(  # type: ignore[attr-defined]
        name=settings.deployment_name("Batcher", entry),
        user_config=entry.batcher.model_dump(),
        **batcher_queue_bounds(entry, _most_replicas(options)),
        **batcher_replicas,
    ).bind(model, entry.model_path, settings.tracing)
    return ServedModel(entry.name, batcher, model, cache, tuple(entry.aliases), entry.owned_by)


def batcher_queue_bounds(entry: ModelEntry, model_replicas: int) -> dict[str, Any]:
    """The Batcher's Serve queue bounds, sized from what the engines hold (docs/OPERATIONS.md,
    How to size queues).

    Each request holds one Batcher slot for its whole stream, so the slots are what every
    model replica can hold: its running batch plus its waiting queue. As many may wait at the
    ingress for a slot: Serve counts a request as queued until it is routed, so a burst that
    fits the slots must fit this queue too. Past that, requests get 503 with ``Retry-After`` at
    once instead of queueing without bound. A ``deployments:`` entry for the Batcher overrides
    these (set them there when the model replicas come from ``deployments:`` too).
    """
    engine = entry.engine
    capacity = model_replicas * (engine.max_num_seqs + engine.max_waiting_seqs)
    return {
        "max_ongoing_requests": capacity,
        "max_queued_requests": capacity,
        "backpressure_config": BackpressureConfig(retry_after_s=1),
    }


def _most_replicas(model_options: dict[str, Any]) -> int:
    """The most model replicas ``model_options`` (``Deployment.options`` keywords) can run."""
    autoscaling = model_options.get("autoscaling_config")
    if isinstance(autoscaling, dict):
        return int(autoscaling["max_replicas"])
    if autoscaling is not None:  # Serve's AutoscalingConfig
        return int(autoscaling.max_replicas)
    return int(model_options.get("num_replicas", 1))


def _has_limits(auth: AuthConfig) -> bool:
    limits = [auth.default_limits, *auth.limits.values()]
    return any(k.requests_per_minute or k.tokens_per_minute for k in limits)
