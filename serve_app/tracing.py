"""OpenTelemetry tracing: the tracer each replica uses, W3C context in plain data, span helpers.

Every request gets one trace across the deployments: ``ingress`` (with ``response_cache.lookup``
and ``response_cache.store``) -> ``batcher`` -> ``model_server`` (``queue_wait``, ``prefill``,
``decode``, and a ``first_token`` event). The context crosses Ray hops as a W3C ``traceparent``
carrier, a ``dict[str, str]`` inside the plain-data messages; a client's ``traceparent`` header
is honoured. With no OTLP endpoint configured the tracer is OpenTelemetry's no-op one.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import contextmanager
from typing import TypeVar

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from serve_app.config import TracingConfig

logger = logging.getLogger("ray.serve")

T = TypeVar("T")

REQUEST_ID = "serve_app.request_id"  # the attribute every span of a request carries
TRACE_HEADERS = ("traceparent", "tracestate")
# The standard variables, read by the OTLP exporter itself when no endpoint is configured.
ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")

_PROPAGATOR = TraceContextTextMapPropagator()


_provider: TracerProvider | None = None
_tracer: trace.Tracer = trace.NoOpTracer()


def configure(config: TracingConfig, deployment: str) -> TracerProvider | None:
    """Set up this process's tracer for ``deployment``: an OTLP/HTTP exporter behind a
    ``BatchSpanProcessor`` when an endpoint is configured (returned, for ``shutdown``), the
    no-op tracer otherwise."""
    if config.otlp_endpoint is None and not any(os.environ.get(v) for v in ENDPOINT_VARIABLES):
        return None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    resource = Resource.create(
        {"service.name": config.service_name, "serve_app.deployment": deployment}
    )
    provider = TracerProvider(
        resource=resource, sampler=ParentBased(TraceIdRatioBased(config.sample_ratio))
    )
    exporter = OTLPSpanExporter(endpoint=config.otlp_endpoint)
    delay_ms = config.export_delay_s * 1000
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=delay_ms))
    use_provider(provider)
    logger.info("tracing %s to %s", deployment, config.otlp_endpoint or "the OTLP env endpoint")
    return provider


def use_provider(provider: TracerProvider | None) -> None:
    """Trace with ``provider`` (None: the no-op tracer); tests pass one with an in-memory
    exporter."""
    global _provider, _tracer
    _provider = provider
    _tracer = trace.NoOpTracer() if provider is None else provider.get_tracer("serve_app")


def shutdown(provider: TracerProvider | None) -> None:
    """Export the spans ``provider`` still buffers and stop it (a replica's shutdown)."""
    if provider is None:
        return
    provider.shutdown()
    if provider is _provider:
        use_provider(None)


# Context across hops


def from_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The W3C trace headers a client sent, as a carrier (empty when it sent none)."""
    return {name: headers[name] for name in TRACE_HEADERS if name in headers}


def extract(carrier: Mapping[str, str] | None) -> Context:
    """The context a carrier names; an empty context (a new trace) when it names none."""
    return _PROPAGATOR.extract(dict(carrier or {}))


def inject(span: Span) -> dict[str, str]:
    """A carrier naming ``span`` as the parent of the next hop's spans (empty when off)."""
    carrier: dict[str, str] = {}
    if _provider is None:
        return carrier  # the no-op tracer would pass a client's traceparent on unchanged
    _PROPAGATOR.inject(carrier, trace.set_span_in_context(span))
    return carrier


# Spans


def start_span(
    name: str,
    parent: Context | Span | None,
    request_id: str,
    kind: SpanKind = SpanKind.INTERNAL,
    start_ns: int | None = None,
) -> Span:
    """A span tagged with the request id, child of ``parent`` (a context or a span); the
    caller ends it."""
    context = trace.set_span_in_context(parent) if isinstance(parent, Span) else parent
    return _tracer.start_span(
        name,
        context=context or Context(),
        kind=kind,
        attributes={REQUEST_ID: request_id},
        start_time=start_ns,
    )


@contextmanager
def span(
    name: str, parent: Context | Span | None, request_id: str, kind: SpanKind = SpanKind.INTERNAL
) -> Iterator[Span]:
    """A span around a block, ended (and marked failed if it raises) when the block ends."""
    with trace.use_span(start_span(name, parent, request_id, kind), end_on_exit=True) as started:
        yield started


def record_error(span: Span, error: BaseException) -> None:
    """Mark ``span`` failed by ``error``."""
    span.record_exception(error)
    span.set_status(Status(StatusCode.ERROR, type(error).__name__))


async def ending_with(span: Span, items: AsyncIterator[T]) -> AsyncIterator[T]:
    """Pass ``items`` through and end ``span`` when they end, fail or are closed."""
    try:
        async for item in items:
            yield item
    except Exception as exc:
        record_error(span, exc)
        raise
    finally:
        await items.aclose()  # type: ignore[attr-defined]
        span.end()


class GenerationSpans:
    """One request's spans in the model server: ``model_server``, with ``queue_wait``,
    ``prefill`` and ``decode`` children and a ``first_token`` event, timed from the outputs
    the engine streams (the engine itself knows nothing of tracing)."""

    def __init__(self, carrier: Mapping[str, str], request_id: str, **attributes: str) -> None:
        self.request_id = request_id
        self._epoch_offset_ns = time.time_ns() - time.monotonic_ns()  # spans take epoch times
        self._submitted = time.monotonic()
        self._first_token: float | None = None
        parent = extract(carrier)
        start_ns = self._ns(self._submitted)
        self.span = start_span("model_server", parent, request_id, SpanKind.SERVER, start_ns)
        self.span.set_attributes({f"serve_app.{k}": v for k, v in attributes.items()})

    def output(self, new_tokens: int, prefill_started_at: float | None) -> None:
        """An engine output arrived now; the first one with a token ends the prefill."""
        if self._first_token is not None or not new_tokens:
            return
        now = self._first_token = time.monotonic()
        if prefill_started_at is not None:
            self._child("queue_wait", self._submitted, prefill_started_at)
            self._child("prefill", prefill_started_at, now)
        self.span.add_event("first_token", timestamp=self._ns(now))

    def end(self, error: str | None = None, **attributes: str | int) -> None:
        """The request finished (``attributes`` say how) or failed with ``error``."""
        now = time.monotonic()
        if self._first_token is not None:
            self._child("decode", self._first_token, now)
        self.span.set_attributes({f"serve_app.{k}": v for k, v in attributes.items()})
        if error is not None:
            self.span.set_status(Status(StatusCode.ERROR, error))
        self.span.end(end_time=self._ns(now))

    def _child(self, name: str, start: float, end: float) -> None:
        child = start_span(name, self.span, self.request_id, start_ns=self._ns(start))
        child.end(end_time=self._ns(end))

    def _ns(self, monotonic_s: float) -> int:
        return int(monotonic_s * 1e9) + self._epoch_offset_ns
