"""GPU backends generate what the CPU generates, and keep the KV cache on the GPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from serve_app.engine import (
    EngineConfig,
    ExecutionProvider,
    LLMEngine,
    SamplingParams,
    load_decoder,
)
from serve_app.engine.backends.tensorrt_build import deployment_profiles, ensure_engine, read_model
from serve_app.text.tokenizer import Tokenizer

PROMPTS = [
    "The return statement",
    "A list is a mutable sequence type that",
    "def",
]
NEW_TOKENS = 12
LIMITS = {"max_num_seqs": 4, "max_prefill_tokens": 256}  # small profiles build quickly
# Each GPU backend and the fixture (tests/gpu/conftest.py) that skips it where it cannot run.
BACKENDS = {
    "onnxruntime-cuda": "requires_cuda",
    "onnxruntime-tensorrt": "requires_tensorrt_provider",
    "tensorrt": "requires_tensorrt",
}


def backend_config(backend: str, model_dir: Path, cache_dir: Path) -> EngineConfig:
    """The engine config that runs the demo model on ``backend``."""
    if backend == "onnxruntime-tensorrt":
        providers = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
        return EngineConfig(
            model_path=model_dir,
            device="cuda",
            execution_providers=[ExecutionProvider(name=name) for name in providers],
            tensorrt_cache_dir=cache_dir,
            **LIMITS,
        )
    native = backend == "tensorrt"
    return EngineConfig(
        model_path=model_dir,
        device="cuda",
        backend="tensorrt" if native else "onnxruntime",
        tensorrt_cache_dir=cache_dir,
        **LIMITS,
    )


def greedy_batch(engine: LLMEngine, prompts: list[list[int]]) -> list[list[int]]:
    """Greedy continuations of ``prompts``, decoded together in one batch."""
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    for index, prompt in enumerate(prompts):
        engine.add_request(str(index), prompt, params)
    tokens: dict[str, list[int]] = {str(index): [] for index in range(len(prompts))}
    while engine.has_work():
        for output in engine.step():
            tokens[output.request_id].extend(output.new_token_ids)
    return [tokens[str(index)] for index in range(len(prompts))]


@pytest.fixture(scope="module")
def prompts(tokenizer: Tokenizer) -> list[list[int]]:
    return [tokenizer.encode(text) for text in PROMPTS]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tensorrt-cache")


@pytest.fixture(scope="module")
def cpu_tokens(model_dir: Path, prompts: list[list[int]]) -> list[list[int]]:
    config = EngineConfig(model_path=model_dir, device="cpu", intra_op_num_threads=2, **LIMITS)
    return greedy_batch(LLMEngine(config, load_decoder(config)), prompts)


@pytest.fixture(params=list(BACKENDS))
def gpu_engine(request: pytest.FixtureRequest, model_dir: Path, cache_dir: Path) -> LLMEngine:
    request.getfixturevalue(BACKENDS[request.param])
    config = backend_config(request.param, model_dir, cache_dir)
    return LLMEngine(config, load_decoder(config))


def test_gpu_greedy_output_equals_cpu_fp32(
    gpu_engine: LLMEngine, prompts: list[list[int]], cpu_tokens: list[list[int]]
) -> None:
    assert greedy_batch(gpu_engine, prompts) == cpu_tokens


def test_kv_cache_stays_on_the_gpu(gpu_engine: LLMEngine, prompts: list[list[int]]) -> None:
    for index, prompt in enumerate(prompts[:2]):
        gpu_engine.add_request(str(index), prompt, SamplingParams(temperature=0, max_tokens=8))
    for _ in range(3):
        gpu_engine.step()
    assert gpu_engine.cache is not None
    assert {value.device_name() for value in gpu_engine.cache.values} == {"cuda"}


@pytest.mark.usefixtures("requires_tensorrt")
def test_native_engine_is_built_once_and_described(model_dir: Path, cache_dir: Path) -> None:
    config = backend_config("tensorrt", model_dir, cache_dir)
    model, model_io = read_model(config)
    profiles = deployment_profiles(config, model, model_io)
    path = ensure_engine(config, profiles, show_progress=False)
    built_at = path.stat().st_mtime_ns
    assert ensure_engine(config, profiles, show_progress=False) == path
    assert path.stat().st_mtime_ns == built_at
    description = json.loads(path.with_suffix(".json").read_text())
    assert [p["name"] for p in description["profiles"]] == ["prefill", "decode"]
    assert load_decoder(config).describe().startswith("tensorrt ")
