"""Rounds against an in-process system: C requests at once, traced and summarized like a sweep.

The engine benchmarks time this engine, a plain onnxruntime loop and onnxruntime-genai with it.
numpy and the standard library only: the onnxruntime-genai benchmark imports it from its venv.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from serve_app import DEMO_MODEL_DIR
from serve_app.bench.load import Concurrency, PointRun
from serve_app.bench.report import PointResult
from serve_app.bench.stats import summarize
from serve_app.bench.trace import RequestTrace

RoundFn = Callable[[int], PointRun]
"""Sends C requests at once and returns their traces, timed from the round's start."""

WARMUP_REQUESTS = 4


def round_traces(prompt_lens: list[int], max_tokens: int) -> list[RequestTrace]:
    """Empty traces of requests that are all sent as the round starts, one per prompt."""
    return [RequestTrace(start=0.0, input_len=n, max_tokens=max_tokens) for n in prompt_lens]


def measure(
    system: str, round_fn: RoundFn, concurrency: list[int], max_tokens: int
) -> list[PointResult]:
    """Warm up once, then run and summarize one round per concurrency level.

    Every request must produce exactly ``max_tokens`` tokens (EOS ignored); a round where one
    did not raises, since its throughput would not compare with the others.
    """
    warmup = min(WARMUP_REQUESTS, max(concurrency))
    print(f"[{system}] warm-up with {warmup} request(s)", flush=True)
    round_fn(warmup)
    results = []
    for level in concurrency:
        run = round_fn(level)
        for trace in run.traces:
            if trace.ok and not trace.chunks:
                trace.status, trace.error = "no_output", "finished without a token"
        summary = summarize(run.traces, run.wall_s)
        tokens = sum(t.output_tokens for t in run.traces)
        print(
            f"[{system}] C={level:<3} out={summary.output_throughput:8.1f} tok/s"
            f"  decode={summary.decode_throughput:8.1f} tok/s"
            f"  ttft p50={(summary.ttft.p50 or 0.0) * 1e3:7.1f} ms"
            f"  wall={summary.wall_s:6.2f}s tokens={tokens}",
            flush=True,
        )
        if summary.failed:
            raise RuntimeError(f"{system}: {summary.failed} of {level} failed: {summary.errors}")
        if tokens != level * max_tokens:
            raise RuntimeError(f"{system}: expected {level * max_tokens} tokens, got {tokens}")
        results.append(PointResult(system, Concurrency(level), run.traces, summary))
    return results


BENCH_MODEL = (
    Path(os.environ.get("SERVE_APP_CACHE", Path.home() / ".cache" / "serve_app"))
    / "bench-llama-100m"
)  # where ``python -m serve_app.tools.build_bench_model`` writes it by default
GQA_SUBDIR = "gqa"  # the builder writes the same weights' fused-attention layout here


def benchmark_model(layout: str = "optimum") -> tuple[str, Path]:
    """``("bench", its folder)`` when the benchmark model is built, else ``("demo", ...)``;
    says which it took.

    ``layout="gqa"`` takes the fused-attention build of the benchmark model's weights,
    ``("bench-gqa", its folder)``; there is no demo one, so a missing build raises
    FileNotFoundError naming the command that makes it.
    """
    if layout == "gqa":
        folder = BENCH_MODEL / GQA_SUBDIR
        if not (folder / "genai_config.json").is_file():
            raise FileNotFoundError(
                f"no fused-attention benchmark model at {folder}: "
                "python -m serve_app.tools.build_bench_model adds it"
            )
        print(f"== model: bench-gqa at {folder}", flush=True)
        return "bench-gqa", folder
    if (BENCH_MODEL / "model.onnx").is_file():
        print(f"== model: bench at {BENCH_MODEL}", flush=True)
        return "bench", BENCH_MODEL
    print(f"== model: demo (no benchmark model at {BENCH_MODEL})", flush=True)
    return "demo", DEMO_MODEL_DIR
