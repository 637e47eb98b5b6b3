"""Model versions swapped under steady load, and a model replica that dies."""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import ray
from ray import serve

from serve_app import DEMO_MODEL_DIR
from serve_app.app import compose
from serve_app.config import AppArgs
from tests.e2e.conftest import APP_NAME, app_args, wait_healthy

DETERMINISTIC = {"model": "demo", "prompt": "The pass statement", "max_tokens": 6, "temperature": 0}
CHANGES_THE_APP = True  # swaps versions and kills a replica


class SteadyLoad:
    """Background clients sending requests until stopped; every request's start, end and
    status is recorded, so a test can prove which requests were in flight at a moment."""

    def __init__(self, base_url: str, clients: int = 3) -> None:
        self.requests: list[tuple[float, float, int]] = []  # (started, ended, status)
        self._stop = threading.Event()
        self._done = threading.Condition()
        self._threads = [
            threading.Thread(target=self._run, args=(base_url, i), daemon=True)
            for i in range(clients)
        ]

    def __enter__(self) -> SteadyLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=120)

    def wait_for_more(self, count: int, timeout_s: float = 60) -> None:
        """Block until ``count`` more requests have finished than now."""
        with self._done:
            target = len(self.requests) + count
            assert self._done.wait_for(lambda: len(self.requests) >= target, timeout_s)

    def in_flight_at(self, moment: float) -> int:
        """Requests that had started before ``moment`` and ended after it."""
        return sum(1 for started, ended, _ in self.requests if started < moment < ended)

    @property
    def statuses(self) -> set[int]:
        """Every status seen so far."""
        return {status for _, _, status in self.requests}

    def _run(self, base_url: str, index: int) -> None:
        with httpx.Client(base_url=base_url, timeout=120) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                status = self._one_request(client, index)
                with self._done:
                    self.requests.append((started, time.monotonic(), status))
                    self._done.notify_all()

    @staticmethod
    def _one_request(client: httpx.Client, index: int) -> int:
        body = {"prompt": f"The {index} for", "max_tokens": 24, "temperature": 0.8}
        if index % 2:
            with client.stream("POST", "/v1/stream_infer", json=body) as response:
                text = response.read().decode()
                ok = response.status_code == 200 and text.endswith("data: [DONE]\n\n")
                return 200 if ok else response.status_code or 599
        return client.post("/v1/infer", json=body).status_code


def version(client: httpx.Client) -> str:
    return str(client.get("/v1/model_info").json()["version"])


def wait_for_version(client: httpx.Client, expected: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while version(client) != expected and time.monotonic() < deadline:
        time.sleep(0.5)
    assert version(client) == expected


@pytest.fixture(scope="module")
def second_model_dir() -> Iterator[Path]:
    """The same weights under another path: what a new model version looks like on disk."""
    directory = Path(tempfile.mkdtemp()) / "demo-v2"
    shutil.copytree(DEMO_MODEL_DIR, directory)
    yield directory
    shutil.rmtree(directory.parent)


def test_reconfigure_swaps_the_model_in_place_with_no_failed_request(
    client: httpx.Client, served_app: str, second_model_dir: Path
) -> None:
    first = version(client)
    assert client.post("/v1/completions", json=DETERMINISTIC).headers["x-cache"] == "miss"
    assert client.post("/v1/completions", json=DETERMINISTIC).headers["x-cache"] == "hit"
    model = serve.get_deployment_handle("LLMModel", app_name=APP_NAME)
    with SteadyLoad(served_app) as load:
        load.wait_for_more(3)
        swap_started = time.monotonic()
        config = {"model_path": str(second_model_dir), "model_version": "v2"}
        model.reconfigure.remote(config).result()
        swapped = time.monotonic()
        load.wait_for_more(3)
    assert load.in_flight_at(swap_started) >= 1 and load.in_flight_at(swapped) >= 1
    assert load.statuses == {200}
    assert version(client) == "v2" != first
    # The answer cached for the first version is not served for the second.
    assert client.post("/v1/completions", json=DETERMINISTIC).headers["x-cache"] == "miss"
    assert client.post("/v1/completions", json=DETERMINISTIC).headers["x-cache"] == "hit"


def test_redeploying_a_changed_config_swaps_versions_with_no_failed_request(
    client: httpx.Client, served_app: str, model_dir: Path
) -> None:
    settings = AppArgs.model_validate(app_args(model_dir, model_version="v3"))
    with SteadyLoad(served_app) as load:
        load.wait_for_more(3)
        redeployed = time.monotonic()
        serve.run(compose(settings), name=APP_NAME, route_prefix="/", blocking=False)
        wait_for_version(client, "v3")
        swapped = time.monotonic()
        load.wait_for_more(3)
    assert load.in_flight_at(redeployed) >= 1 and load.in_flight_at(swapped) >= 1
    assert load.statuses == {200}, sorted(load.statuses)
    models = client.get("/v1/models").json()["data"]
    assert [m["id"] for m in models] == ["demo"]


def test_a_dead_model_replica_is_replaced_and_serving_resumes(
    client: httpx.Client, served_app: str
) -> None:
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
    replica = next(n for n in names if "LLMModel" in n)
    long = {"model": "demo", "prompt": "The", "max_tokens": 900, "ignore_eos": True,
            "temperature": 0.7, "stream": True}  # fmt: skip
    with client.stream("POST", "/v1/completions", json=long) as stream:
        lines = stream.iter_lines()
        assert next(lines).startswith("data: ")
        ray.kill(ray.get_actor(replica, namespace="serve"), no_restart=True)
        events = [line for line in lines if line.startswith("data: ")]
    # The stream had begun, so its failure arrives as one final error event.
    assert '"error"' in events[-1] and "retry" in events[-1]
    deadline = time.monotonic() + 60
    saw_unhealthy = False
    while time.monotonic() < deadline:
        status = client.get("/health").status_code
        saw_unhealthy = saw_unhealthy or status == 503
        if status == 200 and saw_unhealthy:
            break
        time.sleep(0.2)
    assert saw_unhealthy
    wait_healthy(served_app, timeout_s=60)
    response = client.post("/v1/infer", json={"prompt": "After the restart", "max_tokens": 4})
    assert response.status_code == 200
    assert response.json()["usage"]["completion_tokens"] == 4
