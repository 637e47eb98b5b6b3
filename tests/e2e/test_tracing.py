"""Tracing against a real OTLP/HTTP receiver started here: one request with a client's
``traceparent`` yields one trace, the client's, with spans from every deployment, correctly
parented and tagged with the request id; each replica exports its buffered spans when it shuts
down."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import KeyValue

from tests.e2e.conftest import ServeSession, free_port

DEADLINE_S = 20.0


@dataclass(frozen=True)
class ReceivedSpan:
    """A span as the receiver decoded it, with the deployment that sent it."""

    trace_id: str
    span_id: str
    parent_id: str
    name: str
    attributes: dict[str, str | int | bool]
    events: list[str]
    service: str
    deployment: str


class Receiver(ThreadingHTTPServer):
    """An OTLP/HTTP traces endpoint (POST /v1/traces, protobuf) keeping what it receives."""

    def __init__(self, port: int) -> None:
        super().__init__(("127.0.0.1", port), _ExportHandler)
        self.spans: list[ReceivedSpan] = []
        self.changed = threading.Condition()

    def add(self, export: ExportTraceServiceRequest) -> None:
        with self.changed:
            for resource_spans in export.resource_spans:
                resource = _attributes(resource_spans.resource.attributes)
                for scope_spans in resource_spans.scope_spans:
                    self.spans.extend(
                        ReceivedSpan(
                            span.trace_id.hex(),
                            span.span_id.hex(),
                            span.parent_span_id.hex(),
                            span.name,
                            _attributes(span.attributes),
                            [event.name for event in span.events],
                            str(resource["service.name"]),
                            str(resource.get("serve_app.deployment", "")),
                        )
                        for span in scope_spans.spans
                    )
            self.changed.notify_all()

    def wait_for(self, trace_id: str, names: set[str]) -> dict[str, ReceivedSpan]:
        """The trace's spans by name once every one of ``names`` has arrived."""
        deadline = time.monotonic() + DEADLINE_S
        with self.changed:
            while True:
                spans = [s for s in self.spans if s.trace_id == trace_id]
                if names <= {s.name for s in spans}:
                    break
                left = deadline - time.monotonic()
                assert left > 0, f"only {sorted(s.name for s in spans)} arrived of {sorted(names)}"
                self.changed.wait(left)
        by_name = {s.name: s for s in spans}
        assert len(by_name) == len(spans), f"a span repeats: {sorted(s.name for s in spans)}"
        return by_name


class _ExportHandler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.path != "/v1/traces" or self.headers["Content-Type"] != "application/x-protobuf":
            self.send_error(404)
            return
        self.server.add(ExportTraceServiceRequest.FromString(body))
        answer = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, format: str, *args: object) -> None:
        pass  # quiet


def _attributes(pairs: list[KeyValue]) -> dict[str, str | int | bool]:
    decoded: dict[str, str | int | bool] = {}
    for pair in pairs:
        kind = pair.value.WhichOneof("value")
        decoded[pair.key] = getattr(pair.value, kind) if kind else ""
    return decoded


# Chosen now, so that the app's args (read when ``served_app`` deploys) can name it. Spans wait
# in each replica's buffer far longer than the tests take: they arrive only because each
# replica flushes its buffer when it shuts down.
RECEIVER_PORT = free_port()
ENDPOINT = f"http://127.0.0.1:{RECEIVER_PORT}/v1/traces"
APP_OVERRIDES = {"tracing": {"otlp_endpoint": ENDPOINT, "export_delay_s": 600}}
CHANGES_THE_APP = True

MODEL_SPANS = {"model_server", "queue_wait", "prefill", "decode"}


@dataclass(frozen=True)
class Sent:
    """The requests sent to the traced app before it was shut down."""

    trace_id: str  # the client's, in the traceparent it sent with the first request
    client_span: str
    request_id: str  # the first request's
    stream_request_id: str  # a streamed request's, sent without a traceparent


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    server = Receiver(RECEIVER_PORT)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def sent(receiver: Receiver, served_app: str, serve_session: ServeSession) -> Sent:
    """Two requests to the traced app, which is then shut down (flushing its spans)."""
    sent = Sent(
        secrets.token_hex(16),
        secrets.token_hex(8),
        f"trace-{secrets.token_hex(4)}",
        f"trace-stream-{secrets.token_hex(4)}",
    )
    with httpx.Client(base_url=served_app, timeout=60) as http:
        response = http.post(
            "/v1/completions",
            json={"model": "demo", "prompt": sent.request_id, "max_tokens": 4, "temperature": 0},
            headers={
                "traceparent": f"00-{sent.trace_id}-{sent.client_span}-01",
                "X-Request-Id": sent.request_id,
            },
        )
        assert response.status_code == 200, response.text
        body = {"model": "demo", "prompt": "Once", "max_tokens": 3, "stream": True}
        headers = {"X-Request-Id": sent.stream_request_id}
        with http.stream("POST", "/v1/completions", json=body, headers=headers) as streamed:
            assert streamed.status_code == 200
            assert any("[DONE]" in line for line in streamed.iter_lines())
    assert receiver.spans == []  # still buffered in the replicas
    serve_session.discard()
    return sent


def test_one_request_is_one_trace_across_every_deployment(receiver: Receiver, sent: Sent) -> None:
    names = {"ingress", "response_cache.lookup", "response_cache.store", "batcher", *MODEL_SPANS}
    spans = receiver.wait_for(sent.trace_id, names)

    assert set(spans) == names
    ingress, batcher, server = spans["ingress"], spans["batcher"], spans["model_server"]
    parents = {name: span.parent_id for name, span in spans.items()}
    assert parents == {
        "ingress": sent.client_span,
        "response_cache.lookup": ingress.span_id,
        "response_cache.store": ingress.span_id,
        "batcher": ingress.span_id,
        "model_server": batcher.span_id,
        "queue_wait": server.span_id,
        "prefill": server.span_id,
        "decode": server.span_id,
    }
    deployments = {name: span.deployment for name, span in spans.items()}
    assert deployments == {
        "ingress": "Ingress",
        "response_cache.lookup": "Ingress",
        "response_cache.store": "Ingress",
        "batcher": "Batcher",
        **dict.fromkeys(MODEL_SPANS, "LLMModel"),
    }
    assert {span.service for span in spans.values()} == {"serve_app"}
    assert server.events == ["first_token"]
    # Tagged with the request id (each choice's id is the request's, numbered).
    assert ingress.attributes["serve_app.request_id"] == sent.request_id
    for name in ("batcher", *MODEL_SPANS):
        assert spans[name].attributes["serve_app.request_id"] == f"{sent.request_id}-0"
    assert server.attributes["serve_app.completion_tokens"] == 4
    assert batcher.attributes["serve_app.finish_reason"] == "length"


def test_a_streamed_request_without_a_traceparent_starts_its_own_trace(
    receiver: Receiver, sent: Sent
) -> None:
    deadline = time.monotonic() + DEADLINE_S
    with receiver.changed:
        while not (ingress := _ingress_of(receiver, sent.stream_request_id)):
            assert time.monotonic() < deadline, "the streamed request's span never arrived"
            receiver.changed.wait(deadline - time.monotonic())
    assert ingress.parent_id == ""  # a root: the client sent no traceparent
    assert ingress.trace_id != sent.trace_id
    assert ingress.attributes["serve_app.stream"] is True
    spans = receiver.wait_for(ingress.trace_id, {"ingress", "batcher", *MODEL_SPANS})
    assert spans["batcher"].parent_id == ingress.span_id


def _ingress_of(receiver: Receiver, request_id: str) -> ReceivedSpan | None:
    for span in receiver.spans:
        if span.name == "ingress" and span.attributes.get("serve_app.request_id") == request_id:
            return span
    return None
