"""What every benchmark writes: comparison tables, summary JSON apart from raw traces, plots."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from serve_app.bench.load import Concurrency, RequestRate
from serve_app.bench.report import (
    PointResult,
    comparison_table,
    markdown_table,
    plot_by_concurrency,
    write_json,
)
from serve_app.bench.stats import summarize
from serve_app.bench.trace import RequestTrace


def point(system: str, level: int, first_token_s: float, tokens: int = 4) -> PointResult:
    """``level`` requests, each with a first token at ``first_token_s`` and one per 10 ms after."""
    traces = [RequestTrace(start=0.0, input_len=8, max_tokens=tokens) for _ in range(level)]
    for trace in traces:
        for step in range(tokens):
            trace.record(first_token_s + 0.01 * step)
    return PointResult(system, Concurrency(level), traces, summarize(traces, wall_s=1.0))


def rows(table: str) -> dict[tuple[str, str], list[str]]:
    """Table rows by (system, C), header and rule left out."""
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[2:]]
    return {(r[0], r[1]): r[2:] for r in cells}


def test_systems_compare_against_the_baseline_at_the_same_concurrency() -> None:
    points = [
        point("naive", 1, 0.010),
        point("naive", 4, 0.040),
        point("engine", 1, 0.012),
        point("engine", 4, 0.020, tokens=8),
        point("engine", 8, 0.030),  # no baseline at this level
    ]
    table = comparison_table(points, baseline="naive")
    assert table.splitlines()[0].endswith("| vs naive | TTFT p50 - naive |")
    by_row = rows(table)
    assert list(by_row) == [
        ("engine", "1"), ("engine", "4"), ("engine", "8"), ("naive", "1"), ("naive", "4"),
    ]  # fmt: skip
    # 4 x 7 tokens after the first ones, over the 70 ms from first to last token.
    assert by_row[("engine", "4")] == ["32", "400", "20.0", "2.00x", "-20.0 ms"]
    assert by_row[("engine", "1")][-2:] == ["1.00x", "+2.0 ms"]
    assert by_row[("engine", "8")][-2:] == ["-", "-"]
    assert by_row[("naive", "4")][-2:] == ["1.00x", "+0.0 ms"]


def test_a_comparison_needs_concurrency_levels() -> None:
    rate = replace(point("engine", 1, 0.01), load=RequestRate(2.0))
    with pytest.raises(ValueError, match="rate 2/s is not a concurrency level"):
        comparison_table([rate], baseline="engine")


def test_text_columns_align_left_and_numbers_right() -> None:
    table = markdown_table(["path", "what", "p50 ms"], [["proxy", "hit", "12.3"]], text_columns=2)
    assert table.splitlines()[1] == "| --- | --- | ---: |"


def test_the_summary_json_keeps_no_trace_and_the_raw_json_every_one(tmp_path: Path) -> None:
    points = [point("engine", 2, 0.01), point("naive", 2, 0.02)]
    document = {"settings": {"model": tmp_path / "model"}, "models": [{"points": points}]}
    out = tmp_path / "results" / "engine_bench.json"
    raw = write_json(out, document)

    assert raw == tmp_path / "results" / "raw" / "engine_bench.json"
    summary = json.loads(out.read_text())
    assert summary["settings"] == {"model": str(tmp_path / "model")}
    written = summary["models"][0]["points"]
    assert [(p["system"], p["label"], p["concurrency"]) for p in written] == [
        ("engine", "concurrency 2", 2),
        ("naive", "concurrency 2", 2),
    ]
    assert "requests" not in json.dumps(summary) and "chunks" not in json.dumps(summary)

    raw_points = json.loads(raw.read_text())["models"][0]["points"]
    assert [len(p["requests"]) for p in raw_points] == [2, 2]
    assert [c["tokens"] for c in raw_points[0]["requests"][0]["chunks"]] == [1, 1, 1, 1]


def test_a_separate_raw_document_goes_to_the_raw_path(tmp_path: Path) -> None:
    raw = write_json(tmp_path / "cache.json", {"p50": 0.01}, {"latency_s": [0.01, 0.02]})
    summary = json.loads((tmp_path / "cache.json").read_text())
    assert summary == {"p50": 0.01, "percentiles": "numpy linear interpolation"}
    assert json.loads(raw.read_text()) == {"latency_s": [0.01, 0.02]}


def test_what_json_cannot_hold_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="set is not JSON serializable"):
        write_json(tmp_path / "out.json", {"levels": {1, 2}})


def test_a_point_reads_back_from_its_summary_record(tmp_path: Path) -> None:
    written = [point("engine", 4, 0.02), replace(point("engine", 1, 0.01), load=RequestRate(1e9))]
    write_json(tmp_path / "genai.json", {"points": written})
    records = json.loads((tmp_path / "genai.json").read_text())["points"]
    read = [PointResult.from_record(r) for r in records]
    assert [(p.system, p.load, p.summary) for p in read] == [
        (p.system, p.load, p.summary) for p in written
    ]
    assert all(p.traces == [] for p in read)  # traces stay in the raw JSON
    inf = replace(written[0], load=RequestRate(float("inf")))
    assert PointResult.from_record(inf.summary_record()).load == RequestRate(float("inf"))


def test_the_plot_draws_a_column_per_group(tmp_path: Path) -> None:
    out = tmp_path / "plot.png"
    groups = {
        "demo": [point("engine", 1, 0.01), point("engine", 4, 0.02), point("naive", 1, 0.01)],
        "bench": [point("engine", 1, 0.1)],
        "skipped": [],
    }
    plot_by_concurrency(out, groups)
    assert out.read_bytes().startswith(b"\x89PNG")
    plot_by_concurrency(tmp_path / "none.png", {"skipped": []})
    assert not (tmp_path / "none.png").exists()
