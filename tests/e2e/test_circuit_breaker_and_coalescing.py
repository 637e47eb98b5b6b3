"""Request coalescing and the circuit breaker on a real application: identical concurrent
greedy requests cost one engine sequence; a model replica killed makes the breaker open, shed
at once, and close again once Serve has replaced it."""

from __future__ import annotations

import contextlib
import json
import statistics
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import ray

from tests.e2e.conftest import scrape, settled_metric, wait_for_metric

CHANGES_THE_APP = True  # kills the model replica
APP_OVERRIDES = {
    # A request finding no model replica fails after 1 s instead of 10, so failures come fast.
    "batcher": {"model_wait_s": 1.0},
    "circuit_breaker": {"failure_threshold": 3, "cooldown_s": 5.0, "half_open_probes": 1},
}
CLIENTS = 8
SHED_SAMPLES = 10
SEQUENCES = "ray_serve_app_request_queue_time_seconds_count"  # one per engine sequence
COALESCED = "ray_serve_app_coalesced_requests_total"
SAMPLED = {"model": "demo", "prompt": "The breaker", "max_tokens": 4, "temperature": 0.8}


def completion_text(client: httpx.Client, body: dict[str, object]) -> tuple[int, str, str]:
    """(status, X-Cache, text) of a completion, streamed or not."""
    if not body.get("stream"):
        response = client.post("/v1/completions", json=body)
        return (
            response.status_code,
            response.headers["x-cache"],
            response.json()["choices"][0]["text"],
        )
    with client.stream("POST", "/v1/completions", json=body) as response:
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    text = "".join(
        json.loads(e)["choices"][0]["text"] for e in events[:-1] if json.loads(e)["choices"]
    )
    return response.status_code, response.headers["x-cache"], text


def test_identical_concurrent_greedy_requests_run_as_one_engine_sequence(
    client: httpx.Client, served_app: str
) -> None:
    body = {
        "model": "demo",
        "prompt": f"Coalesced {uuid.uuid4().hex[:8]}",  # never answered from the cache before
        "max_tokens": 400,
        "ignore_eos": True,
        "temperature": 0,
    }
    sequences, coalesced = settled_metric(client, SEQUENCES), scrape(client, COALESCED)
    start = threading.Barrier(CLIENTS)

    def one(index: int) -> tuple[int, str, str]:
        with httpx.Client(base_url=served_app, timeout=60) as own:
            start.wait(timeout=30)
            return completion_text(own, {**body, "stream": index % 2 == 1})

    with ThreadPoolExecutor(CLIENTS) as pool:
        answers = list(pool.map(one, range(CLIENTS)))

    assert {status for status, _, _ in answers} == {200}
    assert {cache for _, cache, _ in answers} == {"miss"}  # none waited for the cache to fill
    texts = {text for _, _, text in answers}
    assert len(texts) == 1 and len(texts.pop()) > 0  # streamed and not, the same answer
    assert wait_for_metric(client, COALESCED, coalesced + CLIENTS - 1) == coalesced + CLIENTS - 1
    assert settled_metric(client, SEQUENCES) == sequences + 1


def kill_model_replicas() -> None:
    """Kill every model replica actor there is now."""
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if "LLMModel" in actor["name"]:
            with contextlib.suppress(ValueError):  # gone meanwhile
                ray.kill(ray.get_actor(actor["name"], namespace="serve"), no_restart=True)


def test_the_breaker_opens_sheds_at_once_and_closes_once_the_model_is_back(
    client: httpx.Client, served_app: str
) -> None:
    assert client.get("/health").json()["circuit_breakers"] == {"demo": "closed"}
    opens = scrape(client, "ray_serve_app_circuit_opens_total")

    # The model path fails: every model replica is killed, replacements too, until the breaker
    # opens after three failures (on a fast machine Serve would otherwise replace the replica
    # before three requests have failed).
    failures: list[str] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        kill_model_replicas()
        error = client.post("/v1/completions", json=SAMPLED).json().get("error")
        if error is not None and error["code"] == "circuit_open":
            break
        if error is not None:
            failures.append(error["code"])
    else:
        raise AssertionError(f"the breaker did not open; failures: {failures}")
    assert len(failures) >= 3 and set(failures) <= {"model_failed", "no_replica"}, failures

    # Open: unhealthy, and every request refused at once in the documented shape.
    health = client.get("/health")
    assert health.status_code == 503
    assert health.json()["circuit_breakers"] == {"demo": "open"}
    elapsed = []
    for _ in range(SHED_SAMPLES):
        started = time.perf_counter()
        response = client.post("/v1/completions", json=SAMPLED)
        elapsed.append(time.perf_counter() - started)
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "circuit_open"
        assert response.json()["error"]["type"] == "service_unavailable"
        assert int(response.headers["retry-after"]) >= 1
    # The median: a new replica loading on this shared box may delay a single answer.
    assert statistics.median(elapsed) < 0.1, elapsed

    # Serve replaces the replica; a probe gets through after the cool-down and closes it.
    deadline = time.monotonic() + 120
    while client.post("/v1/completions", json=SAMPLED).status_code != 200:
        assert time.monotonic() < deadline, "serving did not resume"
        time.sleep(0.25)
    health = client.get("/health")
    assert health.status_code == 200
    assert health.json()["circuit_breakers"] == {"demo": "closed"}
    assert client.post("/v1/completions", json=SAMPLED).status_code == 200
    assert wait_for_metric(client, "ray_serve_app_circuit_opens_total", opens + 1) >= opens + 1
    assert settled_metric(client, "ray_serve_app_circuit_state") == 0
    shed_ms = sorted(round(s * 1000, 1) for s in elapsed)
    print(f"refused while open in (ms): {shed_ms}")
