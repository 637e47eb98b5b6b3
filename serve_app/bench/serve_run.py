"""``serve run <config>`` as a user runs it, in a process group of its own, on a chosen port:
what the overload and soak benchmarks measure, and what the ``serve run`` tests start."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


@contextmanager
def serve_run_process(
    config: Path, port: int, workdir: Path, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """``serve run`` of ``config`` with its HTTP port set to ``port`` and the deployments'
    ``num_cpus`` dropped (so it fits a small box), the edited config written to ``workdir``.
    Yields the process (not yet healthy: wait on ``/health``); on exit stops it with SIGINT
    (Ctrl-C) unless the caller did, and kills it if it has not exited a minute later."""
    settings = yaml.safe_load(config.read_text())
    settings["http_options"] = {"host": "127.0.0.1", "port": port}
    for deployment in settings["applications"][0].get("deployments", []):
        deployment.get("ray_actor_options", {}).pop("num_cpus", None)
    path = workdir / "serve_config.yaml"
    path.write_text(yaml.safe_dump(settings))
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "serve"), "run", str(path), "--address", "local"],
        cwd=ROOT,
        env={**os.environ, **(env or {}), "RAY_ADDRESS": ""},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        # A shell's background job ignores SIGINT, and Python keeps it ignored: restore it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
