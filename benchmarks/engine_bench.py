"""Engine benchmark: this engine vs a naive one-at-a-time onnxruntime loop vs onnxruntime-genai.

    python benchmarks/engine_bench.py                      # demo model and the benchmark model
    python benchmarks/engine_bench.py --models demo --concurrency 1 8

Every system gets C identical greedy requests at once (prompt of --prompt-len token ids,
exactly --max-tokens new tokens each, EOS ignored) and is timed per token. onnxruntime-genai
runs in its own virtual environment (``--genai-python``) on a model its builder makes from the
same Hugging Face weights; it is skipped with a note when that environment is missing.
Prints a table per model, writes the summaries to ``benchmarks/results/engine_bench.json`` with a
plot beside it, and every request's token times to ``benchmarks/results/raw/`` (git-ignored).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np

from serve_app import DEMO_MODEL_DIR
from serve_app.bench.dataset import prompt_ids
from serve_app.bench.inprocess import RoundFn, measure, round_traces
from serve_app.bench.load import PointRun
from serve_app.bench.report import (
    PointResult,
    comparison_table,
    machine,
    plot_by_concurrency,
    write_json,
)
from serve_app.bench.trace import RequestTrace
from serve_app.engine import EngineConfig, LLMEngine, SamplingParams, load_decoder
from serve_app.engine.backends.onnxruntime_decoder import OnnxDecoder

HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("SERVE_APP_CACHE", Path.home() / ".cache" / "serve_app"))
MODELS = {
    # name: (served model dir, Hugging Face checkpoint of the same weights)
    "demo": (DEMO_MODEL_DIR, CACHE / "demo-hf"),
    "bench": (CACHE / "bench-llama-100m", CACHE / "bench-llama-100m" / "hf"),
}


def engine_round_fn(
    model_dir: Path,
    prompts: list[list[int]],
    max_tokens: int,
    threads: int,
    max_num_seqs: int = 256,
    allow_spinning: bool = True,
    **options: object,
) -> RoundFn:
    """Rounds on a new engine sized for these prompts (a KV budget of every sequence's whole
    request, a prefill budget of 64 prompts); request i of a round gets
    ``prompts[i % len(prompts)]``. ``options`` are further ``EngineOptions`` (backend, device,
    execution_providers).
    """
    longest = max(len(p) for p in prompts)
    config = EngineConfig(
        model_path=model_dir,
        max_num_seqs=max_num_seqs,
        kv_cache_tokens=max_num_seqs * (longest + max_tokens),
        max_prefill_tokens=64 * longest,
        intra_op_num_threads=threads,
        allow_spinning=allow_spinning,
        **options,
    )
    return engine_rounds(LLMEngine(config, load_decoder(config)), prompts, max_tokens)


def engine_rounds(engine: LLMEngine, prompts: list[list[int]], max_tokens: int) -> RoundFn:
    """Rounds on ``engine``; request i of a round gets ``prompts[i % len(prompts)]``."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)

    def round_fn(concurrency: int) -> PointRun:
        round_prompts = [prompts[i % len(prompts)] for i in range(concurrency)]
        traces = round_traces(list(map(len, round_prompts)), max_tokens)
        started = time.perf_counter()
        for i, prompt in enumerate(round_prompts):
            engine.add_request(str(i), prompt, params)
        while engine.has_work():
            outputs = engine.step()
            now = time.perf_counter() - started
            for output in outputs:
                if output.new_token_ids:  # a zero-token chunk would have no inter-token gap
                    traces[int(output.request_id)].record(now, len(output.new_token_ids))
        return PointRun(traces, time.perf_counter() - started)

    return round_fn


def naive_round_fn(
    model_dir: Path, ids: np.ndarray, max_tokens: int, threads: int, **options: object
) -> RoundFn:
    """The loop a user writes first: one sequence at a time, ``session.run`` with numpy.

    ``options`` are further ``EngineOptions``; ``device="cuda"`` makes it the bare CUDA loop.
    """
    config = EngineConfig(model_path=model_dir, intra_op_num_threads=threads, **options)
    decoder = OnnxDecoder(config)
    session = decoder.session
    io = decoder.io
    empty = np.zeros((1, io.num_kv_heads, 0, io.head_dim), dtype=io.kv_dtype)
    prompt = ids.astype(np.int64)[None, :]

    def generate_one(trace: RequestTrace, started: float) -> None:
        feeds = {
            "input_ids": prompt,
            "attention_mask": np.ones_like(prompt),
            "position_ids": np.arange(prompt.shape[1], dtype=np.int64)[None, :],
            **{name: empty for name in io.past_names},
        }
        length = prompt.shape[1]
        for _ in range(max_tokens):
            logits, *present = session.run(None, feeds)
            token = int(logits[0, -1].argmax())
            trace.record(time.perf_counter() - started)
            length += 1
            feeds = {
                "input_ids": np.array([[token]], dtype=np.int64),
                "attention_mask": np.ones((1, length), dtype=np.int64),
                "position_ids": np.array([[length - 1]], dtype=np.int64),
                **dict(zip(io.past_names, present, strict=True)),
            }
            if not io.has_position_ids:
                del feeds["position_ids"]

    def round_fn(concurrency: int) -> PointRun:
        traces = round_traces([len(ids)] * concurrency, max_tokens)
        started = time.perf_counter()
        for trace in traces:  # one after the other: the later ones wait, as a queue would
            generate_one(trace, started)
        return PointRun(traces, time.perf_counter() - started)

    return round_fn


def genai_results(
    args: argparse.Namespace, name: str, hf_dir: Path
) -> tuple[list[PointResult], str]:
    """Build (once) and run the onnxruntime-genai model in its own environment."""
    if not Path(args.genai_python).exists():
        return [], f"skipped: {args.genai_python} not found (see docs/PERFORMANCE.md)"
    if not (hf_dir / "config.json").is_file():
        return [], f"skipped: no Hugging Face checkpoint at {hf_dir}"
    built = CACHE / f"{name}-genai-fp32"
    script = str(HERE / "genai_engine.py")
    subprocess.run(
        [args.genai_python, script, "build", "--checkpoint", str(hf_dir), "--output", str(built)],
        check=True,
    )
    out = CACHE / f"{name}-genai-results.json"
    command = [
        args.genai_python, script, "run", "--model", str(built),
        "--prompt-len", str(args.prompt_len), "--max-tokens", str(args.max_tokens),
        "--seed", str(args.seed), "--threads", str(args.threads),
        "--concurrency", *map(str, args.concurrency), "--json-out", str(out),
    ]  # fmt: skip
    subprocess.run(command, check=True)
    payload = json.loads(out.read_text())  # its raw traces stay in the cache's raw/ folder
    points = [PointResult.from_record(record) for record in payload["points"]]
    results = [dataclasses.replace(p, system=f"genai-{p.system}") for p in points]
    return results, json.dumps(payload.get("notes", {}))


def bench_model(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """Every system on one model."""
    model_dir, hf_dir = MODELS[name]
    if not (model_dir / "model.onnx").is_file():
        hint = "python -m serve_app.tools.build_bench_model" if name == "bench" else ""
        print(f"== {name}: no model at {model_dir}; skipped. {hint}")
        return {"model": name, "skipped": f"no model at {model_dir}"}
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    ids = prompt_ids(args.prompt_len, vocab, args.seed)
    print(f"== {name}: {model_dir}", flush=True)
    levels, m = args.concurrency, args.max_tokens
    engine_fn = engine_round_fn(model_dir, [ids.astype(np.int64).tolist()], m, args.threads)
    results = measure("engine", engine_fn, levels, m)
    results += measure("naive", naive_round_fn(model_dir, ids, m, args.threads), levels, m)
    genai, genai_notes = genai_results(args, name, hf_dir)
    results += genai
    print_table(name, results)
    return {"model": name, "model_dir": str(model_dir), "genai": genai_notes, "points": results}


def print_table(name: str, results: list[PointResult], baseline: str = "naive") -> None:
    """One row per system and concurrency, with the ratios to the ``baseline`` system."""
    print(f"\n{name}: output tokens/s, decode tokens/s, TTFT p50")
    print(comparison_table(results, baseline), end="\n\n", flush=True)


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["demo", "bench"])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--genai-python",
        default=str(HERE.parent / ".venv-tools" / "bin" / "python"),
        help="python of the environment with onnxruntime-genai",
    )
    parser.add_argument("--out", type=Path, default=HERE / "results" / "engine_bench.json")
    return parser.parse_args()


def write_report(report: dict[str, Any], out: Path) -> None:
    """The summary JSON, its plot beside it, and the raw traces in the git-ignored folder."""
    raw = write_json(out, report)
    groups = {m["model"]: m.get("points", []) for m in report["models"]}
    plot_by_concurrency(out.with_suffix(".png"), groups)
    print(f"wrote {out}, {out.with_suffix('.png')} and {raw}")


def main() -> None:
    """Run the benchmark and write its JSON and plot."""
    args = parse_args()
    report: dict[str, Any] = {
        "machine": machine(),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "models": [bench_model(args, name) for name in args.models],
    }
    write_report(report, args.out)


if __name__ == "__main__":
    main()
