"""A real Prometheus server scrapes the running service: every expression of the Grafana
dashboard returns data, and the alerting rules evaluate cleanly on the real series.

Prometheus runs from Debian's ``prometheus`` package (``.ci/run`` installs it), with
``monitoring/prometheus.yml`` adapted to this test: its file service discovery reads a file
listing this Ray session's nodes (as Ray's own discovery file does), scraped every second.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import ray
import yaml

from tests.e2e.conftest import APP_NAME, free_port

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "monitoring" / "grafana-dashboard.json"
SCRAPE_CONFIG = ROOT / "monitoring" / "prometheus.yml"
ALERTS = ROOT / "monitoring" / "alerts.yml"
PROMETHEUS = shutil.which("prometheus")
RATE_INTERVAL = "30s"  # what the dashboard's $__rate_interval becomes here
DEADLINE_S = 60

pytestmark = pytest.mark.skipif(
    PROMETHEUS is None,
    reason="the prometheus binary is missing: install Debian's `prometheus` package "
    "(.ci/run does when it can)",
)


def dashboard_expressions() -> list[str]:
    """Every PromQL expression of the dashboard's panels, as Grafana would send it."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    panels = panels + [inner for panel in panels for inner in panel.get("panels", [])]
    return [
        target["expr"].replace("$__rate_interval", RATE_INTERVAL).replace("$application", APP_NAME)
        for panel in panels
        for target in panel.get("targets", [])
    ]


def test_dashboard_expressions_are_all_found() -> None:
    exprs = dashboard_expressions()
    assert len(exprs) >= 20
    assert not [e for e in exprs if "$" in e], "a dashboard variable the test does not fill in"


@pytest.fixture(scope="module")
def prometheus(served_app: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Prometheus server scraping every node of this Ray session; yields its base URL."""
    assert PROMETHEUS is not None
    workdir = tmp_path_factory.mktemp("prometheus")
    nodes = [n for n in ray.nodes() if n["Alive"]]
    targets = [f"{n['NodeManagerAddress']}:{n['MetricsExportPort']}" for n in nodes]
    discovery = workdir / "prom_metrics_service_discovery.json"
    discovery.write_text(json.dumps([{"labels": {"job": "ray"}, "targets": targets}]))

    config = yaml.safe_load(SCRAPE_CONFIG.read_text())
    # Late in a long test session Ray's metrics endpoint holds many series and takes seconds
    # to answer: a short scrape timeout would mark it down.
    config["global"].update(scrape_interval="4s", scrape_timeout="4s", evaluation_interval="1s")
    config["rule_files"] = [str(ALERTS)]
    (job,) = config["scrape_configs"]
    job["file_sd_configs"] = [{"files": [str(discovery)], "refresh_interval": "1s"}]
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (workdir / "prometheus.log").open("w")
    process = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while not _ready(url):
            assert process.poll() is None, (workdir / "prometheus.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "Prometheus did not become ready"
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


class Traffic:
    """Requests of every kind the dashboard shows, sent in a loop on a thread until stopped:
    repeated greedy prompts (cache hits), new ones (misses), streams (inter-token latency),
    sampled ones, and invalid ones (400s)."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Traffic:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=60)

    def _run(self) -> None:
        completion = {"model": "demo", "max_tokens": 8}
        with httpx.Client(base_url=self.base_url, timeout=60) as http:
            n = 0
            while not self.stop.is_set():
                n += 1
                bodies: list[tuple[dict[str, Any], int]] = [
                    ({**completion, "prompt": "def add(a, b):", "temperature": 0}, 200),
                    ({**completion, "prompt": f"x = {n}", "temperature": 0}, 200),
                    ({**completion, "prompt": "import os", "temperature": 1.0}, 200),
                    ({**completion, "prompt": "y", "max_tokens": -1}, 400),
                ]
                for body, status in bodies:
                    self._expect(http.post("/v1/completions", json=body), status)
                with http.stream(
                    "POST",
                    "/v1/chat/completions",
                    json={
                        "model": "demo",
                        "messages": [{"role": "user", "content": f"What is {n}?"}],
                        "max_tokens": 8,
                        "stream": True,
                    },
                ) as stream:
                    stream.read()
                    self._expect(stream, 200)

    def _expect(self, response: httpx.Response, status: int) -> None:
        if response.status_code != status:
            self.errors.append(f"{response.request.url}: {response.status_code} {response.text}")


def _query(url: str, expr: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10)
    payload = response.json()
    assert payload["status"] == "success", f"{expr}: {payload}"
    result: list[dict[str, Any]] = payload["data"]["result"]
    return result


def _has_data(result: list[dict[str, Any]]) -> bool:
    """At least one series with a number (histogram_quantile over no traffic gives NaN)."""
    return any(math.isfinite(float(series["value"][1])) for series in result)


def test_every_dashboard_expression_returns_data(served_app: str, prometheus: str) -> None:
    pending = dashboard_expressions()
    with Traffic(served_app) as traffic:
        deadline = time.monotonic() + DEADLINE_S
        while pending and time.monotonic() < deadline and not traffic.errors:
            pending = [expr for expr in pending if not _has_data(_query(prometheus, expr))]
            if pending:
                time.sleep(0.5)
    assert not traffic.errors, traffic.errors[:3]
    targets = httpx.get(f"{prometheus}/api/v1/targets", timeout=10).json()["data"]
    health = [(t["scrapeUrl"], t["health"], t["lastError"]) for t in targets["activeTargets"]]
    assert not pending, f"no data after {DEADLINE_S} s for {pending}; targets: {health}"

    # The dashboard's model picker lists this application.
    variable = json.loads(DASHBOARD.read_text())["templating"]["list"][1]["query"]["query"]
    metric, label = re.fullmatch(r"label_values\((\w+), (\w+)\)", variable).groups()  # type: ignore[union-attr]
    values = httpx.get(
        f"{prometheus}/api/v1/label/{label}/values", params={"match[]": metric}, timeout=10
    ).json()["data"]
    assert APP_NAME in values


def test_alert_rules_evaluate_on_the_real_series(served_app: str, prometheus: str) -> None:
    """Prometheus loaded every rule of monitoring/alerts.yml and evaluates each without error;
    none fires on the healthy service."""
    expected = {rule["alert"] for group in yaml.safe_load(ALERTS.read_text())["groups"]
                for rule in group["rules"]}  # fmt: skip
    deadline = time.monotonic() + 15
    while True:
        groups = httpx.get(f"{prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
        rules = {rule["name"]: rule for group in groups for rule in group["rules"]}
        if all(rule["health"] == "ok" for rule in rules.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert set(rules) == expected
    assert {name: rule["health"] for name, rule in rules.items()} == dict.fromkeys(expected, "ok")
    assert not [name for name, rule in rules.items() if rule["state"] == "firing"]
