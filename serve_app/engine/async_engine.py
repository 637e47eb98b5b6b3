"""An asyncio facade over ``LLMEngine``: the engine steps on its own thread.

onnxruntime releases the GIL while it runs, so the event loop stays responsive while a step
computes. Each step's outputs reach the event loop in one ``call_soon_threadsafe`` call and are
routed to the streams that asked for them; a stream may cover a whole micro-batch of requests
so that one message per step carries all of them.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from serve_app.engine.config import EngineConfig
from serve_app.engine.engine import LLMEngine
from serve_app.engine.errors import EngineDeadError, InvalidRequestError
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


class AsyncLLMEngine:
    """Runs an ``LLMEngine`` on a background thread and streams its outputs to coroutines."""

    def __init__(
        self, config: EngineConfig, on_step: Callable[[StepStats], None] | None = None
    ) -> None:
        self.engine = LLMEngine(config)
        self._on_step = on_step
        self._commands: queue.SimpleQueue[tuple[str, Sequence | str]] = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._error: EngineDeadError | None = None
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    @property
    def num_waiting(self) -> int:
        """Sequences queued in the engine, including those not yet handed to it."""
        return self.engine.num_waiting + self._commands.qsize()

    @property
    def num_running(self) -> int:
        """Sequences in the engine's running batch."""
        return self.engine.num_running

    def check_health(self) -> None:
        """Raise ``EngineDeadError`` if the engine loop has died."""
        if self._error is not None:
            raise self._error
        if not self._thread.is_alive():
            raise EngineDeadError("the engine loop is not running")

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[SequenceOutput]:
        """Stream one request's outputs; closing the iterator early aborts the request."""
        request = GenerationRequest(request_id, prompt_token_ids, params)
        async for outputs in self.generate_batch([request]):
            for output in outputs:
                yield output

    async def generate_batch(
        self, requests: list[GenerationRequest]
    ) -> AsyncIterator[list[SequenceOutput]]:
        """Stream a group of requests: one list per engine step with that step's outputs.

        All requests are validated before any is queued, so an invalid one raises
        ``InvalidRequestError`` and nothing runs. Closing the iterator early aborts every
        request of the group that has not finished.
        """
        self.check_health()
        self.engine.check_capacity(pending=self._commands.qsize() + len(requests) - 1)
        sequences = self._validate(requests)
        stream = _Stream(asyncio.get_running_loop())
        pending = {s.request_id for s in sequences}
        for seq in sequences:
            self._streams[seq.request_id] = stream
            self._commands.put(("add", seq))
        try:
            while pending:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                pending.difference_update(o.request_id for o in item if o.finished)
                yield item
        finally:
            for seq in sequences:
                self._streams.pop(seq.request_id, None)
            for request_id in pending:
                self.abort(request_id)

    def check_request(self, request: GenerationRequest, ahead: int = 0) -> None:
        """Raise ``InvalidRequestError`` or ``EngineOverloadedError`` if the engine would
        refuse ``request`` now, with ``ahead`` more sequences about to be queued before it."""
        self.engine.check_capacity(pending=self._commands.qsize() + ahead)
        self.engine.new_sequence(request.request_id, request.prompt_token_ids, request.params)

    def abort(self, request_id: str) -> None:
        """Cancel a request; safe to call from any thread, and for finished requests."""
        self._commands.put(("abort", request_id))

    def shutdown(self) -> None:
        """Stop the engine loop after its current step."""
        self._stopped.set()
        self._commands.put(("stop", ""))
        self._thread.join(timeout=30)

    def _validate(self, requests: list[GenerationRequest]) -> list[Sequence]:
        ids = [r.request_id for r in requests]
        duplicates = {i for i in ids if ids.count(i) > 1 or i in self._streams}
        if duplicates:
            raise InvalidRequestError(f"request ids already in use: {sorted(duplicates)}")
        return [
            self.engine.new_sequence(r.request_id, r.prompt_token_ids, r.params) for r in requests
        ]

    def _run(self) -> None:
        try:
            while not self._stopped.is_set():
                self._apply_commands(block=not self.engine.has_work())
                if self.engine.has_work():
                    self._deliver(self.engine.step())
                    self._report(self.engine.last_stats)
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
                    self.engine.enqueue(payload)
                elif command == "abort":
                    assert isinstance(payload, str)
                    self.engine.abort(payload)
                command, payload = self._commands.get_nowait()
        except queue.Empty:
            return

    def _deliver(self, outputs: list[SequenceOutput]) -> None:
        by_stream: dict[_Stream, list[SequenceOutput]] = {}
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is not None:
                by_stream.setdefault(stream, []).append(output)
        for stream, stream_outputs in by_stream.items():
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, stream_outputs)

    def _fail_all(self, error: EngineDeadError) -> None:
        for stream in set(list(self._streams.values())):
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, error)
