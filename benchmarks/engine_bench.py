"""Engine benchmark: this engine vs a naive one-at-a-time onnxruntime loop vs onnxruntime-genai.

    python benchmarks/engine_bench.py                      # demo model and the benchmark model
    python benchmarks/engine_bench.py --models demo --concurrency 1 8

Every system gets C identical greedy requests at once (prompt of --prompt-len token ids,
exactly --max-tokens new tokens each, EOS ignored) and is timed per token. onnxruntime-genai
runs in its own virtual environment (``--genai-python``) on a model its builder makes from the
same Hugging Face weights; it is skipped with a note when that environment is missing.
Prints a table per model, writes ``benchmarks/results/engine_bench.json`` and a plot.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnxruntime as ort
from rounds import RequestTiming, RoundFn, RoundResult, measure, prompt_ids

from serve_app import DEMO_MODEL_DIR
from serve_app.engine import EngineConfig, LLMEngine, SamplingParams
from serve_app.engine.onnx_model import OnnxDecoder

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
    """Rounds on this engine; request i of a round gets ``prompts[i % len(prompts)]``.

    ``options`` are further ``EngineOptions`` (backend, device, execution_providers).
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
    engine = LLMEngine(config)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)

    def round_fn(concurrency: int) -> tuple[list[RequestTiming], float]:
        timings = {str(i): RequestTiming() for i in range(concurrency)}
        started = time.perf_counter()
        for i, request_id in enumerate(timings):
            engine.add_request(request_id, prompts[i % len(prompts)], params)
        while engine.has_work():
            outputs = engine.step()
            now = time.perf_counter() - started
            for output in outputs:
                timings[output.request_id].record(now, len(output.new_token_ids))
        return list(timings.values()), time.perf_counter() - started

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

    def generate_one(timing: RequestTiming, started: float) -> None:
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
            timing.record(time.perf_counter() - started)
            length += 1
            feeds = {
                "input_ids": np.array([[token]], dtype=np.int64),
                "attention_mask": np.ones((1, length), dtype=np.int64),
                "position_ids": np.array([[length - 1]], dtype=np.int64),
                **dict(zip(io.past_names, present, strict=True)),
            }
            if not io.has_position_ids:
                del feeds["position_ids"]

    def round_fn(concurrency: int) -> tuple[list[RequestTiming], float]:
        timings = [RequestTiming() for _ in range(concurrency)]
        started = time.perf_counter()
        for timing in timings:
            generate_one(timing, started)
        return timings, time.perf_counter() - started

    return round_fn


def genai_results(
    args: argparse.Namespace, name: str, hf_dir: Path, vocab_size: int
) -> tuple[list[RoundResult], str]:
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
    payload = json.loads(out.read_text())
    results = [RoundResult(**{**r, "mode": f"genai-{r['mode']}"}) for r in payload["results"]]
    return results, json.dumps(payload.get("notes", {}))


def bench_model(args: argparse.Namespace, name: str) -> dict[str, object]:
    """Every system on one model."""
    model_dir, hf_dir = MODELS[name]
    if not (model_dir / "model.onnx").is_file():
        hint = "python -m serve_app.tools.build_bench_model" if name == "bench" else ""
        print(f"== {name}: no model at {model_dir}; skipped. {hint}")
        return {"model": name, "skipped": f"no model at {model_dir}"}
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    ids = prompt_ids(args.prompt_len, vocab, args.seed)
    print(f"== {name}: {model_dir}", flush=True)
    levels, p, m = args.concurrency, args.prompt_len, args.max_tokens
    engine_fn = engine_round_fn(model_dir, [ids.astype(np.int64).tolist()], m, args.threads)
    results = measure("engine", engine_fn, levels, p, m)
    results += measure("naive", naive_round_fn(model_dir, ids, m, args.threads), levels, p, m)
    genai, genai_notes = genai_results(args, name, hf_dir, vocab)
    results += genai
    print_table(name, results)
    return {"model": name, "model_dir": str(model_dir), "genai": genai_notes,
            "results": [asdict(r) for r in results]}  # fmt: skip


def print_table(name: str, results: list[RoundResult], baseline: str = "naive") -> None:
    """One row per system and concurrency, with the ratio to the ``baseline`` system."""
    naive = {r.concurrency: r.output_tokens_per_s for r in results if r.mode == baseline}
    print(f"\n{name}: output tokens/s, decode tokens/s, TTFT p50")
    print(f"| system | C | output tok/s | decode tok/s | TTFT p50 ms | vs {baseline} |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in sorted(results, key=lambda r: (r.mode, r.concurrency)):
        ratio = r.output_tokens_per_s / naive[r.concurrency] if r.concurrency in naive else 0.0
        print(
            f"| {r.mode} | {r.concurrency} | {r.output_tokens_per_s:.0f} | "
            f"{r.decode_tokens_per_s:.0f} | {r.ttft_p50_s * 1e3:.1f} | {ratio:.2f}x |"
        )
    print(flush=True)


def plot(report: dict[str, object], path: Path) -> None:
    """Throughput and TTFT against concurrency, one column per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in report["models"] if "results" in m]  # type: ignore[union-attr]
    if not models:
        return
    fig, axes = plt.subplots(2, len(models), figsize=(6 * len(models), 8), squeeze=False)
    for column, model in enumerate(models):
        modes = sorted({r["mode"] for r in model["results"]})
        for mode in modes:
            rows = [r for r in model["results"] if r["mode"] == mode]
            levels = [r["concurrency"] for r in rows]
            axes[0][column].plot(levels, [r["output_tokens_per_s"] for r in rows], "o-", label=mode)
            axes[1][column].plot(levels, [r["ttft_p50_s"] * 1e3 for r in rows], "o-", label=mode)
        axes[0][column].set_title(f"{model['model']}: output tokens/s")
        axes[1][column].set_title(f"{model['model']}: time to first token p50 (ms)")
        for axis in (axes[0][column], axes[1][column]):
            axis.set_xscale("log", base=2)
            axis.set_xlabel("concurrent sequences")
            axis.grid(alpha=0.3)
            axis.legend()
        axes[1][column].set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


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


def machine() -> dict[str, object]:
    """What the numbers were measured on."""
    return {"platform": platform.platform(), "cpus": os.cpu_count(),
            "python": sys.version.split()[0], "onnxruntime": ort.__version__,
            "providers": ort.get_available_providers()}  # fmt: skip


def write_report(report: dict[str, object], out: Path) -> None:
    """The JSON report and its plot beside it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {out}")
    plot(report, out.with_suffix(".png"))


def main() -> None:
    """Run the benchmark and write its JSON and plot."""
    args = parse_args()
    report: dict[str, object] = {
        "machine": machine(),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "models": [bench_model(args, name) for name in args.models],
    }
    write_report(report, args.out)


if __name__ == "__main__":
    main()
