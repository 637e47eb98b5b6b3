"""The ``Batcher`` deployment: micro-batches requests with ``@serve.batch``, tokenizes them in one
call, sends each micro-batch to a model replica as ONE streaming call, and turns the per-step
token messages back into per-request text streams (``micro_batch.MicroBatch``).
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Any

from opentelemetry.trace import Span, Status, StatusCode
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_app import tracing
from serve_app.api.tokenize import TokenizeRequest
from serve_app.config import DRAIN_POLL_S, BatcherConfig, TracingConfig
from serve_app.deployments.replica_router import ReplicaAffinityRouter
from serve_app.messages import (
    DetokenizedText,
    PreparedRequest,
    RequestError,
    TextChunk,
    TokenizedPrompt,
)
from serve_app.micro_batch import (
    MicroBatch,
    ModelStreamCancelled,
    NoModelReplica,
    StreamItem,
    coalesced_steps,
)
from serve_app.text.chat_template import ChatTemplate
from serve_app.text.tokenizer import Tokenizer

logger = logging.getLogger("ray.serve")

ABORT_TIMEOUT_S = 5.0
MAX_MICRO_BATCHES = 256  # in flight at once per batcher replica


@serve.deployment(
    max_ongoing_requests=1024,
    graceful_shutdown_wait_loop_s=DRAIN_POLL_S,
    # A variant's requests carry its multiplexed model id, so that Serve batches them apart.
    # Serve's default router would then look for a Batcher replica holding that variant (none
    # does) and back off before each such call; this one ranks them all alike.
    request_router_config={"request_router_class": ReplicaAffinityRouter},
)
class Batcher:
    """Tokenizes, micro-batches and detokenizes; never runs the model itself."""

    def __init__(
        self, model: DeploymentHandle, model_dir: Path, trace: TracingConfig | None = None
    ) -> None:
        self._tracer_provider = tracing.configure(trace or TracingConfig(), "Batcher")
        self.model = model
        self.tokenizer = Tokenizer(model_dir)
        self.chat_template = ChatTemplate(model_dir)
        self.settings = BatcherConfig()
        self._running: set[str] = set()  # requests whose micro-batch is running
        self._cancelled: set[str] = set()  # of those, the ones whose caller went away
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
        span = tracing.start_span(
            "batcher", tracing.extract(request.trace_context), request.request_id
        )
        # The model server's spans of this request are children of this one.
        request = dataclasses.replace(request, trace_context=tracing.inject(span))
        try:
            async for chunk in self._micro_batch(request):  # type: ignore[misc, call-arg]
                if chunk is StopIteration:
                    continue
                assert isinstance(chunk, TextChunk)
                finished = chunk.finish_reason is not None or chunk.error is not None
                if finished:
                    _note_end(span, chunk)
                if chunk.text or chunk.token_ids or finished:
                    yield chunk
        finally:
            if not finished and request.request_id in self._running:
                self._cancelled.add(request.request_id)
            span.end()

    def tokenize(self, request: TokenizeRequest) -> TokenizedPrompt:
        """The token ids a completion of ``request``'s prompt (or chat) would give the model."""
        text = request.prompt or ""
        messages = request.message_dicts()
        if messages is not None:
            try:
                text = self.chat_template.render(
                    messages, request.add_generation_prompt, request.chat_template_kwargs or {}
                )
            except ValueError as exc:  # the chat template rejected the messages
                return TokenizedPrompt(error=RequestError(400, str(exc), param="messages"))
        ids = self.tokenizer.encode(text)
        texts = [self.tokenizer.decode_token(i) for i in ids] if request.return_token_strs else None
        return TokenizedPrompt(ids, texts)

    def detokenize(self, token_ids: list[int]) -> DetokenizedText:
        """The text of ``token_ids``, special tokens skipped."""
        vocab_size = self.tokenizer.vocab_size
        unknown = [i for i in token_ids if not 0 <= i < vocab_size]
        if unknown:
            message = f"token ids must be in [0, {vocab_size}); got {unknown[0]}"
            return DetokenizedText(error=RequestError(400, message, param="tokens"))
        return DetokenizedText(self.tokenizer.decode(token_ids))

    def __del__(self) -> None:
        tracing.shutdown(getattr(self, "_tracer_provider", None))  # exports what it buffers

    # serve.batch's type hints cover neither async generators nor its setters: hence the ignores.
    # Micro-batches must run side by side: each streams until its longest request ends, and
    # the engine batches across them continuously.
    @serve.batch(  # type: ignore[arg-type]
        max_batch_size=32, batch_wait_timeout_s=0.005, max_concurrent_batches=MAX_MICRO_BATCHES
    )
    async def _micro_batch(  # type: ignore[misc]
        self, requests: list[PreparedRequest]
    ) -> AsyncIterator[list[StreamItem]]:
        batch = MicroBatch(requests, self.tokenizer, self.chat_template)
        self._running.update(batch.request_ids)
        # Serve splits micro-batches by multiplexed model id: all of this one's is the same.
        run = self._run(batch, serve.get_multiplexed_model_id())
        try:
            async for items in run:
                yield items
        finally:
            await run.aclose()  # ends its model stream now, not when collected
            self._running.difference_update(batch.request_ids)
            self._cancelled.difference_update(batch.request_ids)

    async def _run(self, batch: MicroBatch, variant: str) -> AsyncGenerator[list[StreamItem], None]:
        """Stream a micro-batch through a model replica (running ``variant`` of the model, if
        one is named), one item list per step message."""
        yield batch.collect()
        if not batch.runnable:
            return
        replica_id: str | None = None
        self._active_streams += len(batch.runnable)
        try:
            steps_of_batch = coalesced_steps(
                lambda: self._stream_to_model(batch, variant), self.settings.model_wait_s
            )
            async for steps in steps_of_batch:
                for step in steps:
                    replica_id = step.replica_id or replica_id
                    batch.on_step(step)
                self._abort_ended(batch, replica_id)
                yield batch.collect(self.settings.stream_interval_s(self._active_streams))
        except NoModelReplica as exc:
            logger.warning("micro-batch not taken: %s", exc)
            batch.fail_unfinished(RequestError(503, f"{exc}; retry the request", code="no_replica"))
            yield batch.collect()
        except (Exception, ModelStreamCancelled) as exc:  # tell every caller, never hang
            logger.warning("micro-batch stream failed: %r", exc)
            failed = "the model replica failed; retry the request"
            batch.fail_unfinished(RequestError(503, failed, code="model_failed"))
            yield batch.collect()
        finally:
            self._active_streams -= len(batch.runnable)

    def _stream_to_model(self, batch: MicroBatch, variant: str) -> Any:
        """The ONE streaming call that carries a micro-batch to a model replica, with each
        request's trace context; for a ``variant``, to one that holds it if any does.

        It runs in a context of its own: made inside the first request's context, Serve would
        treat it as that request's child and cancel it (and every other request of the
        micro-batch) when that one caller goes away. Callers leave through targeted aborts.
        """
        call = self.model.options(stream=True, multiplexed_model_id=variant).generate_batch.remote
        traced = batch.trace_contexts()  # empty when tracing is off
        kwargs = {"trace_contexts": traced} if traced else {}
        return contextvars.Context().run(call, batch.runnable, **kwargs)

    def _abort_ended(self, batch: MicroBatch, replica_id: str | None) -> None:
        """Abort, on the replica running them, the sequences whose callers went away or that a
        stop string ended."""
        doomed = [i for i in batch.request_ids if i in self._cancelled] + batch.stopped
        if not doomed or replica_id is None:
            return
        self._cancelled.difference_update(doomed)
        batch.stopped.clear()
        batch.end(doomed)
        call = self.model.abort.remote(doomed, replica_id=replica_id)
        task = asyncio.ensure_future(_bounded(call))
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def _note_end(span: Span, chunk: TextChunk) -> None:
    """How a request ended, on its batcher span."""
    if chunk.error is not None:
        span.set_attribute("serve_app.error_status", chunk.error.status)
        span.set_status(Status(StatusCode.ERROR, chunk.error.message))
        return
    span.set_attributes(
        {
            "serve_app.finish_reason": chunk.finish_reason or "",
            "serve_app.prompt_tokens": chunk.prompt_tokens,
            "serve_app.completion_tokens": chunk.completion_tokens,
        }
    )


async def _bounded(call: Any) -> None:
    """Await a fire-and-forget call for a while; failures only get logged."""
    try:
        await asyncio.wait_for(call, ABORT_TIMEOUT_S)
    except Exception as exc:
        logger.warning("abort did not reach the model replica: %r", exc)
