"""Tracing in process, with an in-memory exporter: the spans of the orchestration, the batcher
and the model server's timing, their parenting through the W3C context the messages carry, a
client's ``traceparent`` honoured, and nothing traced when tracing is off."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from serve_app import tracing
from serve_app.api.openai import CompletionRequest
from serve_app.config import TracingConfig
from serve_app.deployments.model_server import _trace_outputs
from serve_app.engine import FinishReason, GenerationRequest, SequenceOutput
from serve_app.messages import PreparedRequest
from tests.unit.test_batcher import (
    Caller,
    FakeModel,
    ModelStream,
    finish_all,
    first_step,
    make_batcher,
    request,
    serve_batch,  # noqa: F401  (autouse: @serve.batch on the test's event loop)
)
from tests.unit.test_orchestration import FakeBatcher, FakeCacheHandle, echo, service

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN_ID = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{CLIENT_SPAN_ID}-01"


@pytest.fixture
def exported() -> Iterator[InMemorySpanExporter]:
    """Tracing on for the test, every finished span kept in memory."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use_provider(provider)
    yield exporter
    tracing.use_provider(None)


def by_name(exporter: InMemorySpanExporter) -> dict[str, ReadableSpan]:
    spans = exporter.get_finished_spans()
    named = {s.name: s for s in spans}
    assert len(named) == len(spans), f"a span name repeats: {[s.name for s in spans]}"
    return named


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def traceparent_of(span: ReadableSpan) -> str:
    context = span.get_span_context()
    assert context is not None
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-01"


# --- orchestration (the ingress's side) ---


def test_a_request_with_a_client_traceparent_joins_the_clients_trace(
    exported: InMemorySpanExporter,
) -> None:
    batcher, cache = FakeBatcher(echo), FakeCacheHandle()
    body = CompletionRequest(model="demo", prompt="hi", temperature=0, max_tokens=2)

    asyncio.run(service(batcher, cache).run(body, "req-1", {"traceparent": TRACEPARENT}))

    spans = by_name(exported)
    assert set(spans) == {"ingress", "response_cache.lookup", "response_cache.store"}
    ingress = spans["ingress"]
    assert f"{ingress.context.trace_id:032x}" == TRACE_ID
    assert parent_of(ingress) == int(CLIENT_SPAN_ID, 16)
    assert ingress.attributes is not None
    assert ingress.attributes[tracing.REQUEST_ID] == "req-1"
    assert ingress.attributes["serve_app.cache_hit"] is False
    for child in ("response_cache.lookup", "response_cache.store"):
        assert parent_of(spans[child]) == ingress.context.span_id
        assert spans[child].kind is SpanKind.CLIENT
    # The batcher's spans will be children of the ingress span: its context travels along.
    (prepared,) = batcher.requests
    assert prepared.trace_context == {"traceparent": traceparent_of(ingress)}


def test_without_a_traceparent_each_request_starts_a_trace_of_its_own(
    exported: InMemorySpanExporter,
) -> None:
    body = CompletionRequest(model="demo", prompt="hi", max_tokens=2)  # sampled: never cached
    asyncio.run(service(FakeBatcher(echo)).run(body, "req-2"))

    (ingress,) = exported.get_finished_spans()
    assert ingress.name == "ingress" and ingress.parent is None
    assert ingress.context.trace_id != int(TRACE_ID, 16)


def test_a_streamed_request_span_ends_with_its_stream_and_records_a_failure(
    exported: InMemorySpanExporter,
) -> None:
    batcher = FakeBatcher()
    body = CompletionRequest(model="demo", prompt="hi", max_tokens=2, stream=True)

    async def scenario() -> None:
        start = asyncio.ensure_future(
            service(batcher).stream(body, "req-3", {"traceparent": TRACEPARENT})
        )
        deadline = asyncio.get_running_loop().time() + 2.0
        while not batcher.streams:  # the request reaches the batcher
            assert asyncio.get_running_loop().time() < deadline, "no batcher call"
            await asyncio.sleep(0)
        stream = batcher.streams[0]
        stream.push(*echo(stream.request)[:1])  # the first chunk: the stream begins
        _, deltas = await start
        await anext(deltas)
        assert exported.get_finished_spans() == ()  # still streaming
        stream.push(RuntimeError("the batcher replica died"))
        with pytest.raises(RuntimeError):
            await anext(deltas)

    asyncio.run(scenario())
    (ingress,) = exported.get_finished_spans()
    assert ingress.attributes is not None and ingress.attributes["serve_app.stream"] is True
    assert ingress.status.status_code is StatusCode.ERROR
    assert f"{ingress.context.trace_id:032x}" == TRACE_ID


# --- the batcher ---


class TracedModel(FakeModel):
    """The fake model handle, also keeping the trace contexts each micro-batch call carried."""

    def __init__(self) -> None:
        super().__init__()
        self.trace_contexts: list[dict[str, dict[str, str]] | None] = []

    def _generate_batch(
        self,
        requests: list[GenerationRequest],
        trace_contexts: dict[str, dict[str, str]] | None = None,
    ) -> ModelStream:
        self.trace_contexts.append(trace_contexts)
        return super()._generate_batch(requests)


def test_the_batcher_span_is_the_callers_child_and_the_model_servers_parent(
    exported: InMemorySpanExporter, model_dir: Path
) -> None:
    callers = {"a": f"00-{TRACE_ID}-{CLIENT_SPAN_ID}-01", "b": f"00-{'1' * 32}-{'2' * 16}-01"}

    model = TracedModel()

    async def scenario() -> None:
        batcher = make_batcher(model, model_dir, batch_size=2)
        readers = [
            Caller(batcher, traced(request(i), parent), model.changes)
            for i, parent in callers.items()
        ]
        await model.changes.until(lambda: len(model.streams) == 1)
        model.streams[0].send(first_step())
        finish_all(model.streams[0])
        await model.changes.until(lambda: all(r.done for r in readers))

    asyncio.run(scenario())
    spans = {s.attributes[tracing.REQUEST_ID]: s for s in exported.get_finished_spans()}  # type: ignore[index]
    assert set(spans) == set(callers)
    for request_id, parent in callers.items():
        span = spans[request_id]
        assert span.name == "batcher"
        assert (span.context.trace_id, parent_of(span)) == (
            int(parent.split("-")[1], 16),
            int(parent.split("-")[2], 16),
        )
        assert span.attributes is not None
        assert span.attributes["serve_app.finish_reason"] == "length"
    # One micro-batch call, carrying each request's batcher span as the parent to use.
    assert model.trace_contexts == [
        {i: {"traceparent": traceparent_of(s)} for i, s in spans.items()}
    ]


def traced(prepared: PreparedRequest, traceparent: str) -> PreparedRequest:
    return PreparedRequest(
        prepared.request_id,
        prepared.params,
        prepared.prompt,
        trace_context={"traceparent": traceparent},
    )


# --- the model server ---


def output(
    request_id: str,
    tokens: int,
    produced: int,
    finish: FinishReason | None = None,
    prefill_started_at: float | None = None,
) -> SequenceOutput:
    new = tuple(range(tokens))
    return SequenceOutput(request_id, new, None, finish, 5, produced, None, prefill_started_at)


def test_the_model_server_times_queue_wait_prefill_first_token_and_decode(
    exported: InMemorySpanExporter,
) -> None:
    traces = {"a": tracing.GenerationSpans({"traceparent": TRACEPARENT}, "a", replica_id="r1")}
    prefill_started = time.monotonic()
    _trace_outputs(traces, [output("a", 1, 1, prefill_started_at=prefill_started)])
    _trace_outputs(traces, [output("a", 1, 2)])
    assert exported.get_finished_spans() != () and "a" in traces  # not finished yet
    _trace_outputs(traces, [output("a", 1, 3, FinishReason.STOP)])

    assert traces == {}
    spans = by_name(exported)
    assert set(spans) == {"model_server", "queue_wait", "prefill", "decode"}
    server = spans["model_server"]
    assert (f"{server.context.trace_id:032x}", parent_of(server)) == (
        TRACE_ID,
        int(CLIENT_SPAN_ID, 16),
    )
    assert server.attributes == {
        tracing.REQUEST_ID: "a",
        "serve_app.replica_id": "r1",
        "serve_app.finish_reason": "stop",
        "serve_app.prompt_tokens": 5,
        "serve_app.completion_tokens": 3,
    }
    (first_token,) = server.events
    assert first_token.name == "first_token"
    queue, prefill, decode = spans["queue_wait"], spans["prefill"], spans["decode"]
    for child in (queue, prefill, decode):
        assert parent_of(child) == server.context.span_id
        assert child.attributes == {tracing.REQUEST_ID: "a"}
    # One after the other, within the request's span.
    times = [server.start_time, queue.start_time, queue.end_time, prefill.start_time]
    times += [prefill.end_time, decode.start_time, decode.end_time, server.end_time]
    assert all(t is not None for t in times)
    assert times == sorted(times)  # type: ignore[type-var]
    assert prefill.end_time == first_token.timestamp == decode.start_time


def test_a_request_that_ends_without_a_token_has_no_prefill_or_decode(
    exported: InMemorySpanExporter,
) -> None:
    traces = {"a": tracing.GenerationSpans({"traceparent": TRACEPARENT}, "a")}
    _trace_outputs(traces, [output("a", 0, 0, FinishReason.ABORT)])
    (server,) = exported.get_finished_spans()
    assert server.name == "model_server" and server.events == ()


# --- off ---


def test_without_an_endpoint_tracing_is_off_and_nothing_is_carried(
    monkeypatch: pytest.MonkeyPatch, model_dir: Path
) -> None:
    for variable in tracing.ENDPOINT_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    assert tracing.configure(TracingConfig(), "Ingress") is None
    batcher = FakeBatcher(echo)
    body = CompletionRequest(model="demo", prompt="hi", max_tokens=2)
    asyncio.run(service(batcher).run(body, "req-4", {"traceparent": TRACEPARENT}))
    (prepared,) = batcher.requests
    assert prepared.trace_context == {}

    model = FakeModel()  # takes no trace contexts: none may be passed

    async def scenario() -> None:
        reader = Caller(make_batcher(model, model_dir, batch_size=1), prepared, model.changes)
        await model.changes.until(lambda: len(model.streams) == 1)
        model.streams[0].send(first_step())
        finish_all(model.streams[0])
        await model.changes.until(lambda: reader.done)
        assert reader.finished

    asyncio.run(scenario())


def test_an_endpoint_from_config_or_the_standard_variable_turns_tracing_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for variable in tracing.ENDPOINT_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    config = TracingConfig(otlp_endpoint="http://127.0.0.1:9/v1/traces")
    provider = tracing.configure(config, "Batcher")
    assert tracing.start_span("probe", None, "r").is_recording()  # never ended: never sent
    tracing.shutdown(provider)
    assert not tracing.start_span("probe", None, "r").is_recording()

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    provider = tracing.configure(TracingConfig(sample_ratio=0.0), "Batcher")
    try:
        assert not tracing.start_span("probe", None, "r").is_recording()  # sampled out
        honoured = tracing.start_span("probe", tracing.extract({"traceparent": TRACEPARENT}), "r")
        assert honoured.is_recording()  # the client's sampling decision wins
    finally:
        tracing.shutdown(provider)
