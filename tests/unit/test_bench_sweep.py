"""A whole sweep against an in-process fake server, and what it writes: tables, JSON, plot."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from serve_app.bench.__main__ import load_shapes, parse_args, settings
from serve_app.bench.client import Target
from serve_app.bench.dataset import LengthRange, random_requests
from serve_app.bench.load import Concurrency, RequestRate
from serve_app.bench.report import PointResult, markdown_tables, plot, write_json
from serve_app.bench.sweep import run_sweep


def is_odd(prompt: str) -> bool:
    return len(prompt.split()) % 2 == 1


def fake_server(prompts: list[str]) -> httpx.MockTransport:
    """Streams max_tokens one-token chunks, but fails every prompt of an odd number of words."""

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        prompts.append(body["prompt"])
        if is_odd(body["prompt"]):
            return httpx.Response(500, json={"error": {"message": "boom"}})
        n = body["max_tokens"]
        events = [{"choices": [{"index": 0, "text": " tok"}]} for _ in range(n)]
        events.append({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": n}})
        text = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
        return httpx.Response(200, text=text)

    return httpx.MockTransport(handler)


def sweep(prompts: list[str]) -> list[PointResult]:
    requests = random_requests(24, LengthRange(6, 0.5), LengthRange(4, 0.5), seed=0)
    shapes = [Concurrency(1), Concurrency(4), RequestRate(float("inf"))]
    target = Target(model="demo")
    return asyncio.run(
        run_sweep("http://test/v1", None, target, shapes, requests, 0, fake_server(prompts))
    )


def test_every_point_sends_its_own_prompts_and_counts_failures() -> None:
    prompts: list[str] = []
    points = sweep(prompts)
    assert [p.label for p in points] == ["concurrency 1", "concurrency 4", "rate inf/s"]
    assert {p.system for p in points} == {"http://test/v1"}
    assert len(prompts) == len(set(prompts)) == 24  # no prompt reaches a response cache twice
    failed = sum(map(is_odd, prompts))
    assert 0 < failed < 24
    assert sum(p.summary.errors.get("500", 0) for p in points) == failed
    assert all(p.summary.completed + p.summary.failed == 8 for p in points)


def test_results_go_out_as_tables_json_and_a_plot(tmp_path: Path) -> None:
    points = sweep([])
    tables = markdown_tables(points)
    assert "| concurrency 4 |" in tables and "| rate inf/s | TTFT |" in tables

    out = tmp_path / "results.json"
    raw = write_json(out, {"settings": {"seed": 0}, "points": points})
    document = json.loads(out.read_text())
    assert document["settings"] == {"seed": 0}
    first = document["points"][0]
    assert first["label"] == "concurrency 1" and first["concurrency"] == 1
    assert first["summary"]["ttft"]["p50"] > 0
    assert "requests" not in first  # the committed summary holds no per-request trace

    assert raw == tmp_path / "raw" / "results.json"
    raw_first = json.loads(raw.read_text())["points"][0]
    assert len(raw_first["requests"]) == 8
    ok = next(r for r in raw_first["requests"] if r["status"] == "200")
    assert len(ok["chunks"]) == ok["completion_tokens"] == ok["max_tokens"]

    plot(out.with_suffix(".png"), points)
    assert out.with_suffix(".png").read_bytes().startswith(b"\x89PNG")


def test_the_command_line_builds_the_sweep_and_keeps_the_key_out_of_the_json() -> None:
    args = parse_args(["--request-rate", "2", "inf", "--api-key", "sk-secret", "--no-ignore-eos"])
    shapes = load_shapes(args)
    assert [s.label for s in shapes] == ["rate 2/s", "rate inf/s"]
    assert args.ignore_eos is False
    written = json.dumps(settings(args, shapes), allow_nan=False)
    assert "sk-secret" not in written and '"inf"' in written and "concurrency" not in written
    assert [s.label for s in load_shapes(parse_args([]))] == [
        f"concurrency {c}" for c in (1, 4, 16, 32)
    ]


def test_concurrency_and_request_rate_exclude_each_other() -> None:
    with pytest.raises(SystemExit):
        parse_args(["--concurrency", "4", "--request-rate", "2"])
