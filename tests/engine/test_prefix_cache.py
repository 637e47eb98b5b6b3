"""Prefix reuse: the block store alone, then the engine reusing it over the fake decoders of
both cache layouts (the Optimum layout's regrouped cache and a fused-attention model's rows).

The fakes' caches hold each token id (plus one), and their next token is a function of the
whole cached row, so a reused prefix that is wrong, short or misplaced changes the output.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnxruntime as ort
import pytest

from serve_app.engine import FinishReason, LLMEngine, SamplingParams
from serve_app.engine.decoder import ForwardResult
from serve_app.engine.prefix_cache import BLOCK_TOKENS, PrefixCache
from tests.engine.fake_decoder import VOCAB, FakeDecoder, fake_engine
from tests.engine.fake_decoder import continuation as optimum_continuation
from tests.engine.test_kv_slots import continuation as slot_continuation
from tests.engine.test_kv_slots import slot_engine

PREFIX = [(7 * i) % (VOCAB - 1) + 1 for i in range(2 * BLOCK_TOKENS)]  # two blocks, no EOS


def token_kv(token_ids: list[int]) -> np.ndarray:
    """K/V that records which tokens it was read for: ``[1, 1, tokens, 1]``."""
    return np.array(token_ids, dtype=np.float32)[None, None, :, None]


def remember(cache: PrefixCache, token_ids: list[int]) -> list[tuple[int, int]]:
    """Insert a prompt whose K/V is its token ids; returns the ranges the cache read."""
    reads: list[tuple[int, int]] = []

    def read(start: int, end: int) -> np.ndarray:
        reads.append((start, end))
        return token_kv(token_ids[start:end])

    cache.insert(token_ids, read)
    return reads


def greedy(max_tokens: int, **kwargs: object) -> SamplingParams:
    params = {"temperature": 0, "max_tokens": max_tokens, "ignore_eos": True, **kwargs}
    return SamplingParams(**params)  # type: ignore[arg-type]


@dataclasses.dataclass
class Served:
    """What ``run`` saw: each request's tokens, and the steps' prefix-cache token counts."""

    tokens: dict[str, list[int]]
    queried: int
    hits: int


def run(engine: LLMEngine, requests: dict[str, list[int]], max_tokens: int) -> Served:
    """Add the requests one step apart; each one's generated tokens, and the prompt tokens the
    steps looked up in the prefix cache and found there."""
    served = Served({}, 0, 0)
    pending = list(requests.items())
    while pending or engine.has_work():
        if pending:
            request_id, prompt = pending.pop(0)
            engine.add_request(request_id, prompt, greedy(max_tokens))
        for output in engine.step():
            served.tokens.setdefault(output.request_id, []).extend(output.new_token_ids)
        served.queried += engine.last_stats.prefix_cache_queries
        served.hits += engine.last_stats.prefix_cache_hits
    return served


# The block store


def test_a_prompt_s_whole_blocks_are_stored_and_read_once() -> None:
    cache = PrefixCache(max_tokens=1024)
    prompt = [*PREFIX, 3, 4, 5]
    assert remember(cache, prompt) == [(0, 32)]  # the 3-token tail is no whole block
    assert cache.num_tokens == 32
    assert remember(cache, [*PREFIX, *range(1, 17)]) == [(32, 48)]  # only its new block
    assert remember(cache, prompt) == []
    kv = cache.take(prompt, limit=len(prompt) - 1)
    assert kv is not None and kv[0, 0, :, 0].tolist() == PREFIX


def test_a_prefix_is_reused_only_for_the_same_token_ids_from_the_first() -> None:
    cache = PrefixCache(max_tokens=1024)
    remember(cache, [*PREFIX, 1])
    assert cache.match([*PREFIX, 9, 9], limit=100) == 32
    assert cache.match([PREFIX[0] + 1, *PREFIX[1:], 1], limit=100) == 0  # first token differs
    second_block_differs = [*PREFIX[:20], PREFIX[20] + 1, *PREFIX[21:], 1]
    assert cache.match(second_block_differs, limit=100) == 16
    assert cache.match(PREFIX[16:] + PREFIX[:16], limit=100) == 0  # the same blocks, reordered
    assert cache.match(PREFIX[:31], limit=100) == 16  # a partial block is never matched
    assert cache.match([*PREFIX, 1], limit=31) == 16  # nor beyond the caller's limit
    assert cache.take([PREFIX[0] + 1, *PREFIX[1:]], limit=100) is None


def test_lru_eviction_keeps_the_cache_within_its_budget_and_drops_the_oldest_first() -> None:
    cache = PrefixCache(max_tokens=4 * BLOCK_TOKENS + 5)  # room for four blocks
    prompts = [[p] * (2 * BLOCK_TOKENS) for p in (1, 2, 3)]  # two blocks each
    remember(cache, prompts[0])
    remember(cache, prompts[1])
    assert cache.take(prompts[0], limit=64) is not None  # 0 is now more recent than 1
    remember(cache, prompts[2])
    assert cache.num_tokens == 4 * BLOCK_TOKENS
    assert [cache.match(p, limit=64) for p in prompts] == [32, 0, 32]
    remember(cache, [1] * (3 * BLOCK_TOKENS))  # 0's chain grows by one block: 2 loses its last
    assert [cache.match(p, limit=64) for p in prompts] == [32, 0, 16]
    assert cache.nbytes == 4 * BLOCK_TOKENS * 4
    for seed in range(50):  # many prompts sharing first blocks: never over, never orphaned
        rng = np.random.default_rng(seed)
        remember(cache, [int(t) for t in rng.integers(1, 4, int(rng.integers(16, 100)))])
        assert cache.num_tokens <= 4 * BLOCK_TOKENS


def test_a_prompt_longer_than_the_budget_keeps_its_first_blocks() -> None:
    cache = PrefixCache(max_tokens=2 * BLOCK_TOKENS)
    remember(cache, [*PREFIX, *PREFIX])
    assert cache.num_tokens == 32 and cache.match([*PREFIX, *PREFIX], limit=64) == 32


# The engine


@pytest.mark.parametrize("layout", ["optimum", "rows"])
def test_a_reused_prefix_gives_the_tokens_of_a_whole_prefill_and_prefills_only_the_rest(
    layout: str,
) -> None:
    requests = {f"q{i}": [*PREFIX, *range(i + 1, i + 1 + 5 + i)] for i in range(4)}
    if layout == "optimum":
        engine, continuation = fake_engine(max_prefill_tokens=64), optimum_continuation
    else:
        engine, continuation = slot_engine(rows=4, max_prefill_tokens=64)[0], slot_continuation
    tokens: dict[str, list[int]] = {}
    queried = hits = 0
    for request_id, prompt in requests.items():  # one after another: each finds the prefix
        served = run(engine, {request_id: prompt}, max_tokens=6)
        tokens.update(served.tokens)
        queried, hits = queried + served.queried, hits + served.hits
    assert tokens == {r: continuation(p, 6) for r, p in requests.items()}
    assert queried == sum(len(p) for p in requests.values())
    assert hits == 3 * len(PREFIX)  # all but the first reuse both blocks
    assert fake_engine(prefix_cache_tokens=0).prefix_cache is None


def test_only_the_suffix_is_run_through_the_model() -> None:
    decoder = FakeDecoder()
    engine = fake_engine(decoder, max_prefill_tokens=64)
    first, second = [*PREFIX, 1, 2, 3], [*PREFIX, 4, 5, 6, 7]
    run(engine, {"first": first}, max_tokens=1)
    run(engine, {"second": second}, max_tokens=1)
    assert decoder.forward_shapes == [(1, 35), (1, 4)]
    exact = [*PREFIX]  # a prompt of exactly the cached blocks still prefills its last block
    run(engine, {"exact": exact}, max_tokens=1)
    assert decoder.forward_shapes[-1] == (1, BLOCK_TOKENS)


class ScoringDecoder(FakeDecoder):
    """A ``FakeDecoder`` that also returns (flat) logits at every position when asked."""

    def forward(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        past: list[ort.OrtValue],
        *,
        all_positions: bool = False,
    ) -> ForwardResult:
        result = super().forward(input_ids, attention_mask, position_ids, past)
        every = np.zeros((*input_ids.shape, VOCAB), dtype=np.float32) if all_positions else None
        return dataclasses.replace(result, all_logits=every)


def test_a_request_that_scores_its_prompt_does_not_reuse() -> None:
    decoder = ScoringDecoder()
    engine = fake_engine(decoder, max_prefill_tokens=64)
    run(engine, {"first": [*PREFIX, 1]}, max_tokens=1)
    engine.add_request("scored", [*PREFIX, 2], greedy(1, prompt_logprobs=0))
    engine.step()
    assert decoder.forward_shapes[-1] == (1, 33)
    assert engine.last_stats.prefix_cache_queries == 0 and engine.last_stats.prefix_cache_hits == 0


def test_requests_sharing_a_first_block_wait_a_step_for_the_first_to_store_it() -> None:
    decoder = FakeDecoder()
    engine = fake_engine(decoder, max_prefill_tokens=256)
    other = [VOCAB - 1] * 20  # no block in common with the others: prefilled beside the first
    requests = {"q0": [*PREFIX, 1, 2], "other": other, **{f"q{i}": [*PREFIX, i] for i in (1, 2)}}
    for request_id, prompt in requests.items():
        engine.add_request(request_id, prompt, greedy(3))
    served = run(engine, {}, max_tokens=3)
    assert served.tokens == {r: optimum_continuation(p, 3) for r, p in requests.items()}
    # q1 would prefill the same first block as q0: it waits, then reuses q0's two blocks.
    assert decoder.forward_shapes[:3] == [(2, 34), (2, 1), (1, 1)]  # prefill, decode, q1's rest
    assert decoder.forward_shapes[4] == (1, 1), "q2 reuses them at the next step"
    assert served.hits == 2 * len(PREFIX)


@pytest.mark.parametrize("layout", ["optimum", "rows"])
def test_an_abort_mid_prefill_leaves_the_cache_consistent(layout: str) -> None:
    long_prompt = [*PREFIX, *[(5 * i) % (VOCAB - 1) + 1 for i in range(24)]]  # 56 tokens
    if layout == "optimum":
        engine, continuation = fake_engine(max_prefill_tokens=16), optimum_continuation
    else:
        engine, continuation = slot_engine(rows=4, max_prefill_tokens=16)[0], slot_continuation
    run(engine, {"warm": [*PREFIX, 1]}, max_tokens=2)
    assert engine.prefix_cache is not None
    cached = engine.prefix_cache.num_tokens
    engine.add_request("long", long_prompt, greedy(4))
    engine.step()  # reuses the two cached blocks, prefills 16 of the other 24 tokens
    assert engine.prefilling is not None and engine.prefilling.num_done == 48
    engine.abort("long")
    (aborted,) = engine.step()
    assert aborted.finish_reason is FinishReason.ABORT
    assert engine.prefix_cache.num_tokens == cached, "nothing of a partial prefill is stored"
    assert run(engine, {"long": long_prompt}, max_tokens=4).tokens == {
        "long": continuation(long_prompt, 4)
    }
    assert engine.prefix_cache.num_tokens == 48  # the whole prompt's three blocks, once


def test_random_joins_leaves_and_aborts_over_shared_prefixes_keep_every_output_exact() -> None:
    rng = np.random.default_rng(2)
    engine, _ = slot_engine(rows=6, max_prefill_tokens=24, prefix_cache_tokens=64)
    prefixes = [[int(t) for t in rng.integers(1, VOCAB, 40)] for _ in range(3)]
    requests: dict[str, list[int]] = {}
    tokens: dict[str, list[int]] = {}
    aborted: set[str] = set()
    reused = 0
    for _ in range(400):
        if rng.random() < 0.5 and engine.num_waiting < 6:
            request_id = f"r{len(requests)}"
            prefix = prefixes[int(rng.integers(3))][: int(rng.integers(0, 41))]
            requests[request_id] = [*prefix, *rng.integers(1, VOCAB, int(rng.integers(1, 8)))]
            engine.add_request(request_id, [int(t) for t in requests[request_id]], greedy(5))
        live = [s.request_id for s in engine.running]
        if engine.prefilling is not None:
            live.append(engine.prefilling.sequence.request_id)
        if live and rng.random() < 0.05:
            victim = live[int(rng.integers(len(live)))]
            engine.abort(victim)
            aborted.add(victim)
        for output in engine.step():
            tokens.setdefault(output.request_id, []).extend(output.new_token_ids)
        reused += engine.last_stats.prefix_cache_hits
        assert engine.prefix_cache is not None and engine.prefix_cache.num_tokens <= 64
    tokens_after = run(engine, {}, max_tokens=5).tokens  # the last ones finish
    for request_id, rest in tokens_after.items():
        tokens.setdefault(request_id, []).extend(rest)
    assert reused > 0 and aborted
    for request_id, prompt in requests.items():
        got = tokens.get(request_id, [])
        expected = slot_continuation([int(t) for t in prompt], 5)
        assert got == (expected[: len(got)] if request_id in aborted else expected), request_id
