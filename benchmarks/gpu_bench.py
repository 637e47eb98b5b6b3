"""GPU benchmark: the engine on the CUDA and TensorRT execution providers and on native
TensorRT, against a bare onnxruntime CUDA loop, on the same fp16 model.

    python benchmarks/gpu_bench.py --model ~/.cache/serve_app/bench-llama-100m-fp16 \\
        --reference ~/.cache/serve_app/bench-llama-100m

First a correctness pass: greedy tokens of every system against the fp32 model on CPU
(``--reference``); a system agrees when its first ``--agree-tokens`` tokens are the same for
every prompt. Then decode tokens/s and time to first token at each concurrency level.
Systems whose backend or device is missing are skipped with the reason. ``--systems cpu`` runs
the script end to end on a machine without a GPU. Writes the summaries to
``benchmarks/results/gpu_bench.json`` with a plot beside it, and every request's token times to
``benchmarks/results/raw/`` (git-ignored).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
from engine_bench import engine_round_fn, naive_round_fn, print_table, write_report

from serve_app.bench.dataset import prompt_ids
from serve_app.bench.inprocess import measure
from serve_app.bench.report import PointResult, machine
from serve_app.engine import EngineConfig, EngineError, LLMEngine, SamplingParams, load_decoder

TRT_EP = [{"name": "TensorrtExecutionProvider"}, {"name": "CUDAExecutionProvider"}]
SYSTEMS: dict[str, dict[str, object]] = {
    # name: EngineOptions that select it
    "cuda-ep": {"device": "cuda"},
    "tensorrt-ep": {"device": "cuda", "execution_providers": TRT_EP},
    "tensorrt": {"device": "cuda", "backend": "tensorrt"},
    "cpu": {"device": "cpu"},
}
BARE_LOOPS = {"cuda-ep": "bare-cuda", "cpu": "bare-cpu"}  # a baseline per device


def greedy_tokens(
    model_dir: Path, prompts: list[list[int]], count: int, **options: object
) -> list[list[int]]:
    """Greedy continuations of ``prompts`` generated together in one batch."""
    config = EngineConfig(model_path=model_dir, max_prefill_tokens=4096, **options)  # type: ignore[arg-type]
    engine = LLMEngine(config, load_decoder(config))
    params = SamplingParams(temperature=0, max_tokens=count, ignore_eos=True)
    for index, prompt in enumerate(prompts):
        engine.add_request(str(index), prompt, params)
    tokens: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    while engine.has_work():
        for output in engine.step():
            tokens[output.request_id].extend(output.new_token_ids)
    return [tokens[str(i)] for i in range(len(prompts))]


def agreement(reference: list[list[int]], tokens: list[list[int]]) -> dict[str, object]:
    """Where each prompt's tokens first differ from the reference (None: never)."""
    first_diff = [
        next((i for i, (a, b) in enumerate(zip(ref, got, strict=True)) if a != b), None)
        for ref, got in zip(reference, tokens, strict=True)
    ]
    return {"first_divergence": first_diff, "identical": all(d is None for d in first_diff)}


def run_system(
    args: argparse.Namespace, name: str, reference: list[list[int]], prompts: list[list[int]]
) -> tuple[dict[str, Any], list[PointResult]]:
    """Correctness, then throughput, for one system; a load failure is reported, not raised."""
    options = SYSTEMS[name]
    try:
        tokens = greedy_tokens(args.model, prompts, args.agree_tokens, **options)
    except EngineError as exc:
        print(f"== {name}: skipped: {exc}", flush=True)
        return {"system": name, "skipped": str(exc)}, []
    check = agreement(reference, tokens)
    print(f"== {name}: greedy vs CPU fp32: {check}", flush=True)
    m, levels = args.max_tokens, args.concurrency
    engine = engine_round_fn(
        args.model, prompts[:1], m, args.threads, max_num_seqs=max(levels), **options
    )
    results = measure(name, engine, levels, m)
    if name in BARE_LOOPS:
        bare = naive_round_fn(args.model, np.array(prompts[0]), m, args.threads, **options)
        results += measure(BARE_LOOPS[name], bare, levels, m)
    return {"system": name, "correctness": check}, results


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="fp16 export to benchmark")
    parser.add_argument("--reference", type=Path, required=True, help="fp32 export (CPU)")
    parser.add_argument("--systems", nargs="+", choices=sorted(SYSTEMS),
                        default=["cuda-ep", "tensorrt-ep", "tensorrt"])  # fmt: skip
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--agree-tokens", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=8, help="prompts in the correctness pass")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime CPU threads")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "gpu_bench.json"
    )
    return parser.parse_args()


def main() -> None:
    """Run the benchmark and write its JSON and plot."""
    args = parse_args()
    vocab = json.loads((args.model / "config.json").read_text())["vocab_size"]
    prompts = [
        prompt_ids(args.prompt_len, vocab, args.seed + i).tolist() for i in range(args.prompts)
    ]
    reference = greedy_tokens(args.reference, prompts, args.agree_tokens, device="cpu")
    systems: list[dict[str, Any]] = []
    results: list[PointResult] = []
    for name in args.systems:
        system, points = run_system(args, name, reference, prompts)
        systems.append(system)
        results += points
    if results:
        ran = {p.system for p in results}
        print_table("gpu", results, baseline="bare-cuda" if "bare-cuda" in ran else "bare-cpu")
    report = {
        "machine": machine(),
        "settings": {k: str(v) for k, v in vars(args).items()},
        "systems": systems,
        "models": [{"model": args.model.name, "points": results}],
    }
    write_report(report, args.out)


if __name__ == "__main__":
    main()
