"""Shared-prefix benchmark: time to first token of requests sharing a long system prompt.

    python benchmarks/shared_prefix.py                     # the benchmark model, else the demo
    python benchmarks/shared_prefix.py --requests 16 --system-len 512 --model-dir DIR

--requests requests arrive at once at one in-process engine, each a --system-len-token system
prompt (random ids, the same for all) followed by a distinct --question-len-token question,
greedy, --max-tokens tokens each, EOS ignored. Their time to first token (TTFT: from the round's
start to the step that yields a request's first token) is measured in three rounds on one loaded
model: without prefix reuse (``engine.prefix_cache_tokens`` 0); with reuse, cold (the system
prompt is not cached when the round starts: the first request prefills it whole, the rest
reuse it); and with reuse, warm (an earlier request left it cached). The issue's target:
TTFT p50 with reuse <= 0.25x without, at a 1,024-token system prompt (shortened to what the
model's context holds beside the question and the output, and said so). Uses the benchmark
model (``python -m serve_app.tools.build_bench_model``) when it exists, else the demo model, or
--model-dir (an Optimum export or a fused-attention builder folder). Prints a table, writes
``benchmarks/results/shared_prefix.json`` with a plot beside it.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

from serve_app.bench.dataset import prompt_ids
from serve_app.bench.inprocess import benchmark_model
from serve_app.bench.report import figure, machine, markdown_table, save_figure, write_json
from serve_app.bench.stats import distribution
from serve_app.engine import EngineConfig, LLMEngine, ModelConfig, SamplingParams, load_decoder
from serve_app.engine.decoder import Decoder, SlotDecoder

HERE = Path(__file__).resolve().parent
TARGET_RATIO = 0.25  # the bound on TTFT p50 with reuse over without
SCENARIOS = ("no reuse", "reuse, cold", "reuse, warm")


def run_round(
    decoder: Decoder | SlotDecoder,
    model_dir: Path,
    args: argparse.Namespace,
    system: list[int],
    scenario: str,
) -> dict[str, Any]:
    """TTFTs of one round of ``args.requests`` requests sent at once."""
    context = decoder.config.context_length
    config = EngineConfig(
        model_path=model_dir,
        max_num_seqs=args.requests,
        kv_cache_tokens=args.requests * context,
        prefix_cache_tokens=0 if scenario == "no reuse" else args.prefix_cache_tokens,
        intra_op_num_threads=args.threads,
    )
    engine = LLMEngine(config, decoder)
    vocab = decoder.config.vocab_size
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    # Warm-up on another system prompt: the round's prompt is cached only where it says warm.
    warm_up = prompt_ids(len(system), vocab, seed=1).tolist()
    warm_ups = [warm_up + prompt_ids(args.question_len, vocab, seed=2 + i).tolist() for i in (0, 1)]
    if scenario == "reuse, warm":
        warm_ups.append(system + prompt_ids(args.question_len, vocab, seed=3).tolist())
    for index, prompt in enumerate(warm_ups):
        engine.add_request(f"warm-up-{index}", prompt, params)
        while engine.has_work():
            engine.step()
    questions = [
        prompt_ids(args.question_len, vocab, seed=100 + i).tolist() for i in range(args.requests)
    ]
    start = time.perf_counter()
    for index, question in enumerate(questions):
        engine.add_request(str(index), system + question, params)
    ttft: dict[str, float] = {}
    reused = queried = steps = 0
    while engine.has_work():
        outputs = engine.step()
        now = time.perf_counter()
        steps += 1
        for output in outputs:
            if output.new_token_ids and output.request_id not in ttft:
                ttft[output.request_id] = now - start
        reused += engine.last_stats.prefix_cache_hits
        queried += engine.last_stats.prefix_cache_queries
    wall = time.perf_counter() - start
    if len(ttft) != args.requests:
        raise RuntimeError(f"{scenario}: {args.requests - len(ttft)} requests got no token")
    times = distribution(list(ttft.values()))
    return {
        "scenario": scenario,
        "ttft_p50_s": times.p50,
        "ttft_p90_s": times.p90,
        "ttft_max_s": max(ttft.values()),
        "wall_s": wall,
        "steps": steps,
        "prefix_cache_queries": queried,
        "prefix_cache_hits": reused,
    }


def print_table(model: str, system_len: int, rows: list[dict[str, Any]]) -> None:
    """TTFT per scenario in milliseconds, and the p50 ratio to the round without reuse."""
    table = [
        [
            row["scenario"],
            f"{row['ttft_p50_s'] * 1000:.0f}",
            f"{row['ttft_p90_s'] * 1000:.0f}",
            f"{row['ttft_max_s'] * 1000:.0f}",
            f"{row['p50_ratio']:.2f}",
            f"{row['prefix_cache_hits']} / {row['prefix_cache_queries']}",
            f"{row['wall_s']:.1f}",
        ]
        for row in rows
    ]
    headers = ["scenario", "TTFT p50 ms", "TTFT p90 ms", "TTFT max ms", "p50 / no reuse"]
    headers += ["hit / queried tokens", "round s"]
    print(f"== {model}, {system_len}-token system prompt: target p50 / no reuse <= {TARGET_RATIO}")
    print(markdown_table(headers, table), flush=True)


def plot(path: Path, model: str, system_len: int, rows: list[dict[str, Any]]) -> None:
    """TTFT p50 and p90 per scenario."""
    fig = figure(7, 4.5)
    axes = fig.subplots()
    labels = [row["scenario"] for row in rows]
    positions = range(len(rows))
    axes.bar([p - 0.2 for p in positions], [r["ttft_p50_s"] * 1000 for r in rows], 0.4, label="p50")
    axes.bar([p + 0.2 for p in positions], [r["ttft_p90_s"] * 1000 for r in rows], 0.4, label="p90")
    target = rows[0]["ttft_p50_s"] * 1000 * TARGET_RATIO
    axes.axhline(target, color="red", linestyle="--", label="target p50 (0.25x no reuse)")
    axes.set_xticks(list(positions), labels)
    axes.set_ylabel("time to first token (ms)")
    axes.grid(alpha=0.3, axis="y")
    axes.legend()
    fig.suptitle(f"{rows[0]['requests']} requests, one {system_len}-token system prompt ({model})")
    save_figure(fig, path)


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--system-len", type=int, default=1024)
    parser.add_argument("--question-len", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--prefix-cache-tokens", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "shared_prefix.json")
    return parser.parse_args()


def main() -> None:
    """Run the three rounds on one loaded model; write the JSON and plot."""
    args = parse_args()
    model, model_dir = (
        (args.model_dir.name, args.model_dir) if args.model_dir else benchmark_model()
    )
    context = ModelConfig.from_dir(model_dir).context_length
    decoder = load_decoder(
        EngineConfig(
            model_path=model_dir,
            max_num_seqs=args.requests,
            kv_cache_tokens=args.requests * context,  # a fused-attention model's rows
            intra_op_num_threads=args.threads,
        )
    )
    system_len = min(args.system_len, context - args.question_len - args.max_tokens)
    if system_len < args.system_len:
        print(
            f"   the context ({context}) holds a {system_len}-token system prompt, not "
            f"{args.system_len}",
            flush=True,
        )
    system = prompt_ids(system_len, decoder.config.vocab_size, seed=0).tolist()
    rows = []
    for scenario in SCENARIOS:
        rows.append(
            {**run_round(decoder, model_dir, args, system, scenario), "requests": args.requests}
        )
        print(f"   {scenario}: done", flush=True)
    for row in rows:
        row["p50_ratio"] = row["ttft_p50_s"] / rows[0]["ttft_p50_s"]
    print_table(model, system_len, rows)
    report = {
        "machine": machine(),
        "settings": {
            k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "out"
        },
        "model": model,
        "model_dir": str(model_dir),
        "decoder": decoder.describe(),
        "context_length": context,
        "system_prompt_tokens": system_len,
        "target_p50_ratio": TARGET_RATIO,
        "scenarios": rows,
    }
    write_json(args.out, report)
    plot(args.out.with_suffix(".png"), model, system_len, rows)
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
