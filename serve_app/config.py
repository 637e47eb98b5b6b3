"""Every configuration of the application: strict pydantic models, unknown keys are errors.

``AppArgs`` is the ``args:`` of ``serve_config.yaml``; the others are the parts it hands to each
deployment (the live-tunable ones travel as the deployments' ``user_config``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from serve_app import DEMO_MODEL_DIR
from serve_app.api.auth import AuthConfig
from serve_app.engine import EngineOptions


class BatcherConfig(BaseModel):
    """Live-tunable micro-batching (``user_config`` of the Batcher deployment)."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(default=32, ge=1, description="Most requests in one micro-batch.")
    model_wait_s: float = Field(
        default=10.0,
        gt=0,
        description="Longest wait for a model replica to take a micro-batch; past it its "
        "requests get 503 with Retry-After at once (no replica is alive, e.g. its node is "
        "gone, or every one is full) instead of waiting for one without bound.",
    )
    batch_wait_timeout_s: float = Field(
        default=0.005, ge=0, description="Longest wait for a micro-batch to fill."
    )
    stream_interval_per_request_s: float = Field(
        default=0.002,
        ge=0,
        description="Least time between two chunks of a stream, per stream this replica is "
        "serving: with 32 streams, each sends at most every 64 ms, what accumulated since. "
        "Bounds the messages per second the hops to the client carry; first tokens and "
        "endings are never held back.",
    )
    max_stream_interval_s: float = Field(
        default=0.1, ge=0, description="Upper bound of that interval, however many streams."
    )

    def stream_interval_s(self, active_streams: int) -> float:
        """How long a stream holds tokens back when ``active_streams`` are being served."""
        return min(self.max_stream_interval_s, self.stream_interval_per_request_s * active_streams)


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


class TracingConfig(BaseModel):
    """Where spans go; tracing is off (a no-op tracer) when no endpoint is known."""

    model_config = ConfigDict(extra="forbid")

    otlp_endpoint: str | None = Field(
        default=None,
        description="OTLP/HTTP traces URL, e.g. http://otel-collector:4318/v1/traces. When "
        "unset, OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT in the "
        "replicas' environment turn tracing on; with neither, tracing is off.",
    )
    service_name: str = Field(
        default="serve_app", min_length=1, description="The spans' service.name."
    )
    sample_ratio: float = Field(
        default=1.0,
        ge=0,
        le=1,
        description="Fraction of new traces recorded; a client's traceparent decides for its "
        "own requests.",
    )
    export_delay_s: float = Field(
        default=5.0, gt=0, description="Longest time a finished span waits to be exported."
    )


class ModelSource(BaseModel):
    """The ``user_config`` of ``LLMModel``: the model a replica serves."""

    model_config = ConfigDict(extra="forbid")

    model_path: Path = Field(description="Directory of the exported model.")
    model_version: str = Field(min_length=1, description="Version reported and cached under.")


@dataclass(frozen=True)
class IngressSettings:
    """What the ingress needs to know about the served model and its callers."""

    model_name: str
    default_max_tokens: int
    auth: AuthConfig
    max_request_body_bytes: int = 4 * 1024 * 1024  # larger bodies: 413 (AppArgs documents both)
    sse_keep_alive_s: float = 15.0  # keep-alive comment interval before a stream's first event
    tracing: TracingConfig = field(default_factory=TracingConfig)


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
    max_request_body_bytes: int = Field(
        default=4 * 1024 * 1024,
        ge=1024,
        description="Largest request body the ingress reads; a larger one is answered 413 "
        "before anything is forwarded.",
    )
    sse_keep_alive_s: float = Field(
        default=15.0,
        gt=0,
        description="Until a stream's first event (its request waiting in the queue or "
        "prefilling), a ': keep-alive' comment every this many seconds, so that proxies and "
        "clients keep the connection open.",
    )
    tracing: TracingConfig = Field(
        default_factory=TracingConfig,
        description="OpenTelemetry spans over OTLP/HTTP (docs/OPERATIONS.md, Tracing).",
    )

    def version(self) -> str:
        """The configured version, or a digest of the model's config and weights' size."""
        if self.model_version:
            return self.model_version
        digest = hashlib.sha256((self.model_path / "config.json").read_bytes())
        for weights in sorted(self.model_path.glob("*.onnx*")):
            digest.update(f"{weights.name}:{weights.stat().st_size}".encode())
        return digest.hexdigest()[:12]
