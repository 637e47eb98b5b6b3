"""Two Ray nodes on this machine, started with ``ray start`` as an operator would: the model
server runs on the second node, which is stopped and brought back.

This module starts its own cluster (not the session's in-process Ray): a head node and a node
with the custom resource ``model_node``, each ``ray start --block`` in a process group of its
own under a temp dir of its own, so that the test stops exactly one node (``ray stop`` would
stop every Ray node on the machine). The application is deployed from a separate driver with
``serve run <config> --address <head> --non-blocking`` (``serve deploy`` without the dashboard).
Timings go to stdout (``pytest -s``) and to docs/OPERATIONS.md, "Several nodes".
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml

from serve_app.app import SERVE_ENV
from tests.e2e.conftest import app_args, free_port, wait_healthy

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
MODEL_RESOURCE = "model_node"  # only the second node has it
HEAD_RESOURCE = "head_node"  # pins the other deployments to the head
FAIL_FAST_S = 5.0  # a request must fail within this long once the node is gone
MODEL_WAIT_S = 2.0  # the batcher's bound on waiting for a model replica (BatcherConfig)
CLIENT_TIMEOUT_S = 20.0  # never wait on one request longer than this
LONG = {"model": "demo", "prompt": "The", "max_tokens": 900, "ignore_eos": True, "temperature": 0.7}


def cluster_env() -> dict[str, str]:
    """The environment of every process of this cluster: local, unauthenticated, no telemetry,
    and never the address of another cluster (the session's in-process Ray)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    return env


def process_tree(root: int) -> list[int]:
    """``root`` and every process below it, read from /proc (workers sit in sessions of their
    own under the raylet, so the process group alone does not hold them)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rpartition(")")[2].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def command_line(pid: int) -> str:
    """A process's title (Ray workers rename themselves ``ray::ServeReplica:<app>:<name>``)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@dataclass
class RayNode:
    """One ``ray start --block`` and every process it started, stoppable on its own."""

    args: list[str]
    log: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [str(BIN / "ray"), "start", "--block", "--node-ip-address", HOST, *self.args],
                env=cluster_env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def replicas(self) -> list[str]:
        """The Serve replicas running on this node, by title."""
        assert self.process is not None
        titles = [command_line(pid) for pid in process_tree(self.process.pid)]
        prefix = "ray::ServeReplica:"
        # A title may carry the running method (``...:LLMModel.method``) and padding.
        names = [t[len(prefix) :].split()[0] for t in titles if t.startswith(prefix)]
        return sorted(name.split(".")[0] for name in names)

    def kill(self) -> None:
        """SIGKILL the node's whole process tree at once: what a lost machine looks like."""
        if self.process is None:
            return
        tree = process_tree(self.process.pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait(timeout=30)
        self.process = None


@dataclass
class Cluster:
    """A head node and a model node on this machine, with the application deployed."""

    temp: Path
    base_url: str = ""
    head: RayNode = field(init=False)
    model_node: RayNode = field(init=False)
    gcs_address: str = ""

    def __post_init__(self) -> None:
        port = free_port()
        self.gcs_address = f"{HOST}:{port}"
        self.head = RayNode(
            ["--head", "--port", str(port), "--num-cpus", "2", "--include-dashboard", "false",
             "--resources", json.dumps({HEAD_RESOURCE: 1}), *self._ports("h"),
             "--ray-client-server-port", str(free_port()),
             "--dashboard-port", str(free_port()), "--disable-usage-stats"],
            self.temp / "head.log",
        )  # fmt: skip
        self.model_node = RayNode([], self.temp / "model-node.log")

    def _ports(self, name: str) -> list[str]:
        """A temp dir and agent ports of the node's own: the defaults (52365 ...) would clash
        with the other node on this machine."""
        flags = ["--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                 "--runtime-env-agent-port", "--metrics-export-port"]  # fmt: skip
        return ["--temp-dir", str(self.temp / name)] + [
            part for flag in flags for part in (flag, str(free_port()))
        ]

    def start_model_node(self, name: str) -> None:
        """A (new) second node with the ``model_node`` resource, under a fresh temp dir."""
        self.model_node.args = [
            "--address", self.gcs_address, "--num-cpus", "1",
            "--resources", json.dumps({MODEL_RESOURCE: 1}), *self._ports(name),
        ]  # fmt: skip
        self.model_node.start()

    def deploy(self, model_dir: Path) -> None:
        """``serve run --non-blocking`` of a config like serve_config.yaml, from a driver that
        exits once the application is submitted."""
        http_port = free_port()
        head_only = {"num_cpus": 0, "resources": {HEAD_RESOURCE: 0.01}}
        config = {
            "proxy_location": "HeadOnly",
            "http_options": {"host": HOST, "port": http_port},
            "applications": [{
                "name": "llm", "route_prefix": "/", "import_path": "serve_app.app:build_app",
                "runtime_env": {"env_vars": SERVE_ENV},
                # A micro-batch no model replica takes within this is a 503 (the node is gone).
                "args": app_args(model_dir, batcher={"model_wait_s": MODEL_WAIT_S}),
                "deployments": [
                    {"name": "LLMModel", "num_replicas": 1, "ray_actor_options":
                        {"num_cpus": 0, "resources": {MODEL_RESOURCE: 0.01}}},
                    {"name": "Batcher", "ray_actor_options": head_only},
                    {"name": "Ingress", "ray_actor_options": head_only},
                    {"name": "ResponseCache", "ray_actor_options": head_only},
                ],
            }],
        }  # fmt: skip
        path = self.temp / "serve_config.yaml"
        path.write_text(yaml.safe_dump(config))
        driver = subprocess.run(
            [str(BIN / "serve"), "run", str(path), "--address", self.gcs_address, "--non-blocking"],
            cwd=ROOT,
            env=cluster_env(),
            timeout=120,
            capture_output=True,
        )
        assert driver.returncode == 0, driver.stderr.decode()[-3000:]
        self.base_url = f"http://{HOST}:{http_port}"

    def stop(self) -> None:
        """Stop both nodes and everything they started; leave no file behind."""
        self.model_node.kill()
        self.head.kill()
        shutil.rmtree(self.temp, ignore_errors=True)


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Poll ``condition`` until it holds; the seconds it took. Fails after ``timeout_s``."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout_s:
            raise TimeoutError(f"{what}: not within {timeout_s} s")
        time.sleep(0.1)
    return time.monotonic() - started


TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="module")
def cluster(model_dir: Path) -> Iterator[Cluster]:
    """Both nodes up, the application healthy on them."""
    # Short: Unix socket paths under the temp dir must stay below 108 bytes.
    nodes = Cluster(Path(tempfile.mkdtemp(prefix="ray-mn-", dir="/tmp")))
    try:
        nodes.head.start()
        nodes.start_model_node("m1")
        nodes.deploy(model_dir)
        wait_healthy(nodes.base_url, timeout_s=180)
        yield nodes
    except Exception:
        for log in sorted(nodes.temp.glob("*/session_*/logs/serve/*.log")):
            print(f"--- {log.name}", *log.read_text().splitlines()[-15:], sep="\n")
        raise
    finally:
        nodes.stop()
        print(f"\nseveral-nodes timings (s): {json.dumps(TIMINGS)}")


def test_the_model_server_runs_on_the_second_node(cluster: Cluster) -> None:
    assert cluster.model_node.replicas() == ["llm:LLMModel"]
    head = cluster.head.replicas()
    assert {"llm:Ingress", "llm:Batcher", "llm:ResponseCache"} <= set(head), head
    assert "llm:LLMModel" not in head
    body = {"model": "demo", "prompt": "The for loop", "max_tokens": 8}
    response = httpx.post(f"{cluster.base_url}/v1/completions", json=body, timeout=CLIENT_TIMEOUT_S)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] >= 1


class InFlight(threading.Thread):
    """One non-streaming completion in a thread: its status (0: no answer within
    ``timeout_s``) and when it ended."""

    def __init__(self, base_url: str, body: dict[str, object], timeout_s: float) -> None:
        super().__init__(daemon=True)
        self.url = f"{base_url}/v1/completions"
        self.body = {"model": "demo", **body}
        self.timeout_s = timeout_s
        self.status: int | None = None
        self.ended = 0.0

    def run(self) -> None:
        try:
            self.status = httpx.post(self.url, json=self.body, timeout=self.timeout_s).status_code
        except httpx.TimeoutException:
            self.status = 0
        self.ended = time.monotonic()


def running(client: httpx.Client) -> float:
    """Sequences the model server is decoding now (0 while /health is not 200)."""
    response = client.get("/health")
    return float(response.json().get("num_running", 0)) if response.status_code == 200 else 0


def test_stopping_the_model_node_fails_in_flight_requests_fast(cluster: Cluster) -> None:
    """Requests running on the node when it goes end with 503 (a begun stream: with a final
    error event) within seconds, and /health turns 503."""
    with httpx.Client(base_url=cluster.base_url, timeout=CLIENT_TIMEOUT_S) as client:
        with client.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as stream:
            lines = stream.iter_lines()
            assert next(lines).startswith("data: ")  # the model is generating on node 2
            plain = InFlight(cluster.base_url, LONG, CLIENT_TIMEOUT_S)
            plain.start()
            wait_for(lambda: running(client) >= 2, 15, "both requests running in the engine")
            killed = time.monotonic()
            cluster.model_node.kill()
            events = [line for line in lines if line.startswith("data: ")]
            stream_failed = time.monotonic() - killed
        plain.join(CLIENT_TIMEOUT_S + 5)
        TIMINGS["in_flight_stream_error_event_s"] = round(stream_failed, 2)
        TIMINGS["in_flight_request_503_s"] = round(plain.ended - killed, 2)
        assert '"error"' in events[-1] and "retry" in events[-1], events[-3:]
        assert plain.status == 503, plain.status or "no answer"
        assert max(stream_failed, plain.ended - killed) < FAIL_FAST_S, TIMINGS
        wait_for(lambda: client.get("/health").status_code == 503, 10, "/health 503")
        TIMINGS["health_503_s"] = round(time.monotonic() - killed, 2)


def test_a_new_request_while_the_model_node_is_gone_gets_503_at_once(cluster: Cluster) -> None:
    if cluster.model_node.process is not None:
        pytest.fail("the model node is still up: the test before this one did not stop it")
    sent = time.monotonic()
    try:
        status = httpx.post(
            f"{cluster.base_url}/v1/completions",
            json={"model": "demo", "prompt": "After the loss", "max_tokens": 4},
            timeout=2 * FAIL_FAST_S,
        ).status_code
    except httpx.TimeoutException:
        status = 0
    TIMINGS["new_request_answer_s"] = round(time.monotonic() - sent, 2)
    assert status == 503, (
        f"new request: {status or 'no answer'} after {time.monotonic() - sent:.1f} s"
    )
    assert time.monotonic() - sent < FAIL_FAST_S


def test_serving_resumes_when_the_model_node_returns(cluster: Cluster) -> None:
    """The node comes back with the same resources: Serve starts the model server there, and
    serving resumes."""
    restarted = time.monotonic()
    cluster.start_model_node("m2")

    def serving() -> bool:
        body = {"model": "demo", "prompt": "Back", "max_tokens": 4}
        try:
            response = httpx.post(f"{cluster.base_url}/v1/completions", json=body, timeout=5)
        except httpx.TimeoutException:
            return False
        return response.status_code == 200

    wait_for(serving, 90, "a 200 after the node returned")
    TIMINGS["recovery_after_node_start_s"] = round(time.monotonic() - restarted, 2)
    assert cluster.model_node.replicas() == ["llm:LLMModel"]
    assert httpx.get(f"{cluster.base_url}/health", timeout=CLIENT_TIMEOUT_S).status_code == 200
