"""Service benchmark: the full HTTP service vs the bare engine, same model, same max batch.

    python benchmarks/service_bench.py                       # benchmark model, 32 streams
    python benchmarks/service_bench.py --model demo --concurrency 8 32

Each round sends C streaming requests at once (distinct prompts of about --prompt-len tokens,
exactly --max-tokens new tokens each, greedy, EOS ignored) to ``/v1/stream_infer`` over HTTP,
then gives the bare engine the same token ids in-process. Distinct prompts keep the response
cache out of the measurement. Prints a table, writes the summaries to
``benchmarks/results/service_bench.json`` with a plot beside it, and every request's token times to
``benchmarks/results/raw/`` (git-ignored).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path

import httpx
import numpy as np
import ray
from engine_bench import MODELS, engine_round_fn, print_table, write_report
from ray import serve

from serve_app.app import SERVE_ENV, build_app
from serve_app.bench.inprocess import measure, round_traces
from serve_app.bench.load import PointRun
from serve_app.bench.report import PointResult, machine
from serve_app.bench.trace import RequestTrace
from serve_app.text.tokenizer import Tokenizer

HERE = Path(__file__).resolve().parent


def prompts_for(tokenizer: Tokenizer, count: int, length: int, seed: int) -> list[str]:
    """Distinct text prompts of about ``length`` tokens (decoded from random ids)."""
    rng = np.random.default_rng(seed)
    vocab = tokenizer.vocab_size
    return [
        tokenizer.decode(rng.integers(10, vocab - 10, size=length).tolist()) for _ in range(count)
    ]


async def stream_one(
    client: httpx.AsyncClient, prompt: str, trace: RequestTrace, started: float
) -> None:
    """One streaming request; token counts come from each event's ``tokens``."""
    body = {"prompt": prompt, "max_tokens": trace.max_tokens, "temperature": 0}
    async with client.stream("POST", "/v1/stream_infer", json=body) as response:
        if response.status_code != 200:
            trace.status = str(response.status_code)
            trace.error = (await response.aread()).decode(errors="replace")
            return
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            tokens = int(json.loads(line.removeprefix("data: "))["tokens"])
            if tokens:
                trace.record(time.perf_counter() - started, tokens)


def service_round(base_url: str, prompts: list[str], prompt_len: int, max_tokens: int) -> PointRun:
    """All prompts at once over HTTP."""

    async def run() -> PointRun:
        traces = round_traces([prompt_len] * len(prompts), max_tokens)
        limits = httpx.Limits(max_connections=len(prompts) + 8)
        async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as client:
            started = time.perf_counter()
            await asyncio.gather(
                *(stream_one(client, p, t, started) for p, t in zip(prompts, traces, strict=True))
            )
            return PointRun(traces, time.perf_counter() - started)

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

    def service_fn(concurrency: int) -> PointRun:
        prompts = prompts_for(tokenizer, concurrency, args.prompt_len, seed=next(rounds))
        return service_round(base_url, prompts, args.prompt_len, m)

    results = measure("service", service_fn, levels, m)
    serve.shutdown()
    ray.shutdown()

    print(f"== bare engine: {model_dir}", flush=True)
    engine_results: list[PointResult] = []
    for level in levels:
        prompts = prompts_for(tokenizer, level, args.prompt_len, seed=next(rounds))
        ids = [tokenizer.encode(p) for p in prompts]
        round_fn = engine_round_fn(
            model_dir, ids, m, args.threads, max_num_seqs=64, allow_spinning=args.spinning
        )
        engine_results += measure("engine", round_fn, [level], m)
    results += engine_results

    print_table(args.model, results, baseline="engine")
    report = {
        "machine": machine(),
        "settings": {k: str(v) for k, v in vars(args).items()},
        "models": [{"model": args.model, "model_dir": str(model_dir), "points": results}],
    }
    write_report(report, args.out)


if __name__ == "__main__":
    main()
