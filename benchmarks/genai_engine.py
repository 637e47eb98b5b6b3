"""Benchmark onnxruntime-genai's continuous-batching Engine as a baseline for our own engine.

Runs in the tools venv (``.venv-tools``), which installs this project too: it takes its rounds,
traces and summaries from ``serve_app.bench`` (numpy and the standard library only), never the
engine or Ray.

    python benchmarks/genai_engine.py build --checkpoint HF_DIR --output GENAI_DIR
    python benchmarks/genai_engine.py run --model GENAI_DIR --prompt-len 64 --max-tokens 64 \
        --concurrency 1 8 32 64 --json-out genai.json

``run`` submits C identical greedy requests at once and reports TTFT, decode tokens/s and output
tokens/s per concurrency; ``--json-out`` gets the summaries, ``raw/`` beside it every request's
token times. Two modes exist:

* ``engine``: ``og.Engine`` + ``og.Request``. On CPU (no PagedAttention export) the Engine uses its
  static batch scheduler, which admits at most 4 requests per batch and runs a batch to completion
  before admitting the next; the paged dynamic scheduler needs a CUDA/WebGPU fp16 export.
* ``static-generator``: one ``og.Generator`` with ``batch_size = C`` (a static batch).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime_genai as og

from serve_app.bench.dataset import prompt_ids
from serve_app.bench.inprocess import RoundFn, measure, round_traces
from serve_app.bench.load import PointRun
from serve_app.bench.report import PointResult, write_json
from serve_app.bench.trace import RequestTrace

MODES = ("engine", "static-generator")
GENERATOR_MAX_BATCH = 32  # og.Generator refuses larger batches ("batch_size must be in [1, 32]")


# ---------------------------------------------------------------------------------------------
# build


def is_built(output_dir: Path) -> bool:
    """A genai model dir is complete once both the config and the graph exist."""
    return (output_dir / "genai_config.json").is_file() and (output_dir / "model.onnx").is_file()


def build(args: argparse.Namespace) -> None:
    """Export an HF checkpoint dir with onnxruntime-genai's model builder."""
    output_dir: Path = args.output
    if is_built(output_dir) and not args.force:
        print(f"[build] {output_dir} already built, skipping (use --force to rebuild)")
        return
    cache_dir = args.cache_dir or output_dir.parent / f".{output_dir.name}-builder-cache"
    cmd = [
        sys.executable,
        "-m",
        "onnxruntime_genai.models.builder",
        "-i",
        str(args.checkpoint),
        "-o",
        str(output_dir),
        "-p",
        args.precision,
        "-e",
        args.execution_provider,
        # The builder's default cache dir is ./cache_dir relative to the cwd.
        "-c",
        str(cache_dir),
    ]
    if args.extra_option:
        cmd += ["--extra_options", *args.extra_option]
    # The checkpoint is a local dir, so the Hub must never be contacted.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    print("[build] " + " ".join(cmd), flush=True)
    started = time.perf_counter()
    # Inherit stdout/stderr so the builder's own progress bars show live.
    subprocess.run(cmd, env=env, check=True)
    print(f"[build] done in {time.perf_counter() - started:.1f}s -> {output_dir}")


# ---------------------------------------------------------------------------------------------
# run


def load_model(args: argparse.Namespace, genai_config: dict) -> tuple[og.Model, dict]:
    """Load the genai model with runtime overlays applied; return it and the effective settings."""
    # The Engine rejects a session-wide min_length and beam search that a checkpoint may carry.
    overlay: dict = {"search": {"min_length": 0, "num_beams": 1}}
    if args.threads:
        overlay["model"] = {"decoder": {"session_options": {"intra_op_num_threads": args.threads}}}
    # A paged export carries engine.dynamic_batching; anything else gets the static scheduler.
    dynamic = "dynamic_batching" in genai_config.get("engine", {})
    batching: dict = {}
    if args.max_batch_size:
        batching["max_batch_size"] = args.max_batch_size
    if dynamic and args.num_blocks:
        batching["num_blocks"] = args.num_blocks
    if dynamic and args.max_scheduled_tokens:
        batching["max_scheduled_tokens"] = args.max_scheduled_tokens
    if batching:
        overlay["engine"] = {"dynamic_batching" if dynamic else "static_batching": batching}

    config = og.Config(str(args.model))
    config.overlay(json.dumps(overlay))
    model = og.Model(config)
    settings = {
        "engine_scheduler": "dynamic" if dynamic else "static",
        "overlay": overlay,
        "search": genai_config.get("search", {}),
        "engine_config": genai_config.get("engine", {}),
        # 0.18's StaticBatchScheduler::Schedule hard-codes 4; static_batching.max_batch_size only
        # sizes the sampler, so it changes get_capabilities() but not how many requests run.
        "engine_requests_per_batch": "scheduler-decided" if dynamic else 4,
    }
    return model, settings


def run_engine_round(
    engine: og.Engine, ids: np.ndarray, concurrency: int, max_tokens: int, session_tokens: int
) -> PointRun:
    """Submit `concurrency` requests at once to og.Engine and drain it."""
    buffer = engine.create_event_buffer(max(256, 2 * concurrency))
    traces = round_traces([len(ids)] * concurrency, max_tokens)
    by_request: dict[og.Request, RequestTrace] = {}
    requests = []
    started = time.perf_counter()
    for _ in range(concurrency):
        options = og.RequestOptions()
        if session_tokens:
            # Sizes the static engine's contiguous KV cache; 0 falls back to search.max_length.
            options.set_max_session_tokens(session_tokens)
        request = engine.create_request(options=options)
        turn = og.TurnOptions(request)
        turn.set_do_sample(False)
        turn.set_max_generated_tokens(max_tokens)
        # Masks EOS until max_tokens are out, so every request generates exactly max_tokens.
        turn.set_min_generated_tokens(max_tokens)
        request.begin_turn(ids, turn)
        by_request[request] = traces[len(requests)]
        requests.append(request)
    while engine.has_pending_requests():
        engine.run(buffer)
        now_s = time.perf_counter() - started
        for index in range(len(buffer)):
            event = buffer[index]
            flags = int(event.flags)
            if flags & int(og.EngineEventFlags.FAILED):
                raise RuntimeError(f"engine request failed: {event.error_code}")
            if flags & int(og.EngineEventFlags.TOKEN):
                by_request[event.request].record(now_s)
    wall_s = time.perf_counter() - started
    for request in requests:
        request.close()
    return PointRun(traces, wall_s)


def run_generator_round(
    model: og.Model, ids: np.ndarray, concurrency: int, max_tokens: int
) -> PointRun:
    """Run one static og.Generator batch of `concurrency` identical prompts."""
    total_len = len(ids) + max_tokens
    started = time.perf_counter()
    params = og.GeneratorParams(model)
    # min_length == max_length masks EOS so exactly max_tokens come out.
    params.set_search_options(
        batch_size=concurrency, max_length=total_len, min_length=total_len, do_sample=False
    )
    generator = og.Generator(model, params)
    generator.append_tokens(np.tile(ids, (concurrency, 1)))
    traces = round_traces([len(ids)] * concurrency, max_tokens)
    while not generator.is_done():
        generator.generate_next_token()
        now_s = time.perf_counter() - started
        for trace in traces:
            trace.record(now_s)
    wall_s = time.perf_counter() - started
    del generator
    return PointRun(traces, wall_s)


def engine_round_fn(
    model: og.Model, ids: np.ndarray, args: argparse.Namespace, notes: dict
) -> RoundFn:
    """Create one og.Engine for every concurrency level and record its capabilities."""
    engine = og.Engine(model)
    caps = engine.get_capabilities()
    notes["engine_capabilities"] = {
        "configured_max_batch_size": caps.configured_max_batch_size,
        "max_request_length": caps.max_request_length,
        "max_scheduled_tokens": caps.max_scheduled_tokens,
    }
    session_tokens = (
        args.prompt_len + args.max_tokens
        if args.max_session_tokens < 0
        else args.max_session_tokens
    )
    notes["max_session_tokens"] = session_tokens
    print(f"[run] engine scheduler={notes['engine_scheduler']} caps={notes['engine_capabilities']}")
    return lambda c: run_engine_round(engine, ids, c, args.max_tokens, session_tokens)


def run(args: argparse.Namespace) -> None:
    """Measure every requested mode at every concurrency level."""
    print(f"[run] loading {args.model}", flush=True)
    genai_config = json.loads((args.model / "genai_config.json").read_text())
    model, settings = load_model(args, genai_config)
    ids = prompt_ids(args.prompt_len, int(genai_config["model"]["vocab_size"]), args.seed)
    notes: dict = {"onnxruntime_genai": og.__version__, **settings}

    results: list[PointResult] = []
    for mode in args.mode:
        levels = args.concurrency
        if mode == "engine":
            round_fn = engine_round_fn(model, ids, args, notes)
        else:
            round_fn = lambda c: run_generator_round(model, ids, c, args.max_tokens)  # noqa: E731
            levels = [c for c in levels if c <= GENERATOR_MAX_BATCH]
            notes["static_generator_skipped"] = sorted(set(args.concurrency) - set(levels))
        results += measure(mode, round_fn, levels, args.max_tokens)

    if args.json_out:
        payload = {"notes": notes, "points": results}
        raw = write_json(args.json_out, payload)
        print(f"[run] wrote {args.json_out} and {raw}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """CLI for the build and run subcommands."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="export an HF checkpoint dir with the genai model builder")
    b.add_argument(
        "--checkpoint",
        type=Path,
        required=True,
        help="HF dir with config + safetensors + tokenizer",
    )
    b.add_argument("--output", type=Path, required=True, help="genai model output dir")
    b.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16", "int8", "int4"])
    b.add_argument("--execution-provider", default="cpu", choices=["cpu", "cuda", "dml", "webgpu"])
    b.add_argument("--cache-dir", type=Path, default=None, help="builder scratch dir")
    b.add_argument(
        "--extra-option", nargs="*", default=[], metavar="KEY=VALUE", help="builder --extra_options"
    )
    b.add_argument("--force", action="store_true", help="rebuild even if the output exists")

    r = sub.add_parser("run", help="benchmark a built genai model")
    r.add_argument("--model", type=Path, required=True, help="genai model dir (output of build)")
    r.add_argument("--prompt-len", type=int, default=64)
    r.add_argument("--max-tokens", type=int, default=64)
    r.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    r.add_argument("--mode", nargs="+", choices=MODES, default=list(MODES))
    r.add_argument("--seed", type=int, default=0, help="seed of the prompt token ids")
    r.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0 = ORT default)")
    r.add_argument(
        "--max-batch-size", type=int, default=0, help="engine.*_batching.max_batch_size overlay"
    )
    r.add_argument(
        "--num-blocks", type=int, default=0, help="paged KV blocks (dynamic batching only)"
    )
    r.add_argument(
        "--max-scheduled-tokens",
        type=int,
        default=0,
        help="tokens per step (dynamic batching only)",
    )
    r.add_argument(
        "--max-session-tokens",
        type=int,
        default=-1,
        help="per-request token cap (-1 = prompt-len + max-tokens, 0 = genai_config max_length)",
    )
    r.add_argument("--json-out", type=Path, default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Entry point."""
    args = parse_args(argv)
    if args.command == "build":
        build(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
