"""A fused-attention folder (onnxruntime-genai's builder) served through Ray Serve by the same
``model_path`` setting as an Optimum export: concurrent streams through the official ``openai``
SDK, each exactly as the engine alone answers it, the KV rows in place on the replica."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from serve_app.config import AppArgs
from serve_app.engine import EngineConfig, LLMEngine, SamplingParams, load_decoder
from serve_app.text.tokenizer import Tokenizer
from serve_app.tools.export import export_checkpoint
from tests.e2e.conftest import ServeSession, app_args
from tests.tools.test_export_quantize import save_checkpoint

pytestmark = pytest.mark.e2e

ROWS = 4
CONTEXT = 256  # the tiny checkpoint's
ENGINE = {
    "intra_op_num_threads": 1,
    "allow_spinning": False,
    "max_num_seqs": ROWS,
    "kv_cache_tokens": ROWS * CONTEXT,
}
PROMPTS = [f"Request {i}: the return statement" + " and" * i for i in range(10)]


@pytest.fixture(scope="module")
def gqa_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    checkpoint = save_checkpoint("llama", tmp_path_factory.mktemp("llama-hf"))
    out_dir = tmp_path_factory.mktemp("llama-gqa")
    export_checkpoint(checkpoint, out_dir, layout="gqa")
    return out_dir


@pytest.fixture(scope="module")
def base_url(serve_session: ServeSession, gqa_dir: Path) -> Iterator[str]:
    serve_session.deploy(AppArgs.model_validate(app_args(gqa_dir, engine=ENGINE)), None)
    yield serve_session.base_url
    serve_session.discard()  # the next module needs the demo model


def engine_alone(model_dir: Path, prompt: str, max_tokens: int) -> str:
    """Greedy text of ``prompt`` from the engine in this process, no Serve at all."""
    tokenizer = Tokenizer(model_dir)
    config = EngineConfig(model_path=model_dir, **ENGINE)
    engine = LLMEngine(config, load_decoder(config))
    engine.add_request(
        "0",
        tokenizer.encode(prompt),
        SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
    )
    tokens: list[int] = []
    while engine.has_work():
        for output in engine.step():
            tokens.extend(output.new_token_ids)
    return tokenizer.decode(tokens)


def test_concurrent_streams_match_the_engine_alone(base_url: str, gqa_dir: Path) -> None:
    sdk = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)

    def stream(index: int) -> str:
        chunks = sdk.completions.create(
            model="demo",
            prompt=PROMPTS[index],
            max_tokens=8 + 2 * index,  # leaving at different steps, rows reused
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        return "".join(chunk.choices[0].text for chunk in chunks if chunk.choices)

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        served = list(pool.map(stream, range(len(PROMPTS))))
    expected = [engine_alone(gqa_dir, p, 8 + 2 * i) for i, p in enumerate(PROMPTS)]
    assert served == expected
    with httpx.Client(base_url=base_url, timeout=30) as client:
        info = client.get("/v1/model_info").json()
    assert "GroupQueryAttention" in info["backend"] and info["context_length"] == CONTEXT
