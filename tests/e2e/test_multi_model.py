"""Two different models in one application: each answered by its name through the official
``openai`` SDK exactly as its engine alone answers, listed with its aliases, and removed or added
back by a redeploy while the other serves a steady load without one failed request."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
from ray import serve

from serve_app import DEMO_MODEL_DIR
from serve_app.app import compose
from serve_app.config import AppArgs
from serve_app.engine import EngineConfig, LLMEngine, SamplingParams, load_decoder
from serve_app.text.tokenizer import Tokenizer
from serve_app.tools.llama import DecoderConfig, LlamaDecoder, export_onnx
from tests.e2e.conftest import APP_NAME, ServeSession, wait_for_metric
from tests.e2e.test_reload_and_failure import SteadyLoad

pytestmark = pytest.mark.e2e

TINY = "tiny"
TINY_CONTEXT = 256  # the demo model's is 1024: /v1/models tells them apart
PROMPT = "The return statement"
MAX_TOKENS = 12
ENGINE = {"intra_op_num_threads": 1, "allow_spinning": False, "max_num_seqs": 8}
NO_CPUS = {"ray_actor_options": {"num_cpus": 0}}  # Ray's CPUs here are fewer than replicas
# A redeploy replaces every replica of the app; with two, one of each keeps serving meanwhile.
TWO_REPLICAS = {**NO_CPUS, "num_replicas": 2, "batcher_replicas": 2}


def build_tiny_model(out_dir: Path, seed: int = 1) -> Path:
    """A random-weight two-layer Llama, exported to ONNX, with the demo model's tokenizer."""
    torch.manual_seed(seed)
    config = DecoderConfig(
        vocab_size=Tokenizer(DEMO_MODEL_DIR).vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=TINY_CONTEXT,
    )
    model = LlamaDecoder(config)
    model.init_weights(std=0.02)
    export_onnx(model.eval(), config, out_dir, [0])
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(DEMO_MODEL_DIR / name, out_dir / name)
    return out_dir


def entry(name: str, path: Path, **fields: Any) -> dict[str, Any]:
    return {"name": name, "model_path": str(path), "engine": ENGINE, "deployment": NO_CPUS,
            **fields}  # fmt: skip


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def paths(model_dir: Path, tiny_dir: Path) -> dict[str, Path]:
    return {"demo": model_dir, TINY: tiny_dir}


def two_models(paths: dict[str, Path]) -> AppArgs:
    return AppArgs.model_validate(
        {
            "models": [
                entry("demo", paths["demo"], aliases=["demo-latest"]),
                entry(TINY, paths[TINY], owned_by="tests", deployment=TWO_REPLICAS),
            ]
        }
    )


@pytest.fixture(scope="module")
def base_url(serve_session: ServeSession, paths: dict[str, Path]) -> Iterator[str]:
    serve_session.deploy(two_models(paths), None)
    yield serve_session.base_url
    serve_session.discard()  # the last test leaves one model; the next module needs its own


@pytest.fixture(scope="module")
def client(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=60) as http:
        yield http


@pytest.fixture(scope="module")
def sdk(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)


def engine_alone(model_dir: Path, prompt: str, max_tokens: int) -> str:
    """Greedy text of ``prompt`` from the model's engine in this process, no Serve at all."""
    tokenizer = Tokenizer(model_dir)
    config = EngineConfig(model_path=model_dir, intra_op_num_threads=1)
    engine = LLMEngine(config, load_decoder(config))
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    engine.add_request("0", tokenizer.encode(prompt), params)
    tokens: list[int] = []
    while engine.has_work():
        for output in engine.step():
            tokens.extend(output.new_token_ids)
    return tokenizer.decode(tokens)


@pytest.mark.parametrize("name", ["demo", TINY])
def test_each_model_answers_by_name_as_its_engine_alone(
    sdk: openai.OpenAI, paths: dict[str, Path], name: str
) -> None:
    expected = engine_alone(paths[name], PROMPT, MAX_TOKENS)
    greedy: dict[str, Any] = {"temperature": 0, "extra_body": {"ignore_eos": True}}

    unary = sdk.completions.create(model=name, prompt=PROMPT, max_tokens=MAX_TOKENS, **greedy)
    # One token fewer: a stream of its own, not a replay of the answer just cached.
    stream = sdk.completions.create(
        model=name, prompt=PROMPT, max_tokens=MAX_TOKENS - 1, stream=True, **greedy
    )
    streamed = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)

    assert unary.model == name
    assert unary.choices[0].text == expected
    assert streamed == engine_alone(paths[name], PROMPT, MAX_TOKENS - 1)
    assert expected.startswith(streamed)


def test_the_two_models_answer_differently(sdk: openai.OpenAI) -> None:
    texts = {
        name: sdk.chat.completions.create(
            model=name, messages=[{"role": "user", "content": "Hi"}], max_tokens=8, temperature=0
        )
        .choices[0]
        .message.content
        for name in ("demo", TINY)
    }
    assert texts["demo"] != texts[TINY], texts


def test_models_lists_each_model_and_alias(sdk: openai.OpenAI) -> None:
    cards = {card.id: card.model_dump() for card in sdk.models.list()}

    assert list(cards) == ["demo", "demo-latest", TINY]
    assert cards["demo"]["max_model_len"] == 1024 and cards[TINY]["max_model_len"] == TINY_CONTEXT
    assert (cards["demo-latest"]["root"], cards["demo-latest"]["parent"]) == ("demo", "demo")
    assert (cards[TINY]["root"], cards[TINY]["parent"]) == (TINY, None)
    assert (cards["demo"]["owned_by"], cards[TINY]["owned_by"]) == ("serve_app", "tests")
    assert all(card["created"] > 0 for card in cards.values())


def test_an_alias_is_answered_by_its_model(sdk: openai.OpenAI) -> None:
    body: dict[str, Any] = {"prompt": PROMPT, "max_tokens": 6, "temperature": 0}
    by_alias = sdk.completions.create(model="demo-latest", **body)
    by_name = sdk.completions.create(model="demo", **body)
    assert by_alias.model == "demo-latest"
    assert by_alias.choices[0].text == by_name.choices[0].text


def test_native_api_and_tokenizer_route_by_model(client: httpx.Client) -> None:
    infer = {"prompt": PROMPT, "max_tokens": 6}
    default = client.post("/v1/infer", json=infer).json()
    tiny = client.post("/v1/infer", json={**infer, "model": TINY}).json()
    demo = client.post("/v1/infer", json={**infer, "model": "demo"}).json()
    assert demo["text"] == default["text"] != tiny["text"]

    assert client.get("/v1/model_info").json()["name"] == "demo"
    info = client.get("/v1/model_info", params={"model": TINY}).json()
    assert (info["name"], info["max_tokens"]) == (TINY, TINY_CONTEXT)
    tokenized = client.post("/tokenize", json={"model": TINY, "prompt": PROMPT}).json()
    assert tokenized["max_model_len"] == TINY_CONTEXT


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/v1/completions", {"model": "nope", "prompt": "x"}),
        ("POST", "/v1/chat/completions", {"model": "nope", "messages": [{"role": "user",
                                                                        "content": "x"}]}),
        ("POST", "/v1/infer", {"model": "nope", "prompt": "x"}),
        ("POST", "/tokenize", {"model": "nope", "prompt": "x"}),
        ("GET", "/v1/model_info?model=nope", None),
    ],
)  # fmt: skip
def test_an_unknown_model_is_a_404_naming_the_parameter(
    client: httpx.Client, method: str, path: str, body: dict[str, Any] | None
) -> None:
    response = client.request(method, path, json=body)
    assert response.status_code == 404
    error = response.json()["error"]
    assert (error["param"], error["code"]) == ("model", "model_not_found")
    assert "nope" in error["message"]


def test_request_metrics_are_labelled_by_model(client: httpx.Client) -> None:
    client.post("/v1/infer", json={"prompt": "Metrics", "max_tokens": 2, "model": TINY})
    assert wait_for_metric(client, "ray_serve_app_requests_total", 1, model=TINY) >= 1


class TinyLoad(SteadyLoad):
    """SteadyLoad's clients, every request naming the tiny model."""

    @staticmethod
    def _one_request(client: httpx.Client, index: int) -> int:
        body = {"model": TINY, "prompt": f"The {index} for", "max_tokens": 16, "temperature": 0.8}
        return client.post("/v1/infer", json=body).status_code


def wait_for_models(client: httpx.Client, wanted: list[str], timeout_s: float = 120) -> float:
    """Poll ``/v1/models`` until it lists ``wanted``; returns when it did."""
    deadline = time.monotonic() + timeout_s
    ids: list[str] = []
    while time.monotonic() < deadline:
        ids = [card["id"] for card in client.get("/v1/models").json()["data"]]
        if ids == wanted:
            return time.monotonic()
        time.sleep(0.2)
    raise AssertionError(f"/v1/models lists {ids}, not {wanted}")


def test_removing_and_adding_a_model_leaves_the_other_serving(
    client: httpx.Client, paths: dict[str, Path]
) -> None:
    tiny = entry(TINY, paths[TINY], deployment=TWO_REPLICAS)
    only_tiny = AppArgs.model_validate({"models": [tiny]})
    with TinyLoad(str(client.base_url)) as load:
        load.wait_for_more(3)
        removed = time.monotonic()
        serve.run(compose(only_tiny), name=APP_NAME, route_prefix="/", blocking=False)
        gone = wait_for_models(client, [TINY])
        load.wait_for_more(3)
        assert client.post("/v1/infer", json={"prompt": "x", "model": "demo"}).status_code == 404

        added = time.monotonic()
        serve.run(compose(two_models(paths)), name=APP_NAME, route_prefix="/", blocking=False)
        back = wait_for_models(client, ["demo", "demo-latest", TINY])
        load.wait_for_more(3)
    assert all(load.in_flight_at(moment) >= 1 for moment in (removed, gone, added, back))
    assert load.statuses == {200}, sorted(load.statuses)
    answer = client.post("/v1/infer", json={"prompt": PROMPT, "max_tokens": 4, "model": "demo"})
    assert answer.status_code == 200
