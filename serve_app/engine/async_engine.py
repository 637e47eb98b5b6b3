"""An asyncio facade over ``LLMEngine``: the engine steps on its own thread.

onnxruntime releases the GIL while it runs, so the event loop stays responsive while a step
computes. ``submit`` validates a group of requests and creates their sequences on the caller's
event loop, once; the engine thread only queues them. Each step's outputs reach the event loop
in one ``call_soon_threadsafe`` call per group, so one message per step carries a whole
micro-batch.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from serve_app.engine.engine import LLMEngine
from serve_app.engine.errors import (
    EngineDeadError,
    EngineError,
    EngineOverloadedError,
    InvalidRequestError,
)
from serve_app.engine.model_config import ModelConfig
from serve_app.engine.sampling_params import SamplingParams
from serve_app.engine.sequence import Sequence, SequenceOutput
from serve_app.engine.stats import StepStats

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationRequest:
    """A tokenized prompt to generate from."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass(eq=False)
class _Stream:
    """Where the outputs of a group of requests go, on the event loop that consumes them."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[list[SequenceOutput] | BaseException] = field(
        default_factory=asyncio.Queue
    )


class SubmittedBatch:
    """What ``AsyncLLMEngine.submit`` refused, and the outputs of what it accepted."""

    def __init__(
        self,
        rejected: dict[str, EngineError],
        accepted: list[str],
        stream: _Stream,
        close: Callable[[_Stream, set[str]], None],
    ) -> None:
        self.rejected = rejected  # by request id: InvalidRequestError or EngineOverloadedError
        self._unfinished = set(accepted)
        self._stream = stream
        self._close = close

    async def outputs(self) -> AsyncIterator[list[SequenceOutput]]:
        """One list per engine step with that step's outputs of the accepted requests, until
        every one has finished; closing it early aborts those not finished."""
        try:
            while self._unfinished:
                item = await self._stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                self._unfinished.difference_update(o.request_id for o in item if o.finished)
                yield item
        finally:
            self.abort()

    def abort(self) -> None:
        """Abort the accepted requests that have not finished; their outputs stop here.

        ``outputs`` does this when closed; call it when ``outputs`` will never be iterated.
        """
        self._close(self._stream, self._unfinished)
        self._unfinished = set()


class AsyncLLMEngine:
    """Runs an ``LLMEngine`` on a background thread and streams its outputs to coroutines."""

    def __init__(
        self, engine: LLMEngine, on_step: Callable[[StepStats], None] | None = None
    ) -> None:
        self._engine = engine
        self._on_step = on_step
        self._commands: queue.SimpleQueue[tuple[str, Sequence | str]] = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}  # request id -> its group, until it finishes
        self._error: EngineDeadError | None = None
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    @property
    def model_config(self) -> ModelConfig:
        """The served model's architecture facts and special tokens."""
        return self._engine.model_config

    @property
    def backend(self) -> str:
        """The backend and device in words, e.g. for ``/v1/model_info``."""
        return self._engine.decoder.describe()

    @property
    def num_waiting(self) -> int:
        """Sequences queued in the engine, including those not yet handed to it."""
        # The command queue first: a sequence moving across meanwhile is counted twice, not missed.
        return self._commands.qsize() + self._engine.num_waiting

    @property
    def num_running(self) -> int:
        """Sequences in the engine's running batch."""
        return self._engine.num_running

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of the KV-cache token budget the running batch occupies."""
        return self._engine.kv_cache_usage

    def check_health(self) -> None:
        """Raise ``EngineDeadError`` if the engine loop has died."""
        if self._error is not None:
            raise self._error
        if not self._thread.is_alive():
            raise EngineDeadError("the engine loop is not running")

    def submit(self, requests: list[GenerationRequest]) -> SubmittedBatch:
        """Validate ``requests``, queue those the engine accepts, and return the refusals and a
        stream of the accepted ones' outputs. Call it on the event loop that reads the outputs.

        Each request becomes a sequence exactly once, here. Refusals are per request: an
        ``InvalidRequestError`` naming its parameter, or ``EngineOverloadedError`` once the
        waiting queue is full. Requests sharing an id are all refused. Raises
        ``EngineDeadError`` if the engine loop has died.
        """
        self.check_health()
        stream = _Stream(asyncio.get_running_loop())
        rejected: dict[str, EngineError] = {}
        accepted: list[Sequence] = []
        ahead = self._engine.waiting_beyond_batch(self.num_waiting)
        counts = Counter(r.request_id for r in requests)
        for request in requests:
            request_id = request.request_id
            if counts[request_id] > 1 or request_id in self._streams:
                rejected[request_id] = InvalidRequestError(
                    f"request id {request_id!r} is already in use", "request_id"
                )
                continue
            try:
                sequence = self._engine.new_sequence(
                    request_id,
                    request.prompt_token_ids,
                    request.params,
                    ahead=ahead + len(accepted),
                )
            except (InvalidRequestError, EngineOverloadedError) as refusal:
                rejected[request_id] = refusal
                continue
            accepted.append(sequence)
        for sequence in accepted:
            self._streams[sequence.request_id] = stream
            self._commands.put(("add", sequence))
        if accepted and self._error is not None:  # died after check_health: nothing will come
            stream.queue.put_nowait(self._error)
        return SubmittedBatch(rejected, [s.request_id for s in accepted], stream, self._close)

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[SequenceOutput]:
        """Stream one request's outputs; raises its refusal, and closing the iterator early
        aborts the request."""
        batch = self.submit([GenerationRequest(request_id, prompt_token_ids, params)])
        if request_id in batch.rejected:
            raise batch.rejected[request_id]
        try:
            async for outputs in batch.outputs():
                for output in outputs:
                    yield output
        finally:
            batch.abort()  # now, not when the abandoned inner iterator is collected

    def abort(self, request_id: str) -> None:
        """Cancel a request; safe to call from any thread, and for finished requests."""
        self._commands.put(("abort", request_id))

    def shutdown(self) -> None:
        """Stop the engine loop after its current step."""
        self._stopped.set()
        self._commands.put(("stop", ""))
        self._thread.join(timeout=30)

    def _close(self, stream: _Stream, unfinished: set[str]) -> None:
        """Abort a group's unfinished requests that the engine still runs for that group."""
        for request_id in unfinished:
            if self._streams.get(request_id) is stream:  # else it finished meanwhile
                self._streams.pop(request_id, None)
                self.abort(request_id)

    def _run(self) -> None:
        try:
            while not self._stopped.is_set():
                self._apply_commands(block=not self._engine.has_work())
                if self._engine.has_work():
                    self._deliver(self._engine.step())
                    self._report(self._engine.last_stats)
        except Exception as exc:
            logger.exception("engine loop failed")
            self._error = EngineDeadError(f"the engine loop failed: {exc}")
            self._fail_all(self._error)

    def _report(self, stats: StepStats) -> None:
        if self._on_step is None:
            return
        try:
            self._on_step(stats)
        except Exception:  # metrics must never stop the engine
            logger.exception("step observer failed")

    def _apply_commands(self, *, block: bool) -> None:
        try:
            command, payload = self._commands.get(block=block)
            while True:
                if command == "add":
                    assert isinstance(payload, Sequence)
                    self._engine.enqueue(payload)
                elif command == "abort":
                    assert isinstance(payload, str)
                    self._engine.abort(payload)
                command, payload = self._commands.get_nowait()
        except queue.Empty:
            return

    def _deliver(self, outputs: list[SequenceOutput]) -> None:
        by_stream: dict[_Stream, list[SequenceOutput]] = {}
        for output in outputs:
            stream = (
                self._streams.pop(output.request_id, None)
                if output.finished
                else self._streams.get(output.request_id)
            )
            if stream is not None:
                by_stream.setdefault(stream, []).append(output)
        for stream, stream_outputs in by_stream.items():
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, stream_outputs)

    def _fail_all(self, error: EngineDeadError) -> None:
        for stream in set(list(self._streams.values())):  # a snapshot; submit may add more
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, error)
