"""KV rows in place vs onnxruntime-genai's og.Generator vs the Optimum layout, one set of weights.

    python -m serve_app.tools.build_bench_model      # once: adds the fused-attention build, gqa/
    python benchmarks/kv_rows_bench.py               # issue 12's points, ~15 min on 2 busy cores
    python benchmarks/kv_rows_bench.py --contexts 128 512 --repeat 1

Three systems on the benchmark model's weights (``build_bench_model``), greedy, EOS ignored,
every request of a round sent at once:

* ``engine-rows``: this engine on the fused-attention build (``<bench>/gqa``, KV rows in place);
* ``generator``: onnxruntime-genai's ``og.Generator``, one static batch of C, on that same folder;
* ``engine-optimum``: this engine on the Optimum-layout export (``<bench>/model.onnx``).

Decode part: ``--prompt-len`` token prompts, ``--max-tokens`` new tokens, C = ``--concurrency``,
all three systems. Context sweep: ``--sweep-concurrency`` requests of total context T each (a
prompt of T - ``--sweep-new-tokens`` tokens), the two engines only. Both engines run with the same
settings: ``max_num_seqs`` = the largest C, a KV budget of that many whole contexts (what the
in-place rows take), ``--max-prefill-tokens`` per step, and prefix reuse off: every request of a
round has the same prompt, which reuse would turn into one prefill and C - 1 hits
(``benchmarks/shared_prefix.py`` measures reuse). Each decode point runs ``--repeat`` times,
alternating between the systems, and the fastest run is kept (the machine is shared: other work
only ever slows a run down); a sweep point runs once (minutes each); every run is in the JSON.
Besides the stats' decode tok/s (from the first first token), each point gets its full-batch
decode tok/s: from the last request's first token on, steps over the whole batch only. For the
engines, the seconds spent inside onnxruntime's ``run`` calls are recorded per round: the split
between the graph and the engine's own work. Prints the tables, writes
``benchmarks/results/kv_rows_bench.json`` with a plot beside it, raw traces to ``raw/``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from engine_bench import engine_rounds
from genai_engine import load_model, run_generator_round
from genai_engine import parse_args as genai_args

from serve_app.bench.dataset import prompt_ids
from serve_app.bench.inprocess import RoundFn, benchmark_model, measure
from serve_app.bench.load import PointRun
from serve_app.bench.report import (
    PointResult,
    concurrency,
    figure,
    machine,
    markdown_table,
    save_figure,
    write_json,
)
from serve_app.engine import EngineConfig, LLMEngine, load_decoder
from serve_app.engine.model_config import ModelConfig

HERE = Path(__file__).resolve().parent
ROWS, GENERATOR, OPTIMUM = "engine-rows", "generator", "engine-optimum"


class SessionClock:
    """Seconds spent inside ``onnxruntime.InferenceSession`` runs, over every session in the
    process while installed (one round runs at a time, so a round's share is its own)."""

    METHODS = ("run", "run_with_iobinding", "run_with_ort_values")

    def __init__(self) -> None:
        self.seconds = 0.0

    @contextmanager
    def installed(self) -> Iterator[None]:
        """Wrap the session's run methods for the duration of the block."""
        originals = {name: getattr(ort.InferenceSession, name) for name in self.METHODS}

        def timed(method: Callable[..., Any]) -> Callable[..., Any]:
            def run(*args: Any, **kwargs: Any) -> Any:
                started = time.perf_counter()
                try:
                    return method(*args, **kwargs)
                finally:
                    self.seconds += time.perf_counter() - started

            return run

        for name, method in originals.items():
            setattr(ort.InferenceSession, name, timed(method))
        try:
            yield
        finally:
            for name, method in originals.items():
                setattr(ort.InferenceSession, name, method)


def timed_rounds(round_fn: RoundFn, clock: SessionClock, splits: dict[int, float]) -> RoundFn:
    """``round_fn`` that records, per concurrency, its last round's share of wall time spent in
    onnxruntime runs (the warm-up's is overwritten by the measured round's unless C matches)."""

    def round_with_split(level: int) -> PointRun:
        clock.seconds = 0.0
        run = round_fn(level)
        splits[level] = clock.seconds / run.wall_s
        return run

    return round_with_split


def fastest(runs: list[list[PointResult]]) -> list[PointResult]:
    """Of several runs of the same levels, the fastest (output tok/s) point of each level."""
    return [
        max(points, key=lambda p: p.summary.output_throughput) for points in zip(*runs, strict=True)
    ]


def run_record(point: PointResult) -> dict[str, Any]:
    """What the JSON keeps of every run, the slower repetitions included."""
    s = point.summary
    return {
        "system": point.system,
        "C": concurrency(point),
        "output_tok_s": s.output_throughput,
        "decode_tok_s": s.decode_throughput,
        "full_batch_decode_tok_s": full_batch_decode(point),
        "ttft_p50_s": s.ttft.p50,
    }


class Bench:
    """The two model folders, the settings and the process-wide session clock."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        _, self.rows_dir = benchmark_model("gqa")
        _, self.optimum_dir = benchmark_model()
        self.model = ModelConfig.from_dir(self.optimum_dir)
        self.clock = SessionClock()
        self.max_seqs = max([*args.concurrency, args.sweep_concurrency])
        self.runs: list[dict[str, Any]] = []
        self.splits: dict[str, dict[int, float]] = {}  # "<system> T=<context>" -> C -> share
        self.engines: dict[str, LLMEngine] = {}

    def prompt(self, length: int) -> np.ndarray:
        """The same random prompt ids for every system."""
        return prompt_ids(length, self.model.vocab_size, self.args.seed)

    def engine(self, system: str, ids: np.ndarray, new_tokens: int, key: str) -> RoundFn:
        """Rounds of ``ids`` on this engine over its layout's folder, loaded once for every
        point: its KV rows are allocated lazily by the OS (huge pages, zeroed on first touch),
        and the first rounds to touch them should not be timed at every context."""
        if system not in self.engines:
            config = EngineConfig(
                model_path=self.rows_dir if system == ROWS else self.optimum_dir,
                max_num_seqs=self.max_seqs,
                kv_cache_tokens=self.max_seqs * self.model.context_length,
                max_prefill_tokens=self.args.max_prefill_tokens,
                prefix_cache_tokens=self.args.prefix_cache_tokens,
                intra_op_num_threads=self.args.threads,
            )
            self.engines[system] = LLMEngine(config, load_decoder(config))
        round_fn = engine_rounds(self.engines[system], [ids.astype(np.int64).tolist()], new_tokens)
        return timed_rounds(round_fn, self.clock, self.splits.setdefault(key, {}))

    def decode_part(self) -> list[PointResult]:
        """The three systems on short prompts at each concurrency, repetitions alternating
        between the systems so that a slow spell of the machine hits them alike."""
        args, ids = self.args, self.prompt(self.args.prompt_len)
        key = f"T={args.prompt_len + args.max_tokens}"
        options = genai_args(["run", "--model", str(self.rows_dir), "--threads", str(args.threads)])
        genai_config = json.loads((self.rows_dir / "genai_config.json").read_text())
        og_model, _ = load_model(options, genai_config)
        round_fns = {
            GENERATOR: lambda c: run_generator_round(og_model, ids, c, args.max_tokens),
            **{s: self.engine(s, ids, args.max_tokens, f"{s} {key}") for s in (ROWS, OPTIMUM)},
        }
        runs: dict[str, list[list[PointResult]]] = {system: [] for system in round_fns}
        for _ in range(args.repeat):
            for system, round_fn in round_fns.items():
                points = measure(system, round_fn, args.concurrency, args.max_tokens)
                runs[system].append(points)
                self.runs += map(run_record, points)
        return [p for system_runs in runs.values() for p in fastest(system_runs)]

    def sweep_point(self, context: int) -> list[PointResult]:
        """Both engines at one total context, rows first."""
        args = self.args
        ids = self.prompt(context - args.sweep_new_tokens)
        points = []
        for system in (ROWS, OPTIMUM):
            round_fn = self.engine(system, ids, args.sweep_new_tokens, f"{system} T={context}")
            level = [args.sweep_concurrency]
            run = measure(f"{system} T={context}", round_fn, level, args.sweep_new_tokens)
            self.runs += map(run_record, run)
            points += run
        return points


def all_joined(point: PointResult) -> float:
    """Seconds into the round when its last request got its first token: the prefills (and the
    decode steps between them) are over."""
    return max(t.start + t.chunks[0].t for t in point.traces)


def full_batch_decode(point: PointResult) -> float:
    """Tokens/s once every request of the round has its first token: decode steps over the whole
    batch at the round's context, no prefill between them (the stats' decode tok/s starts at the
    first request's first token, so it counts the later requests' prefills too)."""
    joined = all_joined(point)
    last = max(t.start + t.chunks[-1].t for t in point.traces)
    tokens = sum(c.tokens for t in point.traces for c in t.chunks if t.start + c.t > joined)
    return tokens / (last - joined) if last > joined else 0.0


def ratio(points: list[PointResult], system: str, base: str, level: int, field: str) -> float:
    """``system``'s ``field`` over ``base``'s at concurrency ``level``."""
    value = {(p.system, concurrency(p)): getattr(p.summary, field) for p in points}
    return float(value[(system, level)] / value[(base, level)])


def decode_table(points: list[PointResult], splits: dict[str, dict[int, float]], key: str) -> str:
    """A row per system and concurrency; engine-rows against og.Generator and engine-optimum."""
    rows = []
    for p in sorted(points, key=lambda p: (concurrency(p), p.system)):
        level, s = concurrency(p), p.summary
        share = splits.get(f"{p.system} {key}", {}).get(level)
        rows.append(
            [
                p.system,
                str(level),
                f"{s.decode_throughput:.0f}",
                f"{full_batch_decode(p):.0f}",
                f"{s.output_throughput:.0f}",
                f"{(s.ttft.p50 or 0.0) * 1e3:.0f}",
                f"{ratio(points, ROWS, p.system, level, 'decode_throughput'):.2f}x",
                "-" if share is None else f"{share:.0%}",
            ]
        )
    headers = ["system", "C", "decode tok/s", "full-batch decode", "output tok/s", "TTFT p50 ms"]
    return markdown_table([*headers, "rows decode ÷ this", "in ORT runs"], rows)


def sweep_table(points: list[PointResult], splits: dict[str, dict[int, float]]) -> str:
    """A row per context: both engines' output and decode tok/s and their ratios."""
    by = {p.system: p for p in points}
    rows = []
    for context in sorted({int(p.system.split("T=")[1]) for p in points}):
        rows_p, opt_p = by[f"{ROWS} T={context}"], by[f"{OPTIMUM} T={context}"]
        rows_s, opt = rows_p.summary, opt_p.summary
        full = full_batch_decode(rows_p), full_batch_decode(opt_p)
        level = concurrency(rows_p)
        shares = [
            splits.get(f"{system} T={context}", {}).get(level, float("nan"))
            for system in (ROWS, OPTIMUM)
        ]
        rows.append(
            [
                str(context),
                f"{rows_s.output_throughput:.0f}",
                f"{opt.output_throughput:.0f}",
                f"{rows_s.output_throughput / opt.output_throughput:.2f}x",
                f"{full[0]:.0f}",
                f"{full[1]:.0f}",
                f"{full[0] / full[1]:.2f}x",
                f"{all_joined(rows_p):.1f} / {all_joined(opt_p):.1f}",
                f"{rows_s.wall_s:.1f} / {opt.wall_s:.1f}",
                f"{shares[0]:.0%} / {shares[1]:.0%}",
            ]
        )
    headers = [
        "context",
        "rows out tok/s",
        "optimum out tok/s",
        "out ratio",
        "rows full-batch decode",
        "optimum full-batch decode",
        "decode ratio",
        "all joined at s, rows / opt",
        "wall s, rows / opt",
        "in ORT runs",
    ]
    return markdown_table(headers, rows)


def plot(path: Path, decode: list[PointResult], sweep: list[PointResult]) -> None:
    """Decode tok/s per system at each concurrency; output and decode tok/s over the sweep."""
    fig = figure(15, 4.5)
    left, middle, right = fig.subplots(1, 3)
    for system in (ROWS, GENERATOR, OPTIMUM):
        rows = sorted((p for p in decode if p.system == system), key=concurrency)
        levels = [concurrency(p) for p in rows]
        left.plot(levels, [p.summary.decode_throughput for p in rows], "o-", label=system)
    left.set_xscale("log", base=2)
    left.set_xlabel("concurrent sequences")
    left.set_title("decode tokens/s (64-token prompts)")
    for system in (ROWS, OPTIMUM):
        rows = sorted(
            (p for p in sweep if p.system.startswith(f"{system} ")),
            key=lambda p: int(p.system.split("T=")[1]),
        )
        contexts = [int(p.system.split("T=")[1]) for p in rows]
        middle.plot(contexts, [p.summary.output_throughput for p in rows], "o-", label=system)
        right.plot(contexts, [full_batch_decode(p) for p in rows], "o-", label=system)
    for axis, title in ((middle, "output tokens/s"), (right, "full-batch decode tokens/s")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("total context per sequence (tokens)")
        axis.set_title(f"context sweep: {title}")
    for axis in (left, middle, right):
        axis.grid(alpha=0.3)
        axis.legend()
    save_figure(fig, path)


def parse_args() -> argparse.Namespace:
    """Command-line options; the defaults are issue 12's points."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--contexts", type=int, nargs="*", default=[128, 512, 1024, 2048])
    parser.add_argument("--sweep-concurrency", type=int, default=32)
    parser.add_argument("--sweep-new-tokens", type=int, default=32)
    parser.add_argument("--max-prefill-tokens", type=int, default=4096, help="per engine step")
    parser.add_argument(
        "--prefix-cache-tokens",
        type=int,
        default=0,
        help="engine prefix reuse (0: off; every request of a round has the same prompt)",
    )
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs per decode point, the fastest kept"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "kv_rows_bench.json")
    return parser.parse_args()


def main() -> None:
    """Run the decode part and the sweep; print the tables, write the JSON and the plot."""
    args = parse_args()
    bench = Bench(args)
    started = time.monotonic()
    with bench.clock.installed():
        decode = bench.decode_part()
        sweep = [p for context in args.contexts for p in bench.sweep_point(context)]
    key = f"T={args.prompt_len + args.max_tokens}"
    tables = {"decode": decode_table(decode, bench.splits, key)}
    if sweep:
        tables["sweep"] = sweep_table(sweep, bench.splits)
    for name, table in tables.items():
        print(f"\n{name}:\n{table}", flush=True)
    report = {
        "machine": machine(),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "model_dirs": {ROWS: bench.rows_dir, OPTIMUM: bench.optimum_dir},
        "minutes": (time.monotonic() - started) / 60,
        "tables": tables,
        "ort_run_share": bench.splits,
        "every_run": bench.runs,
        "decode": decode,
        "sweep": sweep,
    }
    raw = write_json(args.out, report)
    plot(args.out.with_suffix(".png"), decode, sweep)
    print(f"wrote {args.out}, {args.out.with_suffix('.png')} and {raw}")


if __name__ == "__main__":
    main()
