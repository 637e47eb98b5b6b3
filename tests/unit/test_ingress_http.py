"""The ingress's HTTP layer in process: its FastAPI app driven over ASGI with local deployments.

The ``Ingress`` replica object is built the way Serve's replica builds it (``__new__``, then its
async ``__init__``) and made the replica's servable object, which the routes' ``self`` resolves to.
The batcher and the model server are small scripted doubles; the rate limiter and the response
cache are the real deployment classes. Each is reached through ``LocalHandle``, which stands in
for Ray's handles. What Serve's proxy does (echoing ``X-Request-Id``, its own timeouts) is not here.

``@serve.ingress`` serves a pickled copy of the app, and the route methods run with a copy of their
module's globals: patching ``serve_app`` module attributes does not reach the routes, so these
tests fake only what the ingress calls out to (handles, Ray's node table).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import ray
from ray.serve import context as serve_context
from ray.serve._private.common import DeploymentID, ReplicaID
from ray.serve._private.config import DeploymentConfig
from ray.serve.schema import ReplicaRank
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve_app.api.auth import AuthConfig, KeyLimits
from serve_app.config import IngressSettings, ResponseCacheConfig
from serve_app.deployments.ingress import Ingress
from serve_app.deployments.rate_limiter import RateLimiter
from serve_app.deployments.response_cache import ResponseCache
from serve_app.messages import ModelDescription, PreparedRequest, RequestError, TextChunk
from serve_app.model_catalog import ServedModel
from tests.unit.fake_handles import LocalHandle
from tests.unit.fakes import HangingHandle

pytestmark = pytest.mark.anyio

MODEL = "demo"
DEFAULT_MAX_TOKENS = 32
PROMPT_TOKENS = 3  # what the scripted batcher reports for every prompt
KEYS_ENV = "SERVE_APP_TEST_INGRESS_KEYS"
OPEN = AuthConfig(api_keys_env=KEYS_ENV)
ALICE = "sk-alice-0123456789"
DESCRIPTION = ModelDescription(
    version="v1",
    type="llama",
    backend="onnxruntime (CPUExecutionProvider)",
    parameters=1_234_567,
    context_length=512,
    loaded_at=1_700_000_000.75,
)
OPENAI_PATHS = ("/v1/completions", "/v1/chat/completions")
USER_A = [{"role": "user", "content": "a"}]
REPLICA_ID = ReplicaID(unique_id="ingress-1", deployment_id=DeploymentID("Ingress", "default"))


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# Deployment doubles


Script = Callable[[PreparedRequest], AsyncIterator[TextChunk]]


def reply(request: PreparedRequest) -> str:
    """What ``echo`` answers: the prompt (or last chat message) and the choice's index."""
    text = request.prompt if request.prompt is not None else (request.messages or [])[-1]["content"]
    return f"re:{text}#{request.request_id.rsplit('-', 1)[1]}"


async def echo(request: PreparedRequest) -> AsyncIterator[TextChunk]:
    """Two chunks per choice, three tokens in all, finishing with 'stop'."""
    head, tail = reply(request)[:3], reply(request)[3:]
    rid = request.request_id
    yield TextChunk(rid, text=head, token_ids=[1], prompt_tokens=PROMPT_TOKENS, completion_tokens=1)
    yield TextChunk(
        rid,
        text=tail,
        token_ids=[2, 3],
        finish_reason="stop",
        prompt_tokens=PROMPT_TOKENS,
        completion_tokens=3,
        model_version="v1",
    )


def rejecting(error: RequestError, when: Callable[[PreparedRequest], bool] = bool) -> Script:
    """Refuses the requests ``when`` picks the way the batcher does (one error chunk)."""

    async def script(request: PreparedRequest) -> AsyncIterator[TextChunk]:
        if when(request):
            yield TextChunk(request.request_id, error=error)
        else:
            async for chunk in echo(request):
                yield chunk

    return script


def failing(exc: Exception) -> Script:
    """Raises ``exc`` before any chunk, as the stream of a replica that died would."""

    async def script(request: PreparedRequest) -> AsyncIterator[TextChunk]:
        raise exc
        yield  # an async generator, like the batcher's stream

    return script


class ScriptedBatcher:
    """The Batcher deployment's ``generate`` stream, answered by a script; records requests."""

    def __init__(self, script: Script = echo) -> None:
        self.script = script
        self.requests: list[PreparedRequest] = []

    async def generate(self, request: PreparedRequest) -> AsyncIterator[TextChunk]:
        self.requests.append(request)
        async for chunk in self.script(request):
            yield chunk


class FakeModel:
    """The model server's ``describe`` and ``stats``; ``stats`` raises ``failure`` if given."""

    def __init__(self, failure: Exception | None = None) -> None:
        self.failure = failure

    def describe(self) -> ModelDescription:
        return DESCRIPTION

    def stats(self) -> dict[str, float]:
        if self.failure is not None:
            raise self.failure
        return {"num_running": 2, "num_waiting": 1, "kv_cache_usage": 0.25}


class FailingRateLimiter:
    """A rate limiter whose replica fails every call."""

    async def acquire(self, *args: Any) -> None:
        raise RuntimeError("rate limiter replica died")

    async def settle(self, *args: Any) -> None:
        raise RuntimeError("rate limiter replica died")


# The ingress, served in process


class ServeRequestContext:
    """What Serve does around an ingress's ASGI app: it sets the request context, whose id is
    the client's ``X-Request-Id`` or one of its own."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.body_sent = asyncio.Event()  # some response has sent part of its body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request_id = Headers(scope=scope).get("x-request-id") or uuid.uuid4().hex

        async def noted_send(message: Message) -> None:
            if message["type"] == "http.response.body" and message.get("body"):
                self.body_sent.set()
            await send(message)

        token = serve_context._serve_request_context.set(
            serve_context._RequestContext(  # type: ignore[arg-type]
                route=scope["path"], request_id=request_id, app_name="default"
            )
        )
        try:
            await self.app(scope, receive, noted_send)
        finally:
            serve_context._serve_request_context.reset(token)


def set_replica_context(servable: object) -> None:
    serve_context._set_internal_replica_context(
        replica_id=REPLICA_ID,
        servable_object=servable,  # type: ignore[arg-type]
        _deployment_config=DeploymentConfig(),
        rank=ReplicaRank(rank=0, node_rank=0, local_rank=0),
        world_size=1,
    )


class IngressReplica(Ingress.func_or_class):  # type: ignore[misc, valid-type]
    """Serve's ingress class, ``@serve.ingress`` wrapper included, minus one finalizer.

    Serve awaits the wrapper's ``async def __del__`` when it shuts a replica down, as
    ``serve_ingress`` does; the interpreter calling it again when it frees the object would only
    leave an unawaited coroutine (a warning, so an error here) behind.
    """

    def __del__(self) -> None:
        pass


@contextlib.asynccontextmanager
async def serve_ingress(
    batcher: LocalHandle | None = None,
    model: LocalHandle | None = None,
    cache: LocalHandle | None = None,
    limiter: Any = None,
    auth: AuthConfig = OPEN,
    settings: IngressSettings | None = None,
    tool_call_parser: str | None = None,
) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client of an ``Ingress`` replica over these deployments (fresh doubles if None);
    ``settings`` replace the default ones (and their ``auth``); ``tool_call_parser`` is the
    model's own."""
    set_replica_context(None)  # Serve sets the context before the constructor runs
    replica = IngressReplica.__new__(IngressReplica)
    served = ServedModel(
        MODEL,
        batcher or LocalHandle(ScriptedBatcher()),
        model or LocalHandle(FakeModel()),
        cache,
        tool_call_parser=tool_call_parser,
    )
    settings = settings or IngressSettings(DEFAULT_MAX_TOKENS, auth)
    await replica.__init__([served], limiter, settings)
    await replica._run_asgi_lifespan_startup()  # as Serve's replica does before serving
    set_replica_context(replica)
    # Like a server, answer 500 for an unhandled exception instead of raising it here.
    transport = httpx.ASGITransport(
        app=ServeRequestContext(replica.app), raise_app_exceptions=False
    )
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://ingress") as client:
            yield client
    finally:
        await Ingress.func_or_class.__del__(replica)  # Serve's shutdown: the app's lifespan


@pytest.fixture(autouse=True)
def outside_any_replica(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test leaves Serve's replica context as it found it, and starts without API keys."""
    monkeypatch.setattr(serve_context, "_INTERNAL_REPLICA_CONTEXT", None)
    monkeypatch.delenv(KEYS_ENV, raising=False)


@pytest.fixture
def batcher() -> LocalHandle:
    return LocalHandle(ScriptedBatcher())


@pytest.fixture
async def client(batcher: LocalHandle) -> AsyncIterator[httpx.AsyncClient]:
    async with serve_ingress(batcher) as client:
        yield client


def requests_of(batcher: LocalHandle) -> list[PreparedRequest]:
    """What a ``ScriptedBatcher``'s handle was asked to generate."""
    scripted: ScriptedBatcher = batcher.target
    return scripted.requests


# Reading responses


def api_error(response: httpx.Response, status: int) -> dict[str, Any]:
    """The ``error`` object of an error response, after checking its status and shape."""
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["error"]
    assert set(body["error"]) == {"message", "type", "param", "code"}
    error: dict[str, Any] = body["error"]
    return error


def sse_data(response: httpx.Response) -> list[str]:
    """The data of each server-sent event, after checking the framing: ``data: ...\\n\\n``."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.text.endswith("\n\n")
    frames = response.text[: -len("\n\n")].split("\n\n")
    assert all(frame.startswith("data: ") and "\n" not in frame for frame in frames), frames
    return [frame.removeprefix("data: ") for frame in frames]


def sse_events(response: httpx.Response) -> list[dict[str, Any]]:
    """The JSON events of a stream that ended normally: ``[DONE]`` last and only last."""
    data = sse_data(response)
    assert data[-1] == "[DONE]"
    assert "[DONE]" not in data[:-1]
    return [json.loads(item) for item in data[:-1]]


def texts_by_index(events: list[dict[str, Any]], field: Callable[[Any], str]) -> dict[int, str]:
    texts: dict[int, str] = {}
    for event in events:
        for choice in event["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + (field(choice) or "")
    return texts


# OpenAI completions


async def test_a_completion_answers_every_choice_of_every_prompt_in_order(
    client: httpx.AsyncClient, batcher: LocalHandle
) -> None:
    response = await client.post(
        "/v1/completions",
        json={"model": MODEL, "prompt": ["a", "b"], "n": 2, "seed": 5, "max_tokens": 7},
    )

    assert response.status_code == 200, response.text
    assert response.headers["x-cache"] == "miss"
    body = response.json()
    assert body["object"] == "text_completion"
    assert body["id"].startswith("cmpl-")
    assert body["model"] == MODEL
    assert [(c["index"], c["text"], c["finish_reason"]) for c in body["choices"]] == [
        (0, "re:a#0", "stop"),
        (1, "re:a#1", "stop"),
        (2, "re:b#2", "stop"),
        (3, "re:b#3", "stop"),
    ]
    # Each prompt is counted once, however many choices sample from it.
    assert body["usage"] == {"prompt_tokens": 6, "completion_tokens": 12, "total_tokens": 18}
    sent = requests_of(batcher)
    assert [(r.prompt, r.params.seed, r.params.max_tokens) for r in sent] == [
        ("a", 5, 7),
        ("a", 6, 7),
        ("b", 5, 7),
        ("b", 6, 7),
    ]


async def test_a_streamed_completion_is_one_event_per_chunk_then_usage_then_done(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post(
        "/v1/completions",
        json={
            "model": MODEL,
            "prompt": ["a", "b"],
            "n": 2,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )

    assert response.headers["x-cache"] == "miss"
    events = sse_events(response)
    *chunks, usage = events
    assert len(chunks) == 8  # two chunks for each of the four choices
    assert all(e["object"] == "text_completion" and len(e["choices"]) == 1 for e in chunks)
    assert len({e["id"] for e in events}) == 1
    assert texts_by_index(chunks, lambda c: c["text"]) == {
        0: "re:a#0",
        1: "re:a#1",
        2: "re:b#2",
        3: "re:b#3",
    }
    assert usage["choices"] == []
    assert usage["usage"] == {"prompt_tokens": 6, "completion_tokens": 12, "total_tokens": 18}


async def test_a_streamed_completion_without_include_usage_sends_no_usage(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post(
        "/v1/completions", json={"model": MODEL, "prompt": "a", "stream": True}
    )

    events = sse_events(response)
    assert [e["choices"][0]["text"] for e in events] == ["re:", "a#0"]
    assert [e["choices"][0]["finish_reason"] for e in events] == [None, "stop"]
    assert all(e["usage"] is None for e in events)


# OpenAI chat completions


async def test_a_chat_completion_answers_as_the_assistant(
    client: httpx.AsyncClient, batcher: LocalHandle
) -> None:
    parts = [{"type": "text", "text": "hi"}, {"type": "text", "text": "!"}]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": parts}]
    response = await client.post(
        "/v1/chat/completions", json={"model": MODEL, "messages": messages}
    )

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "re:hi!#0"},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    (sent,) = requests_of(batcher)
    assert sent.prompt is None
    assert sent.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi!"},
    ]
    # Without a limit of its own, a reply may use the rest of the context, up to the default.
    assert (sent.params.max_tokens, sent.params.fit_to_context) == (DEFAULT_MAX_TOKENS, True)


@pytest.mark.parametrize("include_usage", [True, False])
async def test_a_streamed_chat_sends_the_role_first_and_usage_last_when_asked(
    client: httpx.AsyncClient, include_usage: bool
) -> None:
    response = await client.post(
        "/v1/chat/completions",
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "n": 2,
            "stream": True,
            "stream_options": {"include_usage": include_usage},
        },
    )

    events = sse_events(response)
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    role, *rest = events
    assert role["choices"] == [
        {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
         "finish_reason": None}
        for i in range(2)
    ]  # fmt: skip
    chunks = rest[:-1] if include_usage else rest
    assert all(e["choices"][0]["delta"]["role"] is None for e in chunks)
    assert texts_by_index(chunks, lambda c: c["delta"]["content"]) == {0: "re:hi#0", 1: "re:hi#1"}
    if include_usage:
        assert rest[-1]["choices"] == []
        assert rest[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9}
    else:
        assert all(e["usage"] is None for e in events)


async def test_models_lists_the_served_model(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/models")

    assert response.status_code == 200
    assert response.json() == {
        "object": "list",
        "data": [
            {
                "id": MODEL,
                "object": "model",
                "created": 1_700_000_000,
                "owned_by": "serve_app",
                "root": MODEL,
                "parent": None,
                "max_model_len": DESCRIPTION.context_length,
            }
        ],
    }


# Native API


async def test_infer_returns_the_completion_of_one_prompt(
    client: httpx.AsyncClient, batcher: LocalHandle
) -> None:
    response = await client.post(
        "/v1/infer", json={"prompt": "p", "max_tokens": 9, "stop_words": ["\n"], "seed": 3}
    )

    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["text"], body["tokens"], body["finish_reason"]) == ("re:p#0", 3, "stop")
    assert body["token_ids"] == [1, 2, 3]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    assert "error" not in body and "status" not in body  # the seed's omitempty
    assert body["latency"] >= 0
    assert response.headers["x-cache"] == "miss"
    (sent,) = requests_of(batcher)
    assert (sent.params.max_tokens, sent.params.temperature, sent.params.seed) == (9, 0.0, 3)
    assert sent.stop == ["\n"]


async def test_batch_infer_fails_each_bad_item_alone() -> None:
    too_long = RequestError(400, "the prompt is too long", param="prompt", code="too_long")
    batcher = LocalHandle(ScriptedBatcher(rejecting(too_long, lambda r: r.prompt == "long")))
    async with serve_ingress(batcher) as client:
        response = await client.post(
            "/v1/batch_infer",
            json=[
                {"prompt": "one"},
                {"prompt": "two", "max_tokens": "many"},
                {"prompt": "", "max_tokens": 4},
                {"prompt": "long"},
                {"prompt": "five"},
            ],
            headers={"X-Request-Id": "batch-7"},
        )

    assert response.status_code == 200, response.text
    results = response.json()
    assert [r["text"] for r in results] == ["re:one#0", "", "", "", "re:five#0"]
    assert "error" not in results[0] and "error" not in results[4]
    assert [r["status"] for r in results[1:4]] == [400, 400, 400]
    errors = [r["error_detail"] for r in results[1:4]]
    assert [(e["type"], e["param"]) for e in errors] == [
        ("invalid_request_error", "max_tokens"),
        ("invalid_request_error", "prompt"),
        ("invalid_request_error", "prompt"),
    ]
    assert [r["error"] for r in results[1:4]] == [e["message"] for e in errors]
    assert (errors[2]["message"], errors[2]["code"]) == ("the prompt is too long", "too_long")
    # Each item runs under the batch's request id and its own position.
    assert sorted(r.request_id for r in requests_of(batcher)) == [
        "batch-7-0-0",
        "batch-7-3-0",
        "batch-7-4-0",
    ]


async def test_stream_infer_streams_text_and_ends_with_usage(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/stream_infer", json={"prompt": "p"})

    events = sse_events(response)
    assert all(e.pop("latency") >= 0 for e in events)
    assert events == [
        {
            "text": "re:",
            "tokens": 1,
            "token_ids": [1],
            "finish_reason": "",
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
        },
        {
            "text": "p#0",
            "tokens": 2,
            "token_ids": [2, 3],
            "finish_reason": "stop",
            "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6},
        },
    ]


async def test_model_info_describes_the_served_model(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/model_info")

    assert response.status_code == 200
    assert response.json() == {
        "name": MODEL,
        "version": "v1",
        "type": "llama",
        "parameters": 1_234_567,
        "max_tokens": 512,
        "created_at": "2023-11-14T22:13:20.750000Z",
        "backend": "onnxruntime (CPUExecutionProvider)",
        "context_length": 512,
    }


# Health and metrics


async def test_health_is_ok_with_the_model_stats(client: httpx.AsyncClient) -> None:
    response = await client.get("/health")

    assert response.status_code == 200
    body = response.json()
    assert abs(datetime.fromisoformat(body.pop("time")) - datetime.now(UTC)) < timedelta(minutes=1)
    assert body == {
        "status": "ok",
        "num_running": 2,
        "num_waiting": 1,
        "kv_cache_usage": 0.25,
        "circuit_breakers": {MODEL: "closed"},
    }


async def test_health_is_503_while_the_model_fails() -> None:
    model = LocalHandle(FakeModel(failure=RuntimeError("engine loop died")))
    async with serve_ingress(model=model) as client:
        response = await client.get("/health")

    assert response.status_code == 503
    body = response.json()
    assert abs(datetime.fromisoformat(body.pop("time")) - datetime.now(UTC)) < timedelta(minutes=1)
    assert body == {"status": "unavailable", "circuit_breakers": {MODEL: "closed"}}


AGENT_PAGE = """\
# HELP ray_serve_app_requests_total Finished requests by finish reason (stop, length).
# TYPE ray_serve_app_requests_total counter
ray_serve_app_requests_total{finish_reason="stop"} 3.0
# HELP ray_node_cpu_utilization Total CPU usage on a ray node
# TYPE ray_node_cpu_utilization gauge
ray_node_cpu_utilization{ip="127.0.0.1"} 12.5
"""


@pytest.fixture
def metrics_agent(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """This node's Ray metrics agent: a local page, and Ray's node table pointing at it."""

    class Agent(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = AGENT_PAGE.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Agent)
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    node = {"NodeID": "node-1", "NodeManagerAddress": "127.0.0.1"}
    node["MetricsExportPort"] = server.server_address[1]  # type: ignore[assignment]
    runtime_context = SimpleNamespace(get_node_id=lambda: "node-1")
    monkeypatch.setattr(ray, "get_runtime_context", lambda: runtime_context)
    monkeypatch.setattr(ray, "nodes", lambda: [node])
    yield
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.mark.usefixtures("metrics_agent")
async def test_metrics_relays_the_nodes_serve_app_series_as_prometheus_text(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get("/metrics")

    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert response.text == "".join(AGENT_PAGE.splitlines(keepends=True)[:3])


# Errors


@pytest.mark.parametrize(
    ("path", "body", "param", "message"),
    [
        (
            "/v1/completions",
            {"prompt": "a", "colour": 1},
            "colour",
            "unsupported parameter 'colour'",
        ),
        ("/v1/completions", {"prompt": "a", "temperature": 3}, "temperature", "temperature: "),
        ("/v1/completions", {"prompt": "a", "n": 17}, "n", "n: "),
        ("/v1/completions", {"prompt": []}, "prompt", "prompt: "),
        ("/v1/completions", {}, "prompt", "prompt: "),
        (
            "/v1/completions",
            {"prompt": "a", "stream_options": {"usage": True}},
            "stream_options.usage",
            "unsupported",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "robot", "content": "x"}]},
            "messages.0.role",
            "messages.0.role: ",
        ),
        ("/v1/chat/completions", {"messages": []}, "messages", "messages: "),
        ("/v1/infer", {"prompt": "a", "max_tokens": 0}, "max_tokens", "max_tokens: "),
        ("/v1/stream_infer", {"prompt": "a", "stop_words": [""]}, "stop_words", "stop_words: "),
        ("/v1/batch_infer", {"requests": []}, "requests", "requests: "),
        ("/v1/batch_infer", [], "requests", "requests: "),
        ("/v1/batch_infer", {"prompt": "a"}, "prompt", "prompt: "),
    ],
)
async def test_an_invalid_request_is_a_400_naming_the_parameter(
    client: httpx.AsyncClient,
    batcher: LocalHandle,
    path: str,
    body: Any,
    param: str,
    message: str,
) -> None:
    if path in OPENAI_PATHS:
        body = {"model": MODEL, **body}
    response = await client.post(path, json=body)

    error = api_error(response, 400)
    assert (error["type"], error["param"]) == ("invalid_request_error", param)
    assert error["message"].startswith(message)
    assert requests_of(batcher) == []


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/v1/infer"])
async def test_a_body_that_is_not_json_is_a_400(client: httpx.AsyncClient, path: str) -> None:
    response = await client.post(
        path, content=b'{"model": "demo", "prompt": ', headers={"Content-Type": "application/json"}
    )

    error = api_error(response, 400)
    assert error["message"].startswith("the request body is not valid JSON: Expecting value")
    assert (error["type"], error["param"], error["code"]) == (
        "invalid_request_error",
        None,
        "invalid_json",
    )


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", {"prompt": "a"}),
        ("/v1/chat/completions", {"messages": USER_A}),
    ],
)
async def test_an_unknown_model_is_a_404(
    client: httpx.AsyncClient,
    batcher: LocalHandle,
    path: str,
    body: dict[str, Any],
    stream: bool,
) -> None:
    response = await client.post(path, json={"model": "gpt-4o", "stream": stream, **body})

    error = api_error(response, 404)
    assert (error["type"], error["param"], error["code"]) == (
        "not_found_error",
        "model",
        "model_not_found",
    )
    assert "gpt-4o" in error["message"]
    assert requests_of(batcher) == []


ROUTES_THAT_GENERATE = [
    ("/v1/completions", {"model": MODEL, "prompt": "a"}),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "stream": True}),
    ("/v1/chat/completions", {"model": MODEL, "messages": USER_A}),
    ("/v1/chat/completions", {"model": MODEL, "messages": USER_A, "stream": True}),
    ("/v1/infer", {"prompt": "a"}),
    ("/v1/stream_infer", {"prompt": "a"}),
]


@pytest.mark.parametrize(("path", "body"), ROUTES_THAT_GENERATE)
@pytest.mark.parametrize(
    ("rejection", "retry_after"),
    [
        (RequestError(400, "prompt and max_tokens exceed the context", param="max_tokens"), None),
        (RequestError(503, "the waiting queue is full", code="overloaded"), "1"),
    ],
)
async def test_an_engine_rejection_is_answered_with_its_status(
    path: str, body: dict[str, Any], rejection: RequestError, retry_after: str | None
) -> None:
    async with serve_ingress(LocalHandle(ScriptedBatcher(rejecting(rejection)))) as client:
        response = await client.post(path, json=body)

    # Even a stream is rejected before it begins, as a plain error response.
    error = api_error(response, rejection.status)
    assert error["message"] == rejection.message
    assert (error["param"], error["code"]) == (rejection.param, rejection.code)
    assert response.headers.get("retry-after") == retry_after


@pytest.mark.parametrize(("path", "body"), ROUTES_THAT_GENERATE)
async def test_an_unexpected_error_is_a_500_naming_the_request_id_and_nothing_else(
    path: str, body: dict[str, Any]
) -> None:
    crash = failing(RuntimeError("CUDA error: illegal address in /opt/secret/kernel.cu"))
    async with serve_ingress(LocalHandle(ScriptedBatcher(crash))) as client:
        response = await client.post(path, json=body, headers={"X-Request-Id": "req-42"})

    error = api_error(response, 500)
    assert error == {
        "message": "internal error (request id req-42)",
        "type": "server_error",
        "param": None,
        "code": None,
    }
    assert "CUDA" not in response.text and "secret" not in response.text


async def test_a_500_names_the_id_serve_gave_the_request_without_x_request_id(
    batcher: LocalHandle,
) -> None:
    batcher.target.script = failing(RuntimeError("boom"))
    async with serve_ingress(batcher) as client:
        response = await client.post("/v1/infer", json={"prompt": "a"})

    error = api_error(response, 500)
    (sent,) = requests_of(batcher)
    request_id = sent.request_id.removesuffix("-0")
    assert error["message"] == f"internal error (request id {request_id})"


async def test_the_request_id_names_every_request_sent_to_the_batcher(
    client: httpx.AsyncClient, batcher: LocalHandle
) -> None:
    response = await client.post(
        "/v1/completions",
        json={"model": MODEL, "prompt": ["a", "b"], "n": 2},
        headers={"X-Request-Id": "req-7"},
    )

    assert response.status_code == 200
    assert [r.request_id for r in requests_of(batcher)] == [f"req-7-{i}" for i in range(4)]


@pytest.mark.parametrize(
    ("method", "path", "status", "type_"),
    [
        ("GET", "/v1/embeddings", 404, "not_found_error"),
        ("GET", "/v1/completions", 405, "invalid_request_error"),
    ],
)
async def test_an_unknown_route_or_method_answers_in_the_error_shape(
    client: httpx.AsyncClient, method: str, path: str, status: int, type_: str
) -> None:
    response = await client.request(method, path)

    assert api_error(response, status)["type"] == type_


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"prompt": "a", "echo": True, "max_tokens": 0}, "max_tokens"),
        ("/v1/completions", {"prompt": "a", "max_tokens": 2, "min_tokens": 5}, "min_tokens"),
        ("/v1/chat/completions", {"messages": USER_A, "tool_choice": "required"}, "tool_choice"),
    ],
)
async def test_an_unsupported_parameter_value_is_a_400_naming_it(
    client: httpx.AsyncClient, path: str, body: dict[str, Any], param: str
) -> None:
    response = await client.post(path, json={"model": MODEL, **body})

    error = api_error(response, 400)
    assert (error["type"], error["param"]) == ("invalid_request_error", param)
    assert error["message"].startswith(f"{param}: ")


# Errors after a stream has begun


STREAMING_ROUTES = [(path, body) for path, body in ROUTES_THAT_GENERATE if body.get("stream")]


@pytest.mark.parametrize(("path", "body"), STREAMING_ROUTES)
@pytest.mark.parametrize(
    ("failure", "expected"),
    [
        (
            RuntimeError("replica died"),
            {"message": "internal error (request id req-9)", "type": "server_error",
             "param": None, "code": None},
        ),
        (
            RequestError(503, "the model is unavailable; retry shortly", code="engine_dead"),
            {"message": "the model is unavailable; retry shortly", "type": "service_unavailable",
             "param": None, "code": "engine_dead"},
        ),
    ],
)  # fmt: skip
async def test_an_error_after_the_stream_began_is_one_final_error_event(
    path: str, body: dict[str, Any], failure: Exception | RequestError, expected: dict[str, Any]
) -> None:
    async def script(request: PreparedRequest) -> AsyncIterator[TextChunk]:
        yield TextChunk(request.request_id, text="par", token_ids=[1], prompt_tokens=1)
        if isinstance(failure, RequestError):
            yield TextChunk(request.request_id, error=failure)
        else:
            raise failure

    async with serve_ingress(LocalHandle(ScriptedBatcher(script))) as client:
        response = await client.post(path, json=body, headers={"X-Request-Id": "req-9"})

    *events, last = sse_data(response)  # the status line said 200 before the failure
    assert "par" in events[-1]
    assert "[DONE]" not in events
    assert json.loads(last) == {"error": expected}


async def test_a_native_stream_that_fails_ends_with_an_inference_response_error_event() -> None:
    async def script(request: PreparedRequest) -> AsyncIterator[TextChunk]:
        yield TextChunk(request.request_id, text="par", token_ids=[1], prompt_tokens=1)
        yield TextChunk(request.request_id, error=RequestError(503, "gone", code="engine_dead"))

    async with serve_ingress(LocalHandle(ScriptedBatcher(script))) as client:
        response = await client.post("/v1/stream_infer", json={"prompt": "a"})

    # Every event is an InferenceResponse, the failure too (the seed's error string), and the
    # stream closes after it, as every stream does after an error.
    first, failure = [json.loads(data) for data in sse_data(response)]
    assert (first["text"], first["tokens"], "error" not in first) == ("par", 1, True)
    assert (failure["error"], failure["status"], failure["text"]) == ("gone", 503, "")
    assert failure["error_detail"]["code"] == "engine_dead"


async def test_when_one_choice_fails_mid_stream_the_others_are_cancelled() -> None:
    still_generating = asyncio.Event()

    async def script(request: PreparedRequest) -> AsyncIterator[TextChunk]:
        yield TextChunk(request.request_id, text="x", token_ids=[1], prompt_tokens=1)
        if request.request_id.endswith("-0"):
            await still_generating.wait()  # choice 1 has begun too
            raise RuntimeError("replica died")
        still_generating.set()
        await asyncio.Event().wait()  # generates until cancelled

    batcher = LocalHandle(ScriptedBatcher(script))
    async with serve_ingress(batcher) as client:
        response = await client.post(
            "/v1/completions", json={"model": MODEL, "prompt": "a", "n": 2, "stream": True}
        )

    assert json.loads(sse_data(response)[-1])["error"]["type"] == "server_error"
    assert [r.cancelled for r in batcher.responses] == [True, True]


async def test_a_client_going_away_cancels_generation_and_settles_what_it_used(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(KEYS_ENV, f"alice:{ALICE}")
    generating = asyncio.Event()

    async def script(request: PreparedRequest) -> AsyncIterator[TextChunk]:
        yield TextChunk(request.request_id, text="x", token_ids=[1], prompt_tokens=1)
        generating.set()
        await asyncio.Event().wait()  # generates until cancelled

    batcher = LocalHandle(ScriptedBatcher(script))
    limiter = LocalHandle(RateLimiter.func_or_class())
    auth = limited(KeyLimits(tokens_per_minute=10_000))
    async with serve_ingress(batcher, limiter=limiter, auth=auth) as client:
        call = asyncio.ensure_future(
            client.post(
                "/v1/completions",
                json={"model": MODEL, "prompt": "a", "stream": True},
                headers={"Authorization": f"Bearer {ALICE}"},
            )
        )
        await generating.wait()
        await client._transport.app.body_sent.wait()  # type: ignore[attr-defined]  # streaming
        call.cancel()  # what Serve does to the request when its client disconnects
        with pytest.raises(asyncio.CancelledError):
            await call

    (stream,) = batcher.responses
    assert stream.cancelled
    (acquire,) = limiter.calls_to("acquire")
    (settle,) = limiter.calls_to("settle")
    # One prompt token and one generated token were used; the rest of the reservation is back.
    assert settle.args == ((await acquire.response).reservation_id, 2)


# The response cache


@pytest.fixture
async def response_cache() -> LocalHandle:
    cache = ResponseCache.func_or_class(ResponseCacheConfig())
    await cache.set_live_version("v1")
    return LocalHandle(cache)


async def test_a_deterministic_request_is_answered_from_the_cache_the_second_time(
    batcher: LocalHandle, response_cache: LocalHandle
) -> None:
    body = {"model": MODEL, "prompt": "a", "temperature": 0}
    async with serve_ingress(batcher, cache=response_cache) as client:
        first = await client.post("/v1/completions", json=body)
        second = await client.post("/v1/completions", json=body)
        streamed = await client.post("/v1/completions", json={**body, "stream": True})

    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("miss", "hit")
    assert second.json()["choices"] == first.json()["choices"]
    assert second.json()["usage"] == first.json()["usage"]
    assert streamed.headers["x-cache"] == "hit"
    assert [e["choices"][0]["text"] for e in sse_events(streamed)] == ["re:a#0"]
    assert len(requests_of(batcher)) == 1


async def test_a_deterministic_chat_is_answered_from_the_cache_the_second_time(
    batcher: LocalHandle, response_cache: LocalHandle
) -> None:
    body = {"model": MODEL, "messages": USER_A, "seed": 1}
    async with serve_ingress(batcher, cache=response_cache) as client:
        first = await client.post("/v1/chat/completions", json=body)
        second = await client.post("/v1/chat/completions", json=body)

    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("miss", "hit")
    assert second.json()["choices"] == first.json()["choices"]
    assert len(requests_of(batcher)) == 1


async def test_a_sampled_request_without_a_seed_is_never_answered_from_the_cache(
    batcher: LocalHandle, response_cache: LocalHandle
) -> None:
    body = {"model": MODEL, "prompt": "a", "temperature": 0.8}
    async with serve_ingress(batcher, cache=response_cache) as client:
        responses = [await client.post("/v1/completions", json=body) for _ in range(2)]

    assert [r.headers["x-cache"] for r in responses] == ["miss", "miss"]
    assert len(requests_of(batcher)) == 2


# API keys


ROUTES = [
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "a"}),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "a", "stream": True}),
    ("POST", "/v1/chat/completions", {"model": MODEL, "messages": USER_A}),
    ("GET", "/v1/models", None),
    ("POST", "/v1/infer", {"prompt": "a"}),
    ("POST", "/v1/batch_infer", [{"prompt": "a"}]),
    ("POST", "/v1/stream_infer", {"prompt": "a"}),
    ("GET", "/v1/model_info", None),
    ("GET", "/metrics", None),
]


@pytest.fixture(params=["env", "file"])
def keyed(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> AuthConfig:
    """API keys from the environment variable, or from a keys file."""
    if request.param == "env":
        monkeypatch.setenv(KEYS_ENV, f"alice:{ALICE}, bob:sk-bob-9876543210")
        return OPEN
    keys = tmp_path / "api_keys"
    keys.write_text(f"# keys\nalice:{ALICE}\nbob:sk-bob-9876543210\n", encoding="utf-8")
    return AuthConfig(api_keys_env=KEYS_ENV, api_keys_file=keys)


@pytest.mark.usefixtures("metrics_agent")
@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
async def test_with_api_keys_every_route_needs_a_valid_key(
    keyed: AuthConfig, batcher: LocalHandle, method: str, path: str, body: Any
) -> None:
    async with serve_ingress(batcher, auth=keyed) as client:

        async def call(headers: dict[str, str]) -> httpx.Response:
            return await client.request(method, path, json=body, headers=headers)

        missing = await call({})
        wrong = await call({"Authorization": "Bearer sk-mallory"})
        not_bearer = await call({"Authorization": f"Basic {ALICE}"})
        good = await call({"Authorization": f"Bearer {ALICE}"})

    for refused in (missing, wrong, not_bearer):
        error = api_error(refused, 401)
        assert (error["type"], error["code"]) == ("authentication_error", "invalid_api_key")
    assert good.status_code == 200, good.text
    assert len(requests_of(batcher)) == (0 if body is None else 1)  # only the good key's


async def test_with_api_keys_health_needs_none(keyed: AuthConfig) -> None:
    async with serve_ingress(auth=keyed) as client:
        response = await client.get("/health")

    assert response.status_code == 200
    assert response.json()["status"] == "ok"


# Rate limits


def limited(limits: KeyLimits) -> AuthConfig:
    return AuthConfig(api_keys_env=KEYS_ENV, default_limits=limits)


async def test_a_key_over_its_request_limit_gets_a_429_with_retry_after(
    monkeypatch: pytest.MonkeyPatch, batcher: LocalHandle
) -> None:
    monkeypatch.setenv(KEYS_ENV, f"alice:{ALICE}")
    limiter = LocalHandle(RateLimiter.func_or_class())
    headers = {"Authorization": f"Bearer {ALICE}"}
    body = {"model": MODEL, "prompt": "a"}
    async with serve_ingress(
        batcher, limiter=limiter, auth=limited(KeyLimits(requests_per_minute=1))
    ) as client:
        first = await client.post("/v1/completions", json=body, headers=headers)
        second = await client.post("/v1/completions", json=body, headers=headers)

    assert first.status_code == 200
    error = api_error(second, 429)
    assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
    assert 1 <= int(second.headers["retry-after"]) <= 60  # one request back per minute
    assert len(requests_of(batcher)) == 1


@pytest.mark.parametrize("stream", [False, True])
async def test_a_reservation_is_settled_with_the_tokens_the_request_used(
    monkeypatch: pytest.MonkeyPatch, stream: bool
) -> None:
    monkeypatch.setenv(KEYS_ENV, f"alice:{ALICE}")
    limiter = LocalHandle(RateLimiter.func_or_class())
    body = {
        "model": MODEL,
        "prompt": ["a", "b"],
        "max_tokens": 50,
        "stream": stream,
        "stream_options": {"include_usage": True} if stream else None,
    }
    async with serve_ingress(
        limiter=limiter, auth=limited(KeyLimits(tokens_per_minute=10_000))
    ) as client:
        response = await client.post(
            "/v1/completions", json=body, headers={"Authorization": f"Bearer {ALICE}"}
        )
    usage = sse_events(response)[-1]["usage"] if stream else response.json()["usage"]

    (acquire,) = limiter.calls_to("acquire")
    assert acquire.args[0] == "alice"
    assert acquire.args[2] >= 100  # both prompts' max_tokens, reserved up front
    decision = await acquire.response
    (settle,) = limiter.calls_to("settle")
    assert settle.args == (decision.reservation_id, usage["total_tokens"])


@pytest.mark.parametrize(
    "unavailable_limiter",
    [lambda: LocalHandle(FailingRateLimiter()), HangingHandle],
    ids=["failing", "hanging"],
)
async def test_a_rate_limiter_that_cannot_answer_lets_requests_through(
    monkeypatch: pytest.MonkeyPatch, unavailable_limiter: Callable[[], Any]
) -> None:
    monkeypatch.setenv(KEYS_ENV, f"alice:{ALICE}")
    limiter = unavailable_limiter()
    auth = AuthConfig(
        api_keys_env=KEYS_ENV,
        default_limits=KeyLimits(requests_per_minute=1),
        rate_limit_timeout_s=0.01,
    )
    async with serve_ingress(limiter=limiter, auth=auth) as client:
        responses = [
            await client.post(
                "/v1/completions",
                json={"model": MODEL, "prompt": "a"},
                headers={"Authorization": f"Bearer {ALICE}"},
            )
            for _ in range(2)
        ]

    assert [r.status_code for r in responses] == [200, 200]


# A model's own tool call parser


def answering(text: str) -> Script:
    """Answers every request with ``text``, whole."""

    async def script(request: PreparedRequest) -> AsyncIterator[TextChunk]:
        yield TextChunk(
            request.request_id,
            text=text,
            token_ids=[1],
            finish_reason="stop",
            prompt_tokens=PROMPT_TOKENS,
            completion_tokens=1,
            model_version="v1",
        )

    return script


async def test_a_model_s_own_tool_call_parser_reads_its_auto_calls() -> None:
    mistral = '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Oslo"}}]'
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    body = {"model": MODEL, "messages": USER_A, "tools": tools, "tool_choice": "auto"}
    for parser, calls in (("mistral", 1), (None, 0)):  # None: the application's, hermes
        batcher = LocalHandle(ScriptedBatcher(answering(mistral)))
        async with serve_ingress(batcher, tool_call_parser=parser) as client:
            response = await client.post("/v1/chat/completions", json=body)
        message = response.json()["choices"][0]["message"]
        assert len(message.get("tool_calls") or []) == calls, message
