"""The random datasets: reproducible, within their ranges, and never repeating a prompt."""

from __future__ import annotations

import numpy as np

from serve_app.bench.dataset import FIRST_PROMPT_ID, LengthRange, prompt_ids, random_requests

INPUT = LengthRange(64, 0.25)
OUTPUT = LengthRange(32, 0.5)


def test_a_range_spreads_around_its_mean() -> None:
    assert LengthRange(64, 0.25).bounds == (48, 80)
    assert LengthRange(10, 0.0).bounds == (10, 10)
    assert LengthRange(1, 0.9).bounds == (1, 2)


def test_the_same_seed_gives_the_same_requests() -> None:
    assert random_requests(20, INPUT, OUTPUT, seed=7) == random_requests(20, INPUT, OUTPUT, seed=7)
    assert random_requests(20, INPUT, OUTPUT, seed=7) != random_requests(20, INPUT, OUTPUT, seed=8)


def test_lengths_stay_within_their_ranges() -> None:
    requests = random_requests(200, INPUT, OUTPUT, seed=0)
    assert all(48 <= r.input_len <= 80 for r in requests)
    assert all(16 <= r.output_len <= 48 for r in requests)
    assert all(len(r.prompt.split()) == r.input_len for r in requests)
    # Uniform draws over 200 requests reach near both ends of each range.
    assert min(r.input_len for r in requests) <= 50 and max(r.input_len for r in requests) >= 78


def test_prompts_are_distinct_even_when_short() -> None:
    requests = random_requests(500, LengthRange(2, 0.0), OUTPUT, seed=0)
    assert len({r.prompt for r in requests}) == 500


def test_prompt_ids_are_seeded_and_clear_of_the_special_tokens() -> None:
    ids = prompt_ids(2000, vocab_size=4096, seed=3)
    assert ids.dtype == np.int32 and ids.shape == (2000,)
    assert (prompt_ids(2000, 4096, seed=3) == ids).all()
    assert not (prompt_ids(2000, 4096, seed=4) == ids).all()
    assert ids.min() >= FIRST_PROMPT_ID and ids.max() < 4096
