"""The native API, the response cache and client disconnects, over real HTTP."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import httpx

from serve_app.text.tokenizer import Tokenizer
from tests.e2e.conftest import scrape, settled_metric, wait_for_metric

HITS = "ray_serve_app_response_cache_hits_total"


def engine_load(client: httpx.Client) -> tuple[int, int]:
    """(running, waiting) sequences of the model replica, as /health reports them."""
    health = client.get("/health").json()
    return int(health["num_running"]), int(health["num_waiting"])


def test_infer_returns_text_tokens_and_usage(client: httpx.Client, tokenizer: Tokenizer) -> None:
    response = client.post("/v1/infer", json={"prompt": "The class statement", "max_tokens": 10})
    assert response.status_code == 200, response.text
    body = response.json()
    assert "error" not in body
    assert body["text"] == tokenizer.decode(body["token_ids"])
    assert body["usage"]["completion_tokens"] == body["tokens"] == len(body["token_ids"])
    assert body["usage"]["prompt_tokens"] == len(tokenizer.encode("The class statement"))
    assert body["finish_reason"] in ("stop", "length")
    assert body["latency"] > 0


def test_batch_infer_keeps_good_items_when_one_is_bad(client: httpx.Client) -> None:
    requests = [
        {"prompt": "import", "max_tokens": 5},
        {"prompt": "", "max_tokens": 5},
        {"prompt": "def", "max_tokens": "five"},
        {"prompt": "word " * 3000},
        {"prompt": "while", "max_tokens": 5, "stop_words": ["\n"]},
    ]
    response = client.post("/v1/batch_infer", json=requests)
    assert response.status_code == 200, response.text
    results = response.json()
    assert len(results) == 5
    assert ["error" not in r for r in results] == [True, False, False, False, True]
    assert results[1]["error_detail"]["param"] == "prompt"
    assert results[2]["error_detail"]["param"] == "max_tokens"
    assert "context length" in results[3]["error"]
    assert results[0]["tokens"] and results[4]["usage"]["completion_tokens"] >= 1


def test_stream_infer_streams_then_ends_with_done(client: httpx.Client) -> None:
    request = {"prompt": "The try statement", "max_tokens": 12}
    unary = client.post("/v1/infer", json=request).json()
    with client.stream("POST", "/v1/stream_infer", json=request) as response:
        assert response.status_code == 200
        events = [e.removeprefix("data: ") for e in response.read().decode().split("\n\n") if e]
    events = [e for e in events if not e.startswith(":")]  # keep-alive comments
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["text"] for c in chunks) == unary["text"]
    assert [t for c in chunks for t in c["token_ids"]] == unary["token_ids"]
    assert chunks[-1]["finish_reason"] == unary["finish_reason"]
    assert chunks[-1]["usage"] == unary["usage"]


def test_model_info_health_and_models(client: httpx.Client) -> None:
    info = client.get("/v1/model_info").json()
    assert info["name"] == "demo"
    assert info["type"] == "llama"
    assert "onnxruntime" in info["backend"]
    assert info["parameters"] > 100_000
    assert info["max_tokens"] == info["context_length"] > 0
    assert info["version"]
    assert datetime.fromisoformat(info["created_at"]) <= datetime.now(UTC)
    assert client.get("/health").status_code == 200
    assert client.get("/v1/models").json()["data"][0]["id"] == "demo"


def test_deterministic_request_hits_the_cache_the_second_time(client: httpx.Client) -> None:
    hits_before = settled_metric(client, HITS)
    request = {
        "model": "demo",
        "prompt": "The assert statement",
        "max_tokens": 10,
        "temperature": 0,
    }
    first = client.post("/v1/completions", json=request)
    second = client.post("/v1/completions", json=request)
    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("miss", "hit")
    assert second.json()["choices"] == first.json()["choices"]
    assert second.json()["usage"] == first.json()["usage"]
    assert wait_for_metric(client, HITS, hits_before + 1) == hits_before + 1


def test_a_repeated_infer_request_is_answered_by_the_cache(client: httpx.Client) -> None:
    request = {"prompt": "The nonlocal statement", "max_tokens": 6}  # greedy: cacheable
    first = client.post("/v1/infer", json=request)
    second = client.post("/v1/infer", json=request)
    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("miss", "hit")
    assert second.json()["text"] == first.json()["text"]
    assert second.json()["token_ids"] == first.json()["token_ids"]


def test_sampled_request_never_hits_the_cache(client: httpx.Client) -> None:
    request = {
        "model": "demo",
        "prompt": "The assert statement",
        "max_tokens": 10,
        "temperature": 0.8,
    }
    for _ in range(2):
        assert client.post("/v1/completions", json=request).headers["x-cache"] == "miss"


def test_streamed_cache_hit_is_framed_like_a_miss(client: httpx.Client) -> None:
    request = {
        "model": "demo",
        "messages": [{"role": "user", "content": "Explain pass"}],
        "max_tokens": 12,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    replies = []
    for expected in ("miss", "hit"):
        with client.stream("POST", "/v1/chat/completions", json=request) as response:
            assert response.headers["x-cache"] == expected
            events = [e for e in response.read().decode().split("\n\n") if e]
        assert all(e.startswith("data: ") for e in events)
        assert events[-1] == "data: [DONE]"
        chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        text = "".join(c["choices"][0]["delta"]["content"] or "" for c in chunks if c["choices"])
        finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1]
        replies.append((text, finish, chunks[-1]["usage"]))
    assert replies[0] == replies[1]


def test_disconnect_mid_stream_aborts_the_sequence(client: httpx.Client, served_app: str) -> None:
    context = client.get("/v1/model_info").json()["context_length"]
    request = {
        "model": "demo",
        "prompt": "The",
        "max_tokens": context - 8,
        "ignore_eos": True,
        "temperature": 0.7,
        "stream": True,
    }
    with (
        httpx.Client(base_url=served_app, timeout=30) as other,
        other.stream("POST", "/v1/completions", json=request) as response,
    ):
        lines = response.iter_lines()
        received = [next(lines) for _ in range(4)]
        assert all(line.startswith("data: ") or not line for line in received)
        assert engine_load(client)[0] >= 1
    # Leaving the block closed the connection mid-stream.
    deadline = time.monotonic() + 15
    while engine_load(client) != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert engine_load(client) == (0, 0)


def test_a_short_request_joins_and_leaves_while_a_long_one_streams(
    client: httpx.Client, served_app: str
) -> None:
    long = {"prompt": "The", "max_tokens": 700, "temperature": 0.7}
    with (
        httpx.Client(base_url=served_app, timeout=60) as other,
        other.stream("POST", "/v1/stream_infer", json=long) as stream,
    ):
        lines = stream.iter_lines()
        next(lines)  # the long request is generating
        short = client.post("/v1/infer", json={"prompt": "import", "max_tokens": 3})
        assert short.status_code == 200
        assert short.json()["usage"]["completion_tokens"] == 3
        # Still streaming: the short request did not wait for the long one to end.
        assert not any(line == "data: [DONE]" for line in [next(lines) for _ in range(4)])


def test_metrics_move_with_real_traffic(client: httpx.Client) -> None:
    tokens_before = settled_metric(client, "ray_serve_app_generation_tokens_total")
    length_before = scrape(client, "ray_serve_app_requests_total", finish_reason="length")
    ttft_before = scrape(client, "ray_serve_app_time_to_first_token_seconds_count")
    errors_before = scrape(
        client, "ray_serve_app_request_errors_total", error_type="invalid_request_error"
    )
    returned = 0
    for prompt in ("The yield", "The global statement", "Return the"):
        body = {"prompt": prompt, "max_tokens": 7, "temperature": 0.9}  # sampled: never cached
        returned += client.post("/v1/infer", json=body).json()["tokens"]
    assert client.post("/v1/infer", json={"prompt": ""}).status_code == 400

    name = "ray_serve_app_generation_tokens_total"
    assert wait_for_metric(client, name, tokens_before + returned) == tokens_before + returned
    lengths = wait_for_metric(
        client, "ray_serve_app_requests_total", length_before + 3, finish_reason="length"
    )
    assert lengths == length_before + 3
    ttft = "ray_serve_app_time_to_first_token_seconds_count"
    assert wait_for_metric(client, ttft, ttft_before + 3) == ttft_before + 3
    errors = wait_for_metric(
        client,
        "ray_serve_app_request_errors_total",
        errors_before + 1,
        error_type="invalid_request_error",
    )
    assert errors == errors_before + 1
    assert "ray_serve_app_kv_cache_usage_ratio" in client.get("/metrics").text
    assert "ray_serve_app_batch_size_bucket" in client.get("/metrics").text


def test_one_caller_leaving_does_not_end_its_micro_batch_neighbours(served_app: str) -> None:
    body = {"model": "demo", "prompt": "The raise", "max_tokens": 60, "ignore_eos": True,
            "temperature": 0.7, "stream": True}  # fmt: skip
    barrier = threading.Barrier(4)

    def stream(leave_early: bool) -> str:
        with httpx.Client(base_url=served_app, timeout=60) as http:
            barrier.wait()  # start together, so the requests share a micro-batch ...
            if not leave_early:
                time.sleep(0.002)  # ... whose first request (its Serve context) is the leaver
            with http.stream("POST", "/v1/completions", json=body) as response:
                lines = response.iter_lines()
                if leave_early:
                    next(lines)
                    return "left"
                return [line for line in lines if line][-1]

    with ThreadPoolExecutor(max_workers=4) as pool:
        endings = list(pool.map(stream, [True, False, False, False]))
    assert endings == ["left"] + ["data: [DONE]"] * 3
