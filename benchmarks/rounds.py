"""Timing records and summaries shared by the engine benchmarks.

Plain Python and numpy only: it is imported both by ``engine_bench.py`` (project venv) and by
``genai_engine.py`` (the onnxruntime-genai venv, which cannot import ``serve_app``).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

FIRST_PROMPT_ID = 10  # keep clear of the special tokens (pad/bos/eos) at the start of the vocab


@dataclass
class RoundResult:
    """Measurements for one concurrency level of one system."""

    mode: str
    concurrency: int
    output_tokens_per_s: float
    decode_tokens_per_s: float
    ttft_p50_s: float
    ttft_mean_s: float
    wall_s: float
    tokens_generated: int
    prompt_len: int
    max_tokens: int


@dataclass
class RequestTiming:
    """Token timestamps of one request, relative to the round's start."""

    first_token_s: float | None = None
    last_token_s: float | None = None
    tokens: int = 0

    def record(self, now_s: float, count: int = 1) -> None:
        """Note ``count`` tokens that arrived at ``now_s``."""
        if self.first_token_s is None:
            self.first_token_s = now_s
        self.last_token_s = now_s
        self.tokens += count


RoundFn = Callable[[int], tuple[list[RequestTiming], float]]


def prompt_ids(prompt_len: int, vocab_size: int, seed: int) -> np.ndarray:
    """Deterministic prompt shared by every request (int32; cast where int64 is needed)."""
    rng = np.random.default_rng(seed)
    return rng.integers(FIRST_PROMPT_ID, vocab_size, size=prompt_len).astype(np.int32)


def summarize(
    mode: str, timings: list[RequestTiming], wall_s: float, prompt_len: int, max_tokens: int
) -> RoundResult:
    """Turn per-request timestamps into the reported throughput and latency numbers.

    Decode tokens/s counts every token after each request's first (which prefill produces)
    over the window from the earliest first token to the last token.
    """
    if any(t.first_token_s is None or t.last_token_s is None for t in timings):
        raise RuntimeError(f"{mode}: a request finished without producing a token")
    ttfts = [t.first_token_s for t in timings if t.first_token_s is not None]
    last_s = max(t.last_token_s for t in timings if t.last_token_s is not None)
    total = sum(t.tokens for t in timings)
    decode_window_s = last_s - min(ttfts)
    decode_tokens = total - len(timings)
    return RoundResult(
        mode=mode,
        concurrency=len(timings),
        output_tokens_per_s=total / wall_s,
        decode_tokens_per_s=decode_tokens / decode_window_s if decode_window_s > 0 else 0.0,
        ttft_p50_s=statistics.median(ttfts),
        ttft_mean_s=statistics.fmean(ttfts),
        wall_s=wall_s,
        tokens_generated=total,
        prompt_len=prompt_len,
        max_tokens=max_tokens,
    )


def measure(
    mode: str, round_fn: RoundFn, concurrency: list[int], prompt_len: int, max_tokens: int
) -> list[RoundResult]:
    """Warm up once, then run and summarize one round per concurrency level."""
    warmup = min(4, max(concurrency))
    print(f"[{mode}] warm-up with {warmup} request(s)", flush=True)
    round_fn(warmup)
    results = []
    for level in concurrency:
        timings, wall_s = round_fn(level)
        result = summarize(mode, timings, wall_s, prompt_len, max_tokens)
        results.append(result)
        print(
            f"[{mode}] C={level:<3} out={result.output_tokens_per_s:8.1f} tok/s"
            f"  decode={result.decode_tokens_per_s:8.1f} tok/s"
            f"  ttft p50={result.ttft_p50_s * 1e3:7.1f} ms"
            f"  wall={result.wall_s:6.2f}s tokens={result.tokens_generated}",
            flush=True,
        )
        expected = level * max_tokens
        if result.tokens_generated != expected:
            raise RuntimeError(f"{mode}: expected {expected} tokens, got {result.tokens_generated}")
    return results
