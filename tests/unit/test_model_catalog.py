"""Many models in one application: ``AppArgs.models`` parsing, the deployments each model gets,
and the catalog the ingress routes by (names, aliases, 404s, ``/v1/models`` cards)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from serve_app import model_catalog
from serve_app.api.errors import ApiError
from serve_app.app import compose
from serve_app.config import AppArgs
from serve_app.messages import ModelDescription
from serve_app.model_catalog import ModelCatalog, ServedModel
from tests.unit.fake_handles import LocalHandle
from tests.unit.fakes import HangingHandle

pytestmark = pytest.mark.unit


def two_models(**demo: Any) -> dict[str, Any]:
    return {
        "models": [
            {"name": "demo", "aliases": ["default"], **demo},
            {"name": "small", "model_version": "s1", "deployment": {"num_replicas": 2}},
        ]
    }


def test_the_single_model_form_is_one_entry_with_the_plain_deployment_names() -> None:
    args = AppArgs.model_validate({"model_name": "demo", "engine": {"max_num_seqs": 8}})

    (entry,) = args.model_entries()

    assert (entry.name, entry.engine.max_num_seqs) == ("demo", 8)
    assert args.deployment_name("LLMModel", entry) == "LLMModel"


def test_each_model_of_the_list_names_its_own_deployments() -> None:
    args = AppArgs.model_validate(two_models())

    names = [args.deployment_name("LLMModel", e) for e in args.model_entries()]

    assert names == ["LLMModel-demo", "LLMModel-small"]
    assert args.models[1].deployment.serve_options() == {"num_replicas": 2}


def test_autoscaling_and_resources_become_serve_options() -> None:
    deployment = {
        "autoscaling": {"min_replicas": 1, "max_replicas": 3},
        "ray_actor_options": {"num_gpus": 1},
    }
    entry = AppArgs.model_validate(two_models(deployment=deployment)).models[0]

    options = entry.deployment.serve_options()

    assert options["autoscaling_config"]["max_replicas"] == 3
    assert "num_replicas" not in options
    assert options["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 1.0, "resources": {}}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({**two_models(), "model_path": "/m"}, "model_path: set these per entry"),
        (two_models(aliases=["small"]), "unique: small"),
        (two_models(name="a b"), "pattern"),
        (two_models(deployment={"autoscaling": {"min_replicas": 3, "max_replicas": 2}}), "min_"),
        (two_models(replicas=2), "Extra inputs are not permitted"),
    ],
)
def test_invalid_model_lists_are_refused(args: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        AppArgs.model_validate(args)


def test_compose_binds_each_model_to_its_deployments(model_dir: Path) -> None:
    args = two_models(model_path=str(model_dir))
    args["models"][1]["model_path"] = str(model_dir)

    app = compose(AppArgs.model_validate(args))

    served = app._bound_deployment.init_args[0]
    assert [(m.name, m.aliases) for m in served] == [("demo", ("default",)), ("small", ())]
    assert [m.model._bound_deployment.name for m in served] == ["LLMModel-demo", "LLMModel-small"]
    assert [m.batcher._bound_deployment.name for m in served] == ["Batcher-demo", "Batcher-small"]
    assert served[1].model._bound_deployment.num_replicas == 2
    assert served[1].batcher._bound_deployment.num_replicas == 1  # batcher_replicas' default


class Described:
    def __init__(self, context_length: int) -> None:
        self.context_length = context_length

    def describe(self) -> ModelDescription:
        return ModelDescription("v", "llama", "cpu", 1, self.context_length, 1_700_000_000.5)


def catalog() -> ModelCatalog:
    def served(name: str, context: int, aliases: tuple[str, ...] = ()) -> ServedModel:
        handle: Any = LocalHandle(Described(context))
        return ServedModel(name, handle, handle, aliases=aliases)

    return ModelCatalog([served("demo", 1024, ("default",)), served("small", 256)], 16)


def test_the_catalog_finds_models_by_name_and_alias_and_defaults_to_the_first() -> None:
    models = catalog()

    assert models.get("default").name == "demo"
    assert models.get(None).name == "demo"
    assert models.service("small").model_name == "small"
    with pytest.raises(ApiError) as raised:
        models.get("gpt-4")
    assert (raised.value.status, raised.value.param, raised.value.code) == (
        404,
        "model",
        "model_not_found",
    )


def test_cards_list_models_then_their_aliases_with_root_and_parent() -> None:
    cards = asyncio.run(catalog().cards())

    assert [(c.id, c.root, c.parent, c.max_model_len) for c in cards] == [
        ("demo", "demo", None, 1024),
        ("default", "demo", "demo", 1024),
        ("small", "small", None, 256),
    ]
    assert {c.created for c in cards} == {1_700_000_000}


def test_a_model_that_does_not_answer_is_a_503_and_left_out_of_the_cards(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(model_catalog, "DESCRIBE_TIMEOUT_S", 0.05)
    answering: Any = LocalHandle(Described(1024))
    missing: Any = HangingHandle()  # its application is not running
    models = ModelCatalog(
        [ServedModel("demo", answering, answering), ServedModel("gone", missing, missing)], 16
    )

    assert [card.id for card in asyncio.run(models.cards())] == ["demo"]
    with pytest.raises(ApiError) as raised:
        asyncio.run(models.describe("gone"))
    assert (raised.value.status, raised.value.code) == (503, "model_unavailable")
