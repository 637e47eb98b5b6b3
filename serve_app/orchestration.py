"""Request orchestration: fan-out of prompts x choices to the batcher, merging their streams,
and the response cache in front. HTTP routes and Python handle methods both call this, so they
validate and fail alike; rendering the results is ``api.render``'s.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import aclosing
from typing import Any

from opentelemetry.trace import Span, SpanKind
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from serve_app import tracing
from serve_app.admission import AdmissionGate
from serve_app.api.errors import ApiError, to_api_error
from serve_app.api.openai import CompletionRequest
from serve_app.circuit_breaker import CircuitBreaker, CircuitState, guarded
from serve_app.clients.response_cache import ResponseCacheClient
from serve_app.coalescing import Coalescer
from serve_app.config import CircuitBreakerConfig, split_variant
from serve_app.messages import PreparedRequest, TextChunk
from serve_app.metrics import RequestMetrics
from serve_app.results import (
    Accumulator,
    ChoiceDelta,
    ChoiceResult,
    CompletionResult,
    Request,
)
from serve_app.stores.response_store import (
    CachedChoice,
    CachedResponse,
    cache_key,
    is_cacheable,
)


class CompletionService:
    """Runs OpenAI-style requests through the batcher, with the response cache in front, a
    circuit breaker before the batcher, identical deterministic requests in flight coalesced
    into one generation, and generation streams past ``admission_limit`` refused at once."""

    def __init__(
        self,
        batcher: DeploymentHandle,
        cache: ResponseCacheClient,
        model_name: str,
        default_max_tokens: int,
        metrics: RequestMetrics,
        aliases: Sequence[str] = (),
        circuit_breaker: CircuitBreakerConfig | None = None,
        coalesce: bool = True,
        admission_limit: int | None = None,
    ) -> None:
        self.metrics = metrics
        self.admission = AdmissionGate(admission_limit)
        breaker_config = circuit_breaker or CircuitBreakerConfig()
        self.breaker = (
            CircuitBreaker(breaker_config, on_transition=metrics.circuit_changed)
            if breaker_config.enabled
            else None
        )
        self.coalescer: Coalescer[ChoiceDelta] | None = (
            Coalescer(on_join=metrics.coalesced_requests.inc) if coalesce else None
        )
        self.batcher = batcher
        self.cache = cache
        self.model_name = model_name
        self.names = frozenset([model_name, *aliases])
        self.default_max_tokens = default_max_tokens

    def variant_of(self, name: str) -> str | None:
        """The variant ``name`` asks for (``<model>:<variant>``), None for the model itself
        (its name or an alias); 404 for a model this service does not serve. Whether the
        variant exists, its model replica says."""
        if name in self.names:
            return None
        split = split_variant(name)
        if split is None or split[0] not in self.names:
            raise model_not_found(name, [self.model_name])
        return split[1]

    @property
    def circuit_state(self) -> CircuitState:
        """The circuit breaker's state (closed when there is none)."""
        return CircuitState.CLOSED if self.breaker is None else self.breaker.state

    async def run(
        self, request: Request, request_id: str, trace_context: Mapping[str, str] | None = None
    ) -> CompletionResult:
        """Generate every choice to the end (or answer from the cache). ``trace_context``:
        the caller's W3C trace headers, if it sent any."""
        variant = self.variant_of(request.model)
        self.admission.check()
        with tracing.span("ingress", tracing.extract(trace_context), request_id) as span:
            cacheable = self._cacheable(request, variant)
            cached = await self._lookup(cacheable, span, request_id)
            if cached is not None:
                return _from_cache(cached)
            accumulator = Accumulator.of(request)
            deltas = self._generation(request, request_id, span, cacheable, variant)
            async with aclosing(deltas):  # type: ignore[type-var]
                async for delta in deltas:
                    accumulator.add(delta)
            return accumulator.result()

    async def stream(
        self, request: Request, request_id: str, trace_context: Mapping[str, str] | None = None
    ) -> tuple[bool, AsyncIterator[ChoiceDelta]]:
        """(cache hit, the choices' deltas). Waits for the first delta before returning, so
        that a request rejected by the batcher raises here, before any response has begun.
        Its span ends with the deltas."""
        variant = self.variant_of(request.model)
        self.admission.check()
        span = tracing.start_span("ingress", tracing.extract(trace_context), request_id)
        span.set_attribute("serve_app.stream", True)
        try:
            cache_hit, deltas = await self._start_stream(request, request_id, span, variant)
        except BaseException as exc:
            tracing.record_error(span, exc)
            span.end()
            raise
        return cache_hit, tracing.ending_with(span, deltas)

    async def _start_stream(
        self, request: Request, request_id: str, span: Span, variant: str | None
    ) -> tuple[bool, AsyncIterator[ChoiceDelta]]:
        cacheable = self._cacheable(request, variant)
        cached = await self._lookup(cacheable, span, request_id)
        if cached is not None:
            return True, _replay(cached)
        deltas = self._generation(request, request_id, span, cacheable, variant)
        try:
            first = await anext(deltas)
        except StopAsyncIteration:
            raise ApiError(500, f"empty response (request id {request_id})") from None
        except BaseException:
            await deltas.aclose()  # type: ignore[attr-defined]  # a follower leaves its flight
            raise
        return False, _Prepended(first, deltas)

    def _generation(
        self,
        request: Request,
        request_id: str,
        span: Span,
        cacheable: dict[str, Any] | None,
        variant: str | None,
    ) -> AsyncIterator[ChoiceDelta]:
        """The request's deltas from the batcher (of ``variant``, if set), through the circuit
        breaker, cached once complete when ``cacheable``. An identical deterministic request
        already generating is followed instead, from its first delta (docs/OPERATIONS.md,
        coalescing)."""

        def generate() -> AsyncIterator[ChoiceDelta]:
            prepared = self._prepare(request, request_id, tracing.inject(span))
            deltas = self._deltas(prepared, request.n, variant)
            if self.breaker is not None:
                deltas = guarded(self.breaker, deltas)
            if cacheable is None:
                return deltas
            accumulator = Accumulator.of(request)
            return self._stored_when_complete(cacheable, deltas, accumulator, span, request_id)

        if cacheable is None or self.coalescer is None:
            return generate()
        # Any fixed version will do: a flight is of the version being served now.
        return self.coalescer.stream(cache_key("in-flight", cacheable), generate)

    async def _stored_when_complete(
        self,
        cacheable: dict[str, Any],
        deltas: AsyncIterator[ChoiceDelta],
        accumulator: Accumulator,
        span: Span,
        request_id: str,
    ) -> AsyncIterator[ChoiceDelta]:
        """Pass a stream through and cache it once every choice has finished."""
        async with aclosing(deltas) as items:  # type: ignore[type-var]
            async for delta in items:
                accumulator.add(delta)
                yield delta
        await self._store(cacheable, accumulator.result(), span, request_id)

    def _prepare(
        self, request: Request, request_id: str, trace_context: dict[str, str]
    ) -> list[PreparedRequest]:
        """One prepared request per prompt and choice; choice i samples with seed + i; each
        carries ``trace_context`` to the batcher."""
        if isinstance(request, CompletionRequest):
            params = request.to_sampling_params()
            sources: list[dict[str, Any]] = [
                {"prompt": p} if isinstance(p, str) else {"prompt_token_ids": p}
                for p in request.prompts
            ]
        else:
            params = request.to_sampling_params(self.default_max_tokens)
            sources = [{"messages": request.message_dicts()}]
        prepared = []
        for p_index, source in enumerate(sources):
            for choice in range(request.n):
                seed = None if params.seed is None else params.seed + choice
                prepared.append(
                    PreparedRequest(
                        request_id=f"{request_id}-{p_index * request.n + choice}",
                        params=dataclasses.replace(params, seed=seed),
                        stop=request.stop_strings,
                        text=request.to_text_options(),
                        trace_context=trace_context,
                        **source,
                    )
                )
        return prepared

    async def _lookup(
        self, cacheable: dict[str, Any] | None, parent: Span, request_id: str
    ) -> CachedResponse | None:
        """A cached answer of the version now being served, if there is one."""
        if cacheable is None or not self.cache.enabled:
            return None
        with tracing.span("response_cache.lookup", parent, request_id, SpanKind.CLIENT) as span:
            cached = await self.cache.lookup(cacheable)
            span.set_attribute("serve_app.cache_hit", cached is not None)
        parent.set_attribute("serve_app.cache_hit", cached is not None)
        counter = self.metrics.cache_misses if cached is None else self.metrics.cache_hits
        counter.inc()
        return cached

    async def _store(
        self,
        cacheable: dict[str, Any] | None,
        result: CompletionResult,
        parent: Span,
        request_id: str,
    ) -> None:
        """Cache a complete answer under the version that generated it, never another."""
        complete = all(c.finish_reason for c in result.choices)
        if cacheable is None or not complete or result.model_version is None:
            return
        with tracing.span("response_cache.store", parent, request_id, SpanKind.CLIENT):
            await self.cache.store(result.model_version, cacheable, _to_cache(result))

    async def _deltas(
        self, prepared: list[PreparedRequest], choices_per_prompt: int, variant: str | None
    ) -> AsyncIterator[ChoiceDelta]:
        """Every choice's chunks as they come, merged and timed; an error chunk raises
        ``ApiError``. A ``variant``'s requests carry it as Serve's multiplexed model id."""
        timer = _StreamTimer(self.metrics, time.perf_counter(), choices_per_prompt)
        batcher = self.batcher.options(stream=True, multiplexed_model_id=variant or "")
        try:
            with self.admission.hold(len(prepared)):
                streams = [batcher.generate.remote(p) for p in prepared]
                async for index, chunk in _merge(streams):
                    if chunk.error is not None:
                        raise ApiError.from_request_error(chunk.error)
                    timer.observe(index, chunk)
                    yield ChoiceDelta(index, chunk)
        except (BackPressureError, DeploymentUnavailableError) as exc:
            # The batcher's queue bound, or its application gone: mapped here, since Serve
            # installs its own plain-text handlers for these on the ingress app, ahead of ours.
            raise to_api_error(exc, prepared[0].request_id) from None

    def _cacheable(self, request: Request, variant: str | None) -> dict[str, Any] | None:
        """What identifies a deterministic request (prompt and every sampling parameter);
        None for requests never cached: sampled without a seed, asking for logprobs or the
        prompt echoed (the cache keeps neither logprobs nor prompts), or for a variant (whose
        folder may change without a redeploy, and whose version only its replica knows)."""
        if variant is not None:
            return None
        wants_logprobs = request.logprobs is not None and request.logprobs is not False
        if isinstance(request, CompletionRequest):
            wants_logprobs |= request.echo or request.prompt_logprobs is not None
        if not is_cacheable(request.temperature, request.seed) or wants_logprobs:
            return None
        payload = request.model_dump(exclude={"stream", "stream_options", *request.IGNORED_FIELDS})
        # An alias is the same model: one key whichever name the request used.
        return {"kind": type(request).__name__, **payload, "model": self.model_name}


def model_not_found(name: str, served: Sequence[str]) -> ApiError:
    """The 404 for a request naming a model that is not served."""
    return ApiError(
        404,
        f"the model '{name}' does not exist; this service serves {', '.join(map(repr, served))}",
        param="model",
        code="model_not_found",
    )


class _StreamTimer:
    """Records a request's latency and token series as its chunks arrive."""

    def __init__(self, metrics: RequestMetrics, started: float, choices_per_prompt: int) -> None:
        self.metrics = metrics
        self.started = started
        self.choices_per_prompt = choices_per_prompt
        self.last_token_at: dict[int, float] = {}

    def observe(self, index: int, chunk: TextChunk) -> None:
        now = time.perf_counter()
        tokens = len(chunk.token_ids)
        if tokens:
            previous = self.last_token_at.get(index)
            if previous is None:
                self.metrics.time_to_first_token.observe(now - self.started)
            else:
                # A coalesced chunk spreads its gap over the tokens it carries.
                gap = (now - previous) / tokens
                for _ in range(tokens):
                    self.metrics.inter_token_latency.observe(gap)
            self.last_token_at[index] = now
            self.metrics.generation_tokens.inc(tokens)
        if chunk.finish_reason is not None:
            self.metrics.e2e_latency.observe(now - self.started)
            # A prompt is counted once, with its first choice, however many sample from it.
            if index % self.choices_per_prompt == 0 and chunk.prompt_tokens:
                self.metrics.prompt_tokens.inc(chunk.prompt_tokens)
            self.metrics.requests.inc(tags={"finish_reason": chunk.finish_reason})


async def _merge(streams: list[Any]) -> AsyncIterator[tuple[int, TextChunk]]:
    """Interleave several batcher streams; closing this cancels the ones still running."""
    queue: asyncio.Queue[tuple[int, TextChunk] | BaseException | None] = asyncio.Queue()

    async def pump(index: int, stream: Any) -> None:
        try:
            async for chunk in stream:
                queue.put_nowait((index, chunk))
                if chunk.finish_reason is not None or chunk.error is not None:
                    break  # the end of the stream follows; no need to wait for it
            queue.put_nowait(None)
        except BaseException as exc:  # re-raised by the consumer below
            queue.put_nowait(exc)

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task, stream in zip(tasks, streams, strict=True):
            task.cancel()
            stream.cancel()


class _Prepended:
    """``first``, then the rest of its stream. Closing it closes the rest at once, even before
    the first item was read (an async generator that never ran would skip its cleanup, and with
    it the cancellation of generation)."""

    def __init__(self, first: ChoiceDelta, rest: AsyncIterator[ChoiceDelta]) -> None:
        self._first: ChoiceDelta | None = first
        self._rest = rest

    def __aiter__(self) -> _Prepended:
        return self

    async def __anext__(self) -> ChoiceDelta:
        if self._first is not None:
            first, self._first = self._first, None
            return first
        return await anext(self._rest)

    async def aclose(self) -> None:
        """Stop generation now."""
        self._first = None
        await self._rest.aclose()  # type: ignore[attr-defined]


async def _replay(cached: CachedResponse) -> AsyncIterator[ChoiceDelta]:
    """A cached response as one final chunk per choice; the first carries the prompt tokens
    (the cache keeps their total, not each prompt's)."""
    for index, choice in enumerate(cached.choices):
        yield ChoiceDelta(
            index,
            TextChunk(
                request_id="cached",
                text=choice.text,
                token_ids=list(choice.token_ids),
                finish_reason=choice.finish_reason,
                prompt_tokens=cached.prompt_tokens if index == 0 else 0,
                completion_tokens=len(choice.token_ids),
            ),
        )


def _to_cache(result: CompletionResult) -> CachedResponse:
    return CachedResponse(
        choices=[
            CachedChoice(c.text, c.finish_reason or "stop", list(c.token_ids))
            for c in result.choices
        ],
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
    )


def _from_cache(cached: CachedResponse) -> CompletionResult:
    choices = [ChoiceResult(c.text, list(c.token_ids), [], c.finish_reason) for c in cached.choices]
    return CompletionResult(choices, cached.prompt_tokens, cached.completion_tokens, cache_hit=True)
