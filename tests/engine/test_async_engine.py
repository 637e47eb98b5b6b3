"""The asyncio facade on the demo model: streaming, per-step batch messages, cancellation.

The same facade over a fake decoder, with exact tokens, is in ``test_engine_fake_decoder.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from serve_app.engine import (
    AsyncLLMEngine,
    EngineConfig,
    FinishReason,
    GenerationRequest,
    InvalidRequestError,
    LLMEngine,
    SamplingParams,
    load_decoder,
)
from serve_app.text.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> Iterator[AsyncLLMEngine]:
    config = EngineConfig(model_path=model_dir, intra_op_num_threads=2)
    engine = AsyncLLMEngine(LLMEngine(config, load_decoder(config)))
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
        batch = engine.submit(requests)
        assert batch.rejected == {}
        return [[o.request_id for o in step] async for step in batch.outputs()]

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


def test_an_invalid_request_is_refused_and_the_rest_of_its_batch_runs(
    engine: AsyncLLMEngine,
) -> None:
    requests = [
        GenerationRequest("ok", [1, 2, 3], params(4)),
        GenerationRequest("bad", [], params(4)),
    ]

    async def submit() -> tuple[dict[str, object], list[str]]:
        batch = engine.submit(requests)
        finished = [o.request_id async for step in batch.outputs() for o in step if o.finished]
        return dict(batch.rejected), finished

    rejected, finished = asyncio.run(submit())
    assert list(rejected) == ["bad"]
    assert isinstance(rejected["bad"], InvalidRequestError)
    assert "empty" in str(rejected["bad"])
    assert finished == ["ok"]
    assert engine.num_waiting == 0
