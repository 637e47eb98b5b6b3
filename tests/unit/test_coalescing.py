"""Unit tests of request coalescing: the ``Coalescer`` over a stream the test drives, then
``CompletionService`` with it (and the circuit breaker) over a fake batcher (no Ray, no sleeps)."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import AsyncIterator
from typing import Any

import pytest

from serve_app.api.errors import ApiError
from serve_app.clients.response_cache import ResponseCacheClient
from serve_app.coalescing import Coalescer
from serve_app.config import CircuitBreakerConfig
from serve_app.messages import PreparedRequest, RequestError, TextChunk
from serve_app.metrics import RequestMetrics
from serve_app.orchestration import CompletionService
from tests.unit.test_orchestration import (
    MODEL,
    FakeBatcher,
    FakeCacheHandle,
    chat,
    collect,
    completion,
    echo,
    recorded_metrics,
    service,
    until,
    within,
)

_END = object()


class Generation:
    """A stream the test feeds item by item; it records how often it was started and whether
    it was closed before its end."""

    def __init__(self) -> None:
        self.starts = 0
        self.closed_early = False
        self._queue: asyncio.Queue[Any] = asyncio.Queue()

    def feed(self, *items: Any) -> None:
        """Items to yield; ``_END`` ends the stream, an exception is raised where it stands."""
        for item in items:
            self._queue.put_nowait(item)

    def start(self) -> AsyncIterator[Any]:
        self.starts += 1
        return self._run()

    async def _run(self) -> AsyncIterator[Any]:
        finished = False
        try:
            while (item := await self._queue.get()) is not _END:
                if isinstance(item, Exception):
                    raise item
                yield item
            finished = True
        finally:
            self.closed_early = not finished


async def take(stream: AsyncIterator[Any], count: int) -> list[Any]:
    return [await within(anext(stream)) for _ in range(count)]


async def rest(stream: AsyncIterator[Any]) -> list[Any]:
    return await within(_drain(stream))


async def _drain(stream: AsyncIterator[Any]) -> list[Any]:
    return [item async for item in stream]


def run(scenario: Any) -> Any:
    return asyncio.run(scenario)


# The coalescer


def test_followers_share_one_generation_and_a_late_one_replays_it_from_the_start() -> None:
    async def scenario() -> None:
        joins: list[None] = []
        coalescer: Coalescer[str] = Coalescer(on_join=lambda: joins.append(None))
        generation = Generation()
        first = coalescer.stream("k", generation.start)
        generation.feed("a", "b")
        assert await take(first, 2) == ["a", "b"]
        late = coalescer.stream("k", generation.start)
        assert await take(late, 2) == ["a", "b"]  # what came before it joined
        generation.feed("c", _END)
        assert await rest(first) == ["c"]
        assert await rest(late) == ["c"]
        assert generation.starts == 1
        assert len(joins) == 1
        assert coalescer.in_flight() == 0

    run(scenario())


def test_other_keys_and_a_key_whose_flight_ended_start_their_own_generation() -> None:
    async def scenario() -> None:
        coalescer: Coalescer[str] = Coalescer()
        one, other = Generation(), Generation()
        a = coalescer.stream("one", one.start)
        b = coalescer.stream("other", other.start)
        one.feed("x", _END)
        other.feed("y", _END)
        assert (await rest(a), await rest(b)) == (["x"], ["y"])
        again = coalescer.stream("one", one.start)
        one.feed("z", _END)
        assert await rest(again) == ["z"]
        assert (one.starts, other.starts) == (2, 1)

    run(scenario())


def test_the_first_follower_leaving_does_not_stop_the_generation_for_the_others() -> None:
    async def scenario() -> None:
        coalescer: Coalescer[str] = Coalescer()
        generation = Generation()
        leader = coalescer.stream("k", generation.start)
        generation.feed("a")
        await take(leader, 1)
        follower = coalescer.stream("k", generation.start)
        await leader.aclose()  # the first client went away
        generation.feed("b", _END)
        assert await rest(follower) == ["a", "b"]
        assert not generation.closed_early

    run(scenario())


def test_the_last_follower_leaving_stops_the_generation() -> None:
    async def scenario() -> None:
        coalescer: Coalescer[str] = Coalescer()
        generation = Generation()
        one = coalescer.stream("k", generation.start)
        two = coalescer.stream("k", generation.start)
        generation.feed("a")
        await take(one, 1)
        await take(two, 1)
        await one.aclose()
        assert not generation.closed_early
        await two.aclose()
        assert generation.closed_early  # closed by the time the last follower has left
        assert coalescer.in_flight() == 0

    run(scenario())


def test_a_follower_cancelled_while_waiting_leaves_the_flight() -> None:
    async def scenario() -> None:
        coalescer: Coalescer[str] = Coalescer()
        generation = Generation()
        got: list[str] = []

        async def follow() -> None:
            async for item in coalescer.stream("k", generation.start):
                got.append(item)

        waiting = asyncio.ensure_future(follow())
        generation.feed("a")
        await until(lambda: got == ["a"])  # it follows, and waits for more
        waiting.cancel()  # its client went away
        await asyncio.wait({waiting})
        assert generation.closed_early
        assert coalescer.in_flight() == 0

    run(scenario())


def test_a_failed_generation_fails_every_follower_with_its_error() -> None:
    async def scenario() -> None:
        coalescer: Coalescer[str] = Coalescer()
        generation = Generation()
        followers = [coalescer.stream("k", generation.start) for _ in range(3)]
        generation.feed("a", ApiError(503, "the model replica failed", code="model_failed"))
        for follower in followers:
            with pytest.raises(ApiError, match="replica failed"):
                await rest(follower)
        assert coalescer.in_flight() == 0

    run(scenario())


def test_the_generation_runs_outside_the_first_callers_context() -> None:
    # Serve cancels the calls a request made when its client goes away, finding them
    # through the request's context; the shared generation must not be among them.
    request_of: contextvars.ContextVar[str] = contextvars.ContextVar("request", default="none")

    async def seen_context() -> AsyncIterator[str]:
        yield request_of.get()

    async def scenario() -> list[str]:
        request_of.set("first caller")
        return await rest(Coalescer[str]().stream("k", seen_context))

    assert run(scenario()) == ["none"]


# CompletionService: coalescing


def test_identical_greedy_requests_in_flight_run_once_and_get_the_same_answer() -> None:
    metrics, records = recorded_metrics()

    async def scenario() -> None:
        batcher = FakeBatcher()
        svc = service(batcher, metrics=metrics)
        request = completion(prompt="same", max_tokens=4)
        runs = [asyncio.ensure_future(svc.run(request, f"r{i}")) for i in range(3)]
        streams = [asyncio.ensure_future(collect(svc.stream(request, f"s{i}"))) for i in range(3)]
        await until(lambda: len(batcher.streams) == 1)
        (only,) = batcher.streams
        only.push(*echo(only.request))
        only.end()
        results = await within(asyncio.gather(*runs))
        streamed = await within(asyncio.gather(*streams))
        assert len(batcher.streams) == 1  # one generation for six requests
        assert {r.choices[0].text for r in results} == {"same|seed=None"}
        for hit, deltas in streamed:
            assert not hit
            assert "".join(d.chunk.text for d in deltas) == "same|seed=None"

    run(scenario())
    assert len(records["coalesced_requests"]) == 5
    assert len(records["requests"]) == 1  # the generation finished once


def test_a_stream_joining_late_gets_every_delta_from_the_first() -> None:
    async def scenario() -> None:
        batcher = FakeBatcher()
        svc = service(batcher)
        request = chat(temperature=0, max_tokens=4)
        early = asyncio.ensure_future(svc.stream(request, "early"))
        await until(lambda: len(batcher.streams) == 1)
        (only,) = batcher.streams
        first, last = echo(only.request)
        only.push(first)
        _, early_deltas = await within(early)
        late_hit, late_deltas = await within(svc.stream(request, "late"))
        only.push(last)
        only.end()
        early_chunks = [d.chunk for d in await rest(early_deltas)]
        late_chunks = [d.chunk for d in await rest(late_deltas)]
        assert early_chunks == late_chunks == [first, last]
        assert not late_hit

    run(scenario())


def test_sampled_requests_and_a_service_without_coalescing_generate_each_time() -> None:
    async def scenario(svc: CompletionService, batcher: FakeBatcher, **fields: Any) -> int:
        request = completion(prompt="same", **fields)
        pending = [asyncio.ensure_future(svc.run(request, f"r{i}")) for i in range(2)]
        await until(lambda: len(batcher.streams) == 2)
        for stream in batcher.streams:
            stream.push(*echo(stream.request))
            stream.end()
        await within(asyncio.gather(*pending))
        return len(batcher.streams)

    sampled = FakeBatcher()
    assert run(scenario(service(sampled), sampled, temperature=0.8)) == 2
    plain = FakeBatcher()
    uncoalesced = CompletionService(
        plain,  # type: ignore[arg-type]
        ResponseCacheClient(None),
        MODEL,
        32,
        RequestMetrics(MODEL),
        coalesce=False,
    )
    assert run(scenario(uncoalesced, plain)) == 2


def test_a_coalesced_answer_is_cached_once() -> None:
    async def scenario() -> int:
        batcher, cache = FakeBatcher(), FakeCacheHandle()
        svc = service(batcher, cache)
        request = completion(prompt="same")
        pending = [asyncio.ensure_future(svc.run(request, f"r{i}")) for i in range(4)]
        await until(lambda: len(batcher.streams) == 1)
        batcher.streams[0].push(*echo(batcher.streams[0].request))
        batcher.streams[0].end()
        await within(asyncio.gather(*pending))
        assert (await svc.run(request, "after")).cache_hit
        return cache.stores

    assert run(scenario()) == 1


# CompletionService: the circuit breaker


def failing(prepared: PreparedRequest) -> list[TextChunk]:
    error = RequestError(503, "the model replica failed; retry the request", code="model_failed")
    return [TextChunk(prepared.request_id, error=error)]


def breaking_service(batcher: FakeBatcher, cache: FakeCacheHandle) -> CompletionService:
    config = CircuitBreakerConfig(failure_threshold=2, cooldown_s=60)
    return CompletionService(
        batcher,  # type: ignore[arg-type]
        ResponseCacheClient(cache),  # type: ignore[arg-type]
        MODEL,
        32,
        RequestMetrics(MODEL),
        circuit_breaker=config,
    )


def test_after_repeated_failures_requests_are_refused_without_calling_the_batcher() -> None:
    batcher = FakeBatcher(failing)
    svc = breaking_service(batcher, FakeCacheHandle())

    async def scenario() -> None:
        for i in range(2):
            with pytest.raises(ApiError, match="replica failed"):
                await svc.run(completion(prompt=f"p{i}", temperature=0.7), f"r{i}")
        for call in (svc.run(completion(temperature=0.7), "r"), svc.stream(chat(), "s")):
            with pytest.raises(ApiError) as raised:
                await call
            assert (raised.value.status, raised.value.code) == (503, "circuit_open")

    run(scenario())
    assert len(batcher.streams) == 2
    assert svc.circuit_state.label == "open"


def test_cached_answers_are_still_served_while_the_breaker_is_open() -> None:
    cache = FakeCacheHandle()
    works = FakeBatcher(echo)
    request = completion(prompt="kept")

    async def scenario() -> None:
        svc = breaking_service(works, cache)
        await svc.run(request, "fill")
        svc.batcher = FakeBatcher(failing)  # the model path breaks afterwards
        for i in range(2):
            with pytest.raises(ApiError):
                await svc.run(completion(prompt=f"p{i}"), f"r{i}")
        assert svc.circuit_state.label == "open"
        hit = await svc.run(request, "again")
        assert hit.cache_hit and hit.choices[0].text == "kept|seed=None"

    run(scenario())


def test_overload_and_client_errors_do_not_open_it() -> None:
    def overloaded(prepared: PreparedRequest) -> list[TextChunk]:
        return [TextChunk(prepared.request_id, error=RequestError(503, "queue full"))]

    svc = breaking_service(FakeBatcher(overloaded), FakeCacheHandle())

    async def scenario() -> None:
        for i in range(5):
            with pytest.raises(ApiError, match="queue full"):
                await svc.run(completion(prompt=f"p{i}"), f"r{i}")

    run(scenario())
    assert svc.circuit_state.label == "closed"
