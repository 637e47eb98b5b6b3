"""Every configuration of the application: strict pydantic models, unknown keys are errors.

``AppArgs`` is the ``args:`` of ``serve_config.yaml``; the others are the parts it hands to each
deployment (the live-tunable ones travel as the deployments' ``user_config``).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from serve_app import DEMO_MODEL_DIR
from serve_app.api.auth import AuthConfig
from serve_app.api.tool_calls import TOOL_CALL_PARSERS
from serve_app.engine import EngineOptions

# How often a stopping replica looks whether its requests have drained. Serve's default, 2 s, is
# paid once per tier of the deployment graph even when idle: 8 of `serve run`'s 13 s to exit.
DRAIN_POLL_S = 0.1
# How long the ingress lets requests in flight finish when it stops (SIGINT, redeploy, scale
# down) before Serve ends it; set it per deployment with `graceful_shutdown_timeout_s`.
INGRESS_GRACE_S = 30.0


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


class CircuitBreakerConfig(BaseModel):
    """When the ingress stops calling a failing model path (docs/OPERATIONS.md, Circuit
    breaker and coalescing)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(default=True, description="Break the circuit on repeated failures.")
    failure_threshold: int = Field(
        default=5,
        ge=1,
        description="Failures of the model path (server errors, no replica in time) within "
        "the window that open the breaker; client errors, overload 503s and disconnects "
        "never count.",
    )
    failure_ratio: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="Least share of the window's calls that failed for it to open, so that "
        "a few failures among many successes do not.",
    )
    window_s: float = Field(
        default=10.0, gt=0, description="Seconds of outcomes the threshold is counted over."
    )
    cooldown_s: float = Field(
        default=5.0,
        gt=0,
        description="Seconds the breaker stays open (every call answered 503 circuit_open "
        "at once) before it lets probes through.",
    )
    half_open_probes: int = Field(
        default=2,
        ge=1,
        description="Calls let through after the cool-down; the breaker closes once this "
        "many answered, and re-opens at the first that fails.",
    )


class ModelSource(BaseModel):
    """The ``user_config`` of ``LLMModel``: the model a replica serves."""

    model_config = ConfigDict(extra="forbid")

    model_path: Path = Field(description="Directory of the exported model.")
    model_version: str = Field(min_length=1, description="Version reported and cached under.")


class AutoscalingOptions(BaseModel):
    """Serve autoscaling of one model's replicas (Serve's ``autoscaling_config``)."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(default=1, ge=0, description="Fewest replicas kept running.")
    max_replicas: int = Field(default=1, ge=1, description="Most replicas started.")
    target_ongoing_requests: float = Field(
        default=32.0,
        gt=0,
        description="Micro-batch streams per replica Serve aims for; more starts a replica.",
    )
    upscale_delay_s: float = Field(
        default=30.0, ge=0, description="How long load must stay high before scaling up."
    )
    downscale_delay_s: float = Field(
        default=600.0, ge=0, description="How long load must stay low before scaling down."
    )

    @model_validator(mode="after")
    def _ordered(self) -> AutoscalingOptions:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        return self


class ReplicaResources(BaseModel):
    """What Ray reserves for each replica of one model (Serve's ``ray_actor_options``)."""

    model_config = ConfigDict(extra="forbid")

    num_cpus: float = Field(default=1.0, ge=0, description="CPUs reserved per replica.")
    num_gpus: float = Field(
        default=0.0, ge=0, description="GPUs per replica; a fraction shares one GPU."
    )
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources per replica, e.g. a node label."
    )


class ModelDeploymentOptions(BaseModel):
    """How one model's model-server deployment scales and what each replica reserves."""

    model_config = ConfigDict(extra="forbid")

    num_replicas: int = Field(
        default=1, ge=1, description="Fixed replica count; ignored when autoscaling is set."
    )
    autoscaling: AutoscalingOptions | None = Field(
        default=None, description="Scale between min and max replicas on load instead."
    )
    ray_actor_options: ReplicaResources | None = Field(
        default=None,
        description="Per-replica resources; unset keeps the deployment's default (1 CPU) "
        "and any ``deployments:`` override of the serve config.",
    )
    batcher_replicas: int = Field(
        default=1,
        ge=1,
        description="Replicas of its Batcher. Two or more keep it answering while a redeploy "
        "replaces them, as Serve replaces at most a fifth of a deployment's replicas at once.",
    )

    def serve_options(self) -> dict[str, Any]:
        """These options as keyword arguments of ``Deployment.options``."""
        options: dict[str, Any] = (
            {"autoscaling_config": self.autoscaling.model_dump()}
            if self.autoscaling
            else {"num_replicas": self.num_replicas}
        )
        if self.ray_actor_options is not None:
            options["ray_actor_options"] = self.ray_actor_options.model_dump()
        return options


MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
# A request names a variant of a model as "<model>:<variant>", the variant being a folder name.
VARIANT_SEPARATOR = ":"


def split_variant(name: str) -> tuple[str, str] | None:
    """``(model, variant)`` when ``name`` has the form ``<model>:<variant>`` with a variant
    that may name a folder (MODEL_NAME_PATTERN: no separators, no '..'); else None."""
    model, separator, variant = name.rpartition(VARIANT_SEPARATOR)
    if not separator or not model or re.fullmatch(MODEL_NAME_PATTERN, variant) is None:
        return None
    return model, variant


class VariantsConfig(BaseModel):
    """Variants of one model (e.g. per-customer fine-tunes), each a model folder in
    ``directory``, loaded on demand by the replicas Serve routes their requests to."""

    model_config = ConfigDict(extra="forbid")

    directory: Path = Field(
        description="Folder of variant model folders; a request names one as "
        "'<model>:<folder name>'. A folder added while serving is served without a redeploy. "
        "Each shares its model's tokenizer and chat template."
    )
    max_loaded_per_replica: int = Field(
        default=3,
        ge=1,
        description="Variants one replica holds at once (Serve's max_num_models_per_replica); "
        "loading one more unloads the least recently used, once its streams have ended.",
    )


def _known_parser(name: str) -> str:
    if name not in TOOL_CALL_PARSERS:
        raise ValueError(f"unknown tool call parser; known: {sorted(TOOL_CALL_PARSERS)}")
    return name


ToolCallParserName = Annotated[str, AfterValidator(_known_parser)]


class ModelRoute(BaseModel):
    """What the ingress knows of one model: the names it answers to and how it is admitted."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        pattern=MODEL_NAME_PATTERN,
        description="Name clients pass as 'model'; in 'models:' also names its deployments "
        "(LLMModel-<name>, Batcher-<name>).",
    )
    aliases: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=list, description="Other names clients may pass as 'model' for it."
    )
    owned_by: str = Field(default="serve_app", description="The owned_by of /v1/models.")
    tool_call_parser: ToolCallParserName | None = Field(
        default=None,
        description="How this model writes tool calls of its own (tool_choice auto); unset: "
        "the application's tool_call_parser.",
    )
    admission_limit: int | None = Field(
        default=None,
        ge=1,
        description="Generation streams of this model one ingress replica lets in at once; "
        "past it, 503 + Retry-After at once, counted exactly (docs/OPERATIONS.md, How to size "
        "queues). Unset in 'models:': what the Batcher's queue bounds hold, 2 x model replicas "
        "x (max_num_seqs + max_waiting_seqs), with the replicas these args give; set it when "
        "the model's replicas or the ingress's come from Serve's deployments: overrides. Unset "
        "in 'model_apps:' (whose engines the ingress does not know): no bound at the ingress, "
        "only the Batcher's queue bounds.",
    )

    def names(self) -> list[str]:
        """Every name it answers to: its own, then its aliases."""
        return [self.name, *self.aliases]


class ModelServing(BaseModel):
    """What one model's deployments serve: its files, engine, batching and scaling."""

    model_config = ConfigDict(extra="forbid")

    model_path: Path = Field(
        default=DEMO_MODEL_DIR, description="Directory of the exported model and its tokenizer."
    )
    model_version: str | None = Field(
        default=None,
        description="Version reported by /v1/model_info and part of every cache key; "
        "derived from the model files when unset.",
    )
    engine: EngineOptions = Field(
        default_factory=EngineOptions, description="Engine batching and onnxruntime settings."
    )
    batcher: BatcherConfig = Field(
        default_factory=BatcherConfig, description="Micro-batching of this model (live-tunable)."
    )
    deployment: ModelDeploymentOptions = Field(
        default_factory=ModelDeploymentOptions,
        description="Replicas, autoscaling and resources of its model-server deployment.",
    )
    variants: VariantsConfig | None = Field(
        default=None,
        description="Variants of this model served by its replicas, multiplexed "
        "(docs/OPERATIONS.md, Variants).",
    )

    def version(self) -> str:
        """The configured version, or a digest of the model's config and weights' size."""
        return self.model_version or model_digest(self.model_path)


class ModelEntry(ModelServing, ModelRoute):
    """One model of the application (``models:``): its names and what serves it."""


class ModelAppRef(ModelRoute):
    """One model served by an application of its own (``model_apps:``), as the ingress
    reaches it: that application's Batcher, LLMModel and ResponseCache, by name."""

    app_name: str = Field(
        min_length=1,
        description="The Serve application running the model (import_path "
        "serve_app.app:build_model_app).",
    )


class ModelAppArgs(ModelServing):
    """The ``args:`` of one model's own application (``serve_app.app:build_model_app``): only
    what its deployments serve, so that a change of another model's never touches it."""

    cache: ResponseCacheConfig = Field(
        default_factory=ResponseCacheConfig,
        description="Its response cache's bounds; the cache deployment runs even when "
        "disabled (every lookup a miss), so that the ingress need not know.",
    )
    tracing: TracingConfig = Field(
        default_factory=TracingConfig, description="OpenTelemetry spans of its deployments."
    )


def model_digest(model_path: Path) -> str:
    """A version for a model folder: a digest of its config and its weights' sizes."""
    digest = hashlib.sha256((model_path / "config.json").read_bytes())
    for weights in sorted(model_path.glob("*.onnx*")):
        digest.update(f"{weights.name}:{weights.stat().st_size}".encode())
    return digest.hexdigest()[:12]


@dataclass(frozen=True)
class IngressSettings:
    """What the ingress needs to know about its callers."""

    default_max_tokens: int
    auth: AuthConfig
    max_request_body_bytes: int = 4 * 1024 * 1024  # larger bodies: 413 (AppArgs documents both)
    body_read_timeout_s: float = 30.0  # a body still arriving after this: 408
    sse_keep_alive_s: float = 15.0  # keep-alive comment interval before a stream's first event
    tracing: TracingConfig = field(default_factory=TracingConfig)
    circuit_breaker: CircuitBreakerConfig = field(default_factory=CircuitBreakerConfig)
    coalesce_requests: bool = True  # identical deterministic requests share one generation
    tool_call_parser: str = "hermes"  # how tool_choice "auto" answers' calls are read


class AppArgs(BaseModel):
    """The ``args:`` of ``serve_config.yaml``. Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")

    models: list[ModelEntry] = Field(
        default_factory=list,
        description="Every model served, routed by the request's 'model'; the first is the "
        "native API's default. Unset (and no model_apps): the one model the fields below "
        "describe (model_name, model_path, model_version, engine, batcher), whose deployments "
        "keep the plain names LLMModel and Batcher.",
    )
    model_apps: list[ModelAppRef] = Field(
        default_factory=list,
        description="Instead of 'models': every model served, each by an application of its "
        "own (import_path serve_app.app:build_model_app), which this one's ingress reaches by "
        "name; the first is the native API's default. A config change of one model then "
        "restarts only that model's application (docs/OPERATIONS.md, Many models).",
    )
    model_name: str = Field(
        default="demo",
        pattern=MODEL_NAME_PATTERN,
        description="Single-model form: name clients pass as 'model'.",
    )
    model_path: Path = Field(
        default=DEMO_MODEL_DIR,
        description="Single-model form: directory of the exported model and its tokenizer.",
    )
    model_version: str | None = Field(
        default=None,
        description="Single-model form: version reported by /v1/model_info and part of every "
        "cache key; derived from the model files when unset.",
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
    variants: VariantsConfig | None = Field(
        default=None,
        description="Single-model form: variants of the model served by its replicas, "
        "multiplexed (docs/OPERATIONS.md, Variants).",
    )
    admission_limit: int | None = Field(
        default=None,
        ge=1,
        description="Generation streams of the model one ingress replica lets in at once; "
        "past it, 503 + Retry-After at once, counted exactly (docs/OPERATIONS.md, How to size "
        "queues). Unset: what the Batcher's queue bounds hold, 2 x model replicas x "
        "(max_num_seqs + max_waiting_seqs), with the replicas these args give; set it when "
        "the model's replicas or the ingress's come from Serve's deployments: overrides.",
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
    body_read_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="Longest time a request's body may take to arrive, from the request's "
        "start; a slower one (a client trickling bytes) is answered 408, so that no client "
        "can hold an ingress request open by sending slowly.",
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
    circuit_breaker: CircuitBreakerConfig = Field(
        default_factory=CircuitBreakerConfig,
        description="Shedding with 503 while the model path keeps failing.",
    )
    coalesce_requests: bool = Field(
        default=True,
        description="Identical deterministic requests (those the response cache keeps) that "
        "arrive while the first is still generating wait for its answer, streamed ones "
        "included, instead of generating it again. Per ingress replica.",
    )
    tool_call_parser: ToolCallParserName = Field(
        default="hermes",
        description="How the served models write tool calls of their own (tool_choice auto), "
        f"read into tool_calls: one of {sorted(TOOL_CALL_PARSERS)} (hermes: Hermes', Qwen2.5's "
        "and Qwen3's <tool_call>{...}</tool_call>). A model entry may name its own.",
    )

    @model_validator(mode="after")
    def _one_form(self) -> AppArgs:
        if self.models and self.model_apps:
            raise ValueError("set either 'models' or 'model_apps', not both")
        if self.models or self.model_apps:
            form = "models" if self.models else "model_apps"
            # A model application has its own cache, set in its own args.
            beside = _SINGLE_MODEL_FIELDS | ({"cache"} if self.model_apps else set())
            single = sorted(beside & self.model_fields_set)
            if single:
                raise ValueError(
                    f"{', '.join(single)}: set these per entry of '{form}', not beside it"
                )
        names = [name for route in self.model_routes() for name in route.names()]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"model names and aliases must be unique: {', '.join(repeated)}")
        apps = [ref.app_name for ref in self.model_apps]
        repeated = sorted({app for app in apps if apps.count(app) > 1})
        if repeated:
            raise ValueError(f"each model needs its own application: {', '.join(repeated)}")
        return self

    def model_routes(self) -> list[ModelRoute]:
        """Every served model as the ingress routes to it, the native API's default first."""
        return list(self.model_apps) or list(self.model_entries())

    def model_entries(self) -> list[ModelEntry]:
        """The models this application's own deployments serve (none in the ``model_apps``
        form), the native API's default first."""
        if self.models or self.model_apps:
            return self.models
        return [
            ModelEntry(
                name=self.model_name,
                model_path=self.model_path,
                model_version=self.model_version,
                engine=self.engine,
                batcher=self.batcher,
                variants=self.variants,
                admission_limit=self.admission_limit,
            )
        ]

    def deployment_name(self, base: str, entry: ModelEntry) -> str:
        """The name of ``entry``'s deployment of class ``base``: the plain class name in the
        single-model form (so its ``deployments:`` overrides keep applying), else suffixed
        with the model's name, so that each model's deployments are its own."""
        return f"{base}-{entry.name}" if self.models else base


_SINGLE_MODEL_FIELDS = {"model_name", "model_path", "model_version", "engine", "batcher",
                        "variants", "admission_limit"}  # fmt: skip
