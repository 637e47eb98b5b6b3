"""Long-prompt benchmark: running streams' inter-token latency while a long prompt is prefilled.

    python benchmarks/long_prompt.py                       # the benchmark model, else the demo
    python benchmarks/long_prompt.py --streams 8 --chunk 64 256 --repeats 3

--streams sequences (random prompts of --stream-prompt-len ids, greedy, EOS ignored) decode in
one in-process engine. Their inter-token latency (ITL: the time between two steps that give a
stream a token) is measured without a long prompt (baseline, --baseline-steps steps a round)
and while a prompt of (context - 64) tokens is prefilled: for each chunk budget
(``engine.max_prefill_tokens``) in --chunk, and prefilled whole in one step (a budget of the
context, what the engine did before chunked prefill). A long-prompt window runs from the step
the prompt is added to the step that yields its first token, --repeats times. The issue's target:
ITL p99 with the long prompt <= 2x the baseline's. Uses the benchmark model
(``python -m serve_app.tools.build_bench_model``) when it exists, else the demo model. Prints a
table, writes ``benchmarks/results/long_prompt.json`` with a plot beside it.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path
from typing import Any

from serve_app.bench.dataset import prompt_ids
from serve_app.bench.inprocess import benchmark_model
from serve_app.bench.report import figure, machine, markdown_table, save_figure, write_json
from serve_app.bench.stats import distribution
from serve_app.engine import EngineConfig, LLMEngine, SamplingParams, load_decoder
from serve_app.engine.decoder import Decoder

HERE = Path(__file__).resolve().parent
TARGET_RATIO = 2.0  # the bound on ITL p99 with the long prompt over without
LONG_PROMPT_SHORTFALL = 64  # the long prompt is this many tokens under the context


class StreamClock:
    """When each stream last got a token, and the gaps between its tokens since ``reset``."""

    def __init__(self) -> None:
        self.last: dict[str, float] = {}
        self.gaps: list[float] = []

    def record(self, request_ids: list[str], now: float, measured: bool) -> None:
        """Note the streams that got a token at ``now``; keep their gaps when ``measured``."""
        for request_id in request_ids:
            if measured and request_id in self.last:
                self.gaps.append(now - self.last[request_id])
            self.last[request_id] = now


def run_scenario(
    decoder: Decoder, model_dir: Path, args: argparse.Namespace, budget: int | None
) -> dict[str, Any]:
    """ITL of the streams over the scenario's windows; ``budget`` None is the baseline."""
    context = decoder.config.context_length
    long_len = context - LONG_PROMPT_SHORTFALL
    config = EngineConfig(
        model_path=model_dir,
        max_num_seqs=args.streams + 1,
        kv_cache_tokens=(args.streams + 1) * context,
        max_prefill_tokens=budget or context,
        intra_op_num_threads=args.threads,
    )
    engine = LLMEngine(config, decoder)
    vocab = decoder.config.vocab_size
    stream_params = SamplingParams(
        temperature=0, max_tokens=context - args.stream_prompt_len, ignore_eos=True
    )
    for index in range(args.streams):
        prompt = prompt_ids(args.stream_prompt_len, vocab, seed=index).tolist()
        engine.add_request(f"stream-{index}", prompt, stream_params)
    clock = StreamClock()

    def step(measured: bool) -> list[str]:
        outputs = engine.step()
        now = time.perf_counter()
        got_tokens = [o.request_id for o in outputs if o.new_token_ids]
        clock.record([r for r in got_tokens if r.startswith("stream-")], now, measured)
        return got_tokens

    for _ in range(args.warmup_steps):
        step(measured=False)
    window_steps, long_ttft = [], []
    for repeat in range(args.repeats):
        if budget is None:
            for _ in range(args.baseline_steps):
                step(measured=True)
            window_steps.append(args.baseline_steps)
        else:
            request_id = f"long-{repeat}"
            prompt = prompt_ids(long_len, vocab, seed=1000 + repeat).tolist()
            added = time.perf_counter()
            engine.add_request(request_id, prompt, SamplingParams(temperature=0, max_tokens=1))
            steps = 1
            while request_id not in step(measured=True):
                steps += 1
            long_ttft.append(time.perf_counter() - added)
            window_steps.append(steps)
        for _ in range(args.gap_steps):
            step(measured=False)
    itl = distribution(clock.gaps)
    return {
        "scenario": "baseline" if budget is None else f"chunks of {budget}",
        "max_prefill_tokens": budget,
        "long_prompt_tokens": None if budget is None else long_len,
        "window_steps": window_steps,
        "itl_samples": len(clock.gaps),
        "itl_p50_s": itl.p50,
        "itl_p99_s": itl.p99,
        "itl_max_s": max(clock.gaps),
        "long_prompt_ttft_s": sum(long_ttft) / len(long_ttft) if long_ttft else None,
    }


def print_table(model: str, rows: list[dict[str, Any]]) -> None:
    """ITL per scenario in milliseconds, and the p99 ratio to the baseline's."""

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value * 1000:.1f}"

    table = [
        [
            row["scenario"],
            str(round(sum(row["window_steps"]) / len(row["window_steps"]), 1)),
            ms(row["itl_p50_s"]),
            ms(row["itl_p99_s"]),
            ms(row["itl_max_s"]),
            f"{row['p99_ratio']:.2f}",
            ms(row["long_prompt_ttft_s"]),
        ]
        for row in rows
    ]
    headers = ["scenario", "window steps", "ITL p50 ms", "ITL p99 ms", "ITL max ms"]
    headers += ["p99 / baseline", "long prompt TTFT ms"]
    print(f"== {model}: target p99 / baseline <= {TARGET_RATIO}")
    print(markdown_table(headers, table), flush=True)


def plot(path: Path, model: str, rows: list[dict[str, Any]]) -> None:
    """ITL p99 over the baseline's, with the target, and the long prompt's time to first token."""
    labels = [row["scenario"] for row in rows]
    fig = figure(11, 4.5)
    ratio_axes, ttft_axes = fig.subplots(1, 2)
    ratio_axes.bar(labels, [row["p99_ratio"] for row in rows])
    ratio_axes.axhline(TARGET_RATIO, color="red", linestyle="--", label="target")
    ratio_axes.set_ylabel("streams' ITL p99 / baseline p99")
    ratio_axes.legend()
    long_rows = [row for row in rows if row["long_prompt_ttft_s"] is not None]
    ttft_axes.bar(
        [row["scenario"] for row in long_rows],
        [row["long_prompt_ttft_s"] * 1000 for row in long_rows],
    )
    ttft_axes.set_ylabel("long prompt's time to first token (ms)")
    for axes in (ratio_axes, ttft_axes):
        axes.tick_params(axis="x", labelrotation=30)
        axes.grid(alpha=0.3, axis="y")
    fig.suptitle(f"Running streams while a long prompt is prefilled ({model})")
    save_figure(fig, path)


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--stream-prompt-len", type=int, default=64)
    parser.add_argument("--chunk", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--repeats", type=int, default=3, help="long prompts per scenario")
    parser.add_argument("--baseline-steps", type=int, default=32, help="per baseline round")
    parser.add_argument("--warmup-steps", type=int, default=4)
    parser.add_argument("--gap-steps", type=int, default=2, help="unmeasured, between rounds")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "long_prompt.json")
    return parser.parse_args()


def main() -> None:
    """Run every scenario on one loaded model; write the JSON and plot."""
    args = parse_args()
    model, model_dir = benchmark_model()
    decoder = load_decoder(EngineConfig(model_path=model_dir, intra_op_num_threads=args.threads))
    context = decoder.config.context_length
    rows = []
    for budget in [None, *sorted(args.chunk), context]:
        rows.append(run_scenario(decoder, model_dir, args, budget))
        print(f"   {rows[-1]['scenario']}: done", flush=True)
    rows[-1]["scenario"] = "whole (no chunks)"
    baseline_p99 = rows[0]["itl_p99_s"]
    if not math.isfinite(baseline_p99) or baseline_p99 <= 0:
        raise RuntimeError("the baseline measured no inter-token latency")
    for row in rows:
        row["p99_ratio"] = row["itl_p99_s"] / baseline_p99
    print_table(model, rows)
    report = {
        "machine": machine(),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "model": model,
        "model_dir": str(model_dir),
        "context_length": context,
        "target_p99_ratio": TARGET_RATIO,
        "scenarios": rows,
    }
    write_json(args.out, report)
    plot(args.out.with_suffix(".png"), model, rows)
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
