"""Variants of a model, in process: how a request's ``model`` names one, how the catalog routes
and lists them, which folders of a variants directory serve, and how an unloaded variant's
engine is retired on the replica's loop. The e2e proof is tests/e2e/test_variants.py."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from serve_app.api.errors import ApiError
from serve_app.config import ModelSource, VariantsConfig, split_variant
from serve_app.messages import ModelDescription, RequestError
from serve_app.model_catalog import ModelCatalog, ServedModel
from serve_app.model_variants import (
    LoadedVariant,
    VariantDirectory,
    VariantNotFound,
    VariantNotLoadable,
)
from serve_app.model_versions import LoadedModel
from tests.unit.fake_handles import LocalHandle

pytestmark = pytest.mark.unit

BASE = ModelDescription("v", "llama", "cpu", 1, 1024, 1_700_000_000.5, {"ft-a": 1_750_000_000.7})


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("demo:ft-a", ("demo", "ft-a")),
        ("org:alias:ft.b_2", ("org:alias", "ft.b_2")),  # an alias may hold the separator
        ("demo", None),
        ("demo:", None),
        (":ft-a", None),
        ("demo:..", None),
        ("demo:a/b", None),
        ("demo:.hidden", None),
    ],
)
def test_a_variant_is_named_model_colon_folder(name: str, expected: Any) -> None:
    assert split_variant(name) == expected


class Model:
    """What the catalog calls on a model deployment: its description, and a variant's."""

    def describe(self) -> ModelDescription:
        return BASE

    def describe_variant(self, variant: str) -> ModelDescription | RequestError:
        if variant == "ft-a":
            return ModelDescription(f"{variant}-1234", "llama", "cpu", 1, 1024, 1.0)
        return RequestError(404, f"no variant '{variant}'", param="model", code="model_not_found")


def catalog() -> ModelCatalog:
    handle: Any = LocalHandle(Model())
    return ModelCatalog([ServedModel("demo", handle, handle, aliases=("latest",))], 16)


def test_the_catalog_routes_a_variant_to_its_model_under_the_models_own_name() -> None:
    models = catalog()

    assert models.get("demo:ft-a").name == "demo"
    assert models.served_name("latest:ft-a") == "demo:ft-a"  # an alias's variant too
    assert models.served_name("latest") == "demo"
    assert models.service("demo").variant_of("demo:ft-a") == "ft-a"
    assert models.service("demo").variant_of("latest") is None
    for name in ("other:ft-a", "demo:../x"):
        with pytest.raises(ApiError) as raised:
            models.served_name(name)
        assert (raised.value.status, raised.value.code) == (404, "model_not_found")


def test_cards_list_each_variant_with_its_model_as_parent() -> None:
    cards = asyncio.run(catalog().cards())

    assert [(c.id, c.root, c.parent, c.created) for c in cards] == [
        ("demo", "demo", None, 1_700_000_000),
        ("latest", "demo", "demo", 1_700_000_000),
        ("demo:ft-a", "demo:ft-a", "demo", 1_750_000_000),
    ]


def test_a_variant_is_described_by_its_replica_or_refused_with_its_error() -> None:
    models = catalog()

    assert asyncio.run(models.describe("demo:ft-a")).version == "ft-a-1234"
    with pytest.raises(ApiError) as raised:
        asyncio.run(models.describe("demo:gone"))
    assert (raised.value.status, raised.value.param) == (404, "model")


@pytest.fixture
def directory(tmp_path: Path, model_dir: Path) -> VariantDirectory:
    """A variants directory: one variant, one folder with another tokenizer, one not a model."""
    root = tmp_path / "variants"
    for name in ("ft-a", "odd"):
        (root / name).mkdir(parents=True)
        (root / name / "config.json").write_text("{}")
    shutil.copyfile(model_dir / "tokenizer.json", root / "ft-a" / "tokenizer.json")
    (root / "odd" / "tokenizer.json").write_text("{}")
    (root / "notes").mkdir()
    return VariantDirectory(VariantsConfig(directory=root), model_dir)


def test_the_directory_lists_model_folders_and_serves_those_with_the_models_tokenizer(
    directory: VariantDirectory,
) -> None:
    assert list(directory.listed()) == ["ft-a", "odd"]
    source = directory.source("ft-a")
    assert source.model_path == directory.config.directory / "ft-a"
    assert source.model_version.startswith("ft-a-")
    with pytest.raises(VariantNotLoadable, match="tokenizer"):
        directory.source("odd")
    for missing in ("notes", "absent"):
        with pytest.raises(VariantNotFound):
            directory.source(missing)


def test_a_missing_directory_lists_no_variants(tmp_path: Path, model_dir: Path) -> None:
    config = VariantsConfig(directory=tmp_path / "not-yet")
    assert VariantDirectory(config, model_dir).listed() == {}


def test_an_unloaded_variant_is_retired_on_the_loop_once() -> None:
    engine = SimpleNamespace(shutdown=lambda: None)
    source = ModelSource(model_path=Path("/m"), model_version="ft-a-1")
    model = LoadedModel(source, engine, 1, 0.0)  # type: ignore[arg-type]
    unloaded: list[LoadedModel] = []

    async def unload_from_a_worker_thread() -> None:
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def on_unload(unloaded_model: LoadedModel) -> None:
            assert asyncio.get_running_loop() is loop
            unloaded.append(unloaded_model)
            done.set_result(None)

        variant = LoadedVariant(model, loop, on_unload)
        await asyncio.to_thread(variant.__del__)  # as Serve's LRU does
        variant.__del__()  # then the garbage collector
        await asyncio.wait_for(done, 5)

    asyncio.run(unload_from_a_worker_thread())

    assert unloaded == [model]
