"""``build_app``: the Ray Serve application graph, configured by one strict ``AppArgs`` model.

serve run serve_config.yaml          # import_path: serve_app.app:build_app
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from serve_app.api.auth import AuthConfig
from serve_app.config import AppArgs, IngressSettings, ModelSource
from serve_app.deployments.batcher import Batcher
from serve_app.deployments.ingress import Ingress
from serve_app.deployments.model_server import LLMModel
from serve_app.deployments.rate_limiter import RateLimiter
from serve_app.deployments.response_cache import ResponseCache

# Deployments stream one message per engine step to each other; Serve's gRPC transport carries
# them with about a third more throughput than Ray actor calls (docs/PERFORMANCE.md, section 3).
# The shipped configs set it as the application's runtime_env; Python callers set it in the
# environment of the Ray cluster.
SERVE_ENV = {"RAY_SERVE_USE_GRPC_BY_DEFAULT": "1"}


def build_app(args: dict[str, Any]) -> Application:
    """The application ``serve run`` / ``serve deploy`` start (``import_path``)."""
    return compose(AppArgs.model_validate(args))


def compose(settings: AppArgs, model_options: dict[str, Any] | None = None) -> Application:
    """Ingress -> Batcher -> LLMModel, with the ResponseCache beside the ingress.

    ``model_options`` are Ray Serve deployment options for ``LLMModel`` (e.g.
    ``autoscaling_config``), for Python callers; config files use ``deployments:`` instead.
    """
    cache = None
    if settings.cache.enabled:
        cache = ResponseCache.options(  # type: ignore[attr-defined]
            user_config=settings.cache.model_dump()
        ).bind(settings.cache)
    source = ModelSource(model_path=settings.model_path, model_version=settings.version())
    model = LLMModel.options(  # type: ignore[attr-defined]
        user_config=source.model_dump(mode="json"), **(model_options or {})
    ).bind(settings.engine, cache, settings.tracing)
    batcher = Batcher.options(  # type: ignore[attr-defined]
        user_config=settings.batcher.model_dump()
    ).bind(model, settings.model_path, settings.tracing)
    rate_limiter = RateLimiter.bind() if _has_limits(settings.auth) else None  # type: ignore[attr-defined]
    ingress_settings = IngressSettings(
        model_name=settings.model_name,
        default_max_tokens=settings.default_max_tokens,
        auth=settings.auth,
        max_request_body_bytes=settings.max_request_body_bytes,
        sse_keep_alive_s=settings.sse_keep_alive_s,
        tracing=settings.tracing,
    )
    return Ingress.bind(batcher, model, cache, rate_limiter, ingress_settings)  # type: ignore[attr-defined, no-any-return]


def _has_limits(auth: AuthConfig) -> bool:
    limits = [auth.default_limits, *auth.limits.values()]
    return any(k.requests_per_minute or k.tokens_per_minute for k in limits)
