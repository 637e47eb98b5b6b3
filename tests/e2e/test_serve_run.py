"""``serve run serve_config.yaml`` as a user runs it: it comes up and answers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import yaml

from tests.e2e.conftest import free_port, wait_healthy

ROOT = Path(__file__).resolve().parents[2]


@contextmanager
def serve_run(config: str, tmp_path: Path, env: dict[str, str]) -> Iterator[str]:
    """``serve run`` of a repository config on a free port; yields its base URL."""
    settings = yaml.safe_load((ROOT / config).read_text())
    port = free_port()
    settings["http_options"] = {"host": "127.0.0.1", "port": port}
    for deployment in settings["applications"][0].get("deployments", []):
        deployment.get("ray_actor_options", {}).pop("num_cpus", None)  # fit a 2-core CI box
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(settings))
    serve = Path(sys.executable).parent / "serve"
    process = subprocess.Popen(
        [str(serve), "run", str(path), "--address", "local"],
        cwd=ROOT,
        env={**os.environ, **env, "RAY_ADDRESS": ""},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        base_url = f"http://127.0.0.1:{port}"
        wait_healthy(base_url, timeout_s=180)
        yield base_url
    finally:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def complete(base_url: str) -> httpx.Response:
    response = httpx.post(
        f"{base_url}/v1/completions",
        json={"model": "demo", "prompt": "The while loop", "max_tokens": 8, "temperature": 0},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] >= 1
    return response


@pytest.mark.parametrize("config", ["serve_config.yaml", "configs/cpu_demo.yaml"])
def test_serve_run_comes_up_and_answers(config: str, tmp_path: Path) -> None:
    with serve_run(config, tmp_path, {}) as base_url:
        complete(base_url)


def test_direct_ingress_answers_without_the_proxy(tmp_path: Path) -> None:
    """docs/OPERATIONS.md: the ingress replica listens on a port of its own."""
    direct_port = free_port()
    env = {
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(direct_port),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(direct_port + 100),
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",
    }
    with serve_run("serve_config.yaml", tmp_path, env) as proxy_url:
        direct_url = f"http://127.0.0.1:{direct_port}"
        wait_healthy(direct_url, timeout_s=60)
        first = complete(direct_url)
        assert first.headers["X-Cache"] == "miss"
        # The same answer again, from the ingress replica's near cache, through either path.
        assert complete(direct_url).headers["X-Cache"] == "hit"
        through_proxy = complete(proxy_url)
        assert through_proxy.headers["X-Cache"] == "hit"
        assert through_proxy.json()["choices"] == first.json()["choices"]
