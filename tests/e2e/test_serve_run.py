"""``serve run serve_config.yaml`` as a user runs it: it comes up and answers."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from serve_app.bench.serve_run import ROOT
from serve_app.bench.serve_run import serve_run_process as bench_serve_run
from tests.e2e.conftest import free_port, wait_healthy

IDLE_EXIT_S = 10.0  # issue 17: `serve run` exits within this of SIGINT when idle


@contextmanager
def serve_run_process(
    config: str, tmp_path: Path, env: dict[str, str]
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``serve run`` of a repository config on a free port, healthy; yields its base URL and
    process, and stops it with SIGINT (Ctrl-C) unless the test did."""
    port = free_port()
    with bench_serve_run(ROOT / config, port, tmp_path, env) as process:
        base_url = f"http://127.0.0.1:{port}"
        wait_healthy(base_url, timeout_s=180)
        yield base_url, process


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
def test_serve_run_comes_up_answers_and_exits_quickly_on_ctrl_c(
    config: str, tmp_path: Path
) -> None:
    with serve_run_process(config, tmp_path, {}) as (base_url, process):
        complete(base_url)
        os.killpg(process.pid, signal.SIGINT)  # Ctrl-C while idle
        signalled_at = time.monotonic()
        process.wait(timeout=60)
        assert time.monotonic() - signalled_at <= IDLE_EXIT_S
        assert process.returncode == 0


def test_direct_ingress_answers_and_ctrl_c_drains_a_stream_then_exits_quickly(
    tmp_path: Path,
) -> None:
    """docs/OPERATIONS.md: the ingress replica listens on a port of its own, and answers as
    the proxy does. SIGINT while a stream runs there: the stream still ends with ``[DONE]``
    (the ingress drains it within its grace period), then ``serve run`` exits within
    ``IDLE_EXIT_S``. (The stream goes to the ingress replica's own port: on shutdown Serve
    kills its HTTP proxy at once, cutting what runs through it; docs/OPERATIONS.md, Drain,
    health and failure.)"""
    direct_port = free_port()
    env = {
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(direct_port),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(direct_port + 100),
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",
    }
    payload = {"model": "demo", "prompt": "Once", "max_tokens": 200, "stream": True}
    with serve_run_process("serve_config.yaml", tmp_path, env) as (proxy_url, process):
        direct_url = f"http://127.0.0.1:{direct_port}"
        wait_healthy(direct_url, timeout_s=60)
        first_answer = complete(direct_url)
        assert first_answer.headers["X-Cache"] == "miss"
        # The same answer again, from the ingress replica's near cache, through either path.
        assert complete(direct_url).headers["X-Cache"] == "hit"
        through_proxy = complete(proxy_url)
        assert through_proxy.headers["X-Cache"] == "hit"
        assert through_proxy.json()["choices"] == first_answer.json()["choices"]

        with httpx.stream("POST", f"{direct_url}/v1/completions", json=payload, timeout=60) as s:
            assert s.status_code == 200
            lines = s.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            os.killpg(process.pid, signal.SIGINT)  # Ctrl-C with the stream in flight
            rest = [line for line in lines if line.startswith("data: ")]
        drained_at = time.monotonic()
        assert rest, "the stream was cut at SIGINT"
        assert rest[-1] == "data: [DONE]", rest[-3:]
        assert not any('"error"' in line for line in [first, *rest])
        process.wait(timeout=60)
        assert time.monotonic() - drained_at <= IDLE_EXIT_S
        assert process.returncode == 0
