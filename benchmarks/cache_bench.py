"""Cache benchmark: ``serve run`` cold start, then response-cache hits against misses over HTTP.

    .venv/bin/python benchmarks/cache_bench.py
    .venv/bin/python benchmarks/cache_bench.py --requests 3      # a quick check

Starts ``serve run`` on a copy of ``--config`` listening on a free port, in a fresh local Ray
cluster with Serve's direct ingress enabled, and times launch to the first 200 of a real
``/v1/completions`` request through the proxy (polled every 0.1 s with ``max_tokens`` 1). Then,
on each path side by side (through the proxy, and straight to the ingress replica's own port),
sends ``--requests`` distinct greedy completions twice each, one at a time, over one persistent
HTTP connection: the first of a pair should be an ``X-Cache: miss``, the second a ``hit``. For
context it times two floors of the HTTP path: a 404 (no Ray handle call) and ``GET /health``.
Prints a table with the targets, writes the summary to ``benchmarks/results/cache_bench.json``
with a plot beside it, and every raw time and ``X-Cache`` header to ``benchmarks/results/raw/``
(git-ignored). The server and its Ray processes are stopped at the end, also on errors and Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import yaml
from tqdm import tqdm

from serve_app.bench.report import (
    figure,
    machine,
    markdown_table,
    raw_path,
    save_figure,
    write_json,
)
from serve_app.bench.stats import distribution

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
POLL_INTERVAL_S = 0.1
FLOOR_REQUESTS = 30
HIT_P50_TARGET_S = 0.005
SPEEDUP_TARGET = 20.0
MARKER = "CACHE_BENCH_SERVER"  # set in the server's environment, so leftovers can be found
LATENCY_SETS = {"miss": "miss", "hit": "hit", "not_found": "404 floor", "health": "/health"}
PATHS = ("proxy", "direct")  # through Serve's HTTP proxy; straight to the ingress replica


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_config(source: Path, port: int, directory: Path) -> Path:
    """``source`` as a user runs it, but listening on ``port`` of 127.0.0.1."""
    settings = yaml.safe_load(source.read_text())
    settings["http_options"] = {**settings.get("http_options", {}), "host": "127.0.0.1",
                                "port": port}  # fmt: skip
    path = directory / "serve_config.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def marked_processes(value: str | None = None) -> list[int]:
    """Pids whose environment carries ``MARKER``: with any value, or exactly ``value``."""
    prefix = f"{MARKER}=".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:  # gone, or another user's
            continue
        values = [item[len(prefix) :].decode() for item in environ if item.startswith(prefix)]
        if values and (value is None or value in values):
            found.append(int(entry.name))
    return found


@dataclass
class Server:
    """A running ``serve run``, when it was launched, and what outlived it once stopped."""

    process: subprocess.Popen[bytes]
    launched: float
    log: Path
    marker: str
    leftover_pids: list[int] = field(default_factory=list)
    stop_s: float = 0.0

    def log_tail(self, lines: int = 40) -> str:
        """The end of the server's output, for error messages."""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """Stop it as Ctrl-C would, kill what is left, note any process that survived."""
        started = time.perf_counter()
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)  # serve run shuts Serve and Ray down
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        deadline = time.monotonic() + 30
        while (left := marked_processes(self.marker)) and time.monotonic() < deadline:
            time.sleep(0.5)  # Ray's processes follow their parent down (kill on parent death)
        for pid in left:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if left:
            time.sleep(0.5)
        self.leftover_pids = marked_processes(self.marker)
        self.stop_s = time.perf_counter() - started
        if self.leftover_pids:
            print(f"WARNING: processes outlived the server: {self.leftover_pids}", file=sys.stderr)


def allow_ctrl_c() -> None:
    """Let ``serve run`` see SIGINT even when this script was started with it ignored (``&``)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def direct_ingress_env(port: int) -> dict[str, str]:
    """Serve's direct ingress: the ingress replica also listens on ``port`` itself."""
    return {
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + 100),
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",  # only delays the stop
    }


@contextmanager
def serve_run(config: Path, log: Path, env: dict[str, str]) -> Iterator[Server]:
    """``serve run config`` in a fresh local Ray cluster, stopped on the way out, come what may."""
    marker = str(os.getpid())
    with log.open("wb") as output:
        launched = time.perf_counter()
        process = subprocess.Popen(
            [str(Path(sys.executable).parent / "serve"), "run", str(config), "--address", "local"],
            cwd=ROOT,
            env={**os.environ, **env, "RAY_ADDRESS": "", MARKER: marker},
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so it can be stopped as a whole
            preexec_fn=allow_ctrl_c,
        )
    server = Server(process, launched, log, marker)
    try:
        yield server
    finally:
        server.stop()


def cold_start(client: httpx.Client, server: Server, timeout_s: float) -> dict[str, object]:
    """Seconds from launch to the first 200 of a real completion, polled every 0.1 s."""
    body = {"model": "demo", "prompt": "Cold start", "max_tokens": 1, "temperature": 0}
    polls: dict[str, int] = {}  # what the polls got before the first 200
    while (elapsed := time.perf_counter() - server.launched) < timeout_s:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"serve run exited ({server.process.returncode}):\n{server.log_tail()}"
            )
        poll_started = time.perf_counter()
        try:
            answer = str(client.post("/v1/completions", json=body).status_code)
        except httpx.TransportError as exc:
            answer = type(exc).__name__
        if answer == "200":
            return {"seconds": time.perf_counter() - server.launched, "polls_before": polls}
        polls[answer] = polls.get(answer, 0) + 1
        time.sleep(max(0.0, POLL_INTERVAL_S - (time.perf_counter() - poll_started)))
    raise TimeoutError(f"no 200 after {elapsed:.0f} s ({polls}):\n{server.log_tail()}")


def timed(
    client: httpx.Client, method: str, path: str, expected: int, body: dict[str, Any] | None = None
) -> tuple[float, httpx.Response]:
    """End-to-end seconds of one request, body included; a status other than ``expected`` fails."""
    started = time.perf_counter()
    response = client.request(method, path, json=body)
    seconds = time.perf_counter() - started
    if response.status_code != expected:
        raise RuntimeError(
            f"{method} {path}: {response.status_code}, not {expected}: {response.text}"
        )
    return seconds, response


@dataclass
class Pair:
    """One distinct greedy completion sent twice in a row."""

    prompt: str
    first_s: float = 0.0
    first_cache: str | None = None
    second_s: float = 0.0
    second_cache: str | None = None
    completion_tokens: int = 0

    @property
    def as_expected(self) -> bool:
        """A miss, then a hit."""
        return (self.first_cache, self.second_cache) == ("miss", "hit")


def cache_pairs(
    client: httpx.Client, path: str, requests: int, max_tokens: int, bar: tqdm
) -> list[Pair]:
    """Each of ``requests`` distinct prompts twice, one request at a time."""
    pairs = []
    for index in range(requests):
        pair = Pair(f"Request {index} ({path}): the return statement")
        body = {"model": "demo", "prompt": pair.prompt, "max_tokens": max_tokens, "temperature": 0}
        pair.first_s, response = timed(client, "POST", "/v1/completions", 200, body)
        pair.first_cache = response.headers.get("X-Cache")
        bar.update()
        pair.second_s, response = timed(client, "POST", "/v1/completions", 200, body)
        pair.second_cache = response.headers.get("X-Cache")
        pair.completion_tokens = response.json()["usage"]["completion_tokens"]
        bar.update()
        pairs.append(pair)
    return pairs


def floor(client: httpx.Client, path: str, expected: int, bar: tqdm) -> list[float]:
    """Seconds of ``FLOOR_REQUESTS`` sequential GETs of ``path``."""
    times = []
    for _ in range(FLOOR_REQUESTS):
        times.append(timed(client, "GET", path, expected)[0])
        bar.update()
    return times


def latency_sets(
    pairs: list[Pair], not_found: list[float], health: list[float]
) -> dict[str, list[float]]:
    """The four latency sets; sends count as miss or hit by the ``X-Cache`` they got back."""
    sends = [(p.first_s, p.first_cache) for p in pairs] + [
        (p.second_s, p.second_cache) for p in pairs
    ]
    return {
        "miss": [seconds for seconds, cache in sends if cache == "miss"],
        "hit": [seconds for seconds, cache in sends if cache == "hit"],
        "not_found": not_found,
        "health": health,
    }


def targets(summary: dict[str, dict[str, float]]) -> dict[str, dict[str, float | bool]]:
    """The hit p50 and the speed-up against their targets."""
    hit_p50 = summary["hit"]["p50"]
    speedup = summary["miss"]["p50"] / hit_p50
    return {
        "hit_p50_s": {
            "target": HIT_P50_TARGET_S,
            "value": hit_p50,
            "met": hit_p50 <= HIT_P50_TARGET_S,
        },
        "hit_speedup": {
            "target": SPEEDUP_TARGET,
            "value": speedup,
            "met": speedup >= SPEEDUP_TARGET,
        },
    }


def print_table(summary: dict[str, Any]) -> None:
    """Latency per path and set, then cold start, the targets and the miss-then-hit check."""
    rows = []
    for name, path in summary["paths"].items():
        for set_, label in LATENCY_SETS.items():
            row = path["summary_s"][set_]
            rows.append([name, label, str(path["samples"][set_]),
                         *(f"{row[key] * 1e3:.1f}" for key in ("p50", "p90", "mean"))])  # fmt: skip
    headers = ["path", "what", "n", "p50 ms", "p90 ms", "mean ms"]
    print("\n" + markdown_table(headers, rows, text_columns=2))
    verdict = {True: "met", False: "**missed**"}
    rows = [["`serve run` to the first 200", f"{summary['cold_start']['seconds']:.1f} s",
             "(reported)"]]  # fmt: skip
    for name, path in summary["paths"].items():
        hit, speedup = path["targets"]["hit_p50_s"], path["targets"]["hit_speedup"]
        rows += [
            [f"{name}: hit p50", f"{hit['value'] * 1e3:.1f} ms",
             f"<= {hit['target'] * 1e3:.0f} ms: {verdict[hit['met']]}"],
            [f"{name}: hit speed-up (miss p50 / hit p50)", f"{speedup['value']:.1f}x",
             f">= {speedup['target']:.0f}x: {verdict[speedup['met']]}"],
            [f"{name}: pairs not miss then hit", f"{path['mismatches']} of {path['pairs']}", "0"],
        ]  # fmt: skip
    print("\n" + markdown_table(["what", "result", "target"], rows), end="\n\n", flush=True)


def plot(report: dict[str, Any], summary: dict[str, Any], path: Path) -> None:
    """Cumulative distribution of the four latency sets (raw ``report``), log time axis."""
    fig = figure(8, 4.5)
    axis = fig.subplots()
    for (name, measured), style in zip(report["paths"].items(), ("-", ":"), strict=True):
        for set_, label in LATENCY_SETS.items():
            times = np.sort(measured["latency_s"][set_]) * 1e3
            fraction = np.arange(1, len(times) + 1) / len(times)
            axis.step(times, fraction, style, where="post", label=f"{name}: {label}")
    axis.axvline(HIT_P50_TARGET_S * 1e3, color="grey", linestyle="--", label="hit p50 target")
    axis.set_xscale("log")
    axis.set_xlabel("end-to-end latency, one request at a time (ms)")
    axis.set_ylabel("fraction of requests")
    speedups = ", ".join(
        f"{name} {measured['targets']['hit_speedup']['value']:.0f}x"
        for name, measured in summary["paths"].items()
    )
    axis.set_title(f"cold start {report['cold_start']['seconds']:.1f} s; hit speed-up {speedups}")
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize=8)
    save_figure(fig, path)


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "serve_config.yaml")
    parser.add_argument(
        "--requests", type=int, default=30, help="distinct prompts, each sent twice"
    )
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--startup-timeout", type=float, default=180.0, help="seconds")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "cache_bench.json")
    return parser.parse_args()


def measure_path(
    client: httpx.Client, path: str, args: argparse.Namespace, bar: tqdm
) -> dict[str, Any]:
    """Cache pairs and the two floors over one path."""
    pairs = cache_pairs(client, path, args.requests, args.max_tokens, bar)
    not_found = floor(client, "/v1/does-not-exist", 404, bar)
    health = floor(client, "/health", 200, bar)
    return {
        "mismatches": sum(not p.as_expected for p in pairs),
        "latency_s": latency_sets(pairs, not_found, health),
        "pairs": [asdict(p) for p in pairs],
    }


def wait_for_direct(client: httpx.Client, timeout_s: float) -> None:
    """The ingress replica opens its own port once it has started."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with suppress(httpx.TransportError):
            if client.get("/health").status_code == 200:
                return
        time.sleep(POLL_INTERVAL_S)
    raise TimeoutError("the ingress replica never answered on its direct-ingress port")


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Start the server, time its cold start and every request, stop it; the raw report."""
    with tempfile.TemporaryDirectory(prefix="cache_bench_") as directory:
        port, direct_port = free_port(), free_port()
        config = write_config(args.config, port, Path(directory))
        log = Path(directory) / "serve_run.log"
        with (
            serve_run(config, log, direct_ingress_env(direct_port)) as server,
            httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as proxy,
            httpx.Client(base_url=f"http://127.0.0.1:{direct_port}", timeout=60) as direct,
        ):
            started = cold_start(proxy, server, args.startup_timeout)
            print(f"cold start: {started['seconds']:.1f} s", flush=True)
            wait_for_direct(direct, args.startup_timeout)
            total = len(PATHS) * (2 * args.requests + 2 * FLOOR_REQUESTS)
            with tqdm(total=total, unit="req") as bar:
                paths = {name: measure_path(client, name, args, bar)
                         for name, client in zip(PATHS, (proxy, direct), strict=True)}  # fmt: skip
    return {
        "machine": machine(),
        "settings": {k: str(v) for k, v in vars(args).items() if k != "out"}
        | {"floor_requests": FLOOR_REQUESTS, "poll_interval_s": POLL_INTERVAL_S},
        "cold_start": started,
        "stop_s": server.stop_s,
        "leftover_pids": server.leftover_pids,
        "paths": paths,
    }


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    """What the committed JSON keeps: the report with percentiles and targets, not raw times."""
    paths = {}
    for name, path in report["paths"].items():
        summary_s = {set_: asdict(distribution(path["latency_s"][set_])) for set_ in LATENCY_SETS}
        paths[name] = {
            "pairs": len(path["pairs"]),
            "mismatches": path["mismatches"],
            "samples": {set_: len(path["latency_s"][set_]) for set_ in LATENCY_SETS},
            "summary_s": summary_s,
            "targets": targets(summary_s),
        }
    return {**report, "paths": paths}


def main() -> None:
    """Run the benchmark and write its JSON and plot."""
    args = parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the server on `kill` too
    if leftovers := marked_processes():
        sys.exit(f"an earlier cache_bench server still runs (pids {leftovers}); stop it first")
    report = measure(args)
    for name, path in report["paths"].items():
        if not path["latency_s"]["hit"]:
            raw_path(args.out).parent.mkdir(parents=True, exist_ok=True)
            raw_path(args.out).write_text(json.dumps(report, indent=2))
            sys.exit(f"no X-Cache: hit over {name} (headers in {raw_path(args.out)}): cache on?")
    summary = summarize(report)
    print_table(summary)
    raw = write_json(args.out, summary, report)
    plot(report, summary, args.out.with_suffix(".png"))
    print(f"wrote {args.out}, {args.out.with_suffix('.png')} and {raw}")


if __name__ == "__main__":
    main()
