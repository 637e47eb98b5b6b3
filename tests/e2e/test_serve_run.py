"""``serve run serve_config.yaml`` as a user runs it: it comes up and answers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from tests.e2e.conftest import free_port, wait_healthy

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("config", ["serve_config.yaml", "configs/cpu_demo.yaml"])
def test_serve_run_comes_up_and_answers(config: str, tmp_path: Path) -> None:
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
        env={**os.environ, "RAY_ADDRESS": ""},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        base_url = f"http://127.0.0.1:{port}"
        wait_healthy(base_url, timeout_s=180)
        response = httpx.post(
            f"{base_url}/v1/completions",
            json={"model": "demo", "prompt": "The while loop", "max_tokens": 8},
            timeout=60,
        )
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] >= 1
    finally:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
