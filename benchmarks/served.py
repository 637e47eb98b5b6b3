"""What the overload and soak benchmarks share: a shipped config under ``serve run``, the RSS
of its Ray processes, and timed requests over HTTP.

The service runs as a user runs it (``serve run <config>`` in a process group of its own, on a
free port, the deployments' ``num_cpus`` dropped so it fits a small box); its Ray processes are
the processes under it, labelled by their process title (``ray::ServeReplica:llm:LLMModel``...).
"""

from __future__ import annotations

import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil
import yaml

from serve_app.bench.client import Target, stream_request
from serve_app.bench.dataset import BenchRequest
from serve_app.bench.serve_run import ROOT, serve_run_process
from serve_app.bench.trace import RequestTrace

STARTUP_TIMEOUT_S = 300.0


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def engine_capacity(config: Path) -> int:
    """What the config's service holds at once with one model replica: the engine's batch
    plus its waiting queue (docs/OPERATIONS.md, How to size queues)."""
    args = yaml.safe_load(config.read_text())["applications"][0]["args"]
    engine = args.get("engine", {})
    return int(engine.get("max_num_seqs", 64)) + int(engine.get("max_waiting_seqs", 256))


@contextmanager
def serve_run(config: Path) -> Iterator[tuple[str, int]]:
    """``serve run`` of ``config`` on a free port, healthy; yields (base URL, its pid)."""
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp, serve_run_process(config, port, Path(tmp)) as run:
        base_url = f"http://127.0.0.1:{port}"
        _wait_healthy(base_url)
        yield base_url, run.pid


def _wait_healthy(base_url: str) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base_url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{base_url}/health did not answer 200 in {STARTUP_TIMEOUT_S} s")


def config_label(config: Path) -> str:
    """``config`` as the results name it: relative to the repository when it is in it."""
    return str(config.relative_to(ROOT) if config.is_relative_to(ROOT) else config)


def process_totals(root: int, measure: Callable[[psutil.Process], float]) -> dict[str, float]:
    """``measure`` of ``serve run`` (pid ``root``) and every process under it (the Ray
    processes it started: GCS, raylet, dashboard, and the workers the raylet forks: controller,
    proxy, replicas), summed by label."""
    totals: dict[str, float] = {}
    try:
        parent = psutil.Process(root)
        processes = [parent, *parent.children(recursive=True)]
    except psutil.Error:
        return totals
    for process in processes:
        try:
            label = _label(process.cmdline())
            value = measure(process)
        except psutil.Error:
            continue  # it ended meanwhile
        totals[label] = totals.get(label, 0.0) + value
    return dict(sorted(totals.items()))


def ray_rss_mb(root: int) -> dict[str, float]:
    """RSS in MiB of ``serve run`` (pid ``root``) and every process under it, by label."""
    return process_totals(root, lambda process: process.memory_info().rss / 2**20)


def _label(cmdline: list[str]) -> str:
    """``ray::ServeReplica:llm:Batcher`` for a Ray worker (its process title), else the
    program's name (``raylet``, ``gcs_server``, ``dashboard.py``...)."""
    first = cmdline[0] if cmdline else "?"
    if first.startswith("ray::"):
        return first.split()[0].split(".")[0]  # the title also names the method running
    if "-c" in cmdline:
        return "python -c (Ray helper)"
    words = [Path(part).name for part in cmdline[:4] if not part.startswith("-")]
    names = [w for w in words if not w.startswith("python")]
    return names[0] if names else first


def target() -> Target:
    """Greedy, EOS ignored, usage on the last chunk: every request does its full work."""
    return Target(model="demo", temperature=0.0, ignore_eos=True)


async def timed(client: httpx.AsyncClient, request: BenchRequest, start: float) -> RequestTrace:
    """One streaming request; its trace says its status (``"503"`` when shed) and latency."""
    return await stream_request(client, target(), request, start)
