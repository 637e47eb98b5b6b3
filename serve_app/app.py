"""``build_app``: the Ray Serve application graph, configured by one strict ``AppArgs`` model.

serve run serve_config.yaml          # import_path: serve_app.app:build_app
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from ray.serve import Application

from serve_app import DEMO_MODEL_DIR
from serve_app.auth import AuthConfig
from serve_app.batcher import Batcher, BatcherConfig
from serve_app.cache import ResponseCache, ResponseCacheConfig
from serve_app.engine import EngineOptions
from serve_app.ingress import Ingress, IngressSettings
from serve_app.model import LLMModel, ModelSource
from serve_app.rate_limit import RateLimiter

# Deployments stream one message per engine step to each other; Serve's gRPC transport carries
# them with about a third more throughput than Ray actor calls (docs/PERFORMANCE.md, section 3).
# The shipped configs set it as the application's runtime_env; Python callers set it in the
# environment of the Ray cluster.
SERVE_ENV = {"RAY_SERVE_USE_GRPC_BY_DEFAULT": "1"}


class AppArgs(BaseModel):
    """The ``args:`` of ``serve_config.yaml``. Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")

    model_name: str = Field(default="demo", description="Name clients pass as 'model'.")
    model_path: Path = Field(
        default=DEMO_MODEL_DIR, description="Directory of the exported model and its tokenizer."
    )
    model_version: str | None = Field(
        default=None,
        description="Version reported by /v1/model_info and part of every cache key; "
        "derived from the model files when unset.",
    )
    default_max_tokens: int = Field(
        default=256, ge=1, description="Chat max tokens when the request gives none."
    )
    engine: EngineOptions = Field(
        default_factory=EngineOptions, description="Engine batching and onnxruntime settings."
    )
    batcher: BatcherConfig = Field(
        default_factory=BatcherConfig, description="Micro-batching (live-tunable)."
    )
    cache: ResponseCacheConfig = Field(
        default_factory=ResponseCacheConfig, description="Response cache bounds."
    )
    auth: AuthConfig = Field(
        default_factory=AuthConfig, description="API keys and per-key rate limits."
    )

    def version(self) -> str:
        """The configured version, or a digest of the model's config and weights' size."""
        if self.model_version:
            return self.model_version
        digest = hashlib.sha256((self.model_path / "config.json").read_bytes())
        for weights in sorted(self.model_path.glob("*.onnx*")):
            digest.update(f"{weights.name}:{weights.stat().st_size}".encode())
        return digest.hexdigest()[:12]


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
    ).bind(settings.engine.model_dump(mode="json"), cache)
    batcher = Batcher.options(  # type: ignore[attr-defined]
        user_config=settings.batcher.model_dump()
    ).bind(model, str(settings.model_path))
    rate_limiter = RateLimiter.bind() if _has_limits(settings.auth) else None  # type: ignore[attr-defined]
    ingress_settings = IngressSettings(
        model_name=settings.model_name,
        default_max_tokens=settings.default_max_tokens,
        auth=settings.auth,
    )
    return Ingress.bind(batcher, model, cache, rate_limiter, ingress_settings)  # type: ignore[attr-defined, no-any-return]


def _has_limits(auth: AuthConfig) -> bool:
    limits = [auth.default_limits, *auth.limits.values()]
    return any(k.requests_per_minute or k.tokens_per_minute for k in limits)
