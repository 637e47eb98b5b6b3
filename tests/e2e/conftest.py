"""A real Ray Serve application on a free port.

Ray and Serve start once per test session; each module gets the application its
``APP_OVERRIDES``/``MODEL_OPTIONS`` describe, and modules that want the same one share it.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import ray
from ray import serve

from serve_app.app import SERVE_ENV, compose
from serve_app.config import AppArgs
from tests.conftest import RAY_STARTED

APP_NAME = "llm"
STARTUP_TIMEOUT_S = 120
# Replicas and handles report queue lengths every 0.2 s instead of every few seconds, so that
# the autoscaling test sees load quickly.
FAST_AUTOSCALING_METRICS = {
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.2",
    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.2",
}


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_healthy(base_url: str, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
    """Poll ``/health`` until it answers 200, or fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{base_url}/health", timeout=5)
            if response.status_code == 200:
                return
            last = f"{response.status_code} {response.text}"
        except httpx.TransportError as exc:
            last = repr(exc)
        time.sleep(0.5)
    raise TimeoutError(f"{base_url}/health did not become healthy: {last}")


def scrape(client: httpx.Client, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` in ``GET /metrics`` whose labels include ``labels``."""
    total = 0.0
    wanted = [f'{key}="{value}"' for key, value in labels.items()]
    for line in client.get("/metrics").text.splitlines():
        series, _, value = line.rpartition(" ")
        if series.split("{")[0] == name and all(w in series for w in wanted):
            total += float(value)
    return total


def settled_metric(client: httpx.Client, name: str, **labels: str) -> float:
    """``name`` once earlier traffic has been exported: two reads a second apart agree."""
    previous = scrape(client, name, **labels)
    for _ in range(20):
        time.sleep(1.0)
        current = scrape(client, name, **labels)
        if current == previous:
            return current
        previous = current
    return previous


def wait_for_metric(
    client: httpx.Client, name: str, expected: float, timeout_s: float = 30, **labels: str
) -> float:
    """Poll ``/metrics`` until ``name`` reaches ``expected`` (Ray exports every ~0.5 s here)."""
    deadline = time.monotonic() + timeout_s
    value = scrape(client, name, **labels)
    while value < expected and time.monotonic() < deadline:
        time.sleep(0.25)
        value = scrape(client, name, **labels)
    return value


def app_args(model_dir: Path, **overrides: Any) -> dict[str, Any]:
    """Application args for tests: the demo model, small engine, Ray on few CPUs."""
    args: dict[str, Any] = {
        "model_path": str(model_dir),
        "engine": {"intra_op_num_threads": 1, "allow_spinning": False},
    }
    args.update(overrides)
    return args


@dataclass
class ServeSession:
    """Ray and Serve of this test session, and the application deployed on them now."""

    base_url: str
    deployed: str | None = None  # the args and options the running "llm" app was built from

    def deploy(self, settings: AppArgs, model_options: dict[str, Any] | None) -> None:
        """Run the application ``settings`` describe, unless that very one is running."""
        wanted = json.dumps([settings.model_dump(mode="json"), model_options], sort_keys=True)
        if wanted == self.deployed:
            return
        self.discard()
        serve.run(compose(settings, model_options), name=APP_NAME, route_prefix="/")
        wait_healthy(self.base_url)
        self.deployed = wanted

    def discard(self) -> None:
        """Delete the application (a module changed it in ways the next one must not see)."""
        if self.deployed is not None:
            serve.delete(APP_NAME)
            self.deployed = None


@pytest.fixture(scope="session")
def serve_session(request: pytest.FixtureRequest) -> Iterator[ServeSession]:
    """Ray and Serve on a free HTTP port, once for the whole test session.

    The cluster's processes see ``SERVE_ENV``, as the shipped configs set it, and export
    metrics every 0.5 s so that tests see series quickly.
    """
    request.config.stash[RAY_STARTED] = True
    port = free_port()
    with pytest.MonkeyPatch.context() as patch:
        for name, value in {**SERVE_ENV, **FAST_AUTOSCALING_METRICS}.items():
            patch.setenv(name, value)  # the cluster's processes inherit the driver's environment
        ray.init(
            num_cpus=8,
            include_dashboard=False,
            _system_config={"metrics_report_interval_ms": 500},
        )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield ServeSession(f"http://127.0.0.1:{port}")
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_cluster(serve_session: ServeSession) -> None:
    """Ray and Serve, for modules that deploy their own pieces under their own app names."""


@pytest.fixture(scope="module")
def served_app(
    model_dir: Path, serve_session: ServeSession, request: pytest.FixtureRequest
) -> Iterator[str]:
    """The application, healthy; yields its base URL. Modules may override the args with a
    module-level ``APP_OVERRIDES`` dict, set the model deployment's Serve options with
    ``MODEL_OPTIONS``, and set ``CHANGES_THE_APP = True`` when their tests leave it changed
    (swapped, killed), so that the next module gets a fresh one."""
    overrides = getattr(request.module, "APP_OVERRIDES", {})
    model_options = getattr(request.module, "MODEL_OPTIONS", None)
    serve_session.deploy(AppArgs.model_validate(app_args(model_dir, **overrides)), model_options)
    yield serve_session.base_url
    if getattr(request.module, "CHANGES_THE_APP", False):
        serve_session.discard()


@pytest.fixture(scope="module")
def client(served_app: str) -> Iterator[httpx.Client]:
    """An HTTP client of the served application."""
    with httpx.Client(base_url=served_app, timeout=60) as http:
        yield http
