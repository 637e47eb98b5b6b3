"""Completions and chat completions on top of the batcher: fan-out of prompts x choices,
aggregation, streaming chunks, and the response cache. HTTP routes and Python handle methods
both call this, so they validate and fail alike.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from ray.serve.handle import DeploymentHandle

from serve_app.cache import (
    CachedChoice,
    CachedResponse,
    ResponseCacheClient,
    is_cacheable,
)
from serve_app.errors import ApiError
from serve_app.generation import PreparedRequest, TextChunk, TokenText
from serve_app.metrics import RequestMetrics
from serve_app.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatResponseMessage,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    StreamInferChunk,
    TopLogprob,
    Usage,
    new_id,
)

Request = CompletionRequest | ChatCompletionRequest


@dataclass
class ChoiceResult:
    """A finished choice, accumulated from its chunks."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenText] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass
class Generation:
    """A finished request: its choices in order and its token counts."""

    choices: list[ChoiceResult]
    prompt_tokens: int
    completion_tokens: int
    cache_hit: bool = False
    model_version: str | None = None  # of the model that generated it

    @property
    def usage(self) -> Usage:
        """OpenAI usage object."""
        total = self.prompt_tokens + self.completion_tokens
        return Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            total_tokens=total,
        )


class Accumulator:
    """Builds a ``Generation`` from a stream of deltas (and its usage at any point)."""

    def __init__(self, num_choices: int, choices_per_prompt: int) -> None:
        self.choices = [ChoiceResult() for _ in range(num_choices)]
        self._choices_per_prompt = choices_per_prompt
        self._prompt_tokens: dict[int, int] = {}
        self._model_version: str | None = None

    def add(self, delta: ChoiceDelta) -> None:
        """Fold in one delta."""
        choice, chunk = self.choices[delta.index], delta.chunk
        choice.text += chunk.text
        choice.token_ids.extend(chunk.token_ids)
        choice.logprobs.extend(chunk.logprobs or [])
        choice.finish_reason = chunk.finish_reason or choice.finish_reason
        # The prompt is counted once however many choices sample from it.
        self._prompt_tokens[delta.index // self._choices_per_prompt] = chunk.prompt_tokens
        self._model_version = chunk.model_version or self._model_version

    def generation(self) -> Generation:
        """The request so far."""
        completion_tokens = sum(len(c.token_ids) for c in self.choices)
        prompt_tokens = sum(self._prompt_tokens.values())
        return Generation(
            self.choices, prompt_tokens, completion_tokens, model_version=self._model_version
        )


@dataclass(frozen=True)
class ChoiceDelta:
    """New output of one choice in a stream (the choice index is OpenAI's ``index``)."""

    index: int
    chunk: TextChunk


class CompletionService:
    """Runs OpenAI-style requests through the batcher, with the response cache in front."""

    def __init__(
        self,
        batcher: DeploymentHandle,
        cache: ResponseCacheClient,
        model_name: str,
        default_max_tokens: int,
        metrics: RequestMetrics,
    ) -> None:
        self.metrics = metrics
        self.batcher = batcher
        self.cache = cache
        self.model_name = model_name
        self.default_max_tokens = default_max_tokens

    def check_model(self, name: str) -> None:
        """404 for a model this service does not serve."""
        if name != self.model_name:
            raise ApiError(
                404,
                f"the model '{name}' does not exist; this service serves '{self.model_name}'",
                param="model",
                code="model_not_found",
            )

    async def run(self, request: Request, request_id: str) -> Generation:
        """Generate every choice to the end (or answer from the cache)."""
        self.check_model(request.model)
        cacheable = self._cacheable(request)
        cached = await self._lookup(cacheable)
        if cached is not None:
            return _from_cache(cached)
        prepared = self._prepare(request, request_id)
        accumulator = Accumulator(len(prepared), request.n)
        async for delta in self._deltas(prepared):
            accumulator.add(delta)
        generation = accumulator.generation()
        await self._store(cacheable, generation)
        return generation

    async def stream(
        self, request: Request, request_id: str
    ) -> tuple[bool, AsyncIterator[ChoiceDelta]]:
        """(cache hit, the choices' deltas). Waits for the first delta before returning, so
        that a request rejected by the batcher raises here, before any response has begun."""
        self.check_model(request.model)
        cacheable = self._cacheable(request)
        cached = await self._lookup(cacheable)
        if cached is not None:
            return True, _replay(cached)
        prepared = self._prepare(request, request_id)
        deltas = self._deltas(prepared)
        if cacheable is not None:
            deltas = self._stored_when_complete(cacheable, deltas, len(prepared), request.n)
        try:
            first = await anext(deltas)
        except StopAsyncIteration:
            raise ApiError(500, f"empty response (request id {request_id})") from None
        return False, _prepend(first, deltas)

    async def _stored_when_complete(
        self,
        cacheable: dict[str, Any],
        deltas: AsyncIterator[ChoiceDelta],
        num_choices: int,
        n: int,
    ) -> AsyncIterator[ChoiceDelta]:
        """Pass a stream through and cache it once every choice has finished."""
        accumulator = Accumulator(num_choices, n)
        async for delta in deltas:
            accumulator.add(delta)
            yield delta
        await self._store(cacheable, accumulator.generation())

    def _prepare(self, request: Request, request_id: str) -> list[PreparedRequest]:
        """One prepared request per prompt and choice; choice i samples with seed + i."""
        fit_to_context = False
        if isinstance(request, CompletionRequest):
            params = request.to_sampling_params()
            sources: list[dict[str, Any]] = [{"prompt": p} for p in request.prompts]
        else:
            params = request.to_sampling_params(self.default_max_tokens)
            fit_to_context = request.max_completion_tokens is None and request.max_tokens is None
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
                        fit_to_context=fit_to_context,
                        **source,
                    )
                )
        return prepared

    async def _lookup(self, cacheable: dict[str, Any] | None) -> CachedResponse | None:
        """A cached answer of the version now being served, if there is one."""
        if cacheable is None:
            return None
        cached = await self.cache.lookup(cacheable)
        counter = self.metrics.cache_misses if cached is None else self.metrics.cache_hits
        counter.inc()
        return cached

    async def _store(self, cacheable: dict[str, Any] | None, generation: Generation) -> None:
        """Cache a complete answer under the version that generated it, never another."""
        complete = all(c.finish_reason for c in generation.choices)
        if cacheable is None or not complete or generation.model_version is None:
            return
        await self.cache.store(generation.model_version, cacheable, _to_cache(generation))

    async def _deltas(self, prepared: list[PreparedRequest]) -> AsyncIterator[ChoiceDelta]:
        """Every choice's chunks as they come, merged and timed; an error chunk raises
        ``ApiError``."""
        started = time.perf_counter()
        timer = _StreamTimer(self.metrics, started)
        streams = [self.batcher.options(stream=True).generate.remote(p) for p in prepared]
        async for index, chunk in _merge(streams):
            if chunk.error is not None:
                raise ApiError.from_request_error(chunk.error)
            timer.observe(index, chunk)
            yield ChoiceDelta(index, chunk)

    def _cacheable(self, request: Request) -> dict[str, Any] | None:
        """What identifies a deterministic request (prompt and every sampling parameter);
        None for requests never cached: sampled without a seed, or asking for logprobs."""
        if not is_cacheable(request.temperature, request.seed) or request.logprobs:
            return None
        payload = request.model_dump(exclude={"stream", "stream_options", "user"})
        return {"kind": type(request).__name__, **payload}


class _StreamTimer:
    """Records a request's latency and token series as its chunks arrive."""

    def __init__(self, metrics: RequestMetrics, started: float) -> None:
        self.metrics = metrics
        self.started = started
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


async def _prepend(
    first: ChoiceDelta, rest: AsyncIterator[ChoiceDelta]
) -> AsyncIterator[ChoiceDelta]:
    yield first
    async for delta in rest:
        yield delta


async def _replay(cached: CachedResponse) -> AsyncIterator[ChoiceDelta]:
    """A cached response as one final chunk per choice."""
    completion_tokens = 0
    for index, choice in enumerate(cached.choices):
        completion_tokens += len(choice.token_ids)
        yield ChoiceDelta(
            index,
            TextChunk(
                request_id="cached",
                text=choice.text,
                token_ids=list(choice.token_ids),
                finish_reason=choice.finish_reason,
                prompt_tokens=cached.prompt_tokens,
                completion_tokens=len(choice.token_ids),
            ),
        )


def _to_cache(generation: Generation) -> CachedResponse:
    return CachedResponse(
        choices=[
            CachedChoice(c.text, c.finish_reason or "stop", list(c.token_ids))
            for c in generation.choices
        ],
        prompt_tokens=generation.prompt_tokens,
        completion_tokens=generation.completion_tokens,
    )


def _from_cache(cached: CachedResponse) -> Generation:
    choices = [ChoiceResult(c.text, list(c.token_ids), [], c.finish_reason) for c in cached.choices]
    return Generation(choices, cached.prompt_tokens, cached.completion_tokens, cache_hit=True)


# Rendering: engine results -> OpenAI response objects.


def completion_response(request_id: str, model: str, generation: Generation) -> CompletionResponse:
    """A finished ``text_completion``."""
    return CompletionResponse(
        id=request_id,
        model=model,
        choices=[
            CompletionChoice(
                index=i,
                text=c.text,
                logprobs=_completion_logprobs(c.logprobs) if c.logprobs else None,
                finish_reason=c.finish_reason,
            )
            for i, c in enumerate(generation.choices)
        ],
        usage=generation.usage,
    )


def chat_response(request_id: str, model: str, generation: Generation) -> ChatCompletionResponse:
    """A finished ``chat.completion``."""
    return ChatCompletionResponse(
        id=request_id,
        model=model,
        choices=[
            ChatChoice(
                index=i,
                message=ChatResponseMessage(content=c.text),
                logprobs=_chat_logprobs(c.logprobs) if c.logprobs else None,
                finish_reason=c.finish_reason,
            )
            for i, c in enumerate(generation.choices)
        ],
        usage=generation.usage,
    )


def completion_chunk(request_id: str, model: str, delta: ChoiceDelta) -> CompletionResponse:
    """One streamed ``text_completion`` chunk."""
    chunk = delta.chunk
    choice = CompletionChoice(
        index=delta.index,
        text=chunk.text,
        logprobs=_completion_logprobs(chunk.logprobs) if chunk.logprobs else None,
        finish_reason=chunk.finish_reason,
    )
    return CompletionResponse(id=request_id, model=model, choices=[choice])


def chat_chunk(request_id: str, model: str, delta: ChoiceDelta) -> ChatCompletionChunk:
    """One streamed ``chat.completion.chunk``."""
    chunk = delta.chunk
    choice = ChatChunkChoice(
        index=delta.index,
        delta=ChatDelta(content=chunk.text),
        logprobs=_chat_logprobs(chunk.logprobs) if chunk.logprobs else None,
        finish_reason=chunk.finish_reason,
    )
    return ChatCompletionChunk(id=request_id, model=model, choices=[choice])


def chat_role_chunk(request_id: str, model: str, n: int) -> ChatCompletionChunk:
    """The first chat chunk of each choice: the assistant role, no content yet."""
    choices = [
        ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content="")) for i in range(n)
    ]
    return ChatCompletionChunk(id=request_id, model=model, choices=choices)


def _completion_logprobs(tokens: list[TokenText]) -> CompletionLogprobs:
    offsets, position = [], 0
    for token in tokens:
        offsets.append(position)
        position += len(token.text)
    return CompletionLogprobs(
        tokens=[t.text for t in tokens],
        token_logprobs=[t.logprob for t in tokens],
        top_logprobs=[dict(t.top) for t in tokens],
        text_offset=offsets,
    )


def _chat_logprobs(tokens: list[TokenText]) -> ChatLogprobs:
    def utf8(text: str) -> list[int]:
        return list(text.encode("utf-8"))

    return ChatLogprobs(
        content=[
            ChatTokenLogprob(
                token=t.text,
                logprob=t.logprob,
                bytes=utf8(t.text),
                top_logprobs=[TopLogprob(token=s, logprob=lp, bytes=utf8(s)) for s, lp in t.top],
            )
            for t in tokens
        ]
    )


# Streams: deltas -> OpenAI and native chunks. Each takes the request's Accumulator so the
# caller can read the usage once the stream is over.


async def completion_chunks(
    body: CompletionRequest, deltas: AsyncIterator[ChoiceDelta], accumulator: Accumulator
) -> AsyncIterator[CompletionResponse]:
    """``text_completion`` chunks, then a usage chunk when ``stream_options`` asks."""
    response_id = new_id("cmpl")
    async for delta in deltas:
        accumulator.add(delta)
        yield completion_chunk(response_id, body.model, delta)
    if body.include_usage:
        usage = accumulator.generation().usage
        yield CompletionResponse(id=response_id, model=body.model, choices=[], usage=usage)


async def chat_chunks(
    body: ChatCompletionRequest, deltas: AsyncIterator[ChoiceDelta], accumulator: Accumulator
) -> AsyncIterator[ChatCompletionChunk]:
    """The assistant role first, then content chunks, then usage when asked."""
    response_id = new_id("chatcmpl")
    yield chat_role_chunk(response_id, body.model, body.n)
    async for delta in deltas:
        accumulator.add(delta)
        yield chat_chunk(response_id, body.model, delta)
    if body.include_usage:
        usage = accumulator.generation().usage
        yield ChatCompletionChunk(id=response_id, model=body.model, choices=[], usage=usage)


async def infer_chunks(
    deltas: AsyncIterator[ChoiceDelta], accumulator: Accumulator
) -> AsyncIterator[StreamInferChunk]:
    """``/v1/stream_infer`` chunks; the last one carries the usage."""
    async for delta in deltas:
        accumulator.add(delta)
        chunk = delta.chunk
        usage = accumulator.generation().usage if chunk.finish_reason else None
        yield StreamInferChunk(
            text=chunk.text, tokens=chunk.token_ids, finish_reason=chunk.finish_reason, usage=usage
        )
