"""The alerting rules and scrape config under ``monitoring/`` and ``k8s/monitoring/``, checked with
``promtool`` (Debian's ``prometheus`` package, which ``.ci/run`` installs): each alert fires on
synthetic series in ``monitoring/alerts.test.yml`` and stays quiet on others, and the
PrometheusRule carries exactly the rules of the plain rules file."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "monitoring"
K8S_MONITORING = ROOT / "k8s" / "monitoring"
PROMTOOL = shutil.which("promtool")

needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool is missing: install Debian's `prometheus` package (.ci/run does when it can)",
)


def promtool(*args: str, cwd: Path = MONITORING) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def alert_names() -> list[str]:
    return [rule["alert"] for group in load(MONITORING / "alerts.yml")["groups"]
            for rule in group["rules"]]  # fmt: skip


@needs_promtool
def test_rules_file_and_scrape_config_are_valid() -> None:
    rules = promtool("check", "rules", "alerts.yml")
    assert rules.returncode == 0, rules.stdout + rules.stderr
    config = promtool("check", "config", "prometheus.yml")
    assert config.returncode == 0, config.stdout + config.stderr


@needs_promtool
def test_every_alert_fires_and_stays_quiet_in_promtool_tests() -> None:
    result = promtool("test", "rules", "alerts.test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    cases = [case for test in load(MONITORING / "alerts.test.yml")["tests"]
             for case in test["alert_rule_test"]]  # fmt: skip
    for name in alert_names():
        mine = [case for case in cases if case["alertname"] == name]
        assert any(case["exp_alerts"] for case in mine), f"{name} is never shown to fire"
        assert any(not case["exp_alerts"] for case in mine), f"{name} is never shown quiet"
    assert {case["alertname"] for case in cases} == set(alert_names())


@needs_promtool
@pytest.mark.parametrize("name", alert_names())
@pytest.mark.parametrize("mutation", ["never fires", "always fires"])
def test_the_promtool_tests_catch_a_broken_rule(name: str, mutation: str, tmp_path: Path) -> None:
    """Replacing one alert's expression makes ``promtool test rules`` fail: the tests check
    both that each alert fires and that it stays quiet."""
    rules = load(MONITORING / "alerts.yml")
    for group in rules["groups"]:
        for rule in group["rules"]:
            if rule["alert"] == name:
                rule["expr"] = "vector(1) == 2" if mutation == "never fires" else "vector(1)"
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules))
    shutil.copy(MONITORING / "alerts.test.yml", tmp_path)
    result = promtool("test", "rules", "alerts.test.yml", cwd=tmp_path)
    assert result.returncode != 0, f"the tests pass although {name} {mutation}"


def test_prometheus_rule_carries_the_rules_file() -> None:
    resource = load(K8S_MONITORING / "prometheusrule.yaml")
    assert resource["apiVersion"] == "monitoring.coreos.com/v1"
    assert resource["kind"] == "PrometheusRule"
    assert resource["spec"]["groups"] == load(MONITORING / "alerts.yml")["groups"]


def test_pod_monitor_scrapes_the_metrics_port_of_head_and_workers() -> None:
    monitor = load(K8S_MONITORING / "podmonitor.yaml")
    assert monitor["kind"] == "PodMonitor"
    selected = {
        tuple(expr["values"])
        for expr in monitor["spec"]["selector"]["matchExpressions"]
        if expr["key"] == "ray.io/node-type" and expr["operator"] == "In"
    }
    assert selected == {("head", "worker")}
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics"
    kustomization = load(K8S_MONITORING / "kustomization.yaml")
    assert sorted(kustomization["resources"]) == ["podmonitor.yaml", "prometheusrule.yaml"]


def test_the_ray_containers_declare_the_scraped_port() -> None:
    """KubeRay's head and worker containers name the port the PodMonitor scrapes."""
    base = ROOT / "k8s" / "base" / "rayservice.yaml"
    if not base.exists():
        pytest.skip("k8s/base/rayservice.yaml is not there")
    spec = load(base)["spec"]["rayClusterConfig"]
    pod_specs = [spec["headGroupSpec"]["template"]["spec"]] + [
        group["template"]["spec"] for group in spec.get("workerGroupSpecs", [])
    ]
    for pod in pod_specs:
        ports = {
            port["name"] for container in pod["containers"] for port in container.get("ports", [])
        }
        assert "metrics" in ports


def test_scrape_config_discovers_every_ray_node() -> None:
    config = load(MONITORING / "prometheus.yml")
    (job,) = config["scrape_configs"]
    (discovery,) = job["file_sd_configs"]
    assert discovery["files"] == ["/tmp/ray/prom_metrics_service_discovery.json"]
    assert config["rule_files"] == ["alerts.yml"]
