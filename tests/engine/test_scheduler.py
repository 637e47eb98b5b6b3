"""Admission rules of the ``Scheduler``, on hand-made sequences."""

from __future__ import annotations

import numpy as np

from serve_app.engine.sampling_params import SamplingParams
from serve_app.engine.scheduler import Scheduler
from serve_app.engine.sequence import Sequence


def sequence(request_id: str, prompt_tokens: int, max_length: int) -> Sequence:
    return Sequence(
        request_id=request_id,
        prompt_token_ids=[1] * prompt_tokens,
        params=SamplingParams(max_tokens=max_length - prompt_tokens),
        max_length=max_length,
        rng=np.random.default_rng(0),
    )


def ids(sequences: list[Sequence]) -> list[str]:
    return [s.request_id for s in sequences]


def test_admits_while_the_batch_worst_case_fits_the_kv_budget() -> None:
    scheduler = Scheduler(max_num_seqs=8, kv_cache_tokens=40, max_prefill_tokens=100)
    a, b, c = sequence("a", 2, 10), sequence("b", 2, 20), sequence("c", 2, 5)
    for s in (a, b, c):
        scheduler.add(s)
    # a and b: 2 rows x 20 = 40 slots; c would make 3 x 20 = 60.
    assert ids(scheduler.admit([])) == ["a", "b"]
    assert ids(list(scheduler.waiting)) == ["c"]
    assert scheduler.admit([a, b]) == []
    assert ids(scheduler.admit([b])) == ["c"]  # a left: 2 x 20 fits again


def test_a_large_request_at_the_head_is_not_overtaken() -> None:
    scheduler = Scheduler(max_num_seqs=8, kv_cache_tokens=40, max_prefill_tokens=100)
    running = [sequence("running", 2, 10)]
    scheduler.add(sequence("large", 2, 30))  # 2 x 30 = 60 slots with the running one
    scheduler.add(sequence("small", 2, 5))  # would fit: 3 x 10 = 30
    assert scheduler.admit(running) == []
    assert ids(list(scheduler.waiting)) == ["large", "small"]
    assert ids(scheduler.admit([])) == ["large"]  # 2 x 30 > 40 keeps small out still
    assert ids(list(scheduler.waiting)) == ["small"]


def test_max_num_seqs_caps_the_batch() -> None:
    scheduler = Scheduler(max_num_seqs=3, kv_cache_tokens=1000, max_prefill_tokens=100)
    for name in "abcd":
        scheduler.add(sequence(name, 2, 4))
    assert ids(scheduler.admit([sequence("running", 2, 4)])) == ["a", "b"]
    assert ids(list(scheduler.waiting)) == ["c", "d"]


def test_one_step_prefills_at_most_max_prefill_tokens_but_always_one_prompt() -> None:
    scheduler = Scheduler(max_num_seqs=8, kv_cache_tokens=1000, max_prefill_tokens=8)
    for name, prompt in [("a", 4), ("b", 3), ("c", 4), ("d", 12)]:
        scheduler.add(sequence(name, prompt, prompt + 2))
    assert ids(scheduler.admit([])) == ["a", "b"]  # 2 rows padded to 4 = 8 tokens
    assert ids(scheduler.admit([])) == ["c"]  # c and d would pad to 2 x 12
    assert ids(scheduler.admit([])) == ["d"]  # a prompt over the budget still runs alone


def test_remove_takes_a_waiting_sequence_out_of_the_queue() -> None:
    scheduler = Scheduler(max_num_seqs=8, kv_cache_tokens=1000, max_prefill_tokens=100)
    for name in "abc":
        scheduler.add(sequence(name, 2, 4))
    removed = scheduler.remove("b")
    assert removed is not None and removed.request_id == "b"
    assert scheduler.remove("b") is None
    assert scheduler.remove("unknown") is None
    assert ids(scheduler.admit([])) == ["a", "c"]


def test_fits_alone_compares_the_worst_case_with_the_whole_budget() -> None:
    scheduler = Scheduler(max_num_seqs=8, kv_cache_tokens=32, max_prefill_tokens=100)
    assert scheduler.fits_alone(sequence("exact", 4, 32))
    assert not scheduler.fits_alone(sequence("over", 4, 33))


def test_a_sequence_prefilled_alone_is_admitted_only_first() -> None:
    scheduler = Scheduler(max_num_seqs=8, kv_cache_tokens=400, max_prefill_tokens=100)
    for request_id in "abcd":
        scheduler.add(sequence(request_id, 2, 10))
    seen: list[tuple[str, list[str]]] = []

    def alone(candidate: Sequence, admitted: list[Sequence]) -> bool:
        seen.append((candidate.request_id, ids(admitted)))
        return candidate.request_id in "bc"

    assert ids(scheduler.admit([], alone)) == ["a"]  # b waits: it must be first
    assert seen == [("a", []), ("b", ["a"])]
    assert ids(scheduler.admit([], alone)) == ["b"]  # first, and then alone
    assert ids(scheduler.admit([], alone)) == ["c"]
    assert ids(scheduler.admit([], alone)) == ["d"]
