"""``build_app``: the Ray Serve application graph, configured by one strict ``AppArgs`` model;
``build_model_app``: one model's own application, which a ``model_apps`` ingress reaches.

serve run serve_config.yaml          # import_path: serve_app.app:build_app
serve run configs/multi_model.yaml   # one build_app ingress, one build_model_app per model
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from ray.serve import Application, Deployment
from ray.serve.config import BackpressureConfig
from ray.serve.handle import DeploymentHandle

from serve_app.admission import RETRY_AFTER_S
from serve_app.api.auth import AuthConfig
from serve_app.config import (
    AppArgs,
    IngressSettings,
    ModelAppArgs,
    ModelAppRef,
    ModelEntry,
    ModelServing,
    ModelSource,
    ResponseCacheConfig,
    TracingConfig,
)
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
# Extra Ingress replicas Serve may start while it replaces them (Serve's max_surge_percent).
INGRESS_SURGE_PERCENT = 100


def build_app(args: dict[str, Any]) -> Application:
    """The application ``serve run`` / ``serve deploy`` start (``import_path``)."""
    return compose(AppArgs.model_validate(args))


def build_model_app(args: dict[str, Any]) -> Application:
    """One model's own application (``import_path: serve_app.app:build_model_app``, with
    ``route_prefix: null``), which a ``build_app`` application's ``model_apps`` reaches.

    Its Batcher is the application's ingress; it, the LLMModel and the ResponseCache keep
    their plain names (so ``deployments:`` overrides name them as in the single-model form).
    Its ``args`` hold only what serves this model, so that editing another model's leaves it
    running: Serve redeploys every deployment of an application whose ``args`` change.
    """
    settings = ModelAppArgs.model_validate(args)
    deployments = _bind_deployments(
        settings,
        settings.cache,
        settings.tracing,
        settings.deployment.serve_options(),
        {"num_replicas": settings.deployment.batcher_replicas},
        lambda base: base,
    )
    return deployments.batcher


def compose(settings: AppArgs, model_options: dict[str, Any] | None = None) -> Application:
    """Ingress -> Batcher -> LLMModel per model, each with its ResponseCache beside the ingress.

    ``model_options`` are Ray Serve deployment options for every ``LLMModel`` (e.g.
    ``autoscaling_config``), for Python callers; config files use each model's ``deployment``
    or ``deployments:`` instead. In the ``model_apps`` form the models' deployments are their
    own applications' (``build_model_app``), and this one is the ingress alone.
    """
    if settings.model_apps:
        models = [_reach_model_app(ref) for ref in settings.model_apps]
    else:
        models = [_bind_model(settings, e, model_options) for e in settings.model_entries()]
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
    # A redeploy starts each new Ingress replica before the old one stops taking requests
    # (it then drains what it has in flight): no moment without an ingress. Ingress replicas
    # reserve no CPU, so the extra one costs nothing to place.
    ingress = Ingress.options(max_surge_percent=INGRESS_SURGE_PERCENT)  # type: ignore[attr-defined]
    return ingress.bind(models, rate_limiter, ingress_settings)  # type: ignore[no-any-return]


def _reach_model_app(ref: ModelAppRef) -> ServedModel:
    """Handles to the deployments of the model's own application, by name. A handle finds
    its deployment's replicas when they run, so that application may start after this one
    (the model's requests wait for it) and be redeployed while this one keeps serving."""

    def handle(deployment: object) -> DeploymentHandle:
        return DeploymentHandle(_name(deployment), ref.app_name)

    return ServedModel(
        ref.name,
        handle(Batcher),
        handle(LLMModel),
        handle(ResponseCache),
        tuple(ref.aliases),
        ref.owned_by,
        ref.admission_limit,
        ref.tool_call_parser,
    )


@dataclass(frozen=True)
class _ModelDeployments:
    """One model's bound deployments, and what its Batcher's queue bounds hold."""

    batcher: Application
    model: Application
    cache: Application | None
    capacity: int


def _bind_model(
    settings: AppArgs, entry: ModelEntry, model_options: dict[str, Any] | None
) -> ServedModel:
    """One model's deployments, each named after the model (``AppArgs.deployment_name``), so
    that adding, removing or changing one model leaves the others' deployments as they are."""
    # The single-model form leaves scaling to ``deployments:`` overrides and model_options.
    options = entry.deployment.serve_options() if settings.models else {}
    batcher_options = {"num_replicas": entry.deployment.batcher_replicas} if settings.models else {}
    deployments = _bind_deployments(
        entry,
        settings.cache if settings.cache.enabled else None,
        settings.tracing,
        {**options, **(model_options or {})},
        batcher_options,
        lambda base: settings.deployment_name(base, entry),
    )
    return ServedModel(
        entry.name,
        deployments.batcher,  # type: ignore[arg-type]  # Serve binds a handle in its place
        deployments.model,  # type: ignore[arg-type]
        deployments.cache,  # type: ignore[arg-type]
        tuple(entry.aliases),
        entry.owned_by,
        # By default the ingress admits what the Batcher's bounds hold, counted exactly.
        entry.admission_limit or deployments.capacity,
        entry.tool_call_parser,
    )


def _bind_deployments(
    model: ModelServing,
    cache_config: ResponseCacheConfig | None,
    tracing: TracingConfig,
    model_options: dict[str, Any],
    batcher_options: dict[str, Any],
    name: Callable[[str], str],
) -> _ModelDeployments:
    """``model``'s LLMModel (with ``model_options``), its Batcher and, unless
    ``cache_config`` is None, its ResponseCache, each called ``name(<class name>)``."""
    cache = None
    if cache_config is not None:
        # One cache per model: each follows its own model's live version.
        cache = ResponseCache.options(  # type: ignore[attr-defined]
            name=name(_name(ResponseCache)), user_config=cache_config.model_dump()
        ).bind(cache_config)
    source = ModelSource(model_path=model.model_path, model_version=model.version())
    llm_model = LLMModel.options(  # type: ignore[attr-defined]
        name=name(_name(LLMModel)),
        user_config=source.model_dump(mode="json"),
        **model_options,
    ).bind(model.engine, cache, tracing, model.variants)
    bounds = batcher_queue_bounds(model, _most_replicas(model_options))
    batcher = Batcher.options(  # type: ignore[attr-defined]
        name=name(_name(Batcher)),
        user_config=model.batcher.model_dump(),
        **bounds,
        **batcher_options,
    ).bind(llm_model, model.model_path, tracing)
    capacity = bounds["max_ongoing_requests"] + bounds["max_queued_requests"]
    return _ModelDeployments(batcher, llm_model, cache, capacity)


def _name(deployment: object) -> str:
    """A ``@serve.deployment`` class's name (mypy sees the class, not Serve's Deployment)."""
    return cast(Deployment, deployment).name


def batcher_queue_bounds(entry: ModelServing, model_replicas: int) -> dict[str, Any]:
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
        "backpressure_config": BackpressureConfig(retry_after_s=RETRY_AFTER_S),
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
