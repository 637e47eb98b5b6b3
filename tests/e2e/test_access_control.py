"""API keys, per-key rate limits and backpressure, over real HTTP."""

from __future__ import annotations

import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

KEYS_FILE = Path(tempfile.mkdtemp()) / "api_keys"
KEYS_FILE.write_text("# name:secret\nalice:sk-alice-0123456789\ntight:sk-tight-9876543210\n")
ALICE = {"Authorization": "Bearer sk-alice-0123456789"}
TIGHT = {"Authorization": "Bearer sk-tight-9876543210"}
TIGHT_RPM = 3
APP_OVERRIDES = {
    "auth": {
        "api_keys_file": str(KEYS_FILE),
        "default_limits": {"tokens_per_minute": 20_000},
        "limits": {"tight": {"requests_per_minute": TIGHT_RPM}},
    },
    # One sequence at a time and one waiting: the ingress lets in what the Batcher holds,
    # 2 x (1 + 1) = 4 generation streams, and turns the fifth concurrent request away.
    "engine": {"max_num_seqs": 1, "max_waiting_seqs": 1, "intra_op_num_threads": 1},
}
REQUEST = {"model": "demo", "prompt": "The del statement", "max_tokens": 4}


def assert_openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/completions"),
        ("POST", "/v1/chat/completions"),
        ("GET", "/v1/models"),
        ("GET", "/v1/model_info"),
        ("POST", "/v1/infer"),
        ("GET", "/metrics"),
        ("GET", "/docs"),
        ("GET", "/openapi.json"),
        ("POST", "/tokenize"),
    ],
)
def test_every_route_but_health_needs_a_key(client: httpx.Client, method: str, path: str) -> None:
    response = client.request(method, path, json=REQUEST)
    error = assert_openai_error(response, 401)
    assert error["code"] == "invalid_api_key"
    assert response.headers["www-authenticate"] == "Bearer"
    wrong = client.request(method, path, json=REQUEST, headers={"Authorization": "Bearer nope"})
    assert_openai_error(wrong, 401)


def test_health_is_open_and_a_valid_key_is_served(client: httpx.Client) -> None:
    assert client.get("/health").status_code == 200
    response = client.post("/v1/completions", json=REQUEST, headers=ALICE)
    assert response.status_code == 200, response.text


def test_with_a_key_the_docs_are_served(client: httpx.Client) -> None:
    document = client.get("/openapi.json", headers=ALICE)
    page = client.get("/docs", headers=ALICE)

    assert document.status_code == 200 and "/v1/completions" in document.json()["paths"]
    assert page.status_code == 200 and '"/v1/completions"' in page.text


def test_requests_per_minute_limit_answers_429_with_retry_after(client: httpx.Client) -> None:
    statuses = [
        client.post("/v1/completions", json=REQUEST, headers=TIGHT).status_code
        for _ in range(TIGHT_RPM)
    ]
    assert statuses == [200] * TIGHT_RPM
    refused = client.post("/v1/completions", json=REQUEST, headers=TIGHT)
    error = assert_openai_error(refused, 429)
    assert error["code"] == "rate_limit_exceeded"
    assert int(refused.headers["retry-after"]) >= 1
    # Another key's budget is its own.
    assert client.post("/v1/completions", json=REQUEST, headers=ALICE).status_code == 200


def test_token_limit_counts_prompt_plus_max_tokens(client: httpx.Client) -> None:
    too_big = {**REQUEST, "max_tokens": 30_000}
    error = assert_openai_error(client.post("/v1/completions", json=too_big, headers=ALICE), 429)
    assert "token" in error["message"]


def test_full_queue_turns_requests_away_at_once_while_accepted_ones_finish(
    client: httpx.Client,
) -> None:
    long = {"model": "demo", "prompt": "The", "max_tokens": 400, "ignore_eos": True,
            "temperature": 0.7}  # fmt: skip

    def send(_: int) -> tuple[int, float, str | None]:
        started = time.monotonic()
        response = client.post("/v1/completions", json=long, headers=ALICE)
        return response.status_code, time.monotonic() - started, response.headers.get("retry-after")

    with ThreadPoolExecutor(max_workers=5) as pool:
        results = list(pool.map(send, range(5)))
    accepted = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] == 503]
    # Each takes seconds: all five are in flight together, and the gate counts exactly.
    assert accepted and refused and len(accepted) <= 4, results
    assert len(accepted) + len(refused) == len(results)
    assert all(retry_after == "1" for _, _, retry_after in refused)
    # Refusals come back at once, long before the accepted requests are done.
    assert max(t for _, t, _ in refused) < min(t for _, t, _ in accepted)
