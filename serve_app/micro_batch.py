"""One micro-batch while it runs: its requests' prompts, text streams and pending chunks.

The batcher renders and tokenizes a micro-batch in one call, sends it to a model replica as one
streaming call, and folds each step message back into per-request text (incremental
detokenization, stop strings), holding tokens back under load so that a stream sends what
accumulated instead of one message per token.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from serve_app.engine import FinishReason, GenerationRequest, SequenceOutput
from serve_app.messages import (
    ModelStep,
    PreparedRequest,
    PromptToken,
    RequestError,
    TextChunk,
    TokenText,
)
from serve_app.text.chat_template import ChatTemplate
from serve_app.text.detokenizer import IncrementalDetokenizer, StopStringMatcher
from serve_app.text.tokenizer import Tokenizer

StreamItem = TextChunk | type[StopIteration]


@dataclass
class _Tracked:
    """Per-request state while its micro-batch runs."""

    request: PreparedRequest
    prompt_ids: list[int] = field(default_factory=list)
    detokenizer: IncrementalDetokenizer | None = None
    stops: StopStringMatcher | None = None
    pending: TextChunk | None = None
    model_version: str | None = None
    sent_at: float | None = None  # when its last chunk with tokens went out
    done: bool = False  # its final chunk has been produced
    closed: bool = False  # StopIteration has been sent

    @property
    def request_id(self) -> str:
        return self.request.request_id

    def fail(self, error: RequestError) -> None:
        """End the request with ``error`` as its only remaining chunk."""
        self.pending, self.done = TextChunk(self.request_id, error=error), True


class MicroBatch:
    """The requests of one micro-batch, from tokenization to their last chunk."""

    def __init__(
        self, requests: list[PreparedRequest], tokenizer: Tokenizer, template: ChatTemplate
    ) -> None:
        self._tokenizer = tokenizer
        self.tracked = [_Tracked(r) for r in requests]
        self._by_id = {t.request_id: t for t in self.tracked}
        self.runnable = self._tokenize(template)
        self.stopped: list[str] = []  # ended by a stop string; the engine need not go on

    @property
    def request_ids(self) -> list[str]:
        """Every request of the micro-batch."""
        return list(self._by_id)

    def trace_contexts(self) -> dict[str, dict[str, str]]:
        """The trace context of each runnable request that has one, by request id."""
        contexts = {
            r.request_id: self._by_id[r.request_id].request.trace_context for r in self.runnable
        }
        return {request_id: context for request_id, context in contexts.items() if context}

    def _tokenize(self, template: ChatTemplate) -> list[GenerationRequest]:
        """Render and tokenize every prompt in one call; the engine judges whether they fit."""
        texts = []
        for t in self.tracked:
            try:
                texts.append(_prompt_text(t.request, template))
            except ValueError as exc:  # the chat template rejected the messages
                t.fail(RequestError(400, str(exc), param="messages"))
                texts.append("")
        runnable = []
        for t, ids in zip(self.tracked, self._tokenizer.encode_batch(texts), strict=True):
            if t.done:
                continue
            if t.request.prompt_token_ids is not None:
                ids = list(t.request.prompt_token_ids)
            t.prompt_ids = ids
            options = t.request.text
            t.detokenizer = IncrementalDetokenizer(
                self._tokenizer, ids, options.skip_special_tokens
            )
            t.stops = StopStringMatcher(t.request.stop, options.include_stop_str_in_output)
            t.pending = TextChunk(t.request_id, prompt_tokens=len(ids))
            runnable.append(GenerationRequest(t.request_id, ids, t.request.params))
        return runnable

    def on_step(self, step: ModelStep) -> None:
        """Fold one step message (rejections, the serving version, new tokens) into the streams."""
        if step.model_version is not None:
            for t in self.tracked:
                t.model_version = step.model_version
        for request_id, rejected in step.rejected.items():
            self._by_id[request_id].fail(
                RequestError(
                    rejected.status, rejected.message, param=rejected.param, code=rejected.code
                )
            )
        for output in step.outputs:
            self._on_output(self._by_id[output.request_id], output)

    def _on_output(self, t: _Tracked, output: SequenceOutput) -> None:
        """Fold one step's tokens into the request's pending chunk."""
        if t.done:
            return  # stopped by a stop string; the engine's remaining tokens are dropped
        assert t.detokenizer is not None and t.stops is not None
        finished = output.finish_reason is not None
        delta = t.detokenizer.add(self._text_token_ids(t.request, output))
        if finished:
            delta += t.detokenizer.flush()
        text, stopped = t.stops.feed(delta)
        if finished and not stopped:
            text += t.stops.flush()
        chunk = TextChunk(
            t.request_id,
            text=text,
            token_ids=list(output.new_token_ids),
            logprobs=self._token_texts(output) if output.logprobs is not None else None,
            finish_reason="stop" if stopped else _finish_reason(output),
            prompt_tokens=len(t.prompt_ids),
            completion_tokens=output.num_output_tokens,
            model_version=t.model_version if finished or stopped else None,
            prompt_logprobs=self._prompt_tokens(t.prompt_ids, output),
        )
        if t.pending is None:
            t.pending = chunk
        else:
            t.pending.merge(chunk)
        if stopped and not finished:
            self.stopped.append(t.request_id)
        t.done = stopped or finished

    def _text_token_ids(self, request: PreparedRequest, output: SequenceOutput) -> tuple[int, ...]:
        """The new tokens that become text: the stop token (a special one such as
        end-of-sequence, or one of ``stop_token_ids``) that ended a sequence has none unless
        the request asks, as in vLLM."""
        ids = output.new_token_ids
        if (
            output.finish_reason is FinishReason.STOP
            and ids
            and not request.text.include_stop_str_in_output
            and (ids[-1] in request.params.stop_token_ids or self._tokenizer.is_special(ids[-1]))
        ):
            return ids[:-1]
        return ids

    def _token_texts(self, output: SequenceOutput) -> list[TokenText]:
        decode = self._tokenizer.decode_token
        return [
            TokenText(decode(r.token_id), r.logprob, [(decode(t), lp) for t, lp in r.top])
            for r in output.logprobs or ()
        ]

    def _prompt_tokens(
        self, prompt_ids: list[int], output: SequenceOutput
    ) -> list[PromptToken] | None:
        if output.prompt_logprobs is None:
            return None
        decode = self._tokenizer.decode_token
        tokens = [PromptToken(prompt_ids[0], decode(prompt_ids[0]), None, None, [])]
        for r in output.prompt_logprobs[1:]:
            assert r is not None  # only the first prompt token has no record
            top = [(t, decode(t), lp) for t, lp in r.top]
            tokens.append(PromptToken(r.token_id, decode(r.token_id), r.logprob, r.rank, top))
        return tokens

    def end(self, request_ids: list[str]) -> None:
        """Their callers went away or a stop string ended them: nothing more is sent."""
        for request_id in request_ids:
            self._by_id[request_id].done = True

    def fail_unfinished(self, error: RequestError) -> None:
        """Every request still generating ends with ``error``; none is left hanging."""
        for t in self.tracked:
            if not t.done:
                t.fail(error)

    def collect(self, interval_s: float = 0.0) -> list[StreamItem]:
        """One item per request for ``@serve.batch``: its pending chunk, an empty placeholder
        while it holds tokens back (less than ``interval_s`` since its last chunk), or its end.

        Each chunk costs a message on every hop to the client, so under load a stream sends
        what accumulated at most every ``interval_s`` instead of one message per token.
        """
        now = time.monotonic()
        items: list[StreamItem] = []
        for t in self.tracked:
            if t.closed or (t.done and t.pending is None):
                t.closed = True
                items.append(StopIteration)
                continue
            pending = t.pending
            hold = (
                pending is not None
                and not t.done
                and t.sent_at is not None
                and now - t.sent_at < interval_s
            )
            if pending is None or hold:
                items.append(TextChunk(t.request_id))
                continue
            if pending.token_ids:
                t.sent_at = now
            items.append(pending)
            t.pending = None
        return items


def _prompt_text(request: PreparedRequest, template: ChatTemplate) -> str:
    if request.messages is not None:
        options = request.text
        return template.render(
            request.messages,
            options.add_generation_prompt,
            options.chat_template_kwargs,
            tools=options.tools,
        )
    return request.prompt or ""  # empty for a tokenized prompt: its ids are used as they are


def _finish_reason(output: SequenceOutput) -> str | None:
    return None if output.finish_reason is None else output.finish_reason.value


class ModelStreamCancelled(Exception):
    """The model replica's stream was cancelled under us (e.g. the replica was stopped)."""


class NoModelReplica(Exception):
    """No model replica took the micro-batch in time: none is alive, or every one is full."""


async def coalesced_steps(
    start: Callable[[], Any], first_step_timeout_s: float | None = None
) -> AsyncIterator[list[ModelStep]]:
    """Yield every step message that arrived since the last yield, so a slow consumer
    catches up in one pass instead of falling further behind.

    A replica answers a micro-batch at once with its first message, so none within
    ``first_step_timeout_s`` raises ``NoModelReplica`` instead of waiting for one forever.
    """
    queue: asyncio.Queue[ModelStep | BaseException | None] = asyncio.Queue()
    stream = start()

    async def pump() -> None:
        try:
            async for step in stream:
                queue.put_nowait(step)
            queue.put_nowait(None)
        except asyncio.CancelledError:
            queue.put_nowait(ModelStreamCancelled("the model stream was cancelled"))
        except Exception as exc:  # handed to the consumer, which re-raises it
            queue.put_nowait(exc)

    # The reader shares the stream's own context, not the request that started the batch.
    reader = contextvars.Context().run(asyncio.ensure_future, pump())
    try:
        try:
            first = await asyncio.wait_for(queue.get(), first_step_timeout_s)
        except asyncio.TimeoutError:  # not yet the builtin TimeoutError on Python 3.10
            raise NoModelReplica(
                f"no model replica took the request within {first_step_timeout_s:g} s"
            ) from None
        items = [first]
        while True:
            while not queue.empty():
                items.append(queue.get_nowait())
            steps = [i for i in items if isinstance(i, ModelStep)]
            if steps:
                yield steps
            for item in items:
                if isinstance(item, BaseException):
                    raise item
                if item is None:
                    return
            items = [await queue.get()]
    finally:
        reader.cancel()
        stream.cancel()  # a no-op once it has ended
