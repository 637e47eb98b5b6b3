"""Unit tests of ``CompletionService``: fan-out to the batcher, merging the choices' streams,
errors, cancellation and the response cache in front (a fake batcher handle, no Ray)."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Awaitable, Callable, Coroutine, Generator
from types import SimpleNamespace
from typing import Any, TypeVar

import pytest
from ray.serve.exceptions import BackPressureError

from serve_app.api.errors import ApiError
from serve_app.api.openai import ChatCompletionRequest, ChatMessage, CompletionRequest
from serve_app.clients.response_cache import ResponseCacheClient
from serve_app.messages import PreparedRequest, RequestError, TextChunk, TokenText
from serve_app.metrics import RequestMetrics
from serve_app.orchestration import CompletionService
from serve_app.results import Accumulator, ChoiceDelta
from serve_app.stores.response_store import CachedResponse, LiveLookup, cache_key
from tests.unit.fakes import HangingHandle, HangingResponse

MODEL = "demo"
DEFAULT_MAX_TOKENS = 32
VERSION = "v1"

T = TypeVar("T")


# Fakes


class BatcherStream:
    """One streaming batcher call: yields the chunks the test pushes; ``end()`` finishes it."""

    def __init__(self, request: PreparedRequest) -> None:
        self.request = request
        self.cancelled = False
        self._queue: asyncio.Queue[TextChunk | Exception | None] = asyncio.Queue()

    def push(self, *chunks: TextChunk | Exception) -> None:
        """Chunks to yield; an exception is raised where it stands, as a failed call does."""
        for chunk in chunks:
            self._queue.put_nowait(chunk)

    def end(self) -> None:
        self._queue.put_nowait(None)

    def cancel(self) -> None:
        self.cancelled = True

    def __aiter__(self) -> BatcherStream:
        return self

    async def __anext__(self) -> TextChunk:
        chunk = await self._queue.get()
        if chunk is None:
            raise StopAsyncIteration
        if isinstance(chunk, Exception):
            raise chunk
        return chunk


Script = Callable[[PreparedRequest], list[TextChunk]]


class FakeBatcher:
    """The batcher's handle: ``options(stream=True).generate.remote(prepared)`` opens a
    ``BatcherStream``. With a script, each stream answers the script's chunks and ends; without
    one, the test pushes chunks itself."""

    def __init__(self, script: Script | None = None) -> None:
        self.streams: list[BatcherStream] = []
        self._script = script

    @property
    def requests(self) -> list[PreparedRequest]:
        return [s.request for s in self.streams]

    def options(self, *, stream: bool, multiplexed_model_id: str = "") -> Any:
        assert stream, "the service must call the batcher as a stream"
        assert multiplexed_model_id == "", "no variant was asked for"
        return SimpleNamespace(generate=SimpleNamespace(remote=self._open))

    def _open(self, prepared: PreparedRequest) -> BatcherStream:
        stream = BatcherStream(prepared)
        self.streams.append(stream)
        if self._script is not None:
            stream.push(*self._script(prepared))
            stream.end()
        return stream


class Reply:
    """A handle call's response that answers at once (or raises)."""

    def __init__(self, value: Any = None, error: Exception | None = None) -> None:
        self._value, self._error = value, error

    def __await__(self) -> Generator[Any, None, Any]:
        return self._result().__await__()

    async def _result(self) -> Any:
        if self._error is not None:
            raise self._error
        return self._value

    def cancel(self) -> None:
        pass


class FakeCacheHandle:
    """The ResponseCache deployment's handle over a dict; ``VERSION`` is the live version.

    The live-version long poll never answers, so the client's near cache stays bypassed and
    every lookup reaches this handle.
    """

    def __init__(self, failing: bool = False) -> None:
        self.failing = failing
        self.entries: dict[str, CachedResponse] = {}
        self.lookups = 0
        self.stores = 0
        self.get_live = SimpleNamespace(remote=self._get_live)
        self.put = SimpleNamespace(remote=self._put)
        self.watch_live_version = SimpleNamespace(remote=lambda *_: HangingResponse())

    def _get_live(self, payload: dict[str, Any]) -> Reply:
        self.lookups += 1
        if self.failing:
            return Reply(error=RuntimeError("the cache replica died"))
        return Reply(LiveLookup(VERSION, self.entries.get(cache_key(VERSION, payload))))

    def _put(self, key: str, value: CachedResponse) -> Reply:
        self.stores += 1
        if self.failing:
            return Reply(error=RuntimeError("the cache replica died"))
        self.entries[key] = value
        return Reply()


def recorded_metrics() -> tuple[RequestMetrics, dict[str, list[Any]]]:
    """The real ``RequestMetrics`` (so Ray still checks every tag), each record also kept as
    ``records[series]``: ``(value, tags)`` for counters, the value for histograms."""
    metrics = RequestMetrics(MODEL)
    records: dict[str, list[Any]] = defaultdict(list)
    for name, series in vars(metrics).items():
        if hasattr(series, "observe"):
            observe = series.observe

            def spy_observe(value: float, *, _name: str = name, _real: Any = observe) -> None:
                _real(value)
                records[_name].append(value)

            series.observe = spy_observe
        elif hasattr(series, "inc"):  # counters; gauges are not spied on
            inc = series.inc

            def spy_inc(
                value: float = 1.0,
                tags: dict[str, str] | None = None,
                *,
                _name: str = name,
                _real: Any = inc,
            ) -> None:
                _real(value, tags=tags)
                records[_name].append((value, tags))

            series.inc = spy_inc
    return metrics, records


def service(
    batcher: FakeBatcher,
    cache: FakeCacheHandle | HangingHandle | None = None,
    metrics: RequestMetrics | None = None,
    cache_timeout_s: float = 0.5,
    admission_limit: int | None = None,
) -> CompletionService:
    return CompletionService(
        batcher,  # type: ignore[arg-type]
        ResponseCacheClient(cache, cache_timeout_s),  # type: ignore[arg-type]
        MODEL,
        DEFAULT_MAX_TOKENS,
        metrics or RequestMetrics(MODEL),
        admission_limit=admission_limit,
    )


def source_of(prepared: PreparedRequest) -> str:
    """The prepared request's prompt, or its chat messages' text."""
    if prepared.prompt is not None:
        return prepared.prompt
    return "".join(m["content"] for m in prepared.messages or [])


def echo(prepared: PreparedRequest) -> list[TextChunk]:
    """Two chunks per choice: its source, then its seed and ``finish_reason="length"``; the
    prompt counts one token per character."""
    rid, prompt_tokens = prepared.request_id, len(source_of(prepared))
    return [
        TextChunk(rid, text=f"{source_of(prepared)}|", token_ids=[1], prompt_tokens=prompt_tokens),
        TextChunk(
            rid,
            text=f"seed={prepared.params.seed}",
            token_ids=[2, 3],
            finish_reason="length",
            prompt_tokens=prompt_tokens,
            completion_tokens=3,
            model_version=VERSION,
        ),
    ]


def completion(**fields: Any) -> CompletionRequest:
    return CompletionRequest(model=MODEL, **{"prompt": "hello", "temperature": 0, **fields})


def chat(**fields: Any) -> ChatCompletionRequest:
    messages = [ChatMessage(role="user", content="hi")]
    return ChatCompletionRequest(model=MODEL, messages=messages, **fields)


def run(scenario: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(scenario)


async def until(condition: Callable[[], bool], timeout_s: float = 2.0) -> None:
    """Let the loop run until ``condition`` holds; fail after ``timeout_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        assert loop.time() < deadline, "the condition did not hold in time"
        await asyncio.sleep(0)


async def within(awaitable: Awaitable[T], timeout_s: float = 2.0) -> T:
    """``awaitable``'s result; fail after ``timeout_s`` rather than hang the suite."""
    return await asyncio.wait_for(awaitable, timeout_s)


async def collect(deltas: Awaitable[tuple[bool, Any]]) -> tuple[bool, list[ChoiceDelta]]:
    hit, stream = await deltas
    return hit, [delta async for delta in stream]


# Fan-out and results


def test_prompts_times_choices_become_one_prepared_request_each() -> None:
    batcher = FakeBatcher(echo)
    request = completion(prompt=["ab", "cdef"], n=3, seed=7, temperature=0.8, stop="END")

    result = run(service(batcher).run(request, "rid"))

    assert [p.request_id for p in batcher.requests] == [f"rid-{i}" for i in range(6)]
    assert [p.prompt for p in batcher.requests] == ["ab"] * 3 + ["cdef"] * 3
    # Choice i of each prompt samples with seed + i, so the choices differ but reproduce.
    assert [p.params.seed for p in batcher.requests] == [7, 8, 9, 7, 8, 9]
    assert all(p.params.temperature == 0.8 and p.stop == ["END"] for p in batcher.requests)
    assert [c.text for c in result.choices] == [
        "ab|seed=7", "ab|seed=8", "ab|seed=9", "cdef|seed=7", "cdef|seed=8", "cdef|seed=9",
    ]  # fmt: skip
    assert all(c.finish_reason == "length" for c in result.choices)
    assert result.choices[4].token_ids == [1, 2, 3]
    # Each prompt counts once however many choices sample from it.
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (2 + 4, 6 * 3)
    assert result.usage.total_tokens == 24
    assert not result.cache_hit
    assert result.model_version == VERSION


def test_unseeded_choices_stay_unseeded() -> None:
    batcher = FakeBatcher(echo)
    run(service(batcher).run(completion(n=2, temperature=1.0), "rid"))
    assert [p.params.seed for p in batcher.requests] == [None, None]


def test_chat_without_a_limit_may_fill_the_context() -> None:
    batcher = FakeBatcher(echo)
    run(service(batcher).run(chat(), "rid"))
    (prepared,) = batcher.requests
    assert prepared.messages == [{"role": "user", "content": "hi"}]
    assert prepared.prompt is None
    assert prepared.params.fit_to_context
    assert prepared.params.max_tokens == DEFAULT_MAX_TOKENS


@pytest.mark.parametrize("limit", ["max_tokens", "max_completion_tokens"])
def test_chat_with_a_limit_keeps_it(limit: str) -> None:
    batcher = FakeBatcher(echo)
    run(service(batcher).run(chat(**{limit: 5}), "rid"))
    (prepared,) = batcher.requests
    assert not prepared.params.fit_to_context
    assert prepared.params.max_tokens == 5


def test_logprobs_accumulate_per_choice() -> None:
    def with_logprobs(prepared: PreparedRequest) -> list[TextChunk]:
        rid = prepared.request_id
        first = TokenText("a", -0.5, [("a", -0.5)])
        second = TokenText("b", -1.5, [("b", -1.5)])
        return [
            TextChunk(rid, text="a", token_ids=[1], logprobs=[first], prompt_tokens=1),
            TextChunk(
                rid,
                text="b",
                token_ids=[2],
                logprobs=[second],
                finish_reason="stop",
                prompt_tokens=1,
            ),
        ]

    result = run(service(FakeBatcher(with_logprobs)).run(completion(logprobs=1), "rid"))

    assert [t.text for t in result.choices[0].logprobs] == ["a", "b"]
    assert result.choices[0].text == "ab"


def test_an_unknown_model_is_a_404_before_any_generation() -> None:
    batcher = FakeBatcher(echo)
    with pytest.raises(ApiError) as raised:
        run(service(batcher).run(CompletionRequest(model="gpt-4", prompt="x"), "rid"))
    assert (raised.value.status, raised.value.param) == (404, "model")
    assert raised.value.code == "model_not_found"
    assert batcher.streams == []


# Streams: merging, errors, cancellation


def test_deltas_of_several_choices_arrive_as_they_come() -> None:
    async def scenario() -> list[tuple[int, str, str | None]]:
        batcher = FakeBatcher()
        pending = asyncio.ensure_future(service(batcher).stream(completion(n=2), "rid"))
        await until(lambda: len(batcher.streams) == 2)
        first, second = batcher.streams
        seen = []
        second.push(TextChunk("rid-1", text="B1", token_ids=[1], prompt_tokens=1))
        hit, deltas = await within(pending)
        assert not hit

        async def next_delta() -> None:
            delta = await within(anext(deltas))
            seen.append((delta.index, delta.chunk.text, delta.chunk.finish_reason))

        await next_delta()
        first.push(TextChunk("rid-0", text="A1", token_ids=[1], prompt_tokens=1))
        await next_delta()
        second.push(
            TextChunk("rid-1", text="B2", token_ids=[2], finish_reason="stop", prompt_tokens=1)
        )
        await next_delta()
        first.push(
            TextChunk("rid-0", text="A2", token_ids=[2], finish_reason="length", prompt_tokens=1)
        )
        await next_delta()
        with pytest.raises(StopAsyncIteration):
            await within(
                anext(deltas)
            )  # both choices finished: no need to wait for their streams' ends
        return seen

    assert run(scenario()) == [
        (1, "B1", None), (0, "A1", None), (1, "B2", "stop"), (0, "A2", "length"),
    ]  # fmt: skip


def test_an_error_chunk_raises_its_api_error_and_cancels_the_other_choices() -> None:
    async def scenario() -> list[BatcherStream]:
        batcher = FakeBatcher()
        running = asyncio.ensure_future(service(batcher).run(completion(n=2), "rid"))
        await until(lambda: len(batcher.streams) == 2)
        batcher.streams[0].push(TextChunk("rid-0", text="fine", token_ids=[1]))
        error = RequestError(400, "the prompt is too long", param="prompt", code="too_long")
        batcher.streams[1].push(TextChunk("rid-1", error=error))
        with pytest.raises(ApiError) as raised:
            await within(running)
        assert (raised.value.status, raised.value.param) == (400, "prompt")
        assert (raised.value.message, raised.value.code) == ("the prompt is too long", "too_long")
        assert raised.value.type == "invalid_request_error"
        await until(lambda: all(s.cancelled for s in batcher.streams))
        return batcher.streams

    assert len(run(scenario())) == 2


def test_a_failed_batcher_call_raises_its_error_and_cancels_the_other_choices() -> None:
    async def scenario() -> None:
        batcher = FakeBatcher()
        running = asyncio.ensure_future(service(batcher).run(completion(n=2), "rid"))
        await until(lambda: len(batcher.streams) == 2)
        busy = BackPressureError(8, 8, retry_after_s=2.5)
        batcher.streams[0].push(busy)
        # Serve's own handler would answer it in plain text: it leaves as the API's 503.
        with pytest.raises(ApiError) as raised:
            await within(running)
        error = raised.value
        assert (error.status, error.code, error.retry_after) == (503, "overloaded", "3")
        await until(lambda: all(s.cancelled for s in batcher.streams))

    run(scenario())


def test_stream_raises_before_returning_when_the_first_chunk_is_an_error() -> None:
    def overloaded(prepared: PreparedRequest) -> list[TextChunk]:
        return [TextChunk(prepared.request_id, error=RequestError(503, "queue full"))]

    with pytest.raises(ApiError) as raised:
        run(service(FakeBatcher(overloaded)).stream(completion(), "rid"))
    assert (raised.value.status, raised.value.message) == (503, "queue full")
    assert raised.value.retry_after == "1"


def test_a_stream_that_ends_without_output_is_a_500_naming_the_request() -> None:
    with pytest.raises(ApiError) as raised:
        run(service(FakeBatcher(lambda _: [])).stream(completion(), "rid-42"))
    assert raised.value.status == 500
    assert "rid-42" in raised.value.message


def test_closing_the_merged_stream_cancels_every_batcher_stream() -> None:
    async def scenario() -> None:
        batcher = FakeBatcher()
        pending = asyncio.ensure_future(service(batcher).stream(completion(n=3), "rid"))
        await until(lambda: len(batcher.streams) == 3)
        batcher.streams[2].push(TextChunk("rid-2", text="x", token_ids=[1]))
        _, deltas = await within(pending)
        assert not any(s.cancelled for s in batcher.streams)  # generation is still wanted
        await deltas.aclose()  # type: ignore[attr-defined]  # the client went away
        await until(lambda: all(s.cancelled for s in batcher.streams))

    run(scenario())


# Admission (the exact gate in front of the batcher)


def test_streams_past_the_admission_limit_are_refused_at_once_and_places_come_back() -> None:
    async def scenario() -> None:
        batcher = FakeBatcher()
        gated = service(batcher, admission_limit=3)
        first = asyncio.ensure_future(gated.run(completion(n=2), "a"))
        second = asyncio.ensure_future(gated.run(completion(prompt="other"), "b"))
        await until(lambda: len(batcher.streams) == 3)
        for refused in (
            gated.run(completion(prompt="third"), "c"),
            gated.stream(completion(), "d"),
        ):
            with pytest.raises(ApiError) as raised:
                await within(refused)
            error = raised.value
            assert (error.status, error.code, error.retry_after) == (503, "overloaded", "1")
        assert len(batcher.streams) == 3  # refused before any batcher call
        for stream in batcher.streams:
            stream.push(*echo(stream.request))
            stream.end()
        await within(asyncio.gather(first, second))
        assert gated.admission.in_flight == 0
        later = asyncio.ensure_future(gated.run(completion(prompt="now there is room"), "e"))
        await until(lambda: len(batcher.streams) == 4)
        batcher.streams[3].push(*echo(batcher.streams[3].request))
        batcher.streams[3].end()
        await within(later)

    run(scenario())


def test_a_request_wider_than_the_limit_is_let_in_alone() -> None:
    async def scenario() -> None:
        batcher = FakeBatcher(echo)
        gated = service(batcher, admission_limit=2)
        result = await within(gated.run(completion(n=3), "wide"))
        assert len(result.choices) == 3

    run(scenario())


def test_a_refused_stream_is_not_a_model_path_failure_for_the_breaker() -> None:
    async def scenario() -> None:
        batcher = FakeBatcher()
        gated = service(batcher, admission_limit=1)
        holder = asyncio.ensure_future(gated.run(completion(), "a"))
        await until(lambda: len(batcher.streams) == 1)
        for _ in range(20):
            with pytest.raises(ApiError):
                await within(gated.run(completion(prompt="more"), "b"))
        assert gated.circuit_state.label == "closed"
        batcher.streams[0].push(*echo(batcher.streams[0].request))
        batcher.streams[0].end()
        await within(holder)

    run(scenario())


# Metrics (the real RequestMetrics, recorded values kept)


def test_latency_and_token_series_are_recorded_per_choice() -> None:
    metrics, records = recorded_metrics()

    def three_chunks(prepared: PreparedRequest) -> list[TextChunk]:
        rid = prepared.request_id
        return [
            TextChunk(rid, text="a", token_ids=[1], prompt_tokens=4),
            TextChunk(rid, text="bc", token_ids=[2, 3], prompt_tokens=4),
            TextChunk(rid, text="d", token_ids=[4], finish_reason="length", prompt_tokens=4),
        ]

    request = completion(n=2, temperature=1.0)
    run(service(FakeBatcher(three_chunks), metrics=metrics).run(request, "rid"))

    assert len(records["time_to_first_token"]) == 2  # one per choice
    assert len(records["inter_token_latency"]) == 2 * 3  # every token after each first one
    assert sorted(v for v, _ in records["generation_tokens"]) == [1, 1, 1, 1, 2, 2]
    assert len(records["e2e_latency"]) == 2
    assert {value for value, _ in records["prompt_tokens"]} == {4}
    assert records["requests"] == [(1.0, {"finish_reason": "length"})] * 2
    assert all(t >= 0 for t in records["time_to_first_token"] + records["e2e_latency"])


# Response cache


def test_a_deterministic_request_is_stored_then_replayed_without_the_batcher() -> None:
    metrics, records = recorded_metrics()
    batcher, cache = FakeBatcher(echo), FakeCacheHandle()
    svc = service(batcher, cache, metrics)
    request = completion(prompt=["ab", "cdef"], n=2)

    async def scenario() -> tuple[Any, Any]:
        return await svc.run(request, "first"), await svc.run(request, "second")

    first, second = run(scenario())

    assert len(batcher.streams) == 4  # the second request never reached the batcher
    assert (cache.lookups, cache.stores) == (2, 1)
    assert second.cache_hit and not first.cache_hit
    assert [c.text for c in second.choices] == [c.text for c in first.choices]
    assert [c.token_ids for c in second.choices] == [c.token_ids for c in first.choices]
    assert [c.finish_reason for c in second.choices] == ["length"] * 4
    assert second.usage == first.usage
    assert records["cache_misses"] == [(1.0, None)]
    assert records["cache_hits"] == [(1.0, None)]


def test_a_seeded_sampled_request_is_cached() -> None:
    batcher, cache = FakeBatcher(echo), FakeCacheHandle()
    svc = service(batcher, cache)
    request = completion(temperature=0.9, seed=3)

    async def scenario() -> None:
        await svc.run(request, "first")
        await svc.run(request, "second")

    run(scenario())
    assert (len(batcher.streams), cache.stores) == (1, 1)


def test_another_sampling_parameter_is_another_cache_entry() -> None:
    batcher, cache = FakeBatcher(echo), FakeCacheHandle()
    svc = service(batcher, cache)

    async def scenario() -> None:
        await svc.run(completion(max_tokens=5), "first")
        await svc.run(completion(max_tokens=6), "second")

    run(scenario())
    assert len(batcher.streams) == 2
    assert len(cache.entries) == 2


def test_a_streamed_miss_is_stored_once_every_choice_finished() -> None:
    batcher, cache = FakeBatcher(echo), FakeCacheHandle()
    svc = service(batcher, cache)
    request = completion(n=2)

    hit, deltas = run(collect(svc.stream(request, "rid")))

    assert not hit
    assert len(deltas) == 4
    assert cache.stores == 1
    (stored,) = cache.entries.values()
    assert [c.text for c in stored.choices] == ["hello|seed=None"] * 2
    assert (stored.prompt_tokens, stored.completion_tokens) == (5, 6)


def test_a_stream_closed_early_is_not_stored() -> None:
    async def scenario() -> None:
        batcher, cache = FakeBatcher(), FakeCacheHandle()
        pending = asyncio.ensure_future(service(batcher, cache).stream(completion(n=2), "rid"))
        await until(lambda: len(batcher.streams) == 2)
        first = batcher.streams[0]
        first.push(echo(first.request)[0])  # one choice begun, neither finished
        _, deltas = await within(pending)
        await deltas.aclose()  # type: ignore[attr-defined]
        assert cache.stores == 0

    run(scenario())


def test_a_streamed_hit_replays_each_choice_as_one_final_chunk() -> None:
    batcher, cache = FakeBatcher(echo), FakeCacheHandle()
    svc = service(batcher, cache)
    request = completion(n=2)

    async def scenario() -> tuple[bool, list[ChoiceDelta]]:
        await svc.run(request, "first")
        return await collect(svc.stream(request, "second"))

    hit, deltas = run(scenario())

    assert hit
    assert len(batcher.streams) == 2  # only the first request's choices
    assert [d.index for d in deltas] == [0, 1]
    assert [d.chunk.text for d in deltas] == ["hello|seed=None"] * 2
    assert [d.chunk.token_ids for d in deltas] == [[1, 2, 3]] * 2
    assert [d.chunk.finish_reason for d in deltas] == ["length"] * 2


def test_a_streamed_hit_reports_the_same_usage_as_the_original() -> None:
    batcher, cache = FakeBatcher(echo), FakeCacheHandle()
    svc = service(batcher, cache)
    request = completion(prompt=["ab", "cdef"])

    async def scenario() -> tuple[Any, Any]:
        original = await svc.run(request, "first")
        _, deltas = await svc.stream(request, "second")
        accumulator = Accumulator.of(request)  # what the ingress renders usage from
        async for delta in deltas:
            accumulator.add(delta)
        return original.usage, accumulator.result().usage

    original, replayed = run(scenario())
    assert replayed == original


def test_unfinished_choices_are_not_stored() -> None:
    def cut_short(prepared: PreparedRequest) -> list[TextChunk]:
        return [TextChunk(prepared.request_id, text="par", token_ids=[1], model_version=VERSION)]

    cache = FakeCacheHandle()
    result = run(service(FakeBatcher(cut_short), cache).run(completion(), "rid"))
    assert result.choices[0].finish_reason is None
    assert (cache.lookups, cache.stores) == (1, 0)


def test_an_answer_without_a_model_version_is_not_stored() -> None:
    def unversioned(prepared: PreparedRequest) -> list[TextChunk]:
        rid = prepared.request_id
        return [TextChunk(rid, text="x", token_ids=[1], finish_reason="stop", prompt_tokens=1)]

    cache = FakeCacheHandle()
    run(service(FakeBatcher(unversioned), cache).run(completion(), "rid"))
    assert (cache.lookups, cache.stores) == (1, 0)


@pytest.mark.parametrize(
    "request_",
    [
        pytest.param(completion(temperature=0.7), id="sampled-completion"),
        pytest.param(chat(temperature=1.0), id="sampled-chat"),
        pytest.param(completion(logprobs=2), id="completion-logprobs"),
        pytest.param(chat(temperature=0, logprobs=True), id="chat-logprobs"),
        pytest.param(completion(logprobs=0), id="completion-logprobs-0"),
    ],
)
def test_sampled_and_logprobs_requests_are_never_cached(request_: Any) -> None:
    metrics, records = recorded_metrics()
    batcher, cache = FakeBatcher(echo), FakeCacheHandle()
    svc = service(batcher, cache, metrics)

    async def scenario() -> None:
        await svc.run(request_, "first")
        await svc.run(request_, "second")

    run(scenario())
    assert (cache.lookups, cache.stores) == (0, 0)
    assert len(batcher.streams) == 2
    assert "cache_hits" not in records and "cache_misses" not in records


def test_a_failing_cache_degrades_to_a_miss() -> None:
    metrics, records = recorded_metrics()
    batcher, cache = FakeBatcher(echo), FakeCacheHandle(failing=True)
    svc = service(batcher, cache, metrics)

    result = run(svc.run(completion(), "rid"))

    assert result.choices[0].text == "hello|seed=None"
    assert (cache.lookups, cache.stores) == (1, 1)
    assert svc.cache.errors == 2
    assert records["cache_misses"] == [(1.0, None)]


def test_a_hanging_cache_degrades_to_a_miss_and_its_calls_are_cancelled() -> None:
    async def scenario() -> None:
        hanging = HangingHandle()
        svc = service(FakeBatcher(echo), hanging, cache_timeout_s=0.01)
        result = await svc.run(completion(), "rid")
        assert result.choices[0].finish_reason == "length"
        # The lookup and the store gave up at their deadline; the live-version poll still waits.
        assert len(hanging.responses) == 3
        assert sum(r.cancelled for r in hanging.responses) == 2
        assert svc.cache.errors == 2

    run(scenario())


def test_without_a_cache_handle_nothing_is_cached() -> None:
    batcher = FakeBatcher(echo)
    svc = service(batcher, None)

    async def scenario() -> None:
        await svc.run(completion(), "first")
        await svc.run(completion(), "second")

    run(scenario())
    assert len(batcher.streams) == 2
