"""The continuous-batching engine on the demo model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from serve_app.engine import (
    EngineConfig,
    FinishReason,
    InvalidRequestError,
    LLMEngine,
    SamplingParams,
    SequenceOutput,
)
from serve_app.engine.backends.onnxruntime_decoder import OnnxDecoder
from serve_app.text.tokenizer import Tokenizer

PROMPTS = [
    "The return statement",
    "A list is a mutable sequence type that",
    "def",
    "Raise an exception when the given key is not found in the mapping, and",
    "The with statement is used to wrap the execution of a block with methods defined by",
    "Return the",
]


@pytest.fixture(scope="module")
def decoder(model_dir: Path) -> OnnxDecoder:
    return OnnxDecoder(EngineConfig(model_path=model_dir, intra_op_num_threads=2))


@pytest.fixture(scope="module")
def engine(model_dir: Path, decoder: OnnxDecoder) -> LLMEngine:
    return LLMEngine(EngineConfig(model_path=model_dir), decoder)


def engine_with(model_dir: Path, decoder: OnnxDecoder, **limits: int) -> LLMEngine:
    """A fresh engine with its own limits over the module's loaded model."""
    return LLMEngine(EngineConfig(model_path=model_dir, **limits), decoder)


def greedy(max_tokens: int, **kwargs: object) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, **kwargs)  # type: ignore[arg-type]


def run_to_completion(engine: LLMEngine) -> dict[str, list[SequenceOutput]]:
    outputs: dict[str, list[SequenceOutput]] = {}
    while engine.has_work():
        for output in engine.step():
            outputs.setdefault(output.request_id, []).append(output)
    return outputs


def tokens_of(outputs: list[SequenceOutput]) -> list[int]:
    return [token for output in outputs for token in output.new_token_ids]


def generate_alone(engine: LLMEngine, prompt: list[int], params: SamplingParams) -> list[int]:
    engine.add_request("alone", prompt, params)
    return tokens_of(run_to_completion(engine)["alone"])


def test_continuous_batching_equals_each_sequence_alone(
    engine: LLMEngine, tokenizer: Tokenizer
) -> None:
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    lengths = [40, 7, 33, 1, 20, 12]  # some leave early, one after its first token
    params = [greedy(n, ignore_eos=True) for n in lengths]
    expected = [generate_alone(engine, p, sp) for p, sp in zip(prompts, params, strict=True)]

    # Two join at once, the rest arrive one by one while the batch is mid-flight.
    arrivals = {0: [0, 1], 3: [2], 5: [3], 8: [4], 15: [5]}
    outputs: dict[str, list[SequenceOutput]] = {}
    step = 0
    while step <= max(arrivals) or engine.has_work():
        for index in arrivals.get(step, []):
            engine.add_request(str(index), prompts[index], params[index])
        for output in engine.step():
            outputs.setdefault(output.request_id, []).append(output)
        step += 1

    for index, tokens in enumerate(expected):
        assert tokens_of(outputs[str(index)]) == tokens, f"sequence {index} diverged"
        assert len(tokens) == lengths[index]
        assert outputs[str(index)][-1].finish_reason is FinishReason.LENGTH


def test_batched_output_with_natural_stops_equals_alone(
    engine: LLMEngine, tokenizer: Tokenizer
) -> None:
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    expected = [generate_alone(engine, p, greedy(64)) for p in prompts]
    for index, prompt in enumerate(prompts):
        engine.add_request(str(index), prompt, greedy(64))
    outputs = run_to_completion(engine)
    assert [tokens_of(outputs[str(i)]) for i in range(len(prompts))] == expected


def test_kv_cache_path_equals_full_recompute(decoder: OnnxDecoder, tokenizer: Tokenizer) -> None:
    tokens = tokenizer.encode(PROMPTS[4])
    prompt_len = 5
    ids = np.array([tokens[:prompt_len]], dtype=np.int64)
    mask = np.ones_like(ids)
    cached = decoder.forward(ids, mask, np.arange(prompt_len)[None], decoder.ops.empty(1))
    for position in range(prompt_len, len(tokens)):
        full_ids = np.array([tokens[: position + 1]], dtype=np.int64)
        full = decoder.forward(
            full_ids, np.ones_like(full_ids), np.arange(position + 1)[None], decoder.ops.empty(1)
        )
        mask = np.ones((1, position + 1), dtype=np.int64)
        cached = decoder.forward(full_ids[:, -1:], mask, np.array([[position]]), cached.present)
        np.testing.assert_allclose(cached.logits, full.logits, atol=1e-3, rtol=1e-3)


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(
    engine: LLMEngine, tokenizer: Tokenizer
) -> None:
    prompt = tokenizer.encode(PROMPTS[1])
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_tokens=24, ignore_eos=True)
    alone = generate_alone(engine, prompt, params)
    assert generate_alone(engine, prompt, params) == alone

    for index, text in enumerate(PROMPTS):
        noise = SamplingParams(temperature=0.9, seed=index, max_tokens=10 + index)
        engine.add_request(f"other-{index}", tokenizer.encode(text), noise)
    engine.step()
    engine.add_request("seeded", prompt, params)
    in_batch = tokens_of(run_to_completion(engine)["seeded"])
    assert in_batch == alone

    other_seed = SamplingParams(
        temperature=1.0, top_p=0.95, seed=99, max_tokens=24, ignore_eos=True
    )
    assert generate_alone(engine, prompt, other_seed) != alone


def test_near_zero_temperature_equals_greedy(engine: LLMEngine, tokenizer: Tokenizer) -> None:
    prompt = tokenizer.encode(PROMPTS[3])
    expected = generate_alone(engine, prompt, greedy(30, ignore_eos=True))
    cold = SamplingParams(temperature=1e-5, seed=7, max_tokens=30, ignore_eos=True)
    assert generate_alone(engine, prompt, cold) == expected


def test_top_k_and_top_p_never_emit_excluded_tokens(
    engine: LLMEngine, tokenizer: Tokenizer
) -> None:
    prompt = tokenizer.encode(PROMPTS[0])
    for seed in range(4):
        engine.add_request(
            f"k{seed}", prompt, SamplingParams(top_k=3, logprobs=3, seed=seed, max_tokens=30)
        )
        engine.add_request(
            f"p{seed}", prompt, SamplingParams(top_p=0.5, logprobs=20, seed=seed, max_tokens=30)
        )
    outputs = run_to_completion(engine)
    for request_id, stream in outputs.items():
        for output in stream:
            assert output.logprobs is not None
            (record,) = output.logprobs
            ranked = [token for token, _ in record.top]
            if request_id.startswith("k"):
                assert record.token_id in ranked
            else:
                # Everything ranked above the chosen token must leave room in the nucleus;
                # when the token is outside the top 20, their mass is a lower bound of that.
                above = ranked.index(record.token_id) if record.token_id in ranked else None
                mass_above = sum(np.exp(lp) for _, lp in record.top[:above])
                assert mass_above < 0.5 + 1e-4


def test_abort_frees_the_slot_at_the_next_step(engine: LLMEngine, tokenizer: Tokenizer) -> None:
    for index, text in enumerate(PROMPTS[:3]):
        engine.add_request(str(index), tokenizer.encode(text), greedy(50, ignore_eos=True))
    engine.step()
    engine.step()
    assert engine.num_running == 3
    engine.abort("1")
    outputs = engine.step()
    aborted = [o for o in outputs if o.request_id == "1"]
    assert len(aborted) == 1
    assert aborted[0].finish_reason is FinishReason.ABORT
    assert aborted[0].new_token_ids == ()
    assert engine.num_running == 2
    assert engine.cache is not None and engine.cache.batch_size == 2
    assert not any(o.request_id == "1" for o in engine.step())
    engine.abort("0")
    engine.abort("2")
    engine.step()
    assert engine.num_running == 0
    assert engine.cache is None
    assert not engine.has_work()


def test_abort_of_a_waiting_request_leaves_the_queue(
    model_dir: Path, decoder: OnnxDecoder, tokenizer: Tokenizer
) -> None:
    engine = engine_with(model_dir, decoder, max_num_seqs=1)
    engine.add_request("running", tokenizer.encode(PROMPTS[0]), greedy(20, ignore_eos=True))
    engine.add_request("waiting", tokenizer.encode(PROMPTS[1]), greedy(20, ignore_eos=True))
    engine.step()
    assert (engine.num_running, engine.num_waiting) == (1, 1)
    engine.abort("waiting")
    outputs = engine.step()
    assert [o.finish_reason for o in outputs if o.request_id == "waiting"] == [FinishReason.ABORT]
    assert engine.num_waiting == 0


def test_queue_drains_within_the_kv_budget(
    model_dir: Path, decoder: OnnxDecoder, tokenizer: Tokenizer
) -> None:
    budget = 160
    engine = engine_with(model_dir, decoder, max_num_seqs=4, kv_cache_tokens=budget)
    for index in range(12):
        prompt = tokenizer.encode(PROMPTS[index % len(PROMPTS)])
        engine.add_request(str(index), prompt, greedy(10 + 3 * index, ignore_eos=True))
    assert engine.num_waiting == 12
    finished: set[str] = set()
    peak_running = 0
    while engine.has_work():
        for output in engine.step():
            if output.finished:
                finished.add(output.request_id)
        slots = engine.cache.num_slots if engine.cache else 0
        assert slots <= budget
        assert engine.kv_cache_usage <= 1.0
        assert engine.num_running <= 4
        peak_running = max(peak_running, engine.num_running)
    assert finished == {str(i) for i in range(12)}
    assert peak_running > 1  # the budget still lets sequences share the batch
    assert engine.num_waiting == 0


def test_finish_reasons_and_token_limits(engine: LLMEngine, tokenizer: Tokenizer) -> None:
    prompt = tokenizer.encode(PROMPTS[2])
    free_run = generate_alone(engine, prompt, greedy(12, ignore_eos=True))
    stop_at = free_run[4]
    engine.add_request("stop", prompt, greedy(12, ignore_eos=True, stop_token_ids=(stop_at,)))
    engine.add_request("min", prompt, greedy(12, min_tokens=12, stop_token_ids=(stop_at,)))
    engine.add_request("length", prompt, greedy(3, ignore_eos=True))
    outputs = run_to_completion(engine)
    stop_tokens = tokens_of(outputs["stop"])
    assert stop_tokens == free_run[: free_run.index(stop_at) + 1]
    assert outputs["stop"][-1].finish_reason is FinishReason.STOP
    assert len(tokens_of(outputs["min"])) == 12
    assert stop_at not in tokens_of(outputs["min"])[:11]
    assert outputs["length"][-1].finish_reason is FinishReason.LENGTH
    assert outputs["length"][-1].num_output_tokens == 3


def test_generation_fitted_to_the_context_stops_at_its_end(engine: LLMEngine) -> None:
    context = engine.model_config.context_length
    prompt = [5] * (context - 3)
    engine.add_request("long", prompt, greedy(100, ignore_eos=True, fit_to_context=True))
    outputs = run_to_completion(engine)["long"]
    assert outputs[-1].finish_reason is FinishReason.LENGTH
    assert outputs[-1].num_prompt_tokens + outputs[-1].num_output_tokens == context


@pytest.mark.parametrize(
    ("prompt", "params", "param"),
    [
        ([], greedy(4), "prompt"),
        ([1] * 100_000, greedy(4), "prompt"),
        ([10**9], greedy(4), "prompt"),
        ([-1], greedy(4), "prompt"),
        ([1, 2], greedy(4, stop_token_ids=(10**9,)), "stop_token_ids"),
        ([1, 2], greedy(4, stop_token_ids=(-3,)), "stop_token_ids"),
        ([5] * 1000, greedy(100), "max_tokens"),
    ],
)
def test_requests_the_engine_cannot_run_are_rejected(
    engine: LLMEngine, prompt: list[int], params: SamplingParams, param: str
) -> None:
    with pytest.raises(InvalidRequestError) as info:
        engine.add_request("bad", prompt, params)
    assert info.value.param == param
    assert not engine.has_work()


def test_duplicate_and_oversized_requests_are_rejected(
    model_dir: Path, decoder: OnnxDecoder
) -> None:
    engine = engine_with(model_dir, decoder, kv_cache_tokens=64)
    engine.add_request("a", [1, 2, 3], greedy(8))
    with pytest.raises(InvalidRequestError, match="already in use"):
        engine.add_request("a", [1, 2, 3], greedy(8))
    with pytest.raises(InvalidRequestError, match="KV-cache budget of 64") as info:
        engine.add_request("b", [1, 2, 3], greedy(100))
    assert info.value.param == "max_tokens"


def long_prompt(tokenizer: Tokenizer, num_tokens: int) -> list[int]:
    """A prompt of exactly ``num_tokens`` tokens of real text."""
    token_ids = tokenizer.encode(" ".join(PROMPTS * 8))
    assert len(token_ids) >= num_tokens
    return token_ids[:num_tokens]


def test_a_prompt_over_the_prefill_budget_gives_the_tokens_of_a_whole_prefill(
    engine: LLMEngine, model_dir: Path, decoder: OnnxDecoder, tokenizer: Tokenizer
) -> None:
    prompt = long_prompt(tokenizer, 50)
    params = greedy(12, ignore_eos=True)
    whole = generate_alone(engine, prompt, params)
    chunked = engine_with(model_dir, decoder, max_prefill_tokens=16)
    chunked.add_request("long", prompt, params)
    steps = [chunked.step() for _ in range(4)]  # chunks of 16, 16, 16 and 2 tokens
    assert steps[:3] == [[], [], []], "a chunk before the last yields no token"
    (first,) = steps[3]
    assert first.prefill_started_at is not None and first.num_prompt_tokens == 50
    assert tokens_of([first, *run_to_completion(chunked)["long"]]) == whole
    assert chunked.num_running == 0 and chunked.kv_cache_usage == 0


def test_running_streams_get_a_token_every_step_while_a_long_prompt_prefills(
    engine: LLMEngine, model_dir: Path, decoder: OnnxDecoder, tokenizer: Tokenizer
) -> None:
    short = [tokenizer.encode(p) for p in PROMPTS[:2]]
    prompt = long_prompt(tokenizer, 50)
    params = greedy(10, ignore_eos=True)
    expected = [generate_alone(engine, p, params) for p in [*short, prompt]]
    batch = engine_with(model_dir, decoder, max_prefill_tokens=16)
    for index, token_ids in enumerate(short):
        batch.add_request(str(index), token_ids, params)
    steps = [batch.step()]  # both short prompts prefill together
    batch.add_request("long", prompt, params)
    steps += [batch.step() for _ in range(4)]  # the long prompt's four chunks
    for step in steps[1:4]:
        assert [(o.request_id, len(o.new_token_ids)) for o in step] == [("0", 1), ("1", 1)]
    assert [o.request_id for o in steps[4]] == ["0", "1", "long"], "joins after its last chunk"
    outputs: dict[str, list[SequenceOutput]] = {}
    for output in [o for step in steps for o in step]:
        outputs.setdefault(output.request_id, []).append(output)
    for request_id, rest in run_to_completion(batch).items():
        outputs[request_id].extend(rest)
    assert [tokens_of(outputs[r]) for r in ["0", "1", "long"]] == expected


def test_abort_mid_prefill_frees_its_cache(
    model_dir: Path, decoder: OnnxDecoder, tokenizer: Tokenizer
) -> None:
    engine = engine_with(model_dir, decoder, max_prefill_tokens=16)
    engine.add_request("long", long_prompt(tokenizer, 50), greedy(4))
    assert engine.step() == []
    assert engine.num_running == 1 and engine.kv_cache_usage > 0
    engine.abort("long")
    (aborted,) = engine.step()
    assert aborted.finish_reason is FinishReason.ABORT and aborted.new_token_ids == ()
    assert engine.num_running == 0 and engine.kv_cache_usage == 0 and not engine.has_work()
    assert engine.prefilling is None
    engine.add_request("long", [5, 6, 7], greedy(2))  # its id is free again
    assert len(tokens_of(run_to_completion(engine)["long"])) == 2


def test_the_tensorrt_backend_refuses_a_prompt_over_the_prefill_budget(
    model_dir: Path, decoder: OnnxDecoder
) -> None:
    """TensorRT's shape profiles hold no chunk over a non-empty cache."""
    config = EngineConfig(model_path=model_dir, backend="tensorrt", max_prefill_tokens=16)
    engine = LLMEngine(config, decoder)  # the engine reads the backend from its config
    engine.add_request("fits", list(range(5, 21)), greedy(1))
    with pytest.raises(InvalidRequestError, match="prefills at most 16") as info:
        engine.add_request("long", list(range(5, 22)), greedy(1))
    assert info.value.param == "prompt"


def test_a_request_reusing_a_cached_prefix_gives_the_tokens_of_one_without_reuse(
    model_dir: Path, decoder: OnnxDecoder, tokenizer: Tokenizer
) -> None:
    system = long_prompt(tokenizer, 70)  # four whole blocks and a partial one
    prompts = [system + tokenizer.encode(f" {p}") for p in PROMPTS[:4]]
    params = greedy(8, ignore_eos=True)
    without = engine_with(model_dir, decoder, prefix_cache_tokens=0)
    expected = [generate_alone(without, p, params) for p in prompts]
    reusing = engine_with(model_dir, decoder)
    hits = 0
    for index, prompt in enumerate(prompts):  # one by one: each after the first finds 64 tokens
        reusing.add_request(str(index), prompt, params)
        tokens: list[int] = []
        while reusing.has_work():
            tokens.extend(t for o in reusing.step() for t in o.new_token_ids)
            hits += reusing.last_stats.prefix_cache_hits
        assert tokens == expected[index], index
    assert hits == 3 * 64
    # Arriving together: the first two miss and prefill as one left-padded batch (their prompts
    # differ in length), which stores the prefix; the others reuse it, one a step.
    batch = engine_with(model_dir, decoder, max_prefill_tokens=2 * max(map(len, prompts)))
    for index, prompt in enumerate(prompts):
        batch.add_request(str(index), prompt, params)
    outputs = run_to_completion(batch)
    assert [tokens_of(outputs[str(i)]) for i in range(4)] == expected
    assert [len(p) // 16 for p in prompts] == [4, 4, 4, 5]
    assert batch.prefix_cache is not None and batch.prefix_cache.num_tokens == 80  # 4 shared + 1
