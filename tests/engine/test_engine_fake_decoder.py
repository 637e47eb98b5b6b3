"""The engine's batching, admission, validation and cancellation over a fake decoder.

``FakeDecoder`` makes every step take microseconds and every token predictable
(``continuation``), so these tests check exact tokens, step by step, without a model file.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest

from serve_app.engine import (
    AsyncLLMEngine,
    EngineDeadError,
    EngineError,
    EngineOverloadedError,
    FinishReason,
    GenerationRequest,
    InvalidRequestError,
    LLMEngine,
    SamplingParams,
    SequenceOutput,
    StepStats,
)
from tests.engine.fake_decoder import (
    CONTEXT,
    MODEL_CONFIG,
    VOCAB,
    FakeDecoder,
    continuation,
    fake_engine,
)

Steps = list[list[SequenceOutput]]


def greedy(max_tokens: int, **kwargs: object) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, **kwargs)  # type: ignore[arg-type]


def run_to_completion(engine: LLMEngine) -> Steps:
    """Each step's outputs until the engine has nothing left to do."""
    steps = []
    while engine.has_work():
        steps.append(engine.step())
    return steps


def tokens(steps: Steps, request_id: str) -> list[int]:
    return [
        t for step in steps for o in step if o.request_id == request_id for t in o.new_token_ids
    ]


def final(steps: Steps, request_id: str) -> SequenceOutput:
    (output,) = [o for step in steps for o in step if o.request_id == request_id and o.finished]
    return output


def first_step(steps: Steps, request_id: str) -> int:
    return next(i for i, step in enumerate(steps) if any(o.request_id == request_id for o in step))


def last_step(steps: Steps, request_id: str) -> int:
    return max(i for i, step in enumerate(steps) if any(o.request_id == request_id for o in step))


# LLMEngine


def test_sequences_joining_and_leaving_mid_flight_keep_their_own_tokens() -> None:
    engine = fake_engine()
    requests = {
        "a": ([5, 6, 7], 12),
        "b": ([9], 3),
        "c": ([1, 2, 3, 4, 5, 6], 9),
        "d": ([20, 3], 1),
        "e": ([11, 11, 11, 11], 6),
    }
    arrivals = {0: ["a", "b"], 2: ["c"], 3: ["d"], 5: ["e"]}
    steps: Steps = []
    while len(steps) <= max(arrivals) or engine.has_work():
        for request_id in arrivals.get(len(steps), []):
            prompt, max_tokens = requests[request_id]
            engine.add_request(request_id, prompt, greedy(max_tokens, ignore_eos=True))
        steps.append(engine.step())
    for request_id, (prompt, max_tokens) in requests.items():
        assert tokens(steps, request_id) == continuation(prompt, max_tokens), request_id
        assert final(steps, request_id).finish_reason is FinishReason.LENGTH


def test_a_sequence_waits_until_the_batch_worst_case_fits_the_kv_budget() -> None:
    budget = 24
    engine = fake_engine(kv_cache_tokens=budget)
    engine.add_request("a", [1, 2], greedy(10, ignore_eos=True))  # up to 12 slots
    steps = [engine.step()]
    engine.add_request("large", [3, 4], greedy(18, ignore_eos=True))  # 2 x 20 > 24 beside a
    engine.add_request("small", [5, 6], greedy(2, ignore_eos=True))  # 2 x 12 would fit beside a
    while engine.has_work():
        steps.append(engine.step())
        assert (engine.cache.num_slots if engine.cache else 0) <= budget
        assert engine.kv_cache_usage <= 1.0
    assert first_step(steps, "large") >= last_step(steps, "a")
    assert first_step(steps, "small") >= last_step(steps, "large")  # FIFO: no overtaking
    assert tokens(steps, "large") == continuation([3, 4], 18)
    assert tokens(steps, "small") == continuation([5, 6], 2)


def test_max_num_seqs_bounds_the_running_batch() -> None:
    engine = fake_engine(max_num_seqs=2)
    for request_id, max_tokens in [("a", 3), ("b", 5), ("c", 5)]:
        engine.add_request(request_id, [1, 2], greedy(max_tokens, ignore_eos=True))
    steps = []
    while engine.has_work():
        steps.append(engine.step())
        assert engine.num_running <= 2
    assert {o.request_id for o in steps[0]} == {"a", "b"}
    assert first_step(steps, "c") == last_step(steps, "a")  # a's row is reused in its last step
    assert tokens(steps, "c") == continuation([1, 2], 5)


def test_one_step_prefills_at_most_max_prefill_tokens() -> None:
    decoder = FakeDecoder()
    engine = fake_engine(decoder, max_prefill_tokens=8)
    for request_id in "abc":
        engine.add_request(request_id, [1, 2, 3, 4], greedy(3, ignore_eos=True))
    steps = run_to_completion(engine)
    assert [o.request_id for o in steps[0]] == ["a", "b"]
    assert first_step(steps, "c") == 1
    assert decoder.forward_shapes[:3] == [(2, 4), (2, 1), (1, 4)]  # prefill, decode, prefill


def test_a_long_prompt_is_prefilled_in_chunks_between_decode_steps_within_the_kv_budget() -> None:
    decoder = FakeDecoder()
    engine = fake_engine(decoder, max_prefill_tokens=8, kv_cache_tokens=48)
    engine.add_request("a", [1, 2], greedy(10, ignore_eos=True))  # up to 12 slots
    steps = [engine.step()]
    long_prompt = list(range(3, 23))  # 20 tokens: chunks of 8, 8 and 4
    engine.add_request("long", long_prompt, greedy(4, ignore_eos=True))  # 2 x 24 = 48 fits
    engine.add_request("b", [5, 6], greedy(2, ignore_eos=True))  # 3 x 24 > 48: waits
    while engine.has_work():
        steps.append(engine.step())
        assert engine.kv_cache_usage <= 1.0
    prefill_a, *rest = decoder.forward_shapes
    assert prefill_a == (1, 2)
    assert rest[:6] == [(1, 1), (1, 8), (1, 1), (1, 8), (1, 1), (1, 4)]  # decode, then a chunk
    assert [len(step) for step in steps[1:4]] == [1, 1, 2], "a gets a token at every step"
    assert first_step(steps, "long") == 3
    assert first_step(steps, "b") == last_step(steps, "long")  # fits once long has left
    assert tokens(steps, "a") == continuation([1, 2], 10)
    assert tokens(steps, "long") == continuation(long_prompt, 4)
    assert tokens(steps, "b") == continuation([5, 6], 2)


def test_abort_mid_prefill_ends_the_sequence_and_frees_its_cache() -> None:
    engine = fake_engine(max_prefill_tokens=8)
    engine.add_request("long", list(range(1, 21)), greedy(4))
    assert engine.step() == []
    assert engine.num_running == 1 and engine.kv_cache_usage > 0
    engine.add_request("next", [1, 2], greedy(3, ignore_eos=True))
    engine.abort("long")
    steps = run_to_completion(engine)
    assert final(steps, "long").finish_reason is FinishReason.ABORT
    assert tokens(steps, "long") == []
    assert tokens(steps, "next") == continuation([1, 2], 3)
    assert engine.prefilling is None and engine.num_running == 0 and engine.kv_cache_usage == 0


def test_abort_of_a_waiting_request_ends_it_without_tokens() -> None:
    engine = fake_engine(max_num_seqs=1)
    engine.add_request("running", [1, 2], greedy(6, ignore_eos=True))
    engine.add_request("waiting", [3, 4], greedy(6, ignore_eos=True))
    steps = [engine.step()]
    assert (engine.num_running, engine.num_waiting) == (1, 1)
    engine.abort("waiting")
    steps += run_to_completion(engine)
    aborted = final(steps, "waiting")
    assert (aborted.finish_reason, aborted.new_token_ids) == (FinishReason.ABORT, ())
    assert tokens(steps, "waiting") == []
    assert tokens(steps, "running") == continuation([1, 2], 6)


def test_abort_of_a_running_request_frees_its_kv_rows_at_the_next_step() -> None:
    engine = fake_engine()
    for request_id, prompt in [("a", [1, 2, 3]), ("b", [7]), ("c", [4, 5])]:
        engine.add_request(request_id, prompt, greedy(20, ignore_eos=True))
    steps = [engine.step(), engine.step()]
    usage_with_three = engine.kv_cache_usage
    engine.abort("b")
    steps.append(engine.step())
    aborted = [o for o in steps[-1] if o.request_id == "b"]
    assert [(o.finish_reason, o.new_token_ids) for o in aborted] == [(FinishReason.ABORT, ())]
    assert engine.num_running == 2
    assert engine.cache is not None and engine.cache.batch_size == 2
    assert engine.kv_cache_usage < usage_with_three
    steps.append(engine.step())
    assert "b" not in {o.request_id for o in steps[-1]}
    assert tokens(steps, "a") == continuation([1, 2, 3], 4)  # the rows left kept their tokens
    assert tokens(steps, "c") == continuation([4, 5], 4)
    engine.abort("a")
    engine.abort("c")
    engine.step()
    assert (engine.num_running, engine.cache, engine.kv_cache_usage) == (0, None, 0.0)
    engine.abort("a")  # finished: nothing to do
    assert not engine.has_work()


def test_the_waiting_queue_is_bounded_beyond_the_batch_s_room() -> None:
    engine = fake_engine(max_num_seqs=2, max_waiting_seqs=2)
    # A burst before any step: the batch's room (2) and the waiting queue (2) take it.
    for request_id in "abcd":
        engine.add_request(request_id, [1], greedy(4))
    with pytest.raises(EngineOverloadedError, match="waiting queue is full"):
        engine.add_request("e", [1], greedy(4))
    engine.step()  # a and b join the batch; c and d still wait, the batch is full
    assert (engine.num_running, engine.num_waiting) == (2, 2)
    with pytest.raises(EngineOverloadedError, match="waiting queue is full"):
        engine.add_request("e", [1], greedy(4))
    run_to_completion(engine)
    engine.add_request("e", [1], greedy(4))
    assert engine.num_waiting == 1


def test_stop_token_ids_and_min_tokens() -> None:
    engine = fake_engine()
    prompt = [1, 2, 3]  # generates 4, 5, 6, 7, 8, ...
    engine.add_request("stop", prompt, greedy(10, stop_token_ids=(6,)))
    engine.add_request("banned", prompt, greedy(6, min_tokens=4, stop_token_ids=(6,)))
    engine.add_request("late", prompt, greedy(10, min_tokens=2, stop_token_ids=(8,)))
    steps = run_to_completion(engine)
    assert tokens(steps, "stop") == [4, 5, 6]
    assert final(steps, "stop").finish_reason is FinishReason.STOP
    assert tokens(steps, "banned") == [4, 5, 7, 7, 8, 9]  # 6 banned while under min_tokens
    assert final(steps, "banned").finish_reason is FinishReason.LENGTH
    assert tokens(steps, "late") == [4, 5, 6, 7, 8]
    assert final(steps, "late").finish_reason is FinishReason.STOP


def test_eos_stops_unless_ignored() -> None:
    engine = fake_engine()
    prompt = [28, 29, 30]  # generates 31, then 0: the end-of-sequence token
    engine.add_request("eos", prompt, greedy(4))
    engine.add_request("ignored", prompt, greedy(4, ignore_eos=True))
    steps = run_to_completion(engine)
    assert tokens(steps, "eos") == [31, 0]
    assert final(steps, "eos").finish_reason is FinishReason.STOP
    assert tokens(steps, "ignored") == [31, 0, 1, 2]
    assert final(steps, "ignored").finish_reason is FinishReason.LENGTH


def test_max_tokens_beyond_the_context_is_refused_unless_fit_to_context() -> None:
    engine = fake_engine()
    prompt = [i % VOCAB for i in range(CONTEXT - 4)]
    with pytest.raises(InvalidRequestError, match=r"max_tokens \(10\).*60 tokens.*64") as info:
        engine.add_request("refused", prompt, greedy(10, ignore_eos=True))
    assert info.value.param == "max_tokens"
    engine.add_request("exact", prompt, greedy(4, ignore_eos=True))
    engine.add_request("fitted", prompt, greedy(10, ignore_eos=True, fit_to_context=True))
    steps = run_to_completion(engine)
    for request_id in ("exact", "fitted"):
        assert tokens(steps, request_id) == continuation(prompt, 4)
        output = final(steps, request_id)
        assert output.finish_reason is FinishReason.LENGTH
        assert output.num_prompt_tokens + output.num_output_tokens == CONTEXT


def test_a_step_reports_aborts_then_the_running_batch_then_newcomers_in_arrival_order() -> None:
    engine = fake_engine()
    engine.add_request("a", [1], greedy(10, ignore_eos=True))
    engine.step()
    engine.add_request("b", [2], greedy(10, ignore_eos=True))
    engine.step()
    engine.add_request("d", [3], greedy(10, ignore_eos=True))
    engine.add_request("c", [4], greedy(10, ignore_eos=True))
    engine.abort("a")
    assert [o.request_id for o in engine.step()] == ["a", "b", "d", "c"]


@pytest.mark.parametrize(
    ("prompt", "params", "param", "message"),
    [
        ([], greedy(4), "prompt", "empty"),
        ([1] * CONTEXT, greedy(1, fit_to_context=True), "prompt", "context length is 64"),
        ([VOCAB], greedy(1), "prompt", r"\[0, 32\)"),
        ([-1], greedy(1), "prompt", r"\[0, 32\)"),
        ([1], greedy(1, stop_token_ids=(VOCAB,)), "stop_token_ids", r"\[0, 32\)"),
        ([1], greedy(1, stop_token_ids=(-1,)), "stop_token_ids", r"\[0, 32\)"),
        ([1] * 10, greedy(60), "max_tokens", "context length of 64"),
        ([1] * 10, greedy(40), "max_tokens", "KV-cache budget of 48"),
    ],
)
def test_requests_that_cannot_fit_are_refused_naming_the_parameter(
    prompt: list[int], params: SamplingParams, param: str, message: str
) -> None:
    engine = fake_engine(max_prefill_tokens=16, kv_cache_tokens=48)
    with pytest.raises(InvalidRequestError, match=message) as info:
        engine.add_request("bad", prompt, params)
    assert info.value.param == param
    assert not engine.has_work()


def test_a_request_id_in_use_is_refused() -> None:
    engine = fake_engine()
    engine.add_request("a", [1], greedy(2))
    with pytest.raises(InvalidRequestError, match="already in use") as info:
        engine.add_request("a", [1], greedy(2))
    assert info.value.param == "request_id"
    run_to_completion(engine)
    engine.add_request("a", [1], greedy(2))  # finished ids may be used again


# AsyncLLMEngine


@pytest.fixture
def async_engine() -> Iterator[AsyncLLMEngine]:
    engine = AsyncLLMEngine(fake_engine(max_waiting_seqs=2))
    yield engine
    engine.shutdown()


async def collect(
    engine: AsyncLLMEngine, requests: list[GenerationRequest]
) -> tuple[dict[str, EngineError], Steps]:
    batch = engine.submit(requests)
    return batch.rejected, [step async for step in batch.outputs()]


def test_submit_runs_what_it_accepts_and_reports_each_refusal(
    async_engine: AsyncLLMEngine,
) -> None:
    requests = [
        GenerationRequest("ok", [5, 6, 7], greedy(4, ignore_eos=True)),
        GenerationRequest("empty", [], greedy(4)),
        GenerationRequest("twin", [1], greedy(4)),
        GenerationRequest("also-ok", [9], greedy(3, ignore_eos=True)),
        GenerationRequest("twin", [2], greedy(4)),
    ]
    rejected, steps = asyncio.run(collect(async_engine, requests))
    assert {rid: (type(e), getattr(e, "param", None)) for rid, e in rejected.items()} == {
        "empty": (InvalidRequestError, "prompt"),
        "twin": (InvalidRequestError, "request_id"),
    }
    assert {o.request_id for step in steps for o in step} == {"ok", "also-ok"}
    assert tokens(steps, "ok") == continuation([5, 6, 7], 4)
    assert tokens(steps, "also-ok") == continuation([9], 3)
    assert len(steps) == 4  # one message per engine step for the whole batch


def test_submit_refuses_past_the_batch_s_room_and_the_waiting_queue() -> None:
    engine = AsyncLLMEngine(fake_engine(max_num_seqs=1, max_waiting_seqs=2))
    requests = [GenerationRequest(rid, [1, 2], greedy(3, ignore_eos=True)) for rid in "abcd"]
    try:
        rejected, steps = asyncio.run(collect(engine, requests))
    finally:
        engine.shutdown()
    assert list(rejected) == ["d"]
    assert isinstance(rejected["d"], EngineOverloadedError)
    assert {o.request_id for step in steps for o in step if o.finished} == {"a", "b", "c"}


def test_a_batch_with_nothing_accepted_ends_at_once(async_engine: AsyncLLMEngine) -> None:
    rejected, steps = asyncio.run(collect(async_engine, [GenerationRequest("x", [], greedy(2))]))
    assert list(rejected) == ["x"]
    assert steps == []


def test_generate_raises_the_refusal_of_its_request(async_engine: AsyncLLMEngine) -> None:
    async def generate() -> None:
        async for _ in async_engine.generate("x", [VOCAB], greedy(2)):
            pass

    with pytest.raises(InvalidRequestError) as info:
        asyncio.run(generate())
    assert info.value.param == "prompt"


def test_the_facade_describes_the_engine_without_reaching_through(
    async_engine: AsyncLLMEngine,
) -> None:
    assert async_engine.model_config == MODEL_CONFIG
    assert async_engine.backend == "fake (cpu)"
    assert (async_engine.num_running, async_engine.num_waiting) == (0, 0)
    assert async_engine.kv_cache_usage == 0.0


def test_closing_the_outputs_aborts_what_has_not_finished() -> None:
    gate = threading.Semaphore(0)  # each forward pass takes one permit
    idle = threading.Event()

    def on_step(stats: StepStats) -> None:
        if stats.num_running == stats.num_waiting == 0:
            idle.set()

    decoder = FakeDecoder(gate)
    engine = AsyncLLMEngine(fake_engine(decoder), on_step=on_step)

    async def read_one_step_then_close() -> tuple[Steps, dict[str, EngineError]]:
        batch = engine.submit(
            [
                GenerationRequest("a", [1, 2], greedy(40, ignore_eos=True)),
                GenerationRequest("b", [3], greedy(40, ignore_eos=True)),
            ]
        )
        outputs = batch.outputs()
        gate.release()  # the prefill
        first = await anext(outputs)
        again = engine.submit([GenerationRequest("a", [1], greedy(2))])  # "a" is still running
        await outputs.aclose()
        return [first], again.rejected

    try:
        steps, again = asyncio.run(read_one_step_then_close())
        assert isinstance(again["a"], InvalidRequestError) and again["a"].param == "request_id"
        gate.release(100)  # enough for every step, were the requests not aborted
        assert idle.wait(timeout=10)
        assert {o.request_id for o in steps[0]} == {"a", "b"}
        assert len(decoder.forward_shapes) <= 2  # the prefill, and a decode already under way
        assert (engine.num_running, engine.kv_cache_usage) == (0, 0.0)
    finally:
        gate.release(100)
        engine.shutdown()


def test_aborting_a_batch_that_is_never_read_frees_the_engine() -> None:
    gate = threading.Semaphore(0)
    idle = threading.Event()

    def on_step(stats: StepStats) -> None:
        if stats.num_running == stats.num_waiting == 0:
            idle.set()

    decoder = FakeDecoder(gate)
    engine = AsyncLLMEngine(fake_engine(decoder), on_step=on_step)

    async def submit_then_abort() -> None:
        batch = engine.submit([GenerationRequest("a", [1, 2], greedy(40, ignore_eos=True))])
        batch.abort()
        assert [step async for step in batch.outputs()] == []

    try:
        asyncio.run(submit_then_abort())
        gate.release(100)
        assert idle.wait(timeout=10)
        assert len(decoder.forward_shapes) <= 1  # at most the prefill, if it began first
    finally:
        gate.release(100)
        engine.shutdown()


def test_a_failing_decoder_kills_the_engine_and_its_streams() -> None:
    class LostDevice(FakeDecoder):
        def forward(self, *args: object, **kwargs: object) -> object:  # type: ignore[override]
            raise RuntimeError("device lost")

    engine = AsyncLLMEngine(fake_engine(LostDevice()))

    async def generate() -> None:
        async for _ in engine.generate("x", [1, 2, 3], greedy(4)):
            pass

    with pytest.raises(EngineDeadError, match="device lost"):
        asyncio.run(generate())
    with pytest.raises(EngineDeadError):
        engine.check_health()
    with pytest.raises(EngineDeadError):
        asyncio.run(generate())  # new work is refused at once, not left hanging
