"""Every shipped deployment profile is valid for the app's strict arguments."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from serve_app.app import SERVE_ENV, batcher_queue_bounds
from serve_app.config import AppArgs, ModelAppArgs

ROOT = Path(__file__).resolve().parents[2]
PROFILES = ["serve_config.yaml", *sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))]


def serve_config(name: str) -> dict[str, Any]:
    # k8s/overlays embed copies of configs/ (checked equal in test_k8s_manifests.py)
    text = (ROOT / name if name == "serve_config.yaml" else ROOT / "configs" / name).read_text()
    config: dict[str, Any] = yaml.safe_load(text)
    return config


# One application serving every model, or (configs/multi_model.yaml) an ingress application and
# one application per model.
SINGLE_APP = [name for name in PROFILES if len(serve_config(name)["applications"]) == 1]
MULTI_APP = [name for name in PROFILES if name not in SINGLE_APP]


@pytest.mark.parametrize("name", SINGLE_APP)
def test_profile_arguments_validate(name: str) -> None:
    (application,) = serve_config(name)["applications"]
    args = AppArgs.model_validate(application["args"])
    assert application["import_path"] == "serve_app.app:build_app"
    assert application["runtime_env"]["env_vars"] == SERVE_ENV
    if "gpu" in name:
        assert args.engine.device == "cuda"
        model = next(d for d in application["deployments"] if d["name"] == "LLMModel")
        assert model["ray_actor_options"]["num_gpus"] == 1  # one model replica per GPU


@pytest.mark.parametrize("name", SINGLE_APP)
def test_profile_queues_are_sized_from_the_engines_capacity(name: str) -> None:
    """docs/OPERATIONS.md, How to size queues: a waiting queue of 1x the batch; Batcher slots
    for what every model replica holds; as many queued at the ingress."""
    (application,) = serve_config(name)["applications"]
    entry = AppArgs.model_validate(application["args"]).model_entries()[0]
    deployments = {d["name"]: d for d in application["deployments"]}
    model = deployments["LLMModel"]
    replicas = model.get("autoscaling_config", {}).get("max_replicas", model.get("num_replicas", 1))
    assert entry.engine.max_waiting_seqs == entry.engine.max_num_seqs
    bounds = {**batcher_queue_bounds(entry, replicas), **deployments["Batcher"]}
    batchers = deployments["Batcher"].get("num_replicas", 1)
    capacity = replicas * (entry.engine.max_num_seqs + entry.engine.max_waiting_seqs)
    assert bounds["max_ongoing_requests"] * batchers == capacity
    assert bounds["max_queued_requests"] == bounds["max_ongoing_requests"]


@pytest.mark.parametrize("name", SINGLE_APP)
def test_profile_admission_lets_in_what_the_batchers_hold(name: str) -> None:
    """The ingress's exact gate (serve_app.admission) over all ingress replicas admits what the
    Batchers' slots and queues hold: no less (capacity lost), no more (an unbounded queue)."""
    (application,) = serve_config(name)["applications"]
    entry = AppArgs.model_validate(application["args"]).model_entries()[0]
    deployments = {d["name"]: d for d in application["deployments"]}
    model = deployments["LLMModel"]
    replicas = model.get("autoscaling_config", {}).get("max_replicas", model.get("num_replicas", 1))
    bounds = {**batcher_queue_bounds(entry, replicas), **deployments["Batcher"]}
    batchers = deployments["Batcher"].get("num_replicas", 1)
    held = batchers * (bounds["max_ongoing_requests"] + bounds["max_queued_requests"])
    ingresses = deployments.get("Ingress", {}).get("num_replicas", 1)
    limit = entry.admission_limit or 2 * replicas * (
        entry.engine.max_num_seqs + entry.engine.max_waiting_seqs
    )
    assert limit * ingresses == held


def test_a_multi_app_profile_is_shipped() -> None:
    assert MULTI_APP == ["multi_model.yaml"]


@pytest.mark.parametrize("name", MULTI_APP)
def test_multi_app_profile_reaches_one_valid_model_app_per_model(name: str) -> None:
    """The ingress application's ``model_apps`` name exactly the model applications, which
    have no HTTP route, valid args, and Batcher bounds the ingress's admission limit fits."""
    config = serve_config(name)
    ServeDeploySchema.model_validate(config)  # Ray's own checks: unique names and routes
    front, *model_apps = config["applications"]
    refs = AppArgs.model_validate(front["args"]).model_apps
    assert front["import_path"] == "serve_app.app:build_app"
    assert [ref.app_name for ref in refs] == [app["name"] for app in model_apps]
    for ref, application in zip(refs, model_apps, strict=True):
        assert application["import_path"] == "serve_app.app:build_model_app"
        assert application["route_prefix"] is None
        assert application["runtime_env"]["env_vars"] == SERVE_ENV
        model = ModelAppArgs.model_validate(application["args"])
        options = model.deployment
        replicas = options.autoscaling.max_replicas if options.autoscaling else options.num_replicas
        bounds = batcher_queue_bounds(model, replicas)
        held = options.batcher_replicas * (
            bounds["max_ongoing_requests"] + bounds["max_queued_requests"]
        )
        assert ref.admission_limit == held
