"""The HTTP surface beyond generation, over real HTTP through Serve's proxy: the API's
documentation, ``/tokenize`` and ``/detokenize`` against the model's own tokenizer, the request
limits and the framework's answers in the error shape, and keep-alive comments on a stream
that waits in the engine's queue.

(API keys on ``/docs`` and ``/openapi.json``: ``test_access_control``.)
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from serve_app.text.chat_template import ChatTemplate
from serve_app.text.tokenizer import Tokenizer
from tests.api_routes import API_ROUTES

BODY_LIMIT = 64 * 1024
APP_OVERRIDES = {
    # One sequence at a time: a second request waits in the queue behind the first.
    "engine": {"max_num_seqs": 1, "intra_op_num_threads": 1, "allow_spinning": False},
    "sse_keep_alive_s": 0.05,
    "max_request_body_bytes": BODY_LIMIT,
}
KEEP_ALIVE = ": keep-alive"


def assert_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["error"] and set(body["error"]) == {"message", "type", "param", "code"}
    error: dict[str, Any] = body["error"]
    return error


# The API's documentation


def test_openapi_lists_every_route_with_its_models(client: httpx.Client) -> None:
    response = client.get("/openapi.json")

    assert response.status_code == 200
    document = response.json()
    listed = {(method, path) for path, item in document["paths"].items() for method in item}
    assert listed >= API_ROUTES, API_ROUTES - listed
    for method, path in listed:
        operation = document["paths"][path][method]
        assert operation["responses"]["200"]["content"], path
        if method == "post":
            assert operation["requestBody"]["content"]["application/json"]["schema"], path
    schemas = document["components"]["schemas"]
    assert {"TokenizeRequest", "TokenizeResponse", "DetokenizeRequest", "ErrorResponse"} <= set(
        schemas
    )


def test_the_docs_page_is_served(client: httpx.Client) -> None:
    page = client.get("/docs")

    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "swagger-ui" in page.text
    for _, path in API_ROUTES:
        assert f'"{path}"' in page.text, path


# /tokenize and /detokenize


@pytest.fixture(scope="module")
def chat_template(model_dir: Path) -> ChatTemplate:
    return ChatTemplate(model_dir)


def test_tokenize_and_detokenize_agree_with_the_models_tokenizer(
    client: httpx.Client, tokenizer: Tokenizer
) -> None:
    prompt = "The with statement is used to wrap the execution of a block — déjà vu."
    tokenized = client.post("/tokenize", json={"model": "demo", "prompt": prompt})

    assert tokenized.status_code == 200, tokenized.text
    ids = tokenizer.encode(prompt)
    body = tokenized.json()
    assert (body["tokens"], body["count"]) == (ids, len(ids))
    assert body["max_model_len"] == client.get("/v1/model_info").json()["max_tokens"]
    detokenized = client.post("/detokenize", json={"model": "demo", "tokens": ids})
    assert detokenized.status_code == 200, detokenized.text
    assert detokenized.json() == {"prompt": tokenizer.decode(ids)} == {"prompt": prompt}


def test_tokenize_counts_what_a_completion_of_the_prompt_uses(client: httpx.Client) -> None:
    prompt = "Assignment statements are used to (re)bind names to values"
    count = client.post("/tokenize", json={"prompt": prompt}).json()["count"]
    completion = client.post(
        "/v1/completions", json={"model": "demo", "prompt": prompt, "max_tokens": 1}
    )

    assert completion.status_code == 200, completion.text
    assert completion.json()["usage"]["prompt_tokens"] == count


def test_tokenize_renders_chat_messages_like_a_chat_completion(
    client: httpx.Client, tokenizer: Tokenizer, chat_template: ChatTemplate
) -> None:
    messages = [{"role": "user", "content": "What does pass do?"}]
    tokenized = client.post("/tokenize", json={"model": "demo", "messages": messages})
    chat = client.post(
        "/v1/chat/completions", json={"model": "demo", "messages": messages, "max_tokens": 1}
    )

    assert tokenized.status_code == 200, tokenized.text
    expected = tokenizer.encode(chat_template.render(messages))
    assert tokenized.json()["tokens"] == expected
    assert chat.json()["usage"]["prompt_tokens"] == len(expected)


# Limits and the framework's answers


def test_a_body_over_the_limit_is_a_413(client: httpx.Client) -> None:
    declared = client.post("/v1/completions", json={"model": "demo", "prompt": "a" * BODY_LIMIT})

    def chunked() -> Iterator[bytes]:  # no Content-Length
        yield b'{"model": "demo", "prompt": "'
        for _ in range(BODY_LIMIT // 4096 + 1):
            yield b"a" * 4096
        yield b'"}'

    streamed = client.post(
        "/v1/completions", content=chunked(), headers={"Content-Type": "application/json"}
    )

    for response in (declared, streamed):
        error = assert_error(response, 413)
        assert error["code"] == "request_too_large" and str(BODY_LIMIT) in error["message"]


@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", "text/plain"])
def test_a_body_not_declared_as_json_is_a_415(client: httpx.Client, content_type: str) -> None:
    # What `curl -d '{"prompt": "a"}'` sends (form-encoded), and a text/plain body.
    response = client.post(
        "/v1/infer", content=b'{"prompt": "a"}', headers={"Content-Type": content_type}
    )

    assert assert_error(response, 415)["code"] == "unsupported_media_type"


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("GET", "/v1/embeddings", 404), ("GET", "/tokenize", 405), ("DELETE", "/v1/models", 405)],
)
def test_unknown_routes_and_methods_answer_in_the_error_shape(
    client: httpx.Client, method: str, path: str, status: int
) -> None:
    assert_error(client.request(method, path), status)


# Keep-alive comments


def test_a_stream_queued_behind_another_gets_keep_alive_comments(client: httpx.Client) -> None:
    long = {"model": "demo", "prompt": "The", "max_tokens": 400, "ignore_eos": True,
            "temperature": 0.7, "stream": True}  # fmt: skip
    first_running = threading.Event()
    first_done = threading.Event()

    def first() -> None:
        with client.stream("POST", "/v1/completions", json=long) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    first_running.set()
        first_done.set()

    runner = threading.Thread(target=first)
    runner.start()
    try:
        assert first_running.wait(60), "the first request never started"
        waiting = {"model": "demo", "prompt": "The", "max_tokens": 4, "stream": True}
        with client.stream("POST", "/v1/completions", json=waiting) as response:
            assert response.status_code == 200
            assert response.headers["cache-control"] == "no-cache"
            lines: list[str] = []
            first_still_running = False
            for line in response.iter_lines():
                if line and not lines:
                    first_still_running = not first_done.is_set()
                if line:
                    lines.append(line)
    finally:
        runner.join(60)

    # The first frame was a comment, sent while the first request held the only engine slot.
    assert lines[0] == KEEP_ALIVE and first_still_running, lines[:3]
    data = [line for line in lines if line != KEEP_ALIVE]
    assert data[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in data)
    assert len(data) >= 2  # its tokens came after the wait
