"""The model deployment scales up under sustained load and back down after it."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from ray import serve

from tests.e2e.conftest import APP_NAME

MODEL_OPTIONS = {
    "autoscaling_config": {
        "min_replicas": 1,
        "max_replicas": 2,
        "target_ongoing_requests": 1,  # micro-batch streams in flight per replica
        "upscale_delay_s": 0.5,
        "downscale_delay_s": 2,
        "metrics_interval_s": 0.2,  # deprecated (see FAST_AUTOSCALING_METRICS), still honoured
        "look_back_period_s": 1,
    },
    "ray_actor_options": {"num_cpus": 0},
}


pytestmark = pytest.mark.filterwarnings(
    "ignore:The `metrics_interval_s` field in AutoscalingConfig is deprecated:DeprecationWarning"
)


def running_replicas() -> int:
    deployment = serve.status().applications[APP_NAME].deployments["LLMModel"]
    return int(deployment.replica_states.get("RUNNING", 0))


def wait_for_replicas(expected: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if running_replicas() == expected:
            return True
        time.sleep(0.25)
    return False


def test_replicas_follow_the_load_with_no_failed_request(served_app: str) -> None:
    assert running_replicas() == 1
    statuses: list[int] = []
    stop = threading.Event()

    def client_loop(index: int) -> None:
        with httpx.Client(base_url=served_app, timeout=120) as client:
            while not stop.is_set():
                body = {"model": "demo", "prompt": f"Load {index}", "max_tokens": 150,
                        "ignore_eos": True, "temperature": 0.8}  # fmt: skip
                statuses.append(client.post("/v1/completions", json=body).status_code)
                time.sleep(0.01 * index)  # stagger, so requests land in separate micro-batches

    threads = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(6)]
    for thread in threads:
        thread.start()
    try:
        scaled_up = wait_for_replicas(2, timeout_s=60)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=120)
    assert scaled_up, "no second replica under sustained load"
    assert wait_for_replicas(1, timeout_s=60), "did not scale back down after the load"
    assert statuses and set(statuses) == {200}
