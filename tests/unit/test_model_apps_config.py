"""One application per model: the ``model_apps`` form of ``AppArgs``, the ingress it builds
(handles to each model's own application, by name), and ``build_model_app``'s graph."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from serve_app.app import build_app, build_model_app
from serve_app.config import AppArgs, ModelAppArgs
from serve_app.model_catalog import ServedModel

pytestmark = pytest.mark.unit

REFS: list[dict[str, Any]] = [
    {"name": "demo", "app_name": "model-demo", "aliases": ["default"], "admission_limit": 64},
    {"name": "small", "app_name": "model-small", "tool_call_parser": "mistral"},
]


def test_the_ingress_reaches_each_model_in_its_own_application() -> None:
    served = build_app({"model_apps": REFS})._bound_deployment.init_args[0]

    def reached(model: ServedModel) -> list[str]:
        assert model.cache is not None
        ids = [h.deployment_id for h in (model.batcher, model.model, model.cache)]
        return [f"{i.app_name}/{i.name}" for i in ids]

    assert [reached(m) for m in served] == [
        ["model-demo/Batcher", "model-demo/LLMModel", "model-demo/ResponseCache"],
        ["model-small/Batcher", "model-small/LLMModel", "model-small/ResponseCache"],
    ]
    assert [(m.aliases, m.admission_limit, m.tool_call_parser) for m in served] == [
        (("default",), 64, None),
        ((), None, "mistral"),  # unset: no gate at the ingress, which knows no engine
    ]


def test_the_model_apps_form_lists_routes_and_no_entries_of_its_own() -> None:
    args = AppArgs.model_validate({"model_apps": REFS})

    assert [route.names() for route in args.model_routes()] == [["demo", "default"], ["small"]]
    assert args.model_entries() == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"model_apps": REFS, "models": [{"name": "x"}]}, "either 'models' or 'model_apps'"),
        ({"model_apps": REFS, "cache": {"ttl_s": 5}}, "cache: set these per entry"),
        ({"model_apps": REFS, "engine": {}}, "engine: set these per entry of 'model_apps'"),
        ({"model_apps": [REFS[0], {**REFS[1], "name": "default"}]}, "unique: default"),
        ({"model_apps": [REFS[0], {**REFS[1], "app_name": "model-demo"}]}, "own application"),
        ({"model_apps": [{"name": "demo"}]}, "app_name"),
        ({"model_apps": [{**REFS[0], "model_path": "/m"}]}, "Extra inputs are not permitted"),
    ],
)
def test_invalid_model_app_lists_are_refused(args: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        AppArgs.model_validate(args)


def test_a_model_application_is_its_batcher_model_and_cache_under_plain_names(
    model_dir: Path,
) -> None:
    args = {
        "model_path": str(model_dir),
        "model_version": "v1",
        "cache": {"enabled": False},
        "deployment": {"num_replicas": 2, "batcher_replicas": 3},
    }

    batcher = build_model_app(args)._bound_deployment
    model = batcher.init_args[0]._bound_deployment
    cache = model.init_args[1]._bound_deployment

    assert (batcher.name, model.name, cache.name) == ("Batcher", "LLMModel", "ResponseCache")
    assert (batcher.num_replicas, model.num_replicas) == (3, 2)
    assert model.user_config == {"model_path": str(model_dir), "model_version": "v1"}
    # Deployed even when disabled (its lookups miss), so that the ingress need not know.
    assert cache.user_config["enabled"] is False


def test_a_model_application_takes_no_routing_fields(model_dir: Path) -> None:
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        ModelAppArgs.model_validate({"model_path": str(model_dir), "aliases": ["x"]})


def test_a_redeploy_starts_the_new_ingress_before_the_old_one_stops() -> None:
    ingress = build_app({"model_apps": REFS})._bound_deployment

    assert ingress._deployment_config.max_surge_percent == 100
