"""Service benchmark: the full HTTP service vs the bare engine, same model, same max batch.

    python benchmarks/service_bench.py                       # benchmark model, 32 streams
    python benchmarks/service_bench.py --model demo --concurrency 8 32

Each round sends C streaming requests at once (distinct prompts of about --prompt-len tokens,
exactly --max-tokens new tokens each, greedy, EOS ignored) to ``/v1/stream_infer`` over HTTP,
then gives the bare engine the same token ids in-process. Distinct prompts keep the response
cache out of the measurement. Prints a table, writes JSON and a plot.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path

import httpx
import numpy as np
import ray
from engine_bench import MODELS, engine_round_fn
from ray import serve
from rounds import RequestTiming, RoundResult, measure, summarize

from serve_app.app import SERVE_ENV, build_app
from serve_app.tokenizer import Tokenizer

HERE = Path(__file__).resolve().parent


def prompts_for(tokenizer: Tokenizer, count: int, length: int, seed: int) -> list[str]:
    """Distinct text prompts of about ``length`` tokens (decoded from random ids)."""
    rng = np.random.default_rng(seed)
    vocab = tokenizer.vocab_size
    return [
        tokenizer.decode(rng.integers(10, vocab - 10, size=length).tolist()) for _ in range(count)
    ]


async def stream_one(
    client: httpx.AsyncClient, prompt: str, max_tokens: int, started: float
) -> RequestTiming:
    """One streaming request; token counts come from each event's ``tokens``."""
    timing = RequestTiming()
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    async with client.stream("POST", "/v1/stream_infer", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            tokens = len(json.loads(line.removeprefix("data: "))["tokens"])
            if tokens:
                timing.record(time.perf_counter() - started, tokens)
    return timing


def service_round(
    base_url: str, prompts: list[str], max_tokens: int
) -> tuple[list[RequestTiming], float]:
    """All prompts at once over HTTP."""

    async def run() -> tuple[list[RequestTiming], float]:
        limits = httpx.Limits(max_connections=len(prompts) + 8)
        async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as client:
            started = time.perf_counter()
            timings = await asyncio.gather(
                *(stream_one(client, p, max_tokens, started) for p in prompts)
            )
            return list(timings), time.perf_counter() - started

    return asyncio.run(run())


def main() -> None:
    """Run both systems and write the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="bench")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[32])
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument(
        "--spinning",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="let onnxruntime threads spin between steps (steals CPU from the other hops)",
    )
    parser.add_argument("--out", type=Path, default=HERE / "results" / "service_bench.json")
    args = parser.parse_args()
    model_dir = MODELS[args.model][0]
    tokenizer = Tokenizer(model_dir)
    levels, m = args.concurrency, args.max_tokens
    engine_options = {
        "max_num_seqs": 64,
        "kv_cache_tokens": 64 * (2 * args.prompt_len + m),
        "intra_op_num_threads": args.threads,
        "allow_spinning": args.spinning,
    }

    print(f"== service: {model_dir}", flush=True)
    os.environ.update(SERVE_ENV)  # as the shipped configs set it
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    serve.run(build_app({"model_path": str(model_dir), "engine": engine_options}),
              name="llm", route_prefix="/")  # fmt: skip
    base_url = f"http://127.0.0.1:{args.port}"
    rounds = iter(range(1000))  # a fresh prompt set per round keeps the cache cold

    def service_fn(concurrency: int) -> tuple[list[RequestTiming], float]:
        prompts = prompts_for(tokenizer, concurrency, args.prompt_len, seed=next(rounds))
        return service_round(base_url, prompts, m)

    results = measure("service", service_fn, levels, args.prompt_len, m)
    serve.shutdown()
    ray.shutdown()

    print(f"== bare engine: {model_dir}", flush=True)
    engine_results: list[RoundResult] = []
    for level in levels:
        prompts = prompts_for(tokenizer, level, args.prompt_len, seed=next(rounds))
        ids = [tokenizer.encode(p) for p in prompts]
        round_fn = engine_round_fn(
            model_dir, ids, m, args.threads, max_num_seqs=64, allow_spinning=args.spinning
        )
        round_fn(min(4, level))  # warm-up
        timings, wall = round_fn(level)
        engine_results.append(summarize("engine", timings, wall, args.prompt_len, m))
    results += engine_results

    print("\n| system | C | output tok/s | TTFT p50 ms | tok/s vs engine | TTFT p50 - engine |")
    print("|---|---:|---:|---:|---:|---:|")
    bare = {r.concurrency: r for r in engine_results}
    for r in sorted(results, key=lambda r: (r.concurrency, r.mode)):
        base = bare[r.concurrency]
        ratio = r.output_tokens_per_s / base.output_tokens_per_s
        ttft_gap_ms = (r.ttft_p50_s - base.ttft_p50_s) * 1e3
        print(
            f"| {r.mode} | {r.concurrency} | {r.output_tokens_per_s:.0f} | "
            f"{r.ttft_p50_s * 1e3:.1f} | {ratio:.2f}x | {ttft_gap_ms:+.1f} ms |"
        )
    report = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "settings": {k: str(v) for k, v in vars(args).items()},
        "results": [asdict(r) for r in results],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    plot(results, args.out.with_suffix(".png"))


def plot(results: list[RoundResult], path: Path) -> None:
    """Output tokens/s and TTFT p50 of both systems per concurrency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (throughput, ttft) = plt.subplots(1, 2, figsize=(10, 4))
    levels = sorted({r.concurrency for r in results})
    width = 0.38
    for offset, mode in ((-width / 2, "service"), (width / 2, "engine")):
        rows = {r.concurrency: r for r in results if r.mode == mode}
        x = [i + offset for i in range(len(levels))]
        throughput.bar(x, [rows[c].output_tokens_per_s for c in levels], width, label=mode)
        ttft.bar(x, [rows[c].ttft_p50_s * 1e3 for c in levels], width, label=mode)
    for axis, title in ((throughput, "output tokens/s"), (ttft, "time to first token p50 (ms)")):
        axis.set_xticks(range(len(levels)), [f"C={c}" for c in levels])
        axis.set_title(title)
        axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
