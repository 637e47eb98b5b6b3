"""KV rows of a fused-attention model: the row allocator alone, then the engine over a fake
``SlotDecoder`` under a randomized join/leave/abort schedule."""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import numpy as np
import pytest

from serve_app.engine import EngineConfig, LLMEngine, SamplingParams
from serve_app.engine.decoder import SlotDecoder
from serve_app.engine.kv_slots import KVSlots
from tests.engine.fake_decoder import MODEL_CONFIG, VOCAB

CONTEXT = MODEL_CONFIG.context_length


class FakeSlotDecoder:
    """A ``SlotDecoder`` whose rows hold token id + 1 per position (0: never written). Each
    row's next token is the sum of its cached cells mod VOCAB, so a row that lost, gained or
    swapped one token since its prefill changes every later output. Runs that break the
    fused op's rules (rows out of range, several new tokens over a past with batch > 1, a past
    with holes) fail."""

    def __init__(self, num_rows: int) -> None:
        self.config = MODEL_CONFIG
        self.num_rows = num_rows
        self.buffer = np.zeros((num_rows, CONTEXT), dtype=np.int64)

    def run_rows(
        self,
        first_row: int,
        input_ids: np.ndarray,
        lengths: np.ndarray,
        *,
        all_positions: bool = False,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        batch, new = input_ids.shape
        assert first_row >= 0 and first_row + batch <= self.num_rows
        first_prompt = int(lengths.max()) == new
        assert first_prompt or new == 1 or batch == 1, "several new tokens over a past"
        sums = []
        for i, length in enumerate(lengths.tolist()):
            row = self.buffer[first_row + i]
            past = 0 if first_prompt else length - new
            assert (row[:past] > 0).all(), "a row's past has holes"
            count = length - past
            row[past:length] = input_ids[i, :count] + 1
            sums.append(int(row[:length].sum()) % VOCAB)
        distance = (np.arange(VOCAB)[None, :] - np.array(sums)[:, None]) % VOCAB
        return -distance.astype(np.float32), None

    def move_row(self, source: int, destination: int, length: int) -> None:
        self.buffer[destination, :length] = self.buffer[source, :length]

    def read_kv(self, row: int, start: int, end: int) -> np.ndarray:
        return self.buffer[row, start:end][None, None, :, None].copy()

    def write_kv(self, row: int, kv: np.ndarray) -> None:
        self.buffer[row, : kv.shape[2]] = kv[0, 0, :, 0]

    def describe(self) -> str:
        return "fake slots (cpu)"


def continuation(prompt: list[int], num_tokens: int) -> list[int]:
    """What the fake generates greedily after ``prompt``."""
    tokens = list(prompt)
    for _ in range(num_tokens):
        tokens.append(sum(t + 1 for t in tokens) % VOCAB)
    return tokens[len(prompt) :]


def slot_engine(rows: int, **options: int) -> tuple[LLMEngine, FakeSlotDecoder]:
    decoder = FakeSlotDecoder(rows)
    config = EngineConfig(
        model_path=Path("fake-model"),
        intra_op_num_threads=1,
        max_num_seqs=rows,
        kv_cache_tokens=rows * CONTEXT,
        **options,
    )
    return LLMEngine(config, decoder), decoder


def assert_rows_owned_once(engine: LLMEngine) -> None:
    """Every live sequence holds its own row, rows [0, N) in the running batch's order."""
    assert engine.slot_batch is not None
    slots = engine.slot_batch.slots
    assert slots.owners == engine.running
    assert [slots.row(s) for s in engine.running] == list(range(len(engine.running)))
    if engine.prefilling is not None:  # it fills the spare row, which no live sequence holds
        assert len(slots) < slots.num_rows and engine.prefilling.sequence not in slots.owners


def test_the_fake_is_a_slot_decoder() -> None:
    assert isinstance(FakeSlotDecoder(2), SlotDecoder)


def test_a_leaving_row_is_filled_by_the_last_one() -> None:
    slots: KVSlots[str] = KVSlots(4)
    assert [slots.claim(name) for name in "abcd"] == [0, 1, 2, 3]
    with pytest.raises(RuntimeError, match="all 4 KV rows are taken"):
        slots.claim("e")
    assert slots.release("b") == (3, 1)  # d moves into b's row
    assert slots.owners == ["a", "d", "c"]
    assert slots.release("c") is None  # the last row: nothing moves
    assert slots.claim("e") == 2 and slots.owners == ["a", "d", "e"]


def test_rows_stay_contiguous_and_unshared_under_random_claims_and_releases() -> None:
    rng = np.random.default_rng(0)
    slots: KVSlots[int] = KVSlots(16)
    rows = np.full(16, -1)  # what each row holds, moved as release() says
    for owner in range(5000):
        if len(slots) < 16 and rng.random() < 0.55:
            rows[slots.claim(owner)] = owner
        elif len(slots):
            leaving = slots.owners[int(rng.integers(len(slots)))]
            move = slots.release(leaving)
            if move is not None:
                rows[move[1]] = rows[move[0]]
        live = slots.owners
        assert len(set(live)) == len(live)
        assert [slots.row(o) for o in live] == list(range(len(live)))
        assert rows[: len(live)].tolist() == live


def test_a_thousand_random_steps_of_joins_leaves_and_aborts_keep_every_row_its_own() -> None:
    rng = np.random.default_rng(1)
    engine, _ = slot_engine(rows=8, max_prefill_tokens=24)
    requests: dict[str, tuple[list[int], int]] = {}
    tokens: dict[str, list[int]] = {}
    aborted: set[str] = set()
    finished: set[str] = set()
    for _ in range(1000):
        for _join in range(int(rng.integers(0, 3))):
            if engine.num_waiting >= 8:
                break
            request_id = f"r{len(requests)}"
            length = int(rng.integers(25, 45)) if rng.random() < 0.05 else int(rng.integers(1, 20))
            prompt = [int(t) for t in rng.integers(1, VOCAB, length)]
            requests[request_id] = (prompt, int(rng.integers(1, min(30, CONTEXT - length))))
            params = SamplingParams(
                temperature=0, max_tokens=requests[request_id][1], ignore_eos=True
            )
            engine.add_request(request_id, prompt, params)
        live = [s.request_id for s in engine.running]
        if engine.prefilling is not None:
            live.append(engine.prefilling.sequence.request_id)
        if live and rng.random() < 0.1:
            victim = live[int(rng.integers(len(live)))]
            engine.abort(victim)
            aborted.add(victim)
        for output in engine.step():
            tokens.setdefault(output.request_id, []).extend(output.new_token_ids)
            if output.finished:
                finished.add(output.request_id)
        assert_rows_owned_once(engine)
    assert len(finished) > 200 and len(aborted) > 20
    for request_id in finished:
        prompt, max_tokens = requests[request_id]
        expected = continuation(prompt, max_tokens)
        got = tokens.get(request_id, [])
        assert got == (expected[: len(got)] if request_id in aborted else expected), request_id


def test_memory_stays_flat_across_ten_thousand_joins_and_leaves() -> None:
    engine, decoder = slot_engine(rows=8)
    buffer = decoder.buffer
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)

    def serve(first: int, count: int) -> None:
        for index in range(first, first + count):
            engine.add_request(str(index), [1 + index % 7] * (1 + index % 5), params)
            if engine.num_waiting >= 8:
                while engine.num_waiting:
                    engine.step()
        while engine.has_work():
            engine.step()

    serve(0, 1000)  # warm up allocator caches
    gc.collect()
    before = sys.getallocatedblocks()
    serve(1000, 10_000)
    gc.collect()
    grown = sys.getallocatedblocks() - before
    assert grown < 1000, f"{grown} more Python objects after 10,000 sequences"
    assert decoder.buffer is buffer and engine.num_running == 0 and engine.kv_cache_usage == 0
