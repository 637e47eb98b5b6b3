"""The HTTP surface beyond generation, in process: the API's documentation, ``/tokenize`` and
``/detokenize``, the request limits (413, 415), the error shape of the framework's answers,
``WWW-Authenticate`` on 401s, and keep-alive comments on streams.

The ingress runs over ASGI as in ``test_ingress_http``; tokenization is the real ``Batcher``
deployment's, over the demo model, reached through ``LocalHandle``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from serve_app.api import sse
from serve_app.api.sse import KEEP_ALIVE
from serve_app.config import IngressSettings
from serve_app.deployments.batcher import Batcher
from serve_app.messages import PreparedRequest, RequestError, TextChunk
from serve_app.text.chat_template import ChatTemplate
from serve_app.text.tokenizer import Tokenizer
from tests.api_routes import API_ROUTES
from tests.unit.fake_handles import LocalHandle
from tests.unit.fakes import HangingHandle
from tests.unit.test_ingress_http import (  # noqa: F401  # fixtures used by name
    ALICE,
    DEFAULT_MAX_TOKENS,
    DESCRIPTION,
    KEYS_ENV,
    MODEL,
    OPEN,
    USER_A,
    ScriptedBatcher,
    anyio_backend,
    api_error,
    echo,
    outside_any_replica,
    requests_of,
    serve_ingress,
)

pytestmark = pytest.mark.anyio

JSON_ROUTES = [
    ("/v1/completions", {"model": MODEL, "prompt": "a"}),
    ("/v1/chat/completions", {"model": MODEL, "messages": USER_A}),
    ("/v1/infer", {"prompt": "a"}),
    ("/v1/stream_infer", {"prompt": "a"}),
    ("/tokenize", {"prompt": "a"}),
    ("/detokenize", {"tokens": [1]}),
]


async def eventually(event: asyncio.Event, timeout_s: float = 10.0) -> None:
    """Wait for ``event``; a test whose condition never comes fails instead of hanging."""
    await asyncio.wait_for(event.wait(), timeout_s)


def settings(**fields: Any) -> IngressSettings:
    return IngressSettings(DEFAULT_MAX_TOKENS, OPEN, **fields)


@pytest.fixture
def batcher(model_dir: Path) -> LocalHandle:
    """The real Batcher over the demo model; its model handle is never called here."""
    return LocalHandle(Batcher.func_or_class(HangingHandle(), model_dir))  # type: ignore[attr-defined]


# The API's documentation


async def test_openapi_lists_every_route_with_its_request_and_response_models() -> None:
    async with serve_ingress() as client:
        response = await client.get("/openapi.json")

    assert response.status_code == 200
    document = response.json()
    schemas = document["components"]["schemas"]
    listed = {(m, p) for p, item in document["paths"].items() for m in item}
    assert listed >= API_ROUTES, API_ROUTES - listed
    for method, path in listed:
        operation = document["paths"][path][method]
        if method == "post":
            body = operation["requestBody"]["content"]["application/json"]["schema"]
            assert body["$ref"].removeprefix("#/components/schemas/") in schemas, path
        ok = operation["responses"]["200"]["content"]
        assert any(media["schema"] for media in ok.values()), (path, ok)
        error = operation["responses"]["4XX"]["content"]["application/json"]["schema"]
        assert error == {"$ref": "#/components/schemas/ErrorResponse"}
    chat_stream = document["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]
    assert chat_stream["content"]["text/event-stream"]["schema"]["title"] == "ChatCompletionChunk"
    # Every reference resolves, the streamed chunks' parts included.
    refs = {ref.split("/")[-1] for ref in _refs(document)}
    assert refs <= set(schemas), refs - set(schemas)
    assert "/docs" not in document["paths"] and "/openapi.json" not in document["paths"]


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


async def test_the_docs_page_embeds_the_document() -> None:
    async with serve_ingress() as client:
        page = await client.get("/docs")
        document = (await client.get("/openapi.json")).json()

    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "SwaggerUIBundle" in page.text
    # Inlined, so that a page fetched with the key works without fetching the document again.
    assert '"/v1/chat/completions"' in page.text and '"/tokenize"' in page.text
    assert document["components"]["securitySchemes"]["apiKey"]["scheme"] == "bearer"
    assert document["paths"]["/health"]["get"]["security"] == []


@pytest.mark.parametrize("path", ["/docs", "/openapi.json"])
async def test_with_api_keys_the_docs_need_a_key(
    monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    monkeypatch.setenv(KEYS_ENV, f"alice:{ALICE}")
    async with serve_ingress() as client:
        refused = await client.get(path)
        served = await client.get(path, headers={"Authorization": f"Bearer {ALICE}"})

    assert api_error(refused, 401)["code"] == "invalid_api_key"
    assert refused.headers["www-authenticate"] == "Bearer"
    assert served.status_code == 200


async def test_every_401_names_the_bearer_scheme(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEYS_ENV, f"alice:{ALICE}")
    async with serve_ingress() as client:
        responses = [
            await client.post("/v1/completions", json={"model": MODEL, "prompt": "a"}),
            await client.post("/tokenize", json={"prompt": "a"}, headers={"Authorization": "x"}),
            await client.get("/v1/models", headers={"Authorization": "Bearer sk-wrong"}),
        ]

    for response in responses:
        api_error(response, 401)
        assert response.headers["www-authenticate"] == "Bearer"


# /tokenize and /detokenize


async def test_tokenize_gives_the_ids_a_completion_of_the_prompt_would(
    batcher: LocalHandle, tokenizer: Tokenizer
) -> None:
    prompt = "The del statement removes a name."
    async with serve_ingress(batcher) as client:
        response = await client.post("/tokenize", json={"model": MODEL, "prompt": prompt})
        with_strs = await client.post(
            "/tokenize", json={"prompt": prompt, "return_token_strs": True}
        )

    assert response.status_code == 200, response.text
    ids = tokenizer.encode(prompt)
    assert response.json() == {
        "count": len(ids),
        "max_model_len": DESCRIPTION.context_length,
        "tokens": ids,
        "token_strs": None,
    }
    assert "".join(with_strs.json()["token_strs"]) == prompt
    assert len(batcher.calls_to("tokenize")) == 2  # the ingress itself never tokenizes


@pytest.mark.parametrize("add_generation_prompt", [True, False])
async def test_tokenize_renders_messages_with_the_chat_template(
    batcher: LocalHandle, tokenizer: Tokenizer, model_dir: Path, add_generation_prompt: bool
) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    body = {"model": MODEL, "messages": messages, "add_generation_prompt": add_generation_prompt}
    async with serve_ingress(batcher) as client:
        response = await client.post("/tokenize", json=body)

    assert response.status_code == 200, response.text
    rendered = ChatTemplate(model_dir).render(messages, add_generation_prompt)
    assert response.json()["tokens"] == tokenizer.encode(rendered)
    assert response.json()["count"] == len(tokenizer.encode(rendered))


async def test_detokenize_inverts_tokenize(batcher: LocalHandle) -> None:
    prompt = "for x in range(3):\n    print(x)  # déjà vu"
    async with serve_ingress(batcher) as client:
        tokens = (await client.post("/tokenize", json={"prompt": prompt})).json()["tokens"]
        response = await client.post("/detokenize", json={"model": MODEL, "tokens": tokens})

    assert response.status_code == 200, response.text
    assert response.json() == {"prompt": prompt}


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/tokenize", {"model": "gpt-4", "prompt": "a"}, 404, "model"),
        ("/detokenize", {"model": "gpt-4", "tokens": [1]}, 404, "model"),
        ("/tokenize", {"prompt": "a", "messages": USER_A}, 400, "prompt"),
        ("/tokenize", {}, 400, "prompt"),
        ("/tokenize", {"prompt": "a", "add_special_tokens": "yes"}, 400, "add_special_tokens"),
        ("/detokenize", {"tokens": [1, 10**9]}, 400, "tokens"),
        ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
        ("/detokenize", {"tokens": "abc"}, 400, "tokens"),
    ],
)
async def test_a_bad_tokenizer_request_names_its_fault(
    batcher: LocalHandle, path: str, body: dict[str, Any], status: int, param: str
) -> None:
    async with serve_ingress(batcher) as client:
        response = await client.post(path, json=body)

    assert api_error(response, status)["param"] == param


# Request limits and the framework's own answers


@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", "text/plain"])
@pytest.mark.parametrize(("path", "body"), JSON_ROUTES)
async def test_a_body_that_is_not_declared_json_is_a_415(
    path: str, body: dict[str, Any], content_type: str
) -> None:
    batcher = LocalHandle(ScriptedBatcher())
    async with serve_ingress(batcher) as client:
        response = await client.post(
            path, content=json.dumps(body), headers={"Content-Type": content_type}
        )

    error = api_error(response, 415)
    assert (error["type"], error["code"]) == ("invalid_request_error", "unsupported_media_type")
    assert "application/json" in error["message"] and content_type in error["message"]
    assert requests_of(batcher) == []


@pytest.mark.parametrize(
    "content_type", [None, "application/json; charset=utf-8", "application/vnd.api+json"]
)
async def test_json_is_read_with_a_json_content_type_or_none(content_type: str | None) -> None:
    headers = {} if content_type is None else {"Content-Type": content_type}
    body = json.dumps({"model": MODEL, "prompt": "a"}).encode()
    async with serve_ingress() as client:
        request = client.build_request("POST", "/v1/completions", content=body, headers=headers)
        assert ("content-type" in request.headers) == (content_type is not None)
        response = await client.send(request)

    assert response.status_code == 200, response.text


async def test_without_a_key_an_unauthenticated_415_is_a_401(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(KEYS_ENV, f"alice:{ALICE}")
    async with serve_ingress() as client:
        response = await client.post(
            "/v1/infer", content="prompt=a", headers={"Content-Type": "text/plain"}
        )

    api_error(response, 401)


LIMIT = 2048


async def test_a_body_declared_over_the_limit_is_a_413_before_anything_is_forwarded() -> None:
    batcher = LocalHandle(ScriptedBatcher())
    prompt = "a" * LIMIT
    async with serve_ingress(batcher, settings=settings(max_request_body_bytes=LIMIT)) as client:
        too_big = await client.post("/v1/completions", json={"model": MODEL, "prompt": prompt})
        fits = await client.post("/v1/completions", json={"model": MODEL, "prompt": "a" * 100})

    error = api_error(too_big, 413)
    assert (error["type"], error["code"]) == ("invalid_request_error", "request_too_large")
    assert str(LIMIT) in error["message"]
    assert fits.status_code == 200
    assert [r.prompt for r in requests_of(batcher)] == ["a" * 100]


async def test_a_chunked_body_over_the_limit_is_a_413() -> None:
    batcher = LocalHandle(ScriptedBatcher())

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: sent chunked
        yield b'{"model": "demo", "prompt": "'
        for _ in range(8):
            yield b"a" * 512
        yield b'"}'

    async with serve_ingress(batcher, settings=settings(max_request_body_bytes=LIMIT)) as client:
        response = await client.post(
            "/v1/completions", content=chunks(), headers={"Content-Type": "application/json"}
        )

    assert api_error(response, 413)["code"] == "request_too_large"
    assert requests_of(batcher) == []


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/tokenize", 405),
        ("PUT", "/detokenize", 405),
        ("POST", "/v1/models", 405),
        ("GET", "/v2/completions", 404),
        ("GET", "/redoc", 404),
    ],
)
async def test_unknown_routes_and_methods_answer_in_the_error_shape(
    method: str, path: str, status: int
) -> None:
    async with serve_ingress() as client:
        response = await client.request(method, path)

    api_error(response, status)


# Streams: keep-alive comments and caching headers


def stream_frames(response: httpx.Response) -> list[str]:
    """Every frame of a stream: events (``data: ...``) and comments (``: ...``)."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    return [frame + "\n\n" for frame in response.text.split("\n\n")[:-1]]


STREAMS = [
    ("/v1/completions", {"model": MODEL, "prompt": "a", "stream": True}),
    ("/v1/chat/completions", {"model": MODEL, "messages": USER_A, "stream": True}),
    ("/v1/stream_infer", {"prompt": "a"}),
]


@pytest.mark.parametrize(("path", "body"), STREAMS)
async def test_a_stream_waiting_for_its_first_token_gets_keep_alive_comments(
    path: str, body: dict[str, Any]
) -> None:
    keep_alives_sent = asyncio.Event()

    async def queued(request: PreparedRequest) -> AsyncIterator[TextChunk]:
        await keep_alives_sent.wait()  # queued behind others, or prefilling, until then
        async for chunk in echo(request):
            yield chunk

    batcher = LocalHandle(ScriptedBatcher(queued))
    async with serve_ingress(batcher, settings=settings(sse_keep_alive_s=0.01)) as client:
        sent = client._transport.app  # type: ignore[attr-defined]
        call = asyncio.ensure_future(client.post(path, json=body))
        await eventually(sent.body_sent)  # the response has begun before the first token
        keep_alives_sent.set()
        response = await call

    frames = stream_frames(response)
    assert frames[0] == KEEP_ALIVE
    events = [f for f in frames if f != KEEP_ALIVE]
    assert all(f.startswith("data: ") for f in events)
    assert events[-1] == "data: [DONE]\n\n"
    assert "a#0" in "".join(events)  # the echo's answer came after the comments


async def test_a_request_that_fails_after_its_stream_began_gets_one_error_event() -> None:
    release = asyncio.Event()

    async def rejected_late(request: PreparedRequest) -> AsyncIterator[TextChunk]:
        await release.wait()
        yield TextChunk(request.request_id, error=RequestError(503, "queue full", code="x"))

    batcher = LocalHandle(ScriptedBatcher(rejected_late))
    body = {"model": MODEL, "prompt": "a", "stream": True}
    async with serve_ingress(batcher, settings=settings(sse_keep_alive_s=0.01)) as client:
        call = asyncio.ensure_future(client.post("/v1/completions", json=body))
        await eventually(client._transport.app.body_sent)  # type: ignore[attr-defined]
        release.set()
        response = await call

    frames = stream_frames(response)
    assert frames[0] == KEEP_ALIVE
    *comments, last = frames
    assert set(comments) == {KEEP_ALIVE}
    assert json.loads(last.removeprefix("data: "))["error"]["message"] == "queue full"


async def test_a_request_rejected_before_the_interval_gets_its_status() -> None:
    async def rejected(request: PreparedRequest) -> AsyncIterator[TextChunk]:
        yield TextChunk(request.request_id, error=RequestError(400, "too long", param="prompt"))

    batcher = LocalHandle(ScriptedBatcher(rejected))
    body = {"model": MODEL, "prompt": "a", "stream": True}
    async with serve_ingress(batcher, settings=settings(sse_keep_alive_s=30)) as client:
        response = await client.post("/v1/completions", json=body)

    assert api_error(response, 400)["param"] == "prompt"


async def test_a_client_leaving_while_its_request_waits_cancels_it() -> None:
    waiting = asyncio.Event()

    async def queued(request: PreparedRequest) -> AsyncIterator[TextChunk]:
        waiting.set()
        await asyncio.Event().wait()  # never admitted
        yield TextChunk(request.request_id)

    batcher = LocalHandle(ScriptedBatcher(queued))
    body = {"model": MODEL, "prompt": "a", "stream": True}
    async with serve_ingress(batcher, settings=settings(sse_keep_alive_s=0.01)) as client:
        call = asyncio.ensure_future(client.post("/v1/completions", json=body))
        await waiting.wait()
        await eventually(client._transport.app.body_sent)  # type: ignore[attr-defined]
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call

    (stream,) = batcher.responses
    assert stream.cancelled


# Deferred starts, closed early


async def test_closing_a_deferred_stream_closes_what_its_start_gave_or_cancels_it() -> None:
    release = asyncio.Event()
    closed: list[str] = []

    class Stream:
        """What ``CompletionService.stream`` gives: closing it cancels generation, read or not."""

        def __aiter__(self) -> Stream:
            return self

        async def __anext__(self) -> int:
            return 1

        async def aclose(self) -> None:
            closed.append("stream")

    def stream() -> AsyncIterator[int]:
        return Stream()

    async def start() -> tuple[bool, AsyncIterator[int]]:
        try:
            await release.wait()
        except asyncio.CancelledError:
            closed.append("start")
            raise
        return False, stream()

    _, came_back = await sse.started_within(start(), 0.01)
    _, never_came = await sse.started_within(start(), 0.01)
    assert isinstance(came_back, sse.DeferredStream) and isinstance(never_came, sse.DeferredStream)
    await never_came.aclose()
    assert closed == ["start"]
    release.set()
    await asyncio.wait({came_back._started})
    await came_back.aclose()  # never read: the stream it gave is closed all the same

    assert closed == ["start", "stream"]
