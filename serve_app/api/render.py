"""Rendering: finished requests and streamed deltas -> OpenAI and native response objects."""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel

from serve_app.api import tool_calls
from serve_app.api.errors import ApiError
from serve_app.api.native import Health, InferResponse, ModelInfo
from serve_app.api.openai import ChatCompletionRequest, CompletionRequest
from serve_app.api.openai_responses import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatResponseMessage,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    FunctionCall,
    FunctionCallDelta,
    PromptLogprob,
    ToolCall,
    ToolCallDelta,
    TopLogprob,
    Usage,
    new_id,
)
from serve_app.api.tool_calls import ToolCallFormat, ToolCallStream
from serve_app.circuit_breaker import CircuitState
from serve_app.messages import ModelDescription, PromptToken, TokenText
from serve_app.results import Accumulator, ChoiceDelta, ChoiceResult, CompletionResult

ChunkRenderer = Callable[[Any, AsyncIterator[ChoiceDelta], Accumulator], AsyncIterator[BaseModel]]
"""Renders a request's deltas as the chunks of one API (the request, deltas, accumulator)."""


def completion_response(
    request_id: str, model: str, result: CompletionResult
) -> CompletionResponse:
    """A finished ``text_completion``."""
    return CompletionResponse(
        id=request_id,
        model=model,
        choices=[
            CompletionChoice(
                index=i,
                text=(c.echo or "") + c.text,
                logprobs=(
                    _completion_logprobs(c.logprobs, prompt=c.echo_logprobs or [])
                    if c.logprobs or c.echo_logprobs
                    else None
                ),
                finish_reason=c.finish_reason,
                prompt_logprobs=_prompt_logprobs(c.prompt_logprobs),
            )
            for i, c in enumerate(result.choices)
        ],
        usage=result.usage,
    )


def chat_response(
    request_id: str,
    model: str,
    result: CompletionResult,
    tool_format: ToolCallFormat | None = None,
) -> ChatCompletionResponse:
    """A finished ``chat.completion``; with ``tool_format``, the tool calls in each choice's
    text become its message's ``tool_calls`` (a cached answer's too: the cache keeps text)."""
    return ChatCompletionResponse(
        id=request_id,
        model=model,
        choices=[_chat_choice(i, c, tool_format) for i, c in enumerate(result.choices)],
        usage=result.usage,
    )


def _chat_choice(
    index: int, choice: ChoiceResult, tool_format: ToolCallFormat | None
) -> ChatChoice:
    message = ChatResponseMessage(content=choice.text)
    finish_reason = choice.finish_reason
    extracted = tool_format.extract(choice.text) if tool_format is not None else None
    if extracted is not None and extracted.calls:
        calls = [
            ToolCall(
                id=tool_calls.new_call_id(),
                function=FunctionCall(name=c.name, arguments=c.arguments),
            )
            for c in extracted.calls
        ]
        message = ChatResponseMessage(content=extracted.content, tool_calls=calls)
        finish_reason = tool_calls.finish_reason(finish_reason, has_calls=True)
    return ChatChoice(
        index=index,
        message=message,
        logprobs=_chat_logprobs(choice.logprobs) if choice.logprobs else None,
        finish_reason=finish_reason,
    )


def completion_chunk(
    request_id: str,
    model: str,
    delta: ChoiceDelta,
    text_offset: int = 0,
    prompt: ChoiceResult | None = None,
) -> CompletionResponse:
    """One streamed ``text_completion`` chunk; its logprobs' offsets start at ``text_offset``
    (the length of the choice's tokens' text before it). ``prompt``, on a choice's first chunk,
    carries what it echoes and its prompt logprobs."""
    chunk = delta.chunk
    echoed = (prompt.echo_logprobs if prompt else None) or []
    logprobs = (
        _completion_logprobs(chunk.logprobs or [], text_offset, echoed)
        if chunk.logprobs or echoed
        else None
    )
    choice = CompletionChoice(
        index=delta.index,
        text=((prompt.echo if prompt else None) or "") + chunk.text,
        logprobs=logprobs,
        finish_reason=chunk.finish_reason,
        prompt_logprobs=_prompt_logprobs(prompt.prompt_logprobs if prompt else None),
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


class _ToolCallChunks:
    """Chat chunks of a stream whose text holds tool calls: each choice's text goes through
    its own reader, which may hold text back (a call being written); a chunk that lets
    nothing out is not sent."""

    def __init__(self, tool_format: ToolCallFormat) -> None:
        self._format = tool_format
        self._readers: dict[int, ToolCallStream] = {}
        self._called: set[int] = set()  # choices that made a call

    def chunk(self, request_id: str, model: str, delta: ChoiceDelta) -> ChatCompletionChunk | None:
        """The chunk of ``delta``, or None when it lets nothing out yet."""
        chunk = delta.chunk
        reader = self._readers.setdefault(delta.index, self._format.stream())
        pieces = reader.feed(chunk.text)
        if chunk.finish_reason is not None:
            pieces.extend(reader.end())
        if pieces.calls:
            self._called.add(delta.index)
        finish_reason = tool_calls.finish_reason(chunk.finish_reason, delta.index in self._called)
        if not (pieces.content or pieces.calls or chunk.logprobs or finish_reason):
            return None
        calls = [
            ToolCallDelta(
                index=piece.index,
                id=tool_calls.new_call_id() if piece.name is not None else None,
                type="function" if piece.name is not None else None,
                function=FunctionCallDelta(name=piece.name, arguments=piece.arguments),
            )
            for piece in pieces.calls
        ]
        choice = ChatChunkChoice(
            index=delta.index,
            delta=ChatDelta(content=pieces.content or None, tool_calls=calls or None),
            logprobs=_chat_logprobs(chunk.logprobs) if chunk.logprobs else None,
            finish_reason=finish_reason,
        )
        return ChatCompletionChunk(id=request_id, model=model, choices=[choice])


def chat_role_chunk(request_id: str, model: str, n: int) -> ChatCompletionChunk:
    """The first chat chunk of each choice: the assistant role, no content yet."""
    choices = [
        ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content="")) for i in range(n)
    ]
    return ChatCompletionChunk(id=request_id, model=model, choices=choices)


def _completion_logprobs(
    tokens: list[TokenText], start: int = 0, prompt: Sequence[PromptToken] = ()
) -> CompletionLogprobs:
    """Legacy logprobs of the ``prompt`` tokens (echoed; the first has none), then of the
    generated ``tokens``; offsets count each token's text from ``start``, as vLLM's do. A
    prompt position's alternatives include the prompt token itself, as OpenAI's and vLLM's do.
    """
    texts = [t.text for t in prompt] + [t.text for t in tokens]
    offsets = list(itertools.accumulate((len(t) for t in texts[:-1]), initial=start))
    prompt_tops: list[dict[str, float] | None] = [
        None if t.logprob is None else {**{s: lp for _, s, lp in t.top}, t.text: t.logprob}
        for t in prompt
    ]
    return CompletionLogprobs(
        tokens=texts,
        token_logprobs=[t.logprob for t in prompt] + [t.logprob for t in tokens],
        top_logprobs=prompt_tops + [dict(t.top) for t in tokens],
        text_offset=offsets if texts else [],
    )


def _prompt_logprobs(
    tokens: list[PromptToken] | None,
) -> list[dict[str, PromptLogprob] | None] | None:
    """vLLM's ``prompt_logprobs``: per position the prompt token and its top alternatives by
    token id (an alternative's rank is its place among them); None for the first token."""
    if tokens is None:
        return None
    positions: list[dict[str, PromptLogprob] | None] = [None]
    for t in tokens[1:]:
        assert t.logprob is not None  # only the first prompt token has none
        records = {
            str(token_id): PromptLogprob(logprob=lp, rank=rank, decoded_token=text)
            for rank, (token_id, text, lp) in enumerate(t.top, start=1)
        }
        records[str(t.token_id)] = PromptLogprob(
            logprob=t.logprob, rank=t.rank, decoded_token=t.text
        )
        positions.append(records)
    return positions


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
    """``text_completion`` chunks (each with the usage so far when ``stream_options`` asks for
    ``continuous_usage_stats``), then a usage chunk when it asks for ``include_usage``."""
    response_id = new_id("cmpl")
    started: set[int] = set()
    async for delta in deltas:
        choice = accumulator.choices[delta.index]
        texts = [t.text for t in choice.echo_logprobs or []] + [t.text for t in choice.logprobs]
        offset = sum(len(text) for text in texts)
        accumulator.add(delta)
        first = delta.index not in started  # it echoes the prompt, with the prompt's logprobs
        started.add(delta.index)
        chunk = completion_chunk(response_id, body.model, delta, offset, choice if first else None)
        if body.continuous_usage:
            chunk.usage = accumulator.result().usage
        yield chunk
    if body.include_usage:
        usage = accumulator.result().usage
        yield CompletionResponse(id=response_id, model=body.model, choices=[], usage=usage)


async def chat_chunks(
    body: ChatCompletionRequest,
    deltas: AsyncIterator[ChoiceDelta],
    accumulator: Accumulator,
    tool_format: ToolCallFormat | None = None,
) -> AsyncIterator[ChatCompletionChunk]:
    """The assistant role first, then content chunks, then usage when asked; with
    ``continuous_usage_stats`` every chunk carries the usage so far, as vLLM's do. With
    ``tool_format``, tool calls in the text stream as ``delta.tool_calls`` like OpenAI's."""
    response_id = new_id("chatcmpl")
    tool_chunks = _ToolCallChunks(tool_format) if tool_format is not None else None
    role_sent = False
    async for delta in deltas:
        if not role_sent:
            # Sent with the first delta (already there when a stream begins), which knows the
            # prompt's length for the role chunk's usage.
            yield _role_chunk(body, response_id, delta.chunk.prompt_tokens)
            role_sent = True
        accumulator.add(delta)
        if tool_chunks is None:
            chunk = chat_chunk(response_id, body.model, delta)
        else:
            tool_chunk = tool_chunks.chunk(response_id, body.model, delta)
            if tool_chunk is None:
                continue
            chunk = tool_chunk
        if body.continuous_usage:
            chunk.usage = accumulator.result().usage
        yield chunk
    if not role_sent:
        yield _role_chunk(body, response_id, 0)
    if body.include_usage:
        usage = accumulator.result().usage
        yield ChatCompletionChunk(id=response_id, model=body.model, choices=[], usage=usage)


def _role_chunk(
    body: ChatCompletionRequest, response_id: str, prompt_tokens: int
) -> ChatCompletionChunk:
    chunk = chat_role_chunk(response_id, body.model, body.n)
    if body.continuous_usage:
        chunk.usage = Usage(
            prompt_tokens=prompt_tokens, completion_tokens=0, total_tokens=prompt_tokens
        )
    return chunk


async def infer_chunks(
    deltas: AsyncIterator[ChoiceDelta], accumulator: Accumulator, started: float
) -> AsyncIterator[InferResponse]:
    """``/v1/stream_infer`` events: each an ``InferenceResponse`` whose text and tokens are the
    delta and whose usage is the request's so far; the last one carries the finish reason.
    (A failure after the stream began is ``infer_failure``'s event.)"""
    async for delta in deltas:
        accumulator.add(delta)
        chunk = delta.chunk
        yield InferResponse(
            text=chunk.text,
            tokens=len(chunk.token_ids),
            latency=time.perf_counter() - started,
            usage=accumulator.result().usage,
            finish_reason=chunk.finish_reason or "",
            token_ids=chunk.token_ids,
        )


def infer_response(result: CompletionResult, latency_s: float) -> InferResponse:
    """A finished ``/v1/infer`` answer (its only choice)."""
    choice = result.choices[0]
    return InferResponse(
        text=choice.text,
        tokens=len(choice.token_ids),
        latency=latency_s,
        usage=result.usage,
        finish_reason=choice.finish_reason or "",
        token_ids=choice.token_ids,
    )


def infer_failure(error: ApiError, latency_s: float) -> InferResponse:
    """A failed ``/v1/batch_infer`` item, or the last event of a ``/v1/stream_infer`` that
    failed after it began: the seed's ``error`` string, with the status it would have had."""
    return InferResponse.failed(error.status, error.body().error, latency_s=latency_s)


def model_info(name: str, description: ModelDescription) -> ModelInfo:
    """``/v1/model_info`` for the model a replica described."""
    return ModelInfo(
        name=name,
        version=description.version,
        type=description.type,
        parameters=description.parameters,
        max_tokens=description.context_length,
        created_at=datetime.fromtimestamp(description.loaded_at, UTC),
        backend=description.backend,
        context_length=description.context_length,
    )


def health(stats: dict[str, float] | None, circuits: dict[str, str] | None = None) -> Health:
    """``/health``: ok with the model replica's ``stats``; unavailable when none answered or
    a model's circuit breaker (``circuits``, by model) is open."""
    now = datetime.now(UTC)
    circuits = circuits or {}
    ok = stats is not None and CircuitState.OPEN.label not in circuits.values()
    status = "ok" if ok else "unavailable"
    return Health(status=status, time=now, circuit_breakers=circuits, **(stats or {}))
