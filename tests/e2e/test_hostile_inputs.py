"""Hostile requests over real HTTP: each is a 4xx in the documented error shape naming its
problem, never a 500, and the service answers normally afterwards.

Oversized and trickled bodies, malformed JSON (deep nesting, invalid UTF-8, NaN, duplicated
keys), text that is not Unicode, absurd numbers and wrong content types.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

BODY_READ_TIMEOUT_S = 2.0
APP_OVERRIDES = {"body_read_timeout_s": BODY_READ_TIMEOUT_S}
LIMIT = 4 * 1024 * 1024  # the default max_request_body_bytes
SURROGATE = "\\ud800"  # a JSON escape of a lone surrogate: valid JSON, not valid Unicode
COMPLETION = '{"model": "demo", "max_tokens": 2, "prompt": %s}'


def assert_error(
    response: httpx.Response, status: int, *, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    """The response is ``status`` with the documented error body; returns its ``error``."""
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and error["type"]
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
    return error


@pytest.fixture(autouse=True)
def still_serving(client: httpx.Client) -> Iterator[None]:
    """After every hostile case, the service is healthy and answers a normal request."""
    yield
    assert client.get("/health").status_code == 200
    answer = client.post("/v1/infer", json={"prompt": "The for statement", "max_tokens": 1})
    assert answer.status_code == 200 and answer.json()["tokens"] == 1


# Sizes and slow bodies


def test_a_body_over_the_limit_is_413_before_it_is_forwarded(client: httpx.Client) -> None:
    huge = COMPLETION % json.dumps("x" * (LIMIT + 1))
    error = assert_error(
        client.post("/v1/completions", content=huge), 413, code="request_too_large"
    )
    assert str(LIMIT) in error["message"]


def test_a_chunked_body_over_the_limit_is_413(client: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is counted as bytes arrive
        yield b'{"model": "demo", "prompt": "'
        for _ in range(LIMIT // 65536 + 1):
            yield b"x" * 65536
        yield b'"}'

    response = client.post("/v1/completions", content=chunks())
    assert_error(response, 413, code="request_too_large")


def slow_request(base_url: str, body: bytes, sent_at_once: int, deadline_s: float) -> bytes:
    """Send ``body`` with its full Content-Length but, after ``sent_at_once`` bytes, one byte a
    second; return what the server answered by ``deadline_s`` (the bytes it sent)."""
    host, port = base_url.removeprefix("http://").split(":")
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    answer = b""
    with socket.create_connection((host, int(port)), timeout=1) as sock:
        sock.sendall(head + body[:sent_at_once])
        started = time.monotonic()
        position = sent_at_once
        while time.monotonic() - started < deadline_s and b"\r\n\r\n" not in answer:
            try:
                chunk = sock.recv(65536)  # waits up to the socket's 1 s timeout
                if not chunk:
                    break
                answer += chunk
            except TimeoutError:
                if position < len(body):
                    sock.sendall(body[position : position + 1])
                    position += 1
        response_head, _, payload = answer.partition(b"\r\n\r\n")
        length = next(
            (int(line.split(b":")[1]) for line in response_head.lower().split(b"\r\n")
             if line.startswith(b"content-length:")),
            0,
        )  # fmt: skip
        sock.settimeout(5)
        while len(payload) < length and (chunk := sock.recv(65536)):
            payload += chunk
            answer += chunk
    return answer


@pytest.mark.parametrize("sent_at_once", [0, 10], ids=["no-body-byte", "a-byte-a-second"])
def test_a_trickled_body_gets_408_within_the_body_timeout(
    served_app: str, sent_at_once: int
) -> None:
    body = (COMPLETION % json.dumps("The while statement")).encode()
    started = time.monotonic()
    answer = slow_request(served_app, body, sent_at_once, deadline_s=BODY_READ_TIMEOUT_S + 10)
    elapsed = time.monotonic() - started
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), answer[:300]
    # Answered once the timeout passed, long before the whole body would have arrived.
    assert BODY_READ_TIMEOUT_S <= elapsed < len(body) - sent_at_once
    error = json.loads(payload[payload.index(b"{") :])["error"]
    assert error["code"] == "request_timeout" and "did not arrive" in error["message"]


# Malformed JSON


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        pytest.param(
            b'{"model": "demo", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
            "nests deeper",
            id="deep-nesting",
        ),
        pytest.param(
            b'{"model": "demo", "prompt": "a", "echo": ' + b'{"a": ' * 40 + b"1" + b"}" * 40 + b"}",
            "nests deeper",
            id="nesting-deeper-than-the-limit",
        ),
        pytest.param(b'{"model": "demo", "prompt": "\xff\xfe"}', "UTF-8", id="invalid-utf8"),
        pytest.param(
            b'{"model": "demo", "prompt": "a\x00b"}', "control character", id="raw-nul-byte"
        ),
        pytest.param(b'{"model": "demo", "prompt": "a", "temperature": NaN}', "NaN", id="nan"),
        pytest.param(
            b'{"model": "demo", "prompt": "a", "top_p": Infinity}', "Infinity", id="infinity"
        ),
        pytest.param(
            b'{"model": "demo", "prompt": "a", "temperature": -Infinity}',
            "-Infinity",
            id="minus-infinity",
        ),
        pytest.param(
            b'{"model": "demo", "prompt": "a", "temperature": 1e400}', "out of range", id="1e400"
        ),
        pytest.param(
            b'{"model": "demo", "prompt": "a", "max_tokens": ' + b"9" * 5000 + b"}",
            "digits",
            id="5000-digit-integer",
        ),
        pytest.param(
            b'{"model": "demo", "prompt": "harmless", "prompt": "other"}',
            "'prompt' appears twice",
            id="duplicated-key",
        ),
        pytest.param(b'{"model": "demo", "prompt": "a"', "Expecting", id="truncated"),
    ],
)
def test_malformed_json_is_400_naming_the_problem(
    client: httpx.Client, body: bytes, problem: str
) -> None:
    response = client.post("/v1/completions", content=body)
    error = assert_error(response, 400, code="invalid_json")
    assert problem in error["message"]


# Text that is not Unicode, and NUL characters


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", COMPLETION % f'"{SURROGATE}"', "prompt"),
        ("/v1/completions", COMPLETION % f'["fine", "a{SURROGATE}"]', "prompt.1"),
        (
            "/v1/completions",
            f'{{"model": "demo", "prompt": "a", "stop": ["{SURROGATE}"]}}',
            "stop.0",
        ),
        (
            "/v1/chat/completions",
            f'{{"model": "demo", "messages": [{{"role": "user", "content": "{SURROGATE}"}}]}}',
            "messages.0.content",
        ),
        (
            "/v1/chat/completions",
            f'{{"model": "demo", "messages": [{{"role": "user", "content": "a"}}], '
            f'"stop": "{SURROGATE}"}}',
            "stop",
        ),
        ("/v1/infer", f'{{"prompt": "{SURROGATE}"}}', "prompt"),
        ("/v1/stream_infer", f'{{"prompt": "ok", "stop_words": ["{SURROGATE}"]}}', "stop_words.0"),
        ("/tokenize", f'{{"prompt": "{SURROGATE}"}}', "prompt"),
    ],
)
def test_a_lone_surrogate_is_400_naming_the_field(
    client: httpx.Client, path: str, body: str, param: str
) -> None:
    error = assert_error(client.post(path, content=body), 400, param=param)
    assert "surrogate" in error["message"]


def test_a_lone_surrogate_in_one_batch_item_fails_that_item_alone(client: httpx.Client) -> None:
    body = f'[{{"prompt": "fine", "max_tokens": 1}}, {{"prompt": "{SURROGATE}"}}]'
    response = client.post("/v1/batch_infer", content=body)
    assert response.status_code == 200, response.text
    fine, bad = response.json()
    assert fine["tokens"] == 1 and "error" not in fine
    assert bad["status"] == 400 and bad["error_detail"]["param"] == "prompt"


def test_an_escaped_nul_character_is_ordinary_text(client: httpx.Client) -> None:
    # U+0000 is valid Unicode (unlike a raw NUL byte in JSON): it is tokenized like any text.
    body = COMPLETION % '"The \\u0000 statement"'
    response = client.post("/v1/completions", content=body)
    assert response.status_code == 200, response.text
    tokenized = client.post("/tokenize", content='{"prompt": "a\\u0000b"}')
    assert tokenized.status_code == 200 and tokenized.json()["count"] >= 1


# Absurd numbers


@pytest.mark.parametrize(
    ("path", "fields", "param"),
    [
        ("/v1/completions", {"n": 10**9}, "n"),
        ("/v1/completions", {"max_tokens": 10**12}, "max_tokens"),
        ("/v1/completions", {"max_tokens": 2**70}, "max_tokens"),
        ("/v1/completions", {"logprobs": 10**9}, "logprobs"),
        ("/v1/completions", {"prompt_logprobs": 10**9}, "prompt_logprobs"),
        ("/v1/completions", {"best_of": 10**9}, "best_of"),
        ("/v1/completions", {"seed": 2**64}, "seed"),
        ("/v1/completions", {"top_k": 2**70}, "top_k"),
        ("/v1/completions", {"min_tokens": 2**70}, "min_tokens"),
        ("/v1/completions", {"stop_token_ids": [2**70]}, "stop_token_ids"),
        ("/v1/completions", {"prompt": [2**70]}, "prompt"),
        ("/v1/completions", {"prompt": [-1]}, "prompt"),
        ("/v1/chat/completions", {"max_tokens": 10**12}, "max_tokens"),
        ("/v1/chat/completions", {"n": 10**9}, "n"),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 10**9}, "top_logprobs"),
        ("/v1/infer", {"max_tokens": 10**12}, "max_tokens"),
        ("/detokenize", {"tokens": [2**70]}, "tokens"),
    ],
)
def test_absurd_numbers_are_400_naming_the_parameter(
    client: httpx.Client, path: str, fields: dict[str, Any], param: str
) -> None:
    if path == "/v1/chat/completions":
        body: dict[str, Any] = {"model": "demo", "messages": [{"role": "user", "content": "a"}]}
    elif path == "/detokenize":
        body = {}
    else:
        body = {"model": "demo", "prompt": "The", "max_tokens": 2}
    response = client.post(path, json={**body, **fields})
    error = assert_error(response, 400)
    assert error["param"] is not None and error["param"].startswith(param), error


def test_too_many_batch_items_is_400(client: httpx.Client) -> None:
    items = [{"prompt": "a"}] * 100_000
    assert_error(client.post("/v1/batch_infer", json=items), 400, param="requests")


# Content types


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=xyz",
        "application/xml",
        "not a media type",
    ],
)
def test_a_body_that_is_not_json_is_415(client: httpx.Client, content_type: str) -> None:
    response = client.post(
        "/v1/completions",
        content=COMPLETION % '"The"',
        headers={"Content-Type": content_type},
    )
    error = assert_error(response, 415, code="unsupported_media_type")
    assert content_type in error["message"]


def test_a_vanishing_temperature_decodes_greedily(client: httpx.Client) -> None:
    # 1e-45 divides the logits into float32 overflow: sampled, it would give noise.
    body = {"model": "demo", "prompt": "The class statement", "max_tokens": 8}
    greedy = client.post("/v1/completions", json={**body, "temperature": 0})
    tiny = client.post("/v1/completions", json={**body, "temperature": 1e-45, "seed": 1})
    assert greedy.status_code == tiny.status_code == 200, tiny.text
    assert tiny.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]
