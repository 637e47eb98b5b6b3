"""The ``Ingress`` deployment: the HTTP/SSE routes and the typed methods for handle callers.

Routes are thin adapters: admit (rate limits), call ``CompletionService``, render. The FastAPI
app, authentication and error handling are ``api.http``'s. (No ``from __future__ import
annotations`` here: FastAPI reads the route signatures at runtime.)
"""

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ValidationError
from ray import serve
from ray.serve.config import BackpressureConfig
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from serve_app import tracing
from serve_app.api import render, sse
from serve_app.api.auth import ApiKeyRegistry, warn_if_open
from serve_app.api.errors import ApiError, to_api_error
from serve_app.api.http import (
    api_key,
    app,
    cached_json,
    event_stream,
    event_stream_responses,
    request_id,
)
from serve_app.api.native import BatchInferRequest, Health, InferRequest, InferResponse, ModelInfo
from serve_app.api.openai import ChatCompletionRequest, CompletionRequest
from serve_app.api.openai_responses import (
    ChatCompletionChunk,
    ChatCompletionResponse,
    CompletionResponse,
    ModelList,
    new_id,
)
from serve_app.api.tokenize import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from serve_app.api.tool_calls import ToolCallFormat
from serve_app.clients.rate_limiter import RateLimitClient
from serve_app.config import DRAIN_POLL_S, INGRESS_GRACE_S, IngressSettings
from serve_app.messages import DetokenizedText, TokenizedPrompt
from serve_app.metrics import node_metrics_text
from serve_app.model_catalog import ModelCatalog, ServedModel
from serve_app.results import Accumulator, CompletionResult

logger = logging.getLogger("ray.serve")

HEALTH_TIMEOUT_S = 2.0

OpenAIRequest = CompletionRequest | ChatCompletionRequest
T = TypeVar("T")
# Serve pickles the ingress class by value when it is decorated: every module-level name its
# methods use must be defined above it.


def _revalidate(body: Any) -> Any:
    """Handle callers may build requests with ``model_construct``; validate like HTTP does."""
    try:
        return type(body).model_validate(body.model_dump(exclude_unset=True))
    except ValidationError as exc:
        raise to_api_error(exc, "handle") from None


async def _batcher_answer(call: Awaitable[T], request_id: str) -> T:
    """A batcher call's answer; a full batcher queue is the documented 503, not the plain-text
    one Serve's own handler for ``BackPressureError`` on the ingress app would give."""
    try:
        return await call
    except BackPressureError as exc:
        raise to_api_error(exc, request_id) from None


@serve.deployment(
    max_ongoing_requests=1024,
    # Past these many waiting at the proxy too, Serve's proxy answers 503 (plain text) at once.
    max_queued_requests=1024,
    backpressure_config=BackpressureConfig(retry_after_s=1),
    ray_actor_options={"num_cpus": 0},
    graceful_shutdown_timeout_s=INGRESS_GRACE_S,
    graceful_shutdown_wait_loop_s=DRAIN_POLL_S,
)
@serve.ingress(app)
class Ingress:
    """HTTP routes and handle methods over the served models, routed by ``model``."""

    def __init__(
        self,
        models: list[ServedModel],
        rate_limiter: DeploymentHandle | None,
        settings: IngressSettings,
    ) -> None:
        self._tracer_provider = tracing.configure(settings.tracing, "Ingress")
        self.catalog = ModelCatalog(
            models,
            settings.default_max_tokens,
            settings.circuit_breaker,
            settings.coalesce_requests,
        )
        self.settings = settings
        self.api_keys = ApiKeyRegistry(settings.auth)
        warn_if_open(self.api_keys, logger)
        app.state.api_keys = self.api_keys
        app.state.max_request_body_bytes = settings.max_request_body_bytes
        app.state.body_read_timeout_s = settings.body_read_timeout_s
        self.limits = RateLimitClient(
            rate_limiter, settings.auth.rate_limit_timeout_s, settings.auth.rate_limit_fail_open
        )

    # OpenAI-compatible API

    @app.post(
        "/v1/completions",
        response_model=None,
        responses=event_stream_responses(CompletionResponse, CompletionResponse),
    )
    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        """OpenAI text completions."""
        if body.stream:
            return await self._stream(request, body, render.completion_chunks)
        result = await self._run(request, body, request_id())
        return cached_json(
            render.completion_response(new_id("cmpl"), body.model, result), result.cache_hit
        )

    @app.post(
        "/v1/chat/completions",
        response_model=None,
        responses=event_stream_responses(ChatCompletionChunk, ChatCompletionResponse),
    )
    async def chat_completions(self, body: ChatCompletionRequest, request: Request) -> Response:
        """OpenAI chat completions."""
        if body.stream:
            chunks = functools.partial(render.chat_chunks, tool_format=self._tool_format(body))
            return await self._stream(request, body, chunks)
        result = await self._run(request, body, request_id())
        return cached_json(
            render.chat_response(new_id("chatcmpl"), body.model, result, self._tool_format(body)),
            result.cache_hit,
        )

    @app.get("/v1/models")
    async def models(self) -> ModelList:
        """Every served model, then each alias (with the model it names as its parent)."""
        return ModelList(data=await self.catalog.cards())

    # Native API

    @app.post("/v1/infer", response_model=InferResponse)
    async def infer(self, body: InferRequest, request: Request) -> Response:
        """One prompt in, its completion out: the seed's ``InferenceResponse``."""
        started = time.perf_counter()
        result = await self._run(request, self._as_completion(body), request_id())
        answer = render.infer_response(result, time.perf_counter() - started)
        return cached_json(answer, result.cache_hit)

    @app.post("/v1/batch_infer", response_model=list[InferResponse])
    async def batch_infer(self, body: BatchInferRequest, request: Request) -> JSONResponse:
        """A JSON array of requests in, one answer per item out, in order; a bad item fails
        alone, with the seed's ``error`` string and the ``status`` it would have had."""
        batch_id = request_id()
        answers = await asyncio.gather(
            *(
                self._infer_item(request, item, f"{batch_id}-{i}")
                for i, item in enumerate(body.root)
            )
        )
        return JSONResponse([answer.model_dump(mode="json") for answer in answers])

    @app.post(
        "/v1/stream_infer", response_model=None, responses=event_stream_responses(InferResponse)
    )
    async def stream_infer(self, body: InferRequest, request: Request) -> Response:
        """One prompt, its completion streamed as ``InferenceResponse`` events, then ``[DONE]``."""
        started = time.perf_counter()
        return await self._stream(
            request,
            self._as_completion(body),
            lambda _, deltas, acc: render.infer_chunks(deltas, acc, started),
            lambda error: render.infer_failure(error, time.perf_counter() - started),
        )

    @app.get("/v1/model_info")
    async def model_info(self, model: str | None = None) -> ModelInfo:
        """The seed's ``ModelInfo`` (name, version, type, parameters, max_tokens, created_at),
        plus the backend, of ``model`` (default: the first served; a variant too)."""
        description = await self.catalog.describe(model)
        return render.model_info(self.catalog.served_name(model), description)

    @app.get("/health", response_model=Health)
    async def health(self) -> JSONResponse:
        """200 once a replica of every model answers (with the first model's queue numbers);
        503 before that, while one does not, and while a model's circuit breaker is open."""
        circuits = self.catalog.circuit_states()
        try:
            calls = [m.model.stats.remote() for m in self.catalog.models]
            stats, *_ = await asyncio.wait_for(asyncio.gather(*calls), HEALTH_TIMEOUT_S)
        except Exception as exc:
            logger.warning("health check failed: %r", exc)
            stats = None
        body = render.health(stats, circuits)
        status = 200 if body.status == "ok" else 503
        return JSONResponse(body.model_dump(mode="json"), status_code=status)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics(self) -> Response:
        """The service's series on this node, in Prometheus text format."""
        text = await asyncio.to_thread(node_metrics_text)
        return Response(text, media_type="text/plain; version=0.0.4")

    # Tokenizer (vLLM's /tokenize and /detokenize): the batcher tokenizes, never the ingress

    @app.post("/tokenize")
    async def tokenize(self, body: TokenizeRequest) -> TokenizeResponse:
        """A prompt's (or a chat's) token ids, as a completion of it would give the model."""
        model = self.catalog.get(body.model)
        call = model.batcher.tokenize.remote(body)  # runs while the model is described
        description = await self.catalog.describe(model.name)
        tokenized: TokenizedPrompt = await _batcher_answer(call, "tokenize")
        if tokenized.error is not None:
            raise ApiError.from_request_error(tokenized.error)
        ids = tokenized.token_ids
        return TokenizeResponse(
            count=len(ids),
            max_model_len=description.context_length,
            tokens=ids,
            token_strs=tokenized.token_texts,
        )

    @app.post("/detokenize")
    async def detokenize(self, body: DetokenizeRequest) -> DetokenizeResponse:
        """The text of token ids."""
        model = self.catalog.get(body.model)
        call = model.batcher.detokenize.remote(body.tokens)
        detokenized: DetokenizedText = await _batcher_answer(call, "detokenize")
        if detokenized.error is not None:
            raise ApiError.from_request_error(detokenized.error)
        return DetokenizeResponse(prompt=detokenized.text)

    # Typed methods for Python callers (serve.get_app_handle(...).generate.remote(...)).
    # They run inside the cluster, so no API key and no rate limit apply.

    async def generate(self, body: CompletionRequest) -> CompletionResponse:
        """A completion, validated and failing exactly as over HTTP (raises ``ApiError``)."""
        body = _revalidate(body)
        result = await self.catalog.service(body.model).run(body, request_id())
        return render.completion_response(new_id("cmpl"), body.model, result)

    async def chat(self, body: ChatCompletionRequest) -> ChatCompletionResponse:
        """A chat completion (raises ``ApiError``)."""
        body = _revalidate(body)
        result = await self.catalog.service(body.model).run(body, request_id())
        return render.chat_response(new_id("chatcmpl"), body.model, result, self._tool_format(body))

    async def stream(self, body: CompletionRequest) -> AsyncIterator[CompletionResponse]:
        """Completion chunks; the last one carries usage when ``stream_options`` asks."""
        body = _revalidate(body)
        _, deltas = await self.catalog.service(body.model).stream(body, request_id())
        async for chunk in render.completion_chunks(body, deltas, Accumulator.of(body)):
            yield chunk

    async def chat_stream(self, body: ChatCompletionRequest) -> AsyncIterator[ChatCompletionChunk]:
        """Chat chunks: the assistant role first, then content, then usage if asked."""
        body = _revalidate(body)
        _, deltas = await self.catalog.service(body.model).stream(body, request_id())
        tool_format = self._tool_format(body)
        async for chunk in render.chat_chunks(body, deltas, Accumulator.of(body), tool_format):
            yield chunk

    # Adapters shared by the routes

    async def _run(self, request: Request, body: OpenAIRequest, rid: str) -> CompletionResult:
        """Run ``body`` to the end within the caller's rate limits, settling what it used."""
        service = self.catalog.service(body.model)
        service.admission.check()  # a full model refuses before the rate limiter is called
        reservation = await self._admit(request, body)
        used = 0
        try:
            result = await service.run(body, rid, tracing.from_headers(request.headers))
            used = result.usage.total_tokens
            return result
        finally:
            await self.limits.settle(reservation, used)

    async def _stream(
        self,
        request: Request,
        body: OpenAIRequest,
        render_chunks: render.ChunkRenderer,
        error_event: Callable[[ApiError], BaseModel] = ApiError.body,
    ) -> Response:
        """Stream ``body`` as server-sent events, settling the rate limit when it closes; a
        failure after the stream began is ``error_event``'s final event."""
        rid = request_id()
        service = self.catalog.service(body.model)
        service.admission.check()  # a full model refuses before the rate limiter is called
        reservation = await self._admit(request, body)
        keep_alive_s = self.settings.sse_keep_alive_s
        try:
            # Not started within the keep-alive interval (queued, prefilling): the stream
            # begins anyway, with keep-alive comments, and a later failure is an error event.
            start = service.stream(body, rid, tracing.from_headers(request.headers))
            cache_hit, deltas = await sse.started_within(start, keep_alive_s)
        except BaseException:
            await self.limits.settle(reservation, 0)
            raise
        accumulator = Accumulator.of(body)

        async def settle() -> None:
            await self.limits.settle(reservation, accumulator.result().usage.total_tokens)

        chunks = render_chunks(body, deltas, accumulator)
        events = sse.framed(chunks, deltas, rid, on_close=settle, error_event=error_event)
        return event_stream(sse.with_keep_alive(events, keep_alive_s), cache_hit)

    async def _admit(self, request: Request, body: OpenAIRequest) -> str | None:
        """Apply the caller's rate limits; returns the reservation to settle afterwards."""
        key = api_key(request)
        if key is None:
            return None
        tokens = body.reserved_tokens(self.settings.default_max_tokens)
        return await self.limits.admit(key, self.api_keys.limits_for(key), tokens)

    def _tool_format(self, body: ChatCompletionRequest) -> ToolCallFormat | None:
        parser = self.catalog.get(body.model).tool_call_parser or self.settings.tool_call_parser
        return body.tool_call_format(parser)

    def _as_completion(self, body: InferRequest) -> CompletionRequest:
        return body.to_completion_request(self.catalog.served_name(body.model))

    async def _infer_item(self, request: Request, item: Any, rid: str) -> InferResponse:
        started = time.perf_counter()
        try:
            body = InferRequest.model_validate(item)
            result = await self._run(request, self._as_completion(body), rid)
        except Exception as exc:
            return render.infer_failure(to_api_error(exc, rid), time.perf_counter() - started)
        return render.infer_response(result, time.perf_counter() - started)

    def __del__(self) -> None:
        tracing.shutdown(getattr(self, "_tracer_provider", None))  # exports what it buffers
