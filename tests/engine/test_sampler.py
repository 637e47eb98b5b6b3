"""Unit tests of the vectorized sampler on hand-made logits."""

from __future__ import annotations

import numpy as np
import pytest

from serve_app.engine.sampler import Sampler
from serve_app.engine.sampling_params import SamplingParams
from serve_app.engine.sequence import Sequence

VOCAB = 50
EOS = 0


def make_sequence(params: SamplingParams, outputs: list[int] | None = None) -> Sequence:
    seed = params.seed if params.seed is not None else 1234
    return Sequence(
        request_id="r",
        prompt_token_ids=[5, 6, 7],
        params=params,
        max_length=100,
        rng=np.random.default_rng(seed),
        output_token_ids=list(outputs or []),
    )


def random_logits(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(rows, VOCAB)).astype(np.float32) * 3


def sample_many(logits: np.ndarray, params: SamplingParams, draws: int) -> list[int]:
    sampler = Sampler(VOCAB, (EOS,))
    seq = make_sequence(params)
    return [int(sampler(logits[:1], [seq]).token_ids[0]) for _ in range(draws)]


def test_greedy_picks_the_argmax_per_row() -> None:
    logits = random_logits(4)
    seqs = [make_sequence(SamplingParams(temperature=0)) for _ in range(4)]
    out = Sampler(VOCAB, (EOS,))(logits, seqs)
    assert out.token_ids.tolist() == logits.argmax(axis=1).tolist()


def test_top_k_never_emits_tokens_outside_the_k_best() -> None:
    logits = random_logits(1)
    allowed = set(np.argsort(-logits[0])[:3].tolist())
    seen = set(sample_many(logits, SamplingParams(top_k=3, seed=1), 300))
    assert seen <= allowed
    assert len(seen) > 1  # it does sample, not just take the argmax


def test_top_p_never_emits_tokens_outside_the_nucleus() -> None:
    logits = random_logits(1, seed=3) / 3  # a flat distribution, so the nucleus has many tokens
    probs = np.exp(logits[0] - logits[0].max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    nucleus_size = int(np.searchsorted(np.cumsum(probs[order]), 0.7)) + 1
    allowed = set(order[:nucleus_size].tolist())
    seen = set(sample_many(logits, SamplingParams(top_p=0.7, seed=2), 400))
    assert seen <= allowed
    assert len(seen) > 1


def test_min_p_drops_unlikely_tokens() -> None:
    logits = random_logits(1, seed=4)
    probs = np.exp(logits[0] - logits[0].max())
    allowed = set(np.flatnonzero(probs >= 0.2).tolist())  # relative to the top token's prob
    seen = set(sample_many(logits, SamplingParams(min_p=0.2, seed=3), 300))
    assert seen <= allowed


def test_sampling_follows_the_distribution() -> None:
    logits = np.log(np.array([[0.7, 0.2, 0.1] + [1e-9] * (VOCAB - 3)], dtype=np.float32))
    draws = np.array(sample_many(logits, SamplingParams(seed=5), 2000))
    assert abs((draws == 0).mean() - 0.7) < 0.05
    assert abs((draws == 2).mean() - 0.1) < 0.03


def test_tiny_temperature_equals_greedy() -> None:
    logits = random_logits(8, seed=6)
    seqs = [make_sequence(SamplingParams(temperature=1e-4, seed=i)) for i in range(8)]
    out = Sampler(VOCAB, (EOS,))(logits, seqs)
    assert out.token_ids.tolist() == logits.argmax(axis=1).tolist()


def test_seeded_row_is_independent_of_its_batch_neighbours() -> None:
    logits = random_logits(5, seed=7)
    params = SamplingParams(temperature=1.0, seed=42)
    alone = Sampler(VOCAB, (EOS,))(logits[2:3], [make_sequence(params)]).token_ids[0]
    others = [make_sequence(SamplingParams(temperature=0.8, top_k=5, seed=i)) for i in range(5)]
    others[2] = make_sequence(params)
    in_batch = Sampler(VOCAB, (EOS,))(logits, others).token_ids[2]
    assert alone == in_batch


def test_repetition_penalty_discourages_seen_tokens() -> None:
    logits = np.zeros((1, VOCAB), dtype=np.float32)
    logits[0, 9] = 2.0
    logits[0, 10] = 1.9
    seq = make_sequence(SamplingParams(temperature=0, repetition_penalty=1.5), outputs=[9])
    assert Sampler(VOCAB, (EOS,))(logits, [seq]).token_ids[0] == 10


def test_frequency_and_presence_penalties_subtract_from_logits() -> None:
    logits = np.zeros((1, VOCAB), dtype=np.float32)
    logits[0, 9] = 2.0
    logits[0, 10] = 1.0
    freq = make_sequence(SamplingParams(temperature=0, frequency_penalty=0.6), outputs=[9, 9])
    assert Sampler(VOCAB, (EOS,))(logits, [freq]).token_ids[0] == 10  # 2.0 - 1.2 < 1.0
    pres = make_sequence(SamplingParams(temperature=0, presence_penalty=0.6), outputs=[9, 9])
    assert Sampler(VOCAB, (EOS,))(logits, [pres]).token_ids[0] == 9  # 2.0 - 0.6 > 1.0


def test_min_tokens_bans_eos_and_stop_tokens_until_reached() -> None:
    logits = np.zeros((1, VOCAB), dtype=np.float32)
    logits[0, EOS] = 5.0
    logits[0, 3] = 4.0
    logits[0, 4] = 3.0
    params = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=(3,))
    early = make_sequence(params, outputs=[11])
    assert Sampler(VOCAB, (EOS,))(logits, [early]).token_ids[0] == 4
    reached = make_sequence(params, outputs=[11, 12])
    assert Sampler(VOCAB, (EOS,))(logits, [reached]).token_ids[0] == EOS


def test_logprobs_report_the_model_distribution() -> None:
    logits = random_logits(1, seed=8)
    seq = make_sequence(SamplingParams(temperature=0, logprobs=3))
    record = Sampler(VOCAB, (EOS,))(logits, [seq]).logprobs[0]
    assert record is not None
    expected = logits[0] - np.log(np.exp(logits[0]).sum())
    assert record.token_id == int(logits[0].argmax())
    assert record.logprob == pytest.approx(float(expected.max()), abs=1e-5)
    assert [t for t, _ in record.top] == np.argsort(-expected)[:3].tolist()
