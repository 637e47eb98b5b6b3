"""Every shipped deployment profile is valid for the app's strict arguments."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from serve_app.app import SERVE_ENV, batcher_queue_bounds
from serve_app.config import AppArgs

ROOT = Path(__file__).resolve().parents[2]
PROFILES = ["serve_config.yaml", *sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))]


def serve_config(name: str) -> dict[str, Any]:
    # k8s/overlays embed copies of configs/ (checked equal in test_k8s_manifests.py)
    text = (ROOT / name if name == "serve_config.yaml" else ROOT / "configs" / name).read_text()
    config: dict[str, Any] = yaml.safe_load(text)
    return config


@pytest.mark.parametrize("name", PROFILES)
def test_profile_arguments_validate(name: str) -> None:
    (application,) = serve_config(name)["applications"]
    args = AppArgs.model_validate(application["args"])
    assert application["import_path"] == "serve_app.app:build_app"
    assert application["runtime_env"]["env_vars"] == SERVE_ENV
    if "gpu" in name:
        assert args.engine.device == "cuda"
        model = next(d for d in application["deployments"] if d["name"] == "LLMModel")
        assert model["ray_actor_options"]["num_gpus"] == 1  # one model replica per GPU


@pytest.mark.parametrize("name", PROFILES)
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
