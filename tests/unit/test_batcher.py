"""The ``Batcher`` deployment's class in process: ``@serve.batch`` on the test's event loop, the
demo model's real tokenizer and chat template, and a fake model handle whose streams the test
scripts. Also ``coalesced_steps``, which reads those streams.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from ray import serve

from serve_app.deployments.batcher import Batcher
from serve_app.engine import FinishReason, GenerationRequest, SamplingParams, SequenceOutput
from serve_app.messages import ModelStep, PreparedRequest, RejectedRequest, TextChunk
from serve_app.micro_batch import ModelStreamCancelled, coalesced_steps
from serve_app.text.tokenizer import Tokenizer

DEADLINE_S = 5.0  # for any one awaited condition; each takes milliseconds
REPLICA = "replica-7"


class Changes:
    """Wakes whoever waits for a condition each time a fake records something."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()

    async def until(self, condition: Callable[[], bool]) -> None:
        async with asyncio.timeout(DEADLINE_S):
            while not condition():
                self._event.clear()
                await self._event.wait()


class ModelStream:
    """One streaming ``generate_batch`` call: yields the steps the test sends, in order."""

    def __init__(self, requests: list[GenerationRequest], changes: Changes) -> None:
        self.requests = requests
        self.taken = 0  # steps its reader has taken
        self.cancelled = False
        self._items: asyncio.Queue[ModelStep | BaseException | None] = asyncio.Queue()
        self._changes = changes

    @property
    def request_ids(self) -> list[str]:
        return [r.request_id for r in self.requests]

    def send(self, *steps: ModelStep) -> None:
        for step in steps:
            self._items.put_nowait(step)

    def end(self) -> None:
        self._items.put_nowait(None)

    def fail(self, error: BaseException) -> None:
        self._items.put_nowait(error)

    def __aiter__(self) -> ModelStream:
        return self

    async def __anext__(self) -> ModelStep:
        item = await self._items.get()
        if item is None:
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        self.taken += 1
        self._changes.notify()
        return item

    def cancel(self) -> None:
        self.cancelled = True
        self._changes.notify()


class FakeModel:
    """The model deployment's handle: every streamed ``generate_batch`` call becomes a
    ``ModelStream`` the test drives; ``abort`` calls are recorded."""

    def __init__(self) -> None:
        self.changes = Changes()
        self.streams: list[ModelStream] = []
        self.aborts: list[tuple[list[str], str]] = []
        self.abort = SimpleNamespace(remote=self._abort)

    def options(self, *, stream: bool = False, multiplexed_model_id: str = "") -> SimpleNamespace:
        assert stream, "a micro-batch must go to the model as one streaming call"
        assert multiplexed_model_id == "", "no variant was asked for"
        return SimpleNamespace(generate_batch=SimpleNamespace(remote=self._generate_batch))

    def _generate_batch(self, requests: list[GenerationRequest]) -> ModelStream:
        self.streams.append(ModelStream(requests, self.changes))
        self.changes.notify()
        return self.streams[-1]

    def _abort(self, request_ids: list[str], *, replica_id: str) -> asyncio.Future[None]:
        self.aborts.append((list(request_ids), replica_id))
        self.changes.notify()
        answered: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        answered.set_result(None)
        return answered


class Caller:
    """One client of the batcher: reads its request's stream in a task, keeping every chunk."""

    def __init__(self, batcher: Any, request: PreparedRequest, changes: Changes) -> None:
        self.chunks: list[TextChunk] = []
        self.done = False
        self._changes = changes
        self.task = asyncio.ensure_future(self._read(batcher.generate(request)))

    async def _read(self, stream: Any) -> None:
        try:
            async for chunk in stream:
                self.chunks.append(chunk)
                self._changes.notify()
        finally:
            self.done = True
            self._changes.notify()

    @property
    def finished(self) -> bool:
        """It has its last chunk: one that ends it (its stream itself ends with the next step)."""
        return bool(self.chunks) and (
            self.chunks[-1].finish_reason is not None or self.chunks[-1].error is not None
        )

    def has_chunks(self) -> bool:
        return bool(self.chunks)

    @property
    def text(self) -> str:
        return "".join(c.text for c in self.chunks)

    @property
    def token_ids(self) -> list[int]:
        return [t for c in self.chunks for t in c.token_ids]

    async def leave(self) -> None:
        """Go away mid-stream, as a client disconnecting does (Serve cancels its call)."""
        self.task.cancel()
        await asyncio.wait([self.task])


@pytest.fixture(autouse=True)
def serve_batch(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Lets ``@serve.batch`` run on each test's own event loop, outside any replica."""
    # serve.batch checks max_batch_size against max_ongoing_requests in its replica's context.
    replica = SimpleNamespace(_deployment_config=Batcher._deployment_config)
    monkeypatch.setattr(serve, "get_replica_context", lambda: replica)
    # serve.batch keeps ONE queue per decorated method, made on first use and bound to that
    # event loop, and reconfigure() changes its settings: each test starts afresh and restores them.
    lazy_queue = Batcher.func_or_class._micro_batch.set_max_batch_size.__self__
    monkeypatch.setattr(lazy_queue, "_queue", None)
    for setting in ("max_batch_size", "batch_wait_timeout_s"):
        monkeypatch.setattr(lazy_queue, setting, getattr(lazy_queue, setting))
    yield
    if lazy_queue._queue is not None:
        # Its task ended with the test's loop; left set, the queue's __del__ (whenever the garbage
        # collector runs it) would create an event loop of its own and leak it.
        lazy_queue._queue._handle_batch_task = None


def make_batcher(model: FakeModel, model_dir: Path, batch_size: int, **settings: float) -> Any:
    batcher = Batcher.func_or_class(model=model, model_dir=model_dir)
    # A micro-batch closes as soon as it is full, never on a timer, so its members are exact; no
    # tokens are held back unless a test asks.
    config = {"batch_wait_timeout_s": 60.0, "stream_interval_per_request_s": 0.0} | settings
    batcher.reconfigure({"max_batch_size": batch_size, **config})
    return batcher


def run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(scenario())


def request(
    request_id: str, prompt: str = "Once upon a time", stop: list[str] | None = None
) -> PreparedRequest:
    return PreparedRequest(request_id, SamplingParams(), prompt, stop=stop or [])


def output(
    request_id: str, token_ids: list[int], produced: int, finish: FinishReason | None = None
) -> SequenceOutput:
    """A step's output; ``produced`` counts the sequence's tokens so far, these included."""
    return SequenceOutput(request_id, tuple(token_ids), None, finish, 0, produced)


def first_step(**rejected: RejectedRequest) -> ModelStep:
    """What a model replica sends first: who it is, what it serves, what its engine refused."""
    return ModelStep([], replica_id=REPLICA, model_version="v3", rejected=rejected)


def finish_all(stream: ModelStream) -> None:
    """End every sequence of the stream after one token, then the stream."""
    stream.send(ModelStep([output(i, [42], 1, FinishReason.LENGTH) for i in stream.request_ids]))
    stream.end()


# --- coalesced_steps ---


def test_steps_that_arrive_while_the_consumer_is_busy_come_as_one_list() -> None:
    async def scenario() -> None:
        changes = Changes()
        stream = ModelStream([], changes)
        steps = [ModelStep([], model_version=str(i)) for i in range(4)]
        reader = coalesced_steps(lambda: stream)

        stream.send(steps[0])
        assert await anext(reader) == [steps[0]]
        stream.send(*steps[1:])  # while the consumer is busy elsewhere
        await changes.until(lambda: stream.taken == 4)
        assert await anext(reader) == steps[1:]
        stream.end()
        assert [s async for s in reader] == []

    run(scenario)


def test_a_failing_stream_delivers_its_steps_then_raises() -> None:
    async def scenario() -> None:
        stream = ModelStream([], Changes())
        step = ModelStep([], replica_id=REPLICA)
        stream.send(step)
        stream.fail(RuntimeError("the replica died"))

        received = []
        with pytest.raises(RuntimeError, match="the replica died"):
            async for steps in coalesced_steps(lambda: stream):
                received.extend(steps)
        assert received == [step]

    run(scenario)


def test_a_cancelled_stream_raises_model_stream_cancelled() -> None:
    async def scenario() -> None:
        stream = ModelStream([], Changes())
        stream.fail(asyncio.CancelledError())  # what the handle raises when its call is cancelled
        with pytest.raises(ModelStreamCancelled):
            async for _ in coalesced_steps(lambda: stream):
                pass

    run(scenario)


def test_a_consumer_that_leaves_cancels_the_model_stream() -> None:
    async def scenario() -> None:
        stream = ModelStream([], Changes())
        reader = coalesced_steps(lambda: stream)
        stream.send(ModelStep([]))
        await anext(reader)
        assert not stream.cancelled
        await reader.aclose()
        assert stream.cancelled

    run(scenario)


# --- the Batcher deployment ---


def test_concurrent_requests_share_one_model_call_and_each_caller_gets_only_its_own_text(
    model_dir: Path, tokenizer: Tokenizer
) -> None:
    prompts = {"a": "Once upon a time", "b": "The cat sat", "c": "Hello"}
    replies = {"a": " there was a dog.", "b": " on the mat", "c": ", world!"}

    async def scenario() -> None:
        model = FakeModel()
        batcher = make_batcher(model, model_dir, batch_size=3)
        callers = {i: Caller(batcher, request(i, p), model.changes) for i, p in prompts.items()}
        await model.changes.until(lambda: len(model.streams) == 1)

        (stream,) = model.streams
        assert [(r.request_id, r.prompt_token_ids) for r in stream.requests] == [
            (i, tokenizer.encode(p)) for i, p in prompts.items()
        ]
        stream.send(first_step())
        tokens = {i: tokenizer.encode(text) for i, text in replies.items()}
        for n in range(1, max(map(len, tokens.values())) + 1):  # one token each per step
            stream.send(
                ModelStep(
                    [
                        output(i, ids[n - 1 : n], n, FinishReason.STOP if n == len(ids) else None)
                        for i, ids in tokens.items()
                        if n <= len(ids)
                    ]
                )
            )
        stream.end()
        await model.changes.until(lambda: all(c.done for c in callers.values()))

        assert len(model.streams) == 1
        for i, caller in callers.items():
            assert {c.request_id for c in caller.chunks} == {i}
            assert caller.text == replies[i]
            assert caller.token_ids == tokens[i]
            assert caller.chunks[0].prompt_tokens == len(tokenizer.encode(prompts[i]))
            last = caller.chunks[-1]
            assert (last.finish_reason, last.model_version) == ("stop", "v3")
            assert last.completion_tokens == len(tokens[i])
        assert model.aborts == []

    run(scenario)


def test_reconfigure_changes_the_micro_batch_size_live(model_dir: Path) -> None:
    async def scenario() -> None:
        model = FakeModel()
        batcher = make_batcher(model, model_dir, batch_size=2)

        first = [Caller(batcher, request(f"first-{n}"), model.changes) for n in range(4)]
        await model.changes.until(lambda: len(model.streams) == 2)
        batcher.reconfigure({"max_batch_size": 4, "batch_wait_timeout_s": 60.0})
        second = [Caller(batcher, request(f"second-{n}"), model.changes) for n in range(4)]
        await model.changes.until(lambda: len(model.streams) == 3)

        assert [len(s.requests) for s in model.streams] == [2, 2, 4]
        assert sorted(model.streams[2].request_ids) == [f"second-{n}" for n in range(4)]
        for stream in model.streams:
            stream.send(first_step())
            finish_all(stream)
        await model.changes.until(lambda: all(c.done for c in first + second))
        assert all(c.chunks[-1].finish_reason == "length" for c in first + second)

    run(scenario)


def test_a_caller_that_leaves_gets_only_its_sequence_aborted_on_its_replica(
    model_dir: Path, tokenizer: Tokenizer
) -> None:
    tokens = tokenizer.encode(" there was a time")

    async def scenario() -> None:
        model = FakeModel()
        batcher = make_batcher(model, model_dir, batch_size=2)
        leaving, staying = (
            Caller(batcher, request(i), model.changes) for i in ("leaving", "staying")
        )
        await model.changes.until(lambda: len(model.streams) == 1)
        (stream,) = model.streams

        stream.send(first_step(), ModelStep([output(i, tokens[:1], 1) for i in stream.request_ids]))
        await model.changes.until(lambda: bool(leaving.chunks and staying.chunks))
        await leaving.leave()
        stream.send(ModelStep([output(i, tokens[1:2], 2) for i in stream.request_ids]))
        await model.changes.until(lambda: bool(model.aborts))

        assert model.aborts == [(["leaving"], REPLICA)]
        assert not stream.cancelled  # the micro-batch's stream goes on for the others
        stream.send(
            ModelStep(
                [
                    output("leaving", [], 2, FinishReason.ABORT),
                    output("staying", tokens[2:], len(tokens), FinishReason.LENGTH),
                ]
            )
        )
        stream.end()
        await model.changes.until(lambda: staying.done)
        assert (staying.text, staying.chunks[-1].finish_reason) == (" there was a time", "length")
        assert leaving.token_ids == tokens[:1]
        assert model.aborts == [(["leaving"], REPLICA)]

    run(scenario)


def test_a_stop_string_ends_the_request_and_aborts_its_sequence(
    model_dir: Path, tokenizer: Tokenizer
) -> None:
    tokens = tokenizer.encode("one two three four")

    async def scenario() -> None:
        model = FakeModel()
        batcher = make_batcher(model, model_dir, batch_size=2)
        stopping = Caller(batcher, request("stopping", stop=[" three"]), model.changes)
        other = Caller(batcher, request("other"), model.changes)
        await model.changes.until(lambda: len(model.streams) == 1)
        (stream,) = model.streams

        stream.send(first_step())
        for n, token in enumerate(tokens[:3], start=1):
            stream.send(ModelStep([output(i, [token], n) for i in stream.request_ids]))
        await model.changes.until(lambda: stopping.finished and bool(model.aborts))

        assert (stopping.text, stopping.chunks[-1].finish_reason) == ("one two", "stop")
        assert model.aborts == [(["stopping"], REPLICA)]
        assert not other.finished
        stream.send(
            ModelStep(
                [
                    output("stopping", [], 3, FinishReason.ABORT),
                    output("other", tokens[3:], len(tokens), FinishReason.LENGTH),
                ]
            )
        )
        stream.end()
        await model.changes.until(lambda: other.done)
        assert other.text == "one two three four"

    run(scenario)


def test_an_engine_rejection_ends_only_that_callers_stream(
    model_dir: Path, tokenizer: Tokenizer
) -> None:
    async def scenario() -> None:
        model = FakeModel()
        batcher = make_batcher(model, model_dir, batch_size=2)
        ok, refused = (Caller(batcher, request(i), model.changes) for i in ("ok", "refused"))
        await model.changes.until(lambda: len(model.streams) == 1)
        (stream,) = model.streams

        rejection = RejectedRequest("max_tokens exceeds the context length", "max_tokens")
        stream.send(first_step(refused=rejection))
        await model.changes.until(lambda: refused.finished)

        (chunk,) = refused.chunks
        assert chunk.error is not None
        assert (chunk.error.status, chunk.error.param) == (400, "max_tokens")
        assert not ok.finished
        stream.send(ModelStep([output("ok", tokenizer.encode(" there"), 1, FinishReason.STOP)]))
        stream.end()
        await model.changes.until(lambda: ok.done)
        assert (ok.text, ok.chunks[-1].error) == (" there", None)

    run(scenario)


def test_a_micro_batch_with_nothing_to_run_never_calls_the_model(model_dir: Path) -> None:
    async def scenario() -> None:
        model = FakeModel()
        batcher = make_batcher(model, model_dir, batch_size=1)
        chat = PreparedRequest("chat", SamplingParams(), messages=[{"role": "user"}])
        caller = Caller(batcher, chat, model.changes)
        await model.changes.until(lambda: caller.done)

        (chunk,) = caller.chunks
        assert chunk.error is not None
        assert (chunk.error.status, chunk.error.param) == (400, "messages")
        assert model.streams == []

    run(scenario)


@pytest.mark.parametrize(
    "failure",
    [RuntimeError("the replica died"), asyncio.CancelledError()],
    ids=["stream-error", "stream-cancelled"],
)
def test_a_failing_model_stream_ends_every_unfinished_request_with_503(
    failure: BaseException, model_dir: Path, tokenizer: Tokenizer
) -> None:
    tokens = tokenizer.encode(" there was")

    async def scenario() -> None:
        model = FakeModel()
        batcher = make_batcher(model, model_dir, batch_size=3)
        done, running, idle = (
            Caller(batcher, request(i), model.changes) for i in ("done", "running", "idle")
        )
        await model.changes.until(lambda: len(model.streams) == 1)
        (stream,) = model.streams

        stream.send(
            first_step(),
            ModelStep(
                [
                    output("done", tokens, len(tokens), FinishReason.LENGTH),
                    output("running", tokens[:1], 1),
                ]
            ),
        )
        await model.changes.until(lambda: done.finished and bool(running.chunks))
        stream.fail(failure)
        await model.changes.until(lambda: running.done and idle.done)  # nobody hangs

        assert (done.text, done.chunks[-1].error) == (" there was", None)
        assert [(c.text, c.error and c.error.status) for c in running.chunks] == [
            (" there", None),
            ("", 503),
        ]
        assert [(c.text, c.error and c.error.status) for c in idle.chunks] == [("", 503)]

    run(scenario)


@pytest.mark.parametrize(
    ("settings", "chunked"),
    [
        ({"stream_interval_per_request_s": 0.0}, [[0], [1], [2], [3]]),
        (
            {"stream_interval_per_request_s": 60.0, "max_stream_interval_s": 600.0},
            [[0], [1, 2, 3]],
        ),
    ],
    ids=["no-interval", "interval"],
)
def test_a_stream_behind_gets_what_accumulated_in_one_chunk(
    settings: dict[str, float], chunked: list[list[int]], model_dir: Path, tokenizer: Tokenizer
) -> None:
    tokens = tokenizer.encode(" there was a time")
    probes = [f"probe-{n}" for n in range(1, len(tokens))]

    async def scenario() -> None:
        model = FakeModel()
        batcher = make_batcher(model, model_dir, batch_size=1 + len(probes), **settings)
        reader = Caller(batcher, request("reader"), model.changes)
        probing = {i: Caller(batcher, request(i), model.changes) for i in probes}
        await model.changes.until(lambda: len(model.streams) == 1)
        (stream,) = model.streams
        stream.send(first_step())

        # Each step gives a new probe its first token, which is never held back: once that probe
        # has it, the batcher has handled the step on its own, not folded into the next one.
        last = len(tokens)
        for n, token in enumerate(tokens, start=1):
            finish = FinishReason.LENGTH if n == last else None
            outputs = [output("reader", [token], n, finish)]
            if n > 1:
                outputs.append(output(probes[n - 2], [token], 1, finish))
            if n == last:
                outputs += [output(p, [], 1, FinishReason.LENGTH) for p in probes[:-1]]
            stream.send(ModelStep(outputs))
            arrived = probing[probes[n - 2]] if n > 1 else reader
            await model.changes.until(arrived.has_chunks)
        stream.end()
        await model.changes.until(lambda: reader.done and all(p.done for p in probing.values()))

        assert [c.token_ids for c in reader.chunks] == [[tokens[i] for i in c] for c in chunked]
        assert reader.text == " there was a time"
        assert reader.chunks[-1].finish_reason == "length"

    run(scenario)
