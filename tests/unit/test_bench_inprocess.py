"""In-process rounds: warm-up, one summarized point per level, and rounds that must fail."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from serve_app.bench import inprocess
from serve_app.bench.inprocess import benchmark_model, measure, round_traces
from serve_app.bench.load import Concurrency, PointRun


class FakeSystem:
    """Every request of a round gets its first token at 0.1 s and one more every 0.05 s.

    ``short_by`` tokens are left off the last request, and ``silent`` requests get none.
    """

    def __init__(self, max_tokens: int, short_by: int = 0, silent: int = 0) -> None:
        self.max_tokens = max_tokens
        self.short_by = short_by
        self.silent = silent
        self.rounds: list[int] = []

    def round(self, concurrency: int) -> PointRun:
        self.rounds.append(concurrency)
        traces = round_traces([8] * concurrency, self.max_tokens)
        for index, trace in enumerate(traces[self.silent :]):
            short = self.short_by if index == len(traces) - self.silent - 1 else 0
            for step in range(self.max_tokens - short):
                trace.record(0.1 + 0.05 * step)
        return PointRun(traces, wall_s=0.5)


def test_a_warm_up_round_precedes_one_point_per_level() -> None:
    system = FakeSystem(max_tokens=4)
    points = measure("engine", system.round, [1, 8, 2], max_tokens=4)
    assert system.rounds == [4, 1, 8, 2]  # the warm-up is never reported
    assert [(p.system, p.load) for p in points] == [
        ("engine", Concurrency(1)),
        ("engine", Concurrency(8)),
        ("engine", Concurrency(2)),
    ]
    assert [len(p.traces) for p in points] == [1, 8, 2]


def test_a_round_is_summarized_from_its_token_times() -> None:
    system = FakeSystem(max_tokens=4)
    (point,) = measure("engine", system.round, [2], max_tokens=4)
    summary = point.summary
    assert system.rounds == [2, 2]
    assert summary.completed == 2 and summary.failed == 0
    assert summary.ttft.p50 == pytest.approx(0.1)
    assert summary.itl.p50 == pytest.approx(0.05)
    assert summary.e2e.p50 == pytest.approx(0.25)  # the last token ends an in-process request
    assert summary.output_throughput == pytest.approx(8 / 0.5)
    # Three tokens after each first one, over the 0.15 s from first to last token.
    assert summary.decode_throughput == pytest.approx(6 / 0.15)


def test_a_round_short_of_tokens_raises() -> None:
    with pytest.raises(RuntimeError, match="expected 8 tokens, got 7"):
        measure("naive", FakeSystem(max_tokens=4, short_by=1).round, [2], max_tokens=4)


def test_a_request_without_a_token_fails_the_round() -> None:
    with pytest.raises(RuntimeError, match=r"1 of 3 failed.*no_output"):
        measure("naive", FakeSystem(max_tokens=4, silent=1).round, [3], max_tokens=4)


def test_the_in_process_modules_import_neither_ray_nor_plotting_nor_http() -> None:
    # benchmarks/genai_engine.py imports them in the onnxruntime-genai venv.
    modules = ["dataset", "inprocess", "load", "report", "stats", "trace"]
    code = "; ".join(
        [
            "import sys",
            *(f"import serve_app.bench.{m}" for m in modules),
            "heavy = ('ray', 'matplotlib', 'httpx', 'tqdm', 'onnxruntime', 'serve_app.engine')",
            "print(sorted(m for m in heavy if m in sys.modules))",
        ]
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]"


def test_the_fused_attention_benchmark_model_is_found_beside_the_optimum_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(inprocess, "BENCH_MODEL", tmp_path)
    (tmp_path / "model.onnx").touch()
    with pytest.raises(FileNotFoundError, match="build_bench_model adds it"):
        benchmark_model("gqa")  # no demo stands in for a missing fused-attention build
    (tmp_path / "gqa").mkdir()
    (tmp_path / "gqa" / "genai_config.json").touch()
    assert benchmark_model("gqa") == ("bench-gqa", tmp_path / "gqa")
    assert benchmark_model() == ("bench", tmp_path)
