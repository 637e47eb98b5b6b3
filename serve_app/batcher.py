"""The ``Batcher`` deployment: micro-batches requests with ``@serve.batch``, tokenizes them in one
call, sends each micro-batch to a model replica as ONE streaming call, and turns the per-step
token messages back into per-request text streams (incremental detokenization, stop strings).
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_app.detokenizer import IncrementalDetokenizer, StopStringMatcher
from serve_app.engine import GenerationRequest, ModelConfig, SequenceOutput
from serve_app.generation import (
    ModelStep,
    PreparedRequest,
    RequestError,
    TextChunk,
    TokenText,
)
from serve_app.tokenizer import Tokenizer

logger = logging.getLogger("ray.serve")

ABORT_TIMEOUT_S = 5.0
MAX_MICRO_BATCHES = 256  # in flight at once per batcher replica
StreamItem = TextChunk | type[StopIteration]


class BatcherConfig(BaseModel):
    """Live-tunable micro-batching (``user_config`` of the Batcher deployment)."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(default=32, ge=1, description="Most requests in one micro-batch.")
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


@dataclass
class _Tracked:
    """Per-request state while its micro-batch runs."""

    request: PreparedRequest
    prompt_token_ids: list[int] = field(default_factory=list)
    detokenizer: IncrementalDetokenizer | None = None
    stops: StopStringMatcher | None = None
    pending: TextChunk | None = None
    model_version: str | None = None
    sent_at: float | None = None  # when its last chunk with tokens went out
    done: bool = False  # its final chunk has been produced
    closed: bool = False  # StopIteration has been sent


@serve.deployment(max_ongoing_requests=1024)
class Batcher:
    """Tokenizes, micro-batches and detokenizes; never runs the model itself."""

    def __init__(self, model: DeploymentHandle, model_dir: str) -> None:
        self.model = model
        self.tokenizer = Tokenizer(Path(model_dir))
        self.context_length = ModelConfig.from_dir(Path(model_dir)).context_length
        self.settings = BatcherConfig()
        self._cancelled: set[str] = set()
        self._background: set[asyncio.Task[Any]] = set()
        self._active_streams = 0  # requests of this replica's micro-batches still generating

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Apply a new ``user_config`` without restarting the replica."""
        self.settings = BatcherConfig.model_validate(config)
        batch: Any = self._micro_batch  # type: ignore[misc]
        batch.set_max_batch_size(self.settings.max_batch_size)
        batch.set_batch_wait_timeout_s(self.settings.batch_wait_timeout_s)

    async def generate(self, request: PreparedRequest) -> AsyncIterator[TextChunk]:
        """Stream one request's text; if the caller goes away, its sequence is aborted."""
        finished = False
        try:
            async for chunk in self._micro_batch(request):  # type: ignore[misc, call-arg]
                if chunk is StopIteration:
                    continue
                assert isinstance(chunk, TextChunk)
                finished = chunk.finish_reason is not None or chunk.error is not None
                if chunk.text or chunk.token_ids or finished:
                    yield chunk
        finally:
            if not finished:
                self._cancelled.add(request.request_id)

    # serve.batch's type hints cover neither async generators nor its setters: hence the ignores.
    # Micro-batches must run side by side: each streams until its longest request ends, and
    # the engine batches across them continuously.
    @serve.batch(  # type: ignore[arg-type]
        max_batch_size=32, batch_wait_timeout_s=0.005, max_concurrent_batches=MAX_MICRO_BATCHES
    )
    async def _micro_batch(  # type: ignore[misc]
        self, requests: list[PreparedRequest]
    ) -> AsyncIterator[list[StreamItem]]:
        tracked = [_Tracked(r) for r in requests]
        by_id = {t.request.request_id: t for t in tracked}
        runnable = self._tokenize(tracked)
        yield _collect(tracked)
        if not runnable:
            return
        replica_id: str | None = None
        self._active_streams += len(runnable)
        try:
            async for steps in _coalesced(lambda: self._stream_micro_batch(runnable)):
                for step in steps:
                    replica_id = step.replica_id or replica_id
                    self._on_step(step, by_id)
                self._abort_cancelled(tracked, replica_id)
                interval = self.settings.stream_interval_s(self._active_streams)
                yield _collect(tracked, interval)
        except (Exception, ModelStreamCancelled) as exc:  # tell every caller, never hang
            logger.warning("micro-batch stream failed: %r", exc)
            error = RequestError(503, "the model replica failed; retry the request")
            for t in tracked:
                if not t.done:
                    t.pending, t.done = TextChunk(t.request.request_id, error=error), True
            yield _collect(tracked)
        finally:
            self._active_streams -= len(runnable)
            self._cancelled.difference_update(by_id)

    def _stream_micro_batch(self, runnable: list[GenerationRequest]) -> Any:
        """The ONE streaming call that carries a micro-batch to a model replica.

        It runs in a context of its own: made inside the first request's context, Serve would
        treat it as that request's child and cancel it (and every other request of the
        micro-batch) when that one caller goes away. Callers leave through targeted aborts.
        """
        return contextvars.Context().run(
            self.model.options(stream=True).generate_batch.remote, runnable
        )

    def _tokenize(self, tracked: list[_Tracked]) -> list[GenerationRequest]:
        """Render and tokenize the whole micro-batch in one call; reject prompts too long."""
        texts = []
        for t in tracked:
            try:
                texts.append(self._prompt_text(t.request))
            except ValueError as exc:  # the chat template rejected the messages
                t.pending = TextChunk(t.request.request_id, error=RequestError(400, str(exc)))
                t.done = True
                texts.append("")
        runnable = []
        for t, ids in zip(tracked, self.tokenizer.encode_batch(texts), strict=True):
            request_id = t.request.request_id
            if t.done:
                continue
            if not ids or len(ids) >= self.context_length:
                problem = "is empty" if not ids else f"has {len(ids)} tokens"
                message = (
                    f"the prompt {problem}; this model's context length is "
                    f"{self.context_length} tokens, including at least one generated token"
                )
                t.pending = TextChunk(request_id, error=RequestError(400, message, param="prompt"))
                t.done = True
                continue
            params = t.request.params
            room = self.context_length - len(ids)
            if params.max_tokens > room:
                if not t.request.fit_to_context:
                    message = (
                        f"max_tokens ({params.max_tokens}) plus the prompt ({len(ids)} tokens) "
                        f"exceeds this model's context length of {self.context_length} tokens"
                    )
                    error = RequestError(400, message, param="max_tokens")
                    t.pending, t.done = TextChunk(request_id, error=error), True
                    continue
                params = dataclasses.replace(params, max_tokens=room)
            t.prompt_token_ids = ids
            t.detokenizer = IncrementalDetokenizer(self.tokenizer, ids)
            t.stops = StopStringMatcher(t.request.stop)
            t.pending = TextChunk(request_id, prompt_tokens=len(ids))
            runnable.append(GenerationRequest(request_id, ids, params))
        return runnable

    def _prompt_text(self, request: PreparedRequest) -> str:
        if request.messages is not None:
            return self.tokenizer.apply_chat_template(request.messages)
        return request.prompt or ""

    def _on_step(self, step: ModelStep, by_id: dict[str, _Tracked]) -> None:
        if step.model_version is not None:
            for t in by_id.values():
                t.model_version = step.model_version
        for request_id, rejected in step.rejected.items():
            error = RequestError(rejected.status, rejected.message, param=rejected.param)
            by_id[request_id].pending = TextChunk(request_id, error=error)
            by_id[request_id].done = True
        for output in step.outputs:
            self._on_output(by_id[output.request_id], output)

    def _on_output(self, t: _Tracked, output: SequenceOutput) -> None:
        """Fold one step's tokens into the request's pending chunk."""
        if t.done:
            return  # stopped by a stop string; the engine's remaining tokens are dropped
        assert t.detokenizer is not None and t.stops is not None
        finished = output.finish_reason is not None
        delta = t.detokenizer.add(output.new_token_ids)
        if finished:
            delta += t.detokenizer.flush()
        text, stopped = t.stops.feed(delta)
        if finished and not stopped:
            text += t.stops.flush()
        chunk = TextChunk(
            t.request.request_id,
            text=text,
            token_ids=list(output.new_token_ids),
            logprobs=self._token_texts(output) if output.logprobs is not None else None,
            finish_reason="stop" if stopped else _finish_reason(output),
            prompt_tokens=len(t.prompt_token_ids),
            completion_tokens=output.num_output_tokens,
            model_version=t.model_version if finished or stopped else None,
        )
        if t.pending is None:
            t.pending = chunk
        else:
            t.pending.merge(chunk)
        if stopped and not finished:
            self._cancelled.add(t.request.request_id)  # the engine need not go on
        t.done = stopped or finished

    def _token_texts(self, output: SequenceOutput) -> list[TokenText]:
        decode = self.tokenizer.decode_token
        return [
            TokenText(decode(r.token_id), r.logprob, [(decode(t), lp) for t, lp in r.top])
            for r in output.logprobs or ()
        ]

    def _abort_cancelled(self, tracked: list[_Tracked], replica_id: str | None) -> None:
        """Abort, on the replica running them, the sequences whose callers went away."""
        doomed = [t.request.request_id for t in tracked if t.request.request_id in self._cancelled]
        if not doomed or replica_id is None:
            return
        self._cancelled.difference_update(doomed)
        for t in tracked:
            if t.request.request_id in doomed:
                t.done = True
        call = self.model.abort.remote(doomed, replica_id=replica_id)
        task = asyncio.ensure_future(_bounded(call))
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def _collect(tracked: list[_Tracked], interval_s: float = 0.0) -> list[StreamItem]:
    """One item per request for ``@serve.batch``: its pending chunk, an empty placeholder while
    it holds tokens back (less than ``interval_s`` since its last chunk), or its end.

    Each chunk costs a message on every hop to the client, so under load a stream sends what
    accumulated at most every ``interval_s`` instead of one message per token.
    """
    now = time.monotonic()
    items: list[StreamItem] = []
    for t in tracked:
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
            items.append(TextChunk(t.request.request_id))
            continue
        if pending.token_ids:
            t.sent_at = now
        items.append(pending)
        t.pending = None
    return items


def _finish_reason(output: SequenceOutput) -> str | None:
    return None if output.finish_reason is None else output.finish_reason.value


class ModelStreamCancelled(Exception):
    """The model replica's stream was cancelled under us (e.g. the replica was stopped)."""


async def _coalesced(start: Callable[[], Any]) -> AsyncIterator[list[ModelStep]]:
    """Yield every step message that arrived since the last yield, so a slow consumer
    catches up in one pass instead of falling further behind."""
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
        while True:
            items = [await queue.get()]
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
    finally:
        reader.cancel()
        stream.cancel()  # a no-op once it has ended


async def _bounded(call: Any) -> None:
    """Await a fire-and-forget call for a while; failures only get logged."""
    try:
        await asyncio.wait_for(call, ABORT_TIMEOUT_S)
    except Exception as exc:
        logger.warning("abort did not reach the model replica: %r", exc)
