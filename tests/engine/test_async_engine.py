"""The asyncio facade: streaming, per-step batch messages, cancellation and engine death."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from serve_app.engine import (
    AsyncLLMEngine,
    EngineConfig,
    EngineDeadError,
    FinishReason,
    GenerationRequest,
    InvalidRequestError,
    SamplingParams,
)
from serve_app.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> Iterator[AsyncLLMEngine]:
    engine = AsyncLLMEngine(EngineConfig(model_path=model_dir, intra_op_num_threads=2))
    yield engine
    engine.shutdown()


def params(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


def test_generate_streams_every_token_then_finishes(
    engine: AsyncLLMEngine, tokenizer: Tokenizer
) -> None:
    async def collect() -> list[tuple[tuple[int, ...], FinishReason | None]]:
        prompt = tokenizer.encode("The for statement")
        return [
            (o.new_token_ids, o.finish_reason)
            async for o in engine.generate("a", prompt, params(9))
        ]

    outputs = asyncio.run(collect())
    assert len(outputs) == 9
    assert all(len(tokens) == 1 for tokens, _ in outputs)
    assert [reason for _, reason in outputs] == [None] * 8 + [FinishReason.LENGTH]


def test_a_batch_stream_gets_one_message_per_step(
    engine: AsyncLLMEngine, tokenizer: Tokenizer
) -> None:
    requests = [
        GenerationRequest(str(i), tokenizer.encode(text), params(n))
        for i, (text, n) in enumerate([("import", 5), ("The class", 8), ("Return a new", 3)])
    ]

    async def collect() -> list[list[str]]:
        return [[o.request_id for o in step] async for step in engine.generate_batch(requests)]

    steps = asyncio.run(collect())
    assert len(steps) == 8  # the longest request decides how many steps there are
    assert sorted(steps[0]) == ["0", "1", "2"]  # all three were prefilled in one step
    counts = {rid: sum(rid in step for step in steps) for rid in ("0", "1", "2")}
    assert counts == {"0": 5, "1": 8, "2": 3}


def test_closing_a_stream_aborts_its_sequence(engine: AsyncLLMEngine, tokenizer: Tokenizer) -> None:
    async def consume_two_then_leave() -> None:
        stream = engine.generate("leaver", tokenizer.encode("while"), params(500))
        received = 0
        async for _ in stream:
            received += 1
            if received == 2:
                break
        await stream.aclose()

    asyncio.run(consume_two_then_leave())

    async def wait_until_idle() -> None:
        for _ in range(200):
            if engine.num_running == 0 and engine.num_waiting == 0:
                return
            await asyncio.sleep(0.01)

    asyncio.run(wait_until_idle())
    assert engine.num_running == 0


def test_invalid_requests_raise_before_anything_runs(engine: AsyncLLMEngine) -> None:
    async def submit() -> None:
        requests = [
            GenerationRequest("ok", [1, 2, 3], params(4)),
            GenerationRequest("bad", [], params(4)),
        ]
        async for _ in engine.generate_batch(requests):
            pass

    with pytest.raises(InvalidRequestError, match="empty"):
        asyncio.run(submit())
    assert engine.num_waiting == 0


def test_a_dead_engine_fails_streams_and_health(model_dir: Path) -> None:
    engine = AsyncLLMEngine(EngineConfig(model_path=model_dir))

    def broken_step() -> list[object]:
        raise RuntimeError("device lost")

    engine.engine.step = broken_step  # type: ignore[assignment,method-assign]

    async def generate() -> None:
        async for _ in engine.generate("x", [1, 2, 3], params(4)):
            pass

    with pytest.raises(EngineDeadError, match="device lost"):
        asyncio.run(generate())
    with pytest.raises(EngineDeadError):
        engine.check_health()
