"""The ``Ingress`` deployment: the HTTP/SSE surface and the typed methods for handle callers.

Routes are thin adapters: validate, call ``CompletionService``, render. Errors of every kind
go through ``errors.to_api_error``. (No ``from __future__ import annotations`` here: FastAPI
reads the route signatures at runtime.)
"""

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from ray import serve
from ray.serve import context as serve_context
from ray.serve.handle import DeploymentHandle

from serve_app.cache import ResponseCacheClient
from serve_app.completions import (
    Accumulator,
    ChoiceDelta,
    CompletionService,
    Generation,
    chat_chunk,
    chat_response,
    chat_role_chunk,
    completion_chunk,
    completion_response,
)
from serve_app.errors import ApiError, to_api_error
from serve_app.generation import ModelDescription
from serve_app.metrics import IngressMetrics
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
    StreamInferChunk,
    new_id,
)

logger = logging.getLogger("ray.serve")

CACHE_HEADER = "X-Cache"
HEALTH_TIMEOUT_S = 2.0

app = FastAPI(title="serve_app", description="OpenAI-compatible LLM inference on Ray Serve.")


def _request_id() -> str:
    """Serve's id of the current request: the client's ``X-Request-Id`` if it sent one.

    The proxy echoes it in the response header and Serve's logs carry it, so error bodies
    name the same id. Serve has no public accessor for it yet.
    """
    return str(serve_context._get_serve_request_context().request_id or uuid.uuid4().hex)


def error_response(exc: BaseException, request_id: str) -> JSONResponse:
    """The JSON error response for any exception."""
    error = to_api_error(exc, request_id)
    headers = {}
    if error.status in (429, 503):
        headers["Retry-After"] = "1"
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
    """What the ingress needs to know about the served model."""

    model_name: str
    model_version: str
    default_max_tokens: int


def sse(payload: BaseModel) -> str:
    """One server-sent event."""
    return f"data: {payload.model_dump_json(exclude_none=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def _revalidate(body: Any) -> Any:
    """Handle callers may build requests with ``model_construct``; validate like HTTP does."""
    try:
        return type(body).model_validate(body.model_dump(exclude_unset=True))
    except ValidationError as exc:
        raise to_api_error(exc, "handle") from None


async def _framed(
    chunks: AsyncIterator[BaseModel], source: AsyncIterator[Any], request_id: str
) -> AsyncIterator[str]:
    """SSE framing: one event per chunk, then ``[DONE]``. An error after the stream has begun goes
    out as one final error event, then the stream closes. Closing this closes ``source``,
    which cancels generation (the client went away)."""
    try:
        async for chunk in chunks:
            yield sse(chunk)
        yield SSE_DONE
    except Exception as exc:
        yield sse(to_api_error(exc, request_id).body())
    finally:
        await source.aclose()  # type: ignore[attr-defined]


def _streaming(body: AsyncIterator[str], cache_hit: bool) -> StreamingResponse:
    headers = {CACHE_HEADER: "hit" if cache_hit else "miss"}
    return StreamingResponse(body, media_type="text/event-stream", headers=headers)


def _json(payload: BaseModel, generation: Generation) -> JSONResponse:
    headers = {CACHE_HEADER: "hit" if generation.cache_hit else "miss"}
    return JSONResponse(payload.model_dump(mode="json"), headers=headers)


@serve.deployment(max_ongoing_requests=1024, ray_actor_options={"num_cpus": 0})
@serve.ingress(app)
class Ingress:
    """HTTP routes and handle methods over one served model."""

    def __init__(
        self,
        batcher: DeploymentHandle,
        model: DeploymentHandle,
        cache: DeploymentHandle | None,
        settings: IngressSettings,
    ) -> None:
        self.model = model
        self.settings = settings
        self.counters = IngressMetrics()
        self.cache = ResponseCacheClient(cache)
        self.service = CompletionService(
            batcher, self.cache, settings.model_name, settings.model_version,
            settings.default_max_tokens,
        )  # fmt: skip
        self._description: ModelDescription | None = None

    # OpenAI-compatible API

    @app.post("/v1/completions", response_model=None)
    async def completions(self, body: CompletionRequest) -> Response:
        """OpenAI text completions."""
        request_id = _request_id()
        if body.stream:
            cache_hit, deltas = await self.service.stream(body, request_id)
            chunks = self._completion_chunks(body, deltas)
            return _streaming(_framed(chunks, deltas, request_id), cache_hit)
        generation = await self._run(body, request_id)
        return _json(completion_response(new_id("cmpl"), body.model, generation), generation)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(self, body: ChatCompletionRequest) -> Response:
        """OpenAI chat completions."""
        request_id = _request_id()
        if body.stream:
            cache_hit, deltas = await self.service.stream(body, request_id)
            chunks = self._chat_chunks(body, deltas)
            return _streaming(_framed(chunks, deltas, request_id), cache_hit)
        generation = await self._run(body, request_id)
        return _json(chat_response(new_id("chatcmpl"), body.model, generation), generation)

    @app.get("/v1/models")
    async def models(self) -> ModelList:
        """The served model."""
        created = int((await self._describe()).loaded_at)
        return ModelList(data=[ModelCard(id=self.settings.model_name, created=created)])

    # Native API

    @app.post("/v1/infer")
    async def infer(self, body: InferRequest) -> InferResponse:
        """One prompt in, its completion out."""
        return await self._infer(body, _request_id())

    @app.post("/v1/batch_infer")
    async def batch_infer(self, body: BatchInferRequest) -> BatchInferResponse:
        """Many prompts; each result carries its own error, so one bad item fails alone."""
        request_id = _request_id()
        results = await asyncio.gather(
            *(self._infer_item(item, f"{request_id}-{i}") for i, item in enumerate(body.requests))
        )
        return BatchInferResponse(results=list(results))

    @app.post("/v1/stream_infer", response_model=None)
    async def stream_infer(self, body: InferRequest) -> Response:
        """One prompt, its completion streamed as server-sent events."""
        request_id = _request_id()
        completion = body.to_completion_request(self.settings.model_name)
        cache_hit, deltas = await self.service.stream(completion, request_id)
        accumulator = Accumulator(1, 1)

        async def chunks() -> AsyncIterator[StreamInferChunk]:
            async for delta in deltas:
                accumulator.add(delta)
                self.counters.count_tokens(delta)
                chunk = delta.chunk
                usage = accumulator.generation().usage if chunk.finish_reason else None
                yield StreamInferChunk(text=chunk.text, tokens=chunk.token_ids,
                                       finish_reason=chunk.finish_reason, usage=usage)  # fmt: skip

        return _streaming(_framed(chunks(), deltas, request_id), cache_hit)

    @app.get("/v1/model_info")
    async def model_info(self) -> ModelInfo:
        """Name, version, architecture, backend, size and load time of the served model."""
        description = await self._describe()
        return ModelInfo(
            name=self.settings.model_name,
            version=self.settings.model_version,
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
        """Prometheus text format."""
        self.counters.observe_cache(self.cache)
        return Response(self.counters.render(), media_type="text/plain; version=0.0.4")

    # Typed methods for Python callers (serve.get_app_handle(...).generate.remote(...))

    async def generate(self, body: CompletionRequest) -> CompletionResponse:
        """A completion, validated and failing exactly as over HTTP (raises ``ApiError``)."""
        body = _revalidate(body)
        generation = await self._run(body, _request_id())
        return completion_response(new_id("cmpl"), body.model, generation)

    async def chat(self, body: ChatCompletionRequest) -> ChatCompletionResponse:
        """A chat completion (raises ``ApiError``)."""
        body = _revalidate(body)
        generation = await self._run(body, _request_id())
        return chat_response(new_id("chatcmpl"), body.model, generation)

    async def stream(self, body: CompletionRequest) -> AsyncIterator[CompletionResponse]:
        """Completion chunks; the last one carries usage when ``stream_options`` asks."""
        body = _revalidate(body)
        _, deltas = await self.service.stream(body, _request_id())
        async for chunk in self._completion_chunks(body, deltas):
            yield chunk

    async def chat_stream(self, body: ChatCompletionRequest) -> AsyncIterator[ChatCompletionChunk]:
        """Chat chunks: the assistant role first, then content, then usage if asked."""
        body = _revalidate(body)
        _, deltas = await self.service.stream(body, _request_id())
        async for chunk in self._chat_chunks(body, deltas):
            yield chunk

    # Helpers

    async def _run(
        self, body: CompletionRequest | ChatCompletionRequest, request_id: str
    ) -> Generation:
        generation = await self.service.run(body, request_id)
        self.counters.count_generation(generation)
        return generation

    async def _infer(self, body: InferRequest, request_id: str) -> InferResponse:
        started = time.perf_counter()
        generation = await self._run(
            body.to_completion_request(self.settings.model_name), request_id
        )
        choice = generation.choices[0]
        return InferResponse(
            text=choice.text,
            tokens=choice.token_ids,
            latency=time.perf_counter() - started,
            usage=generation.usage,
            finish_reason=choice.finish_reason,
        )

    async def _infer_item(self, item: dict[str, Any], request_id: str) -> InferResponse:
        try:
            return await self._infer(InferRequest.model_validate(item), request_id)
        except Exception as exc:
            return InferResponse(error=to_api_error(exc, request_id).body().error)

    async def _describe(self) -> ModelDescription:
        if self._description is None:
            self._description = await self.model.describe.remote()
        return self._description

    async def _completion_chunks(
        self, body: CompletionRequest, deltas: AsyncIterator[ChoiceDelta]
    ) -> AsyncIterator[CompletionResponse]:
        response_id = new_id("cmpl")
        accumulator = Accumulator(len(body.prompts) * body.n, body.n)
        async for delta in deltas:
            accumulator.add(delta)
            self.counters.count_tokens(delta)
            yield completion_chunk(response_id, body.model, delta)
        if body.include_usage:
            usage = accumulator.generation().usage
            yield CompletionResponse(id=response_id, model=body.model, choices=[], usage=usage)

    async def _chat_chunks(
        self, body: ChatCompletionRequest, deltas: AsyncIterator[ChoiceDelta]
    ) -> AsyncIterator[ChatCompletionChunk]:
        response_id = new_id("chatcmpl")
        yield chat_role_chunk(response_id, body.model, body.n)
        accumulator = Accumulator(body.n, body.n)
        async for delta in deltas:
            accumulator.add(delta)
            self.counters.count_tokens(delta)
            yield chat_chunk(response_id, body.model, delta)
        if body.include_usage:
            usage = accumulator.generation().usage
            yield ChatCompletionChunk(id=response_id, model=body.model, choices=[], usage=usage)
