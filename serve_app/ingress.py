"""The ``Ingress`` deployment: the HTTP/SSE surface and the typed methods for handle callers.

Routes are thin adapters: authenticate, admit (rate limits), call ``CompletionService``,
render. Errors of every kind go through ``errors.to_api_error``. (No ``from __future__ import
annotations`` here: FastAPI reads the route signatures at runtime.)
"""

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from ray import serve
from ray.serve import context as serve_context
from ray.serve.handle import DeploymentHandle

from serve_app import sse
from serve_app.auth import ApiKeyRegistry, AuthConfig, warn_if_open
from serve_app.cache import ResponseCacheClient
from serve_app.completions import (
    Accumulator,
    CompletionService,
    Generation,
    chat_chunks,
    chat_response,
    completion_chunks,
    completion_response,
    infer_chunks,
)
from serve_app.errors import ApiError, to_api_error
from serve_app.generation import ModelDescription
from serve_app.metrics import node_metrics_text, request_metrics
from serve_app.protocol import (
    BatchInferRequest,
    BatchInferResponse,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    InferRequest,
    InferResponse,
    ModelCard,
    ModelInfo,
    ModelList,
    new_id,
)
from serve_app.rate_limit import RateLimitClient

logger = logging.getLogger("ray.serve")

CACHE_HEADER = "X-Cache"
HEALTH_TIMEOUT_S = 2.0
OPEN_PATHS = ("/health",)  # answered without an API key, for load balancers and probes

OpenAIRequest = CompletionRequest | ChatCompletionRequest


def _request_id() -> str:
    """Serve's id of the current request: the client's ``X-Request-Id`` if it sent one.

    The proxy echoes it in the response header and Serve's logs carry it, so error bodies
    name the same id. Serve has no public accessor for it yet.
    """
    return str(serve_context._get_serve_request_context().request_id or uuid.uuid4().hex)


async def _authenticate(request: Request) -> None:
    """With API keys configured, every route but ``/health`` needs ``Bearer <key>``."""
    registry: ApiKeyRegistry | None = getattr(request.app.state, "api_keys", None)
    if registry is None or not registry.enabled or request.url.path in OPEN_PATHS:
        return
    key = registry.authenticate(request.headers.get("authorization"))
    if key is None:
        raise ApiError(
            401,
            "a valid API key is required: send 'Authorization: Bearer <key>'",
            code="invalid_api_key",
        )
    request.state.api_key = key


# No interactive docs: they would be the one route served without a key.
app = FastAPI(
    title="serve_app",
    docs_url=None,
    redoc_url=None,
    openapi_url=None,
    dependencies=[Depends(_authenticate)],
)


def error_response(exc: BaseException, request_id: str) -> JSONResponse:
    """The JSON error response for any exception."""
    error = to_api_error(exc, request_id)
    request_metrics().errors.inc(tags={"error_type": error.type})
    headers = {"Retry-After": error.retry_after} if error.retry_after else {}
    return JSONResponse(error.body().model_dump(), status_code=error.status, headers=headers)


@app.exception_handler(RequestValidationError)
async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(exc, _request_id())


@app.exception_handler(ApiError)
async def _on_api_error(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc, _request_id())


@app.exception_handler(Exception)
async def _on_unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    return error_response(exc, _request_id())


@dataclass(frozen=True)
class IngressSettings:
    """What the ingress needs to know about the served model and its callers."""

    model_name: str
    default_max_tokens: int
    auth: AuthConfig


def _revalidate(body: Any) -> Any:
    """Handle callers may build requests with ``model_construct``; validate like HTTP does."""
    try:
        return type(body).model_validate(body.model_dump(exclude_unset=True))
    except ValidationError as exc:
        raise to_api_error(exc, "handle") from None


def _json(payload: BaseModel, generation: Generation) -> JSONResponse:
    headers = {CACHE_HEADER: "hit" if generation.cache_hit else "miss"}
    return JSONResponse(payload.model_dump(mode="json"), headers=headers)


def _accumulator_for(body: OpenAIRequest) -> Accumulator:
    prompts = len(body.prompts) if isinstance(body, CompletionRequest) else 1
    return Accumulator(prompts * body.n, body.n)


ChunkRenderer = Callable[[Any, AsyncIterator[Any], Accumulator], AsyncIterator[BaseModel]]


@serve.deployment(max_ongoing_requests=1024, ray_actor_options={"num_cpus": 0})
@serve.ingress(app)
class Ingress:
    """HTTP routes and handle methods over one served model."""

    def __init__(
        self,
        batcher: DeploymentHandle,
        model: DeploymentHandle,
        cache: DeploymentHandle | None,
        rate_limiter: DeploymentHandle | None,
        settings: IngressSettings,
    ) -> None:
        self.model = model
        self.settings = settings
        self.api_keys = ApiKeyRegistry(settings.auth)
        warn_if_open(self.api_keys, logger)
        app.state.api_keys = self.api_keys
        self.limits = RateLimitClient(rate_limiter, settings.auth.rate_limit_timeout_s)
        self.service = CompletionService(
            batcher,
            ResponseCacheClient(cache),
            settings.model_name,
            settings.default_max_tokens,
            request_metrics(),
        )

    # OpenAI-compatible API

    @app.post("/v1/completions", response_model=None)
    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        """OpenAI text completions."""
        return await self._openai(request, body, completion_response, completion_chunks)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(self, body: ChatCompletionRequest, request: Request) -> Response:
        """OpenAI chat completions."""
        return await self._openai(request, body, chat_response, chat_chunks)

    @app.get("/v1/models")
    async def models(self) -> ModelList:
        """The served model."""
        created = int((await self._describe()).loaded_at)
        return ModelList(data=[ModelCard(id=self.settings.model_name, created=created)])

    # Native API

    @app.post("/v1/infer")
    async def infer(self, body: InferRequest, request: Request) -> InferResponse:
        """One prompt in, its completion out."""
        return await self._infer(request, body, _request_id())

    @app.post("/v1/batch_infer")
    async def batch_infer(self, body: BatchInferRequest, request: Request) -> BatchInferResponse:
        """Many prompts; each result carries its own error, so one bad item fails alone."""
        request_id = _request_id()
        results = await asyncio.gather(
            *(
                self._infer_item(request, item, f"{request_id}-{i}")
                for i, item in enumerate(body.requests)
            )
        )
        return BatchInferResponse(results=list(results))

    @app.post("/v1/stream_infer", response_model=None)
    async def stream_infer(self, body: InferRequest, request: Request) -> Response:
        """One prompt, its completion streamed as server-sent events."""
        completion = body.to_completion_request(self.settings.model_name)
        return await self._stream(request, completion, lambda _, d, a: infer_chunks(d, a))

    @app.get("/v1/model_info")
    async def model_info(self) -> ModelInfo:
        """Name, version, architecture, backend, size and load time of the served model."""
        description = await self._describe()
        return ModelInfo(
            name=self.settings.model_name,
            version=description.version,
            type=description.type,
            backend=description.backend,
            parameters=description.parameters,
            context_length=description.context_length,
            loaded_at=description.loaded_at,
        )

    @app.get("/health")
    async def health(self) -> JSONResponse:
        """200 once a model replica answers; 503 before that and while none does."""
        try:
            stats = await asyncio.wait_for(self.model.stats.remote(), HEALTH_TIMEOUT_S)
        except Exception as exc:
            logger.warning("health check failed: %r", exc)
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return JSONResponse({"status": "ok", **stats})

    @app.get("/metrics")
    async def metrics(self) -> Response:
        """The service's series on this node, in Prometheus text format."""
        text = await asyncio.to_thread(node_metrics_text)
        return Response(text, media_type="text/plain; version=0.0.4")

    # Typed methods for Python callers (serve.get_app_handle(...).generate.remote(...)).
    # They run inside the cluster, so no API key and no rate limit apply.

    async def generate(self, body: CompletionRequest) -> CompletionResponse:
        """A completion, validated and failing exactly as over HTTP (raises ``ApiError``)."""
        body = _revalidate(body)
        generation = await self.service.run(body, _request_id())
        return completion_response(new_id("cmpl"), body.model, generation)

    async def chat(self, body: ChatCompletionRequest) -> ChatCompletionResponse:
        """A chat completion (raises ``ApiError``)."""
        body = _revalidate(body)
        generation = await self.service.run(body, _request_id())
        return chat_response(new_id("chatcmpl"), body.model, generation)

    async def stream(self, body: CompletionRequest) -> AsyncIterator[CompletionResponse]:
        """Completion chunks; the last one carries usage when ``stream_options`` asks."""
        body = _revalidate(body)
        _, deltas = await self.service.stream(body, _request_id())
        async for chunk in completion_chunks(body, deltas, _accumulator_for(body)):
            yield chunk

    async def chat_stream(self, body: ChatCompletionRequest) -> AsyncIterator[ChatCompletionChunk]:
        """Chat chunks: the assistant role first, then content, then usage if asked."""
        body = _revalidate(body)
        _, deltas = await self.service.stream(body, _request_id())
        async for chunk in chat_chunks(body, deltas, _accumulator_for(body)):
            yield chunk

    # Helpers

    async def _openai(
        self,
        request: Request,
        body: OpenAIRequest,
        render: Callable[[str, str, Generation], BaseModel],
        render_chunks: ChunkRenderer,
    ) -> Response:
        if body.stream:
            return await self._stream(request, body, render_chunks)
        request_id = _request_id()
        generation = await self._limited(request, body, lambda: self.service.run(body, request_id))
        prefix = "cmpl" if isinstance(body, CompletionRequest) else "chatcmpl"
        return _json(render(new_id(prefix), body.model, generation), generation)

    async def _stream(
        self, request: Request, body: OpenAIRequest, render_chunks: ChunkRenderer
    ) -> Response:
        request_id = _request_id()
        reservation = await self._admit(request, body)
        try:
            cache_hit, deltas = await self.service.stream(body, request_id)
        except BaseException:
            await self.limits.settle(reservation, 0)
            raise
        accumulator = _accumulator_for(body)

        async def settle() -> None:
            await self.limits.settle(reservation, accumulator.generation().usage.total_tokens)

        chunks = render_chunks(body, deltas, accumulator)
        events = sse.framed(chunks, deltas, request_id, on_close=settle)
        return sse.streaming_response(events, {CACHE_HEADER: "hit" if cache_hit else "miss"})

    async def _admit(self, request: Request, body: OpenAIRequest) -> str | None:
        """Apply the caller's rate limits; returns the reservation to settle afterwards."""
        key = getattr(request.state, "api_key", None)
        if key is None:
            return None
        tokens = body.reserved_tokens(self.settings.default_max_tokens)
        decision = await self.limits.acquire(key.name, self.api_keys.limits_for(key), tokens)
        if not decision.allowed:
            raise ApiError(
                429,
                decision.reason or "rate limit exceeded",
                code="rate_limit_exceeded",
                retry_after=decision.retry_after_header,
            )
        return decision.reservation_id

    async def _limited(
        self, request: Request, body: OpenAIRequest, work: Callable[[], Awaitable[Generation]]
    ) -> Generation:
        """Run ``work`` within the caller's rate limits, settling what it really used."""
        reservation = await self._admit(request, body)
        used = 0
        try:
            generation = await work()
            used = generation.usage.total_tokens
            return generation
        finally:
            await self.limits.settle(reservation, used)

    async def _infer(self, request: Request, body: InferRequest, request_id: str) -> InferResponse:
        started = time.perf_counter()
        completion = body.to_completion_request(self.settings.model_name)
        generation = await self._limited(
            request, completion, lambda: self.service.run(completion, request_id)
        )
        choice = generation.choices[0]
        return InferResponse(
            text=choice.text,
            tokens=choice.token_ids,
            latency=time.perf_counter() - started,
            usage=generation.usage,
            finish_reason=choice.finish_reason,
        )

    async def _infer_item(
        self, request: Request, item: dict[str, Any], request_id: str
    ) -> InferResponse:
        try:
            return await self._infer(request, InferRequest.model_validate(item), request_id)
        except Exception as exc:
            return InferResponse(error=to_api_error(exc, request_id).body().error)

    async def _describe(self) -> ModelDescription:
        description: ModelDescription = await self.model.describe.remote()
        return description
