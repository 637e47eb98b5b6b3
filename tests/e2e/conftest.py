"""A real Ray Serve application on a free port, one per test module."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import ray
from ray import serve

from serve_app.app import SERVE_ENV, AppArgs, compose

APP_NAME = "llm"
STARTUP_TIMEOUT_S = 120


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


@contextmanager
def local_ray(**options: Any) -> Iterator[None]:
    """A local Ray cluster whose processes see ``SERVE_ENV``, as the shipped configs set it."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in SERVE_ENV.items():
            patch.setenv(name, value)  # the cluster's processes inherit the driver's environment
        ray.init(num_cpus=8, include_dashboard=False, **options)
    try:
        yield
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    """Ray for one test module, for tests that deploy their own pieces."""
    with local_ray():
        yield


@pytest.fixture(scope="module")
def served_app(model_dir: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    """Start Ray and the application; yield its base URL. Modules may override the args with
    a module-level ``APP_OVERRIDES`` dict, and set the model deployment's Serve options with
    ``MODEL_OPTIONS``."""
    overrides = getattr(request.module, "APP_OVERRIDES", {})
    model_options = getattr(request.module, "MODEL_OPTIONS", None)
    port = free_port()
    with local_ray(_system_config={"metrics_report_interval_ms": 500}):  # see series quickly
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        settings = AppArgs.model_validate(app_args(model_dir, **overrides))
        serve.run(compose(settings, model_options), name=APP_NAME, route_prefix="/")
        base_url = f"http://127.0.0.1:{port}"
        wait_healthy(base_url)
        yield base_url


@pytest.fixture(scope="module")
def client(served_app: str) -> Iterator[httpx.Client]:
    """An HTTP client of the served application."""
    with httpx.Client(base_url=served_app, timeout=60) as http:
        yield http
