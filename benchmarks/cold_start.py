"""Cold start: ``serve run serve_config.yaml`` to the first 200 on the README's chat request.

    python benchmarks/cold_start.py                        # 3 runs of serve_config.yaml
    python benchmarks/cold_start.py --runs 5
    python benchmarks/cold_start.py --compare /tmp/before  # alternate with another checkout

Each run starts ``serve run`` as a user does (``serve_app.bench.serve_run``), with a Ray temp
dir of its own so that its logs are its own, and sends the README's chat request every 50 ms
until one answers 200. The phases come from the timestamps in that run's Ray and Serve logs:

    ray up          launch -> the driver joins Ray (CLI import, GCS, raylet, dashboard)
    controller      -> the Serve controller runs (its worker's boot and imports)
    deploy start    -> the controller starts building the app (the proxy starts meanwhile)
    app build       -> the app is imported and built (a Ray task importing serve_app.app)
    replicas        -> the last replica is ready (worker spawn, imports, constructor, model)
    first request   -> the client's first 200 (routes reach the proxy, the request itself)

and, per deployment, its replica's start split the same way. Also records the CPU seconds each
Ray process had used by the first 200. Prints a table, writes
``benchmarks/results/cold_start.json`` and a plot.

``--compare DIR`` alternates the runs with runs of the checkout in ``DIR`` (a copy of the
repository holding this script, e.g. ``git archive <commit> | tar -x -C DIR``): the way to
measure a change before and after in one session on a noisy machine. Those runs go through
``DIR``'s own copy of this script, from ``DIR``, with ``DIR`` first on ``PYTHONPATH``: Ray puts
the driver's working directory first on its workers' ``sys.path``, so that is what decides
which ``serve_app`` the replicas import.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import psutil
from served import config_label, free_port, process_totals

from serve_app.bench.report import figure, machine, markdown_table, save_figure, write_json
from serve_app.bench.serve_run import ROOT, serve_run_process

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_S = 10.0
POLL_S = 0.05
STARTUP_TIMEOUT_S = 300.0
# The README's request (README.md, "then, in another shell").
CHAT = {
    "model": "demo",
    "messages": [{"role": "user", "content": "What does the return statement do?"}],
    "max_tokens": 48,
}
PHASES = ["ray up", "controller", "deploy start", "app build", "replicas", "first request"]
REPLICA_PHASES = ["worker wait", "boot + imports", "constructor", "reconfigure + ready"]

_SERVE_LINE = re.compile(r"^\w+ (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (.*)$")
_RAY_LINE = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (.*)$")
_STARTING = re.compile(r"Starting Replica\(id='(\w+)', deployment='(\w+)'")
_STARTED = re.compile(r"Replica\(id='(\w+)', deployment='(\w+)'.*started successfully.*PID: (\d+)")
_WORKER = re.compile(r"Started worker process with pid (\d+)")


@dataclass
class Run:
    """One cold start: its label, time to first 200 and the phases from its logs (seconds)."""

    variant: str
    first_200_s: float
    phases: dict[str, float] = field(default_factory=dict)
    replicas: dict[str, dict[str, float]] = field(default_factory=dict)
    cpu_s: dict[str, float] = field(default_factory=dict)


def _stamp(text: str) -> float:
    """A log timestamp (local time, milliseconds after a comma) as seconds since the epoch."""
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def _serve_lines(path: Path) -> list[tuple[float, str]]:
    lines = []
    for line in path.read_text(errors="replace").splitlines():
        match = _SERVE_LINE.match(line)
        if match:
            lines.append((_stamp(match.group(1)), match.group(2)))
    return lines


def _first(lines: list[tuple[float, str]], needle: str) -> float:
    """When the first line containing ``needle`` was logged."""
    for at, text in lines:
        if needle in text:
            return at
    raise ValueError(f"no log line contains {needle!r}")


def _one(logs: Path, pattern: str) -> Path:
    paths = sorted(logs.glob(pattern))
    if len(paths) != 1:
        raise ValueError(f"{logs}: expected one {pattern}, found {len(paths)}")
    return paths[0]


def phases_from_logs(logs: Path, launched: float, first_200: float) -> tuple[
    dict[str, float], dict[str, dict[str, float]]
]:  # fmt: skip
    """The run's phases in order (they sum to its time to first 200) and each deployment's
    replica start, from the Ray session's ``logs`` directory."""
    driver = _one(logs, "python-core-driver-*.log").read_text().splitlines()[0]
    driver_up = _stamp(_RAY_LINE.match(driver).group(1))  # type: ignore[union-attr]
    controller = _serve_lines(_one(logs, "serve/controller_[0-9]*.log"))
    controller_up = _first(controller, "Controller starting")
    build_start = _first(controller, "Importing and building app")
    build_end = _first(controller, "Imported and built app")
    workers = {}
    for line in (logs / "raylet.out").read_text(errors="replace").splitlines():
        spawned, ray_line = _WORKER.search(line), _RAY_LINE.match(line)
        if spawned and ray_line:
            workers[spawned.group(1)] = _stamp(ray_line.group(1))
    starting = {m.group(1): at for at, text in controller if (m := _STARTING.search(text))}
    replicas: dict[str, dict[str, float]] = {}
    ready = []
    for at, text in controller:
        started = _STARTED.search(text)
        if not started or started.group(2) in replicas:
            continue
        replica_id, deployment, pid = started.groups()
        own = _serve_lines(_one(logs, f"serve/replica_*_{deployment}_{replica_id}.log"))
        requested = starting[replica_id]
        spawned_at = max(workers.get(pid, requested), requested)  # an idle worker: no wait
        init_start = _first(own, "Started initializing replica")
        init_end = _first(own, "Finished initializing replica")
        replicas[deployment] = {
            "worker wait": spawned_at - requested,
            "boot + imports": init_start - spawned_at,
            "constructor": init_end - init_start,
            "reconfigure + ready": at - init_end,
            "total": at - requested,
        }
        ready.append(at)
    phases = {
        "ray up": driver_up - launched,
        "controller": controller_up - driver_up,
        "deploy start": build_start - controller_up,
        "app build": build_end - build_start,
        "replicas": max(ready) - build_end,
        "first request": first_200 - max(ready),
    }
    return phases, replicas


def cpu_seconds(root: int) -> dict[str, float]:
    """CPU seconds (user + system) used so far by ``serve run`` (pid ``root``) and every
    process under it, summed by label (``benchmarks/served.py``)."""

    def used(process: psutil.Process) -> float:
        times = process.cpu_times()
        return float(times.user + times.system)

    return process_totals(root, used)


def cold_start(config: Path, variant: str) -> Run:
    """One ``serve run`` of ``config`` to its first 200; stopped before returning."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="cs", dir="/tmp") as tmp:  # short: Ray's sockets
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        launched = time.time()
        with serve_run_process(config, port, Path(tmp), {"RAY_TMPDIR": tmp}) as process:
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            while not _answers(url):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"serve run gave no 200 (exit code {process.poll()})")
                time.sleep(POLL_S)
            first_200 = time.time()
            cpu = cpu_seconds(process.pid)
        logs = next(Path(tmp, "ray").glob("session_2*")) / "logs"
        phases, replicas = phases_from_logs(logs, launched, first_200)
    return Run(variant, first_200 - launched, phases, replicas, cpu)


def cold_start_in(checkout: Path, config: Path, variant: str) -> Run:
    """One cold start of the checkout in ``checkout``, through its own copy of this script."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run.json"
        subprocess.run(
            [
                sys.executable,
                "benchmarks/cold_start.py",
                "--config",
                str(config),
                "--one",
                str(out),
            ],
            cwd=checkout,
            env={**os.environ, "PYTHONPATH": str(checkout)},
            check=True,
        )
        return Run(**{**json.loads(out.read_text()), "variant": variant})


def _answers(url: str) -> bool:
    try:
        return httpx.post(url, json=CHAT, timeout=60).status_code == 200
    except httpx.HTTPError:
        return False  # not listening yet


def _median(runs: list[Run], value: Any) -> float:
    return statistics.median(value(r) for r in runs)


def summarize(runs: list[Run]) -> dict[str, Any]:
    """Per variant: the median, min and max time to first 200, and each phase's median."""
    out: dict[str, Any] = {}
    for variant in dict.fromkeys(r.variant for r in runs):
        mine = [r for r in runs if r.variant == variant]
        deployments = sorted({d for r in mine for d in r.replicas})
        out[variant] = {
            "runs": len(mine),
            "first_200_s": {
                "median": _median(mine, lambda r: r.first_200_s),
                "min": min(r.first_200_s for r in mine),
                "max": max(r.first_200_s for r in mine),
            },
            "phases_median_s": {p: _median(mine, lambda r, p=p: r.phases[p]) for p in PHASES},
            "replicas_median_s": {
                d: {
                    p: _median(mine, lambda r, d=d, p=p: r.replicas[d][p])
                    for p in [*REPLICA_PHASES, "total"]
                }
                for d in deployments
            },
            "cpu_s_median": {
                label: _median(mine, lambda r, label=label: r.cpu_s.get(label, 0.0))
                for label in sorted({label for r in mine for label in r.cpu_s})
            },
        }
    return out


def print_tables(runs: list[Run], summary: dict[str, Any]) -> None:
    """Every run's phases, then each variant's replica starts and CPU seconds (medians)."""
    rows = [
        [r.variant, str(i), *(f"{r.phases[p]:.2f}" for p in PHASES), f"{r.first_200_s:.2f}"]
        for i, r in enumerate(runs)
    ]
    print(markdown_table(["variant", "run", *PHASES, "first 200 s"], rows, text_columns=2))
    print()
    for variant, s in summary.items():
        replica_rows = [
            [d, *(f"{v[p]:.2f}" for p in [*REPLICA_PHASES, "total"])]
            for d, v in s["replicas_median_s"].items()
        ]
        print(f"{variant}: replica starts, median s")
        print(markdown_table(["deployment", *REPLICA_PHASES, "total"], replica_rows))
        print()
        cpu_rows = [[label, f"{v:.2f}"] for label, v in s["cpu_s_median"].items()]
        print(f"{variant}: CPU s used by the first 200, median")
        print(markdown_table(["process", "CPU s"], cpu_rows))
        print()
        first = s["first_200_s"]
        print(
            f"{variant}: first 200 median {first['median']:.2f} s "
            f"(min {first['min']:.2f}, max {first['max']:.2f}), target {TARGET_S:.0f} s"
        )
        print()


def plot(path: Path, runs: list[Run]) -> None:
    """One stacked bar per run: its phases in order, the target as a line."""
    fig = figure(10, 2.0 + 0.45 * len(runs))
    ax = fig.subplots()
    labels = [f"{r.variant} #{i}" for i, r in enumerate(runs)]
    left = [0.0] * len(runs)
    for phase in PHASES:
        widths = [r.phases[phase] for r in runs]
        ax.barh(labels, widths, left=left, label=phase)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    ax.axvline(TARGET_S, color="red", linestyle="--", label=f"target {TARGET_S:.0f} s")
    ax.invert_yaxis()
    ax.set_xlabel("seconds from `serve run` to the first 200")
    ax.set_title("Cold start of serve_config.yaml, by phase (from the Ray and Serve logs)")
    ax.legend(fontsize=8, ncols=7, loc="upper center", bbox_to_anchor=(0.5, -0.2))
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=ROOT / "serve_config.yaml")
    parser.add_argument("--runs", type=int, default=3, help="runs per variant")
    parser.add_argument(
        "--compare", type=Path, help="a folder holding another serve_app, run alternately"
    )
    parser.add_argument("--label", default="this checkout", help="this checkout's runs' name")
    parser.add_argument("--out", type=Path, default=RESULTS / "cold_start.json")
    parser.add_argument("--one", type=Path, help=argparse.SUPPRESS)  # a --compare run's JSON
    args = parser.parse_args()

    if args.one is not None:
        args.one.write_text(json.dumps(asdict(cold_start(args.config, "one"))))
        return
    runs = []
    for _ in range(args.runs):
        if args.compare is not None:
            config = args.config.relative_to(ROOT)  # the same config, as the other checkout has it
            runs.append(cold_start_in(args.compare.resolve(), config, args.compare.name))
        runs.append(cold_start(args.config, args.label))
    summary = summarize(runs)
    print_tables(runs, summary)
    document = {
        "benchmark": "cold_start",
        "machine": machine(),
        "config": config_label(args.config),
        "target_s": TARGET_S,
        "summary": summary,
        "runs": [asdict(r) for r in runs],
    }
    write_json(args.out, document)
    plot(args.out.with_suffix(".png"), runs)


if __name__ == "__main__":
    main()
