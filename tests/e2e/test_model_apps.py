"""One Serve application per model (``build_model_app``) behind one ingress application
(``build_app`` with ``model_apps``), deployed as ``serve deploy`` does: the whole multi-app config
each time. Models are removed, added back and swapped by editing that config while the other
model serves a steady load, streamed and not, without one failed request and without one of its
replicas restarting."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from ray import serve
from ray.serve._private.client import ServeControllerClient
from ray.serve.context import _get_global_client
from ray.serve.schema import ServeDeploySchema

from tests.e2e.conftest import ServeSession, wait_healthy
from tests.e2e.test_multi_model import ENGINE, NO_CPUS, TINY, build_tiny_model
from tests.e2e.test_reload_and_failure import SteadyLoad

pytestmark = pytest.mark.e2e

FRONT = "model-apps-front"  # none of these collide with the conftest's "llm" application
PREFIX = "/model-apps"
DEMO_APP, TINY_APP = "model-apps-demo", "model-apps-tiny"
DEMO_REF = {"name": "demo", "app_name": DEMO_APP, "aliases": ["demo-latest"]}
TINY_REF = {"name": TINY, "app_name": TINY_APP, "owned_by": "tests"}
ALL_MODELS = ["demo", "demo-latest", TINY]
DEADLINE_S = 60


def controller() -> ServeControllerClient:
    client = _get_global_client()
    assert client is not None
    return client


def model_app(path: Path, **args: Any) -> dict[str, Any]:
    return {"model_path": str(path), "engine": ENGINE, "deployment": NO_CPUS, **args}


def serve_deploy(models: list[tuple[dict[str, Any], dict[str, Any]]]) -> None:
    """Apply the config of an ingress application and one application per (ref, args), as
    ``serve deploy`` sends it: Serve redeploys only the applications whose entry changed."""
    front = {
        "name": FRONT,
        "route_prefix": PREFIX,
        "import_path": "serve_app.app:build_app",
        "args": {"model_apps": [ref for ref, _ in models]},
    }
    apps = [
        {"name": ref["app_name"], "route_prefix": None,
         "import_path": "serve_app.app:build_model_app", "args": args}
        for ref, args in models
    ]  # fmt: skip
    controller().deploy_apps(ServeDeploySchema.model_validate({"applications": [front, *apps]}))


def replica_ids(app: str) -> dict[str, set[str]]:
    """The running replicas of each deployment of ``app``, as the Serve controller lists them
    (``serve.status()`` counts replicas but does not name them)."""
    details = controller().get_serve_details()["applications"][app]["deployments"]
    return {
        name: {r["replica_id"] for r in deployment["replicas"] if r["state"] == "RUNNING"}
        for name, deployment in details.items()
    }


def wait_until(condition: Callable[[], bool], what: str) -> float:
    """Poll ``condition`` until it holds; returns when it did."""
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, f"not within {DEADLINE_S} s: {what}"
        time.sleep(0.2)
    return time.monotonic()


def sole_ingress() -> str:
    """The Ingress replica, once a roll-over has stopped the old one (the new one surges)."""
    ids: set[str] = set()

    def settled() -> bool:
        nonlocal ids
        # While the controller applies a new config it may list the app without deployments.
        ids = replica_ids(FRONT).get("Ingress", set())
        return len(ids) == 1

    wait_until(settled, "one Ingress replica")
    (replica,) = ids
    return replica


def models_listed(client: httpx.Client) -> list[str]:
    response = client.get("/v1/models")
    return [card["id"] for card in response.json()["data"]] if response.is_success else []


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def base_url(serve_session: ServeSession, model_dir: Path, tiny_dir: Path) -> Iterator[str]:
    serve_deploy([(DEMO_REF, model_app(model_dir)), (TINY_REF, model_app(tiny_dir))])
    url = f"{serve_session.base_url}{PREFIX}"
    try:
        wait_healthy(url)
        yield url
    finally:
        for app in (FRONT, DEMO_APP, TINY_APP):
            serve.delete(app)


@pytest.fixture(scope="module")
def client(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=60) as http:
        yield http


def infer(client: httpx.Client, model: str) -> httpx.Response:
    return client.post("/v1/infer", json={"prompt": "The return", "max_tokens": 4, "model": model})


def record(responses: list[httpx.Response], response: httpx.Response) -> httpx.Response:
    responses.append(response)
    return response


def model_info(client: httpx.Client, model: str) -> dict[str, Any]:
    response = client.get("/v1/model_info", params={"model": model})
    return dict(response.json()) if response.is_success else {}


def test_each_model_application_answers_through_the_one_ingress(client: httpx.Client) -> None:
    cards = {card["id"]: card for card in client.get("/v1/models").json()["data"]}
    demo, tiny = infer(client, "demo"), infer(client, TINY)

    assert list(cards) == ["demo", "demo-latest", TINY]
    assert (cards[TINY]["owned_by"], cards["demo-latest"]["parent"]) == ("tests", "demo")
    assert demo.status_code == tiny.status_code == 200
    assert demo.json()["text"] != tiny.json()["text"]
    assert model_info(client, TINY)["name"] == TINY


class DemoLoad(SteadyLoad):
    """SteadyLoad's clients, every request naming the demo model, half of them streamed."""

    @staticmethod
    def _one_request(client: httpx.Client, index: int) -> int:
        body = {"model": "demo", "prompt": f"The {index} for", "max_tokens": 24,
                "temperature": 0.8}  # fmt: skip
        if index % 2:
            with client.stream("POST", "/v1/stream_infer", json=body) as response:
                text = response.read().decode()
                ok = response.status_code == 200 and text.endswith("data: [DONE]\n\n")
                return 200 if ok else response.status_code or 599
        return client.post("/v1/infer", json=body).status_code


def test_removing_adding_and_swapping_a_model_leaves_the_other_untouched(
    client: httpx.Client, model_dir: Path, tiny_dir: Path
) -> None:
    demo = (DEMO_REF, model_app(model_dir))
    tiny = (TINY_REF, model_app(tiny_dir))
    demo_replicas, ingress = replica_ids(DEMO_APP), sole_ingress()
    with DemoLoad(str(client.base_url)) as load:
        load.wait_for_more(3)
        removed = time.monotonic()
        serve_deploy([demo])
        gone = wait_until(lambda: models_listed(client) == ALL_MODELS[:2], "tiny unlisted")
        wait_until(lambda: TINY_APP not in serve.status().applications, "tiny's app deleted")
        # Until the new ingress takes over, tiny is still routed, to an application gone.
        meanwhile: list[httpx.Response] = []
        wait_until(lambda: record(meanwhile, infer(client, TINY)).status_code == 404, "a 404")
        rolled_ingress = sole_ingress()

        added = time.monotonic()
        serve_deploy([demo, tiny])
        back = wait_until(lambda: infer(client, TINY).status_code == 200, "tiny answering")
        listed, ingress_before_swap = models_listed(client), sole_ingress()

        swapped = time.monotonic()
        serve_deploy([demo, (TINY_REF, model_app(tiny_dir, model_version="tiny-v2"))])
        wait_until(lambda: model_info(client, TINY).get("version") == "tiny-v2", "tiny swapped")
        load.wait_for_more(3)
        ingress_after_swap = sole_ingress()

    codes = {(r.status_code, r.json()["error"]["code"]) for r in meanwhile}  # the error shape
    assert codes <= {(404, "model_not_found"), (503, "model_unavailable")}, codes
    assert listed == ALL_MODELS
    assert all(load.in_flight_at(t) >= 1 for t in (removed, gone, added, back, swapped))
    assert load.statuses == {200}, sorted(load.statuses)
    # The ingress rolled over while demo's requests were in flight, and the swap of tiny left
    # it alone; demo's own replicas never restarted.
    assert rolled_ingress != ingress
    assert ingress_after_swap == ingress_before_swap
    assert replica_ids(DEMO_APP) == demo_replicas and all(demo_replicas.values())
