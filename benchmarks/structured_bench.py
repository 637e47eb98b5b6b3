"""Structured-output benchmark: what grammar masks add to a decode step, and compile times.

    python benchmarks/structured_bench.py                  # the benchmark model, else the demo
    python benchmarks/structured_bench.py --batch 1 8 --steps 8

For each batch size B, B sequences (random prompt ids, temperature 1, seeded) decode --steps
steady-state steps three ways, in three engines over one loaded model stepped in turn:
unconstrained; every sequence held to a JSON Schema that cannot end within the run, masks
computed on the engine's worker thread while the model runs (what the engine does); and the
same with each step's masks computed before the forward pass (serial). A fourth engine times
the masks alone. Beside each step's time it reports the part outside the model's forward pass,
which is where the constraint's own work lands; on a busy machine it is the steadier figure.
Then it times turning a spec into a sequence's matcher: cold (a spec not seen before: schema
to grammar to compiled matcher) and cached (a copy of the engine's compiled matcher), with the
first mask of each. Uses the benchmark model (``python -m serve_app.tools.build_bench_model``)
when it exists, else the demo model, and says which. Prints tables, writes
``benchmarks/results/structured_bench.json`` with a plot beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np

from serve_app.bench.dataset import prompt_ids
from serve_app.bench.inprocess import benchmark_model
from serve_app.bench.report import figure, machine, markdown_table, save_figure, write_json
from serve_app.engine import EngineConfig, LLMEngine, SamplingParams, load_decoder
from serve_app.engine.constrained import TokenMasks
from serve_app.engine.decoder import Decoder, ForwardResult
from serve_app.engine.sequence import Sequence
from serve_app.engine.structured import StructuredOutput

HERE = Path(__file__).resolve().parent
TARGET_OVERHEAD = 0.15  # the bound on the extra step time at 32 constrained sequences
MODES = ("plain", "constrained", "serial")
# Objects of free strings, numbers and enums, at least 1000 of them: no run reaches its end.
LONG_SCHEMA = {
    "type": "object",
    "properties": {
        "records": {
            "type": "array",
            "minItems": 1000,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "score": {"type": "number", "minimum": 0, "maximum": 100},
                    "kind": {"enum": ["file", "dir", "link"]},
                    "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
                },
                "required": ["name", "score", "kind"],
            },
        }
    },
    "required": ["records"],
}
COMPILE_SPECS: dict[str, Callable[[int], StructuredOutput]] = {
    # Each takes a number that makes the spec new (a cold compile), or repeats it (cached).
    "json_schema": lambda n: StructuredOutput(
        "json_schema", json.dumps({**LONG_SCHEMA, "title": f"t{n}"})
    ),
    "json_object": lambda n: StructuredOutput("json_object", str(n)),  # spec is ignored
    "regex": lambda n: StructuredOutput("regex", rf"id{n}: (\d{{3}}-[a-z]{{2,8}}\.){{1,5}}"),
    "choice": lambda n: StructuredOutput("choice", json.dumps([f"c{n}-{i}" for i in range(20)])),
    "grammar": lambda n: StructuredOutput(
        "grammar", f'start: "x{n}" item ("," item)*\nitem: /[a-z]+/ | NUMBER\n%import common.NUMBER'
    ),
}


def engine_config(model_dir: Path, batch: int, prompt_len: int, steps: int, threads: int
                  ) -> EngineConfig:  # fmt: skip
    """Limits that admit and prefill ``batch`` sequences in one step."""
    return EngineConfig(
        model_path=model_dir,
        max_num_seqs=batch,
        kv_cache_tokens=batch * (prompt_len + steps + 2),
        max_prefill_tokens=batch * prompt_len,
        intra_op_num_threads=threads,
    )


def serial_masks(engine: LLMEngine) -> None:
    """Make ``engine`` finish each step's masks before its forward pass begins."""
    overlapped = engine.constraints.start_masks

    def start_masks(sequences: list[Sequence]) -> Future[TokenMasks] | None:
        pending = overlapped(sequences)
        if pending is not None:
            pending.result()
        return pending

    engine.constraints.start_masks = start_masks  # type: ignore[method-assign]


def start_batch(engine: LLMEngine, mode: str, batch: int, prompt: list[int], steps: int) -> None:
    """Queue and prefill ``batch`` sequences, constrained unless ``mode`` is ``plain``."""
    structured = StructuredOutput("json_schema", json.dumps(LONG_SCHEMA))
    for i in range(batch):
        params = SamplingParams(
            temperature=1.0,
            seed=i,
            max_tokens=steps + 2,
            ignore_eos=True,
            structured=None if mode == "plain" else structured,
        )
        engine.add_request(f"{mode}-{i}", prompt, params)
    engine.step()
    assert engine.num_running == batch, "the batch was not admitted in one step"


class TimedDecoder:
    """A decoder that remembers how long its last forward pass took."""

    def __init__(self, decoder: Decoder) -> None:
        self.decoder = decoder
        self.config = decoder.config
        self.ops = decoder.ops
        self.last_s = 0.0

    def forward(self, *args: Any, **kwargs: Any) -> ForwardResult:
        """The wrapped decoder's forward pass, timed."""
        started = time.perf_counter()
        result = self.decoder.forward(*args, **kwargs)
        self.last_s = time.perf_counter() - started
        return result

    def describe(self) -> str:
        """The wrapped decoder's description."""
        return self.decoder.describe()


def timed_step(engine: LLMEngine, mode: str) -> tuple[float, float]:
    """Seconds of one decode step and of its forward pass; in mode ``masks``, of computing the
    step's masks alone (the step itself then runs untimed) and zero."""
    started = time.perf_counter()
    if mode == "masks":
        pending = engine.constraints.start_masks(engine.running)
        assert pending is not None
        pending.result()
        elapsed = time.perf_counter() - started
        engine.step()
        return elapsed, 0.0
    engine.step()
    assert isinstance(engine.decoder, TimedDecoder)
    return time.perf_counter() - started, engine.decoder.last_s


def bench_steps(args: argparse.Namespace, model_dir: Path) -> list[dict[str, Any]]:
    """Median step time per mode and batch size, and of the part outside the forward pass.
    One engine per mode over one loaded model, stepped in turn, so changes in the machine's
    load hit every mode alike."""
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    prompt = prompt_ids(args.prompt_len, vocab, args.seed).astype(np.int64).tolist()
    decoder = load_decoder(engine_config(model_dir, 1, args.prompt_len, 0, args.threads))
    rows = []
    for batch in args.batch:
        config = engine_config(model_dir, batch, args.prompt_len, args.steps, args.threads)
        engines = {mode: LLMEngine(config, TimedDecoder(decoder)) for mode in (*MODES, "masks")}
        serial_masks(engines["serial"])
        steps: dict[str, list[float]] = {mode: [] for mode in engines}
        outside: dict[str, list[float]] = {mode: [] for mode in engines}
        for round_ in range(args.rounds + 1):  # round 0 warms onnxruntime up on these shapes
            for mode, engine in engines.items():
                start_batch(engine, mode, batch, prompt, args.steps)
            for _ in range(args.steps):
                for mode, engine in engines.items():
                    step_s, forward_s = timed_step(engine, mode)
                    assert engine.num_running == batch, "a sequence ended inside the run"
                    if round_:
                        steps[mode].append(step_s)
                        outside[mode].append(step_s - forward_s)
            for engine in engines.values():
                while engine.has_work():
                    engine.step()
        row: dict[str, Any] = {"batch": batch}
        for mode in MODES:
            row[f"{mode}_ms"] = float(np.median(steps[mode])) * 1000
            row[f"{mode}_outside_ms"] = float(np.median(outside[mode])) * 1000
        row["mask_ms"] = float(np.median(steps["masks"])) * 1000
        for mode in ("constrained", "serial"):
            row[f"{mode}_extra"] = row[f"{mode}_ms"] / row["plain_ms"] - 1
            extra_outside = row[f"{mode}_outside_ms"] - row["plain_outside_ms"]
            row[f"{mode}_extra_outside"] = extra_outside / row["plain_ms"]
        print(f"  batch {batch}: {row}", flush=True)
        rows.append(row)
    return rows


def bench_compile(model_dir: Path, repeats: int) -> list[dict[str, Any]]:
    """Median milliseconds from spec to a sequence's matcher, and to its first mask."""
    config = engine_config(model_dir, 1, 8, 1, 1)
    constraints = LLMEngine(config, load_decoder(config)).constraints
    rows = []
    for kind, spec in COMPILE_SPECS.items():
        measured: dict[str, list[float]] = {"cold": [], "cached": [], "cold_mask": [],
                                            "cached_mask": []}  # fmt: skip
        for n in range(repeats):
            for phase in ("cold", "cached"):  # the same spec: a miss, then a hit
                started = time.perf_counter()
                matcher = constraints.matcher(spec(n))
                compiled = time.perf_counter()
                matcher.compute_bitmask()
                measured[phase].append(compiled - started)
                measured[f"{phase}_mask"].append(time.perf_counter() - compiled)
        row = {"kind": kind, **{f"{k}_ms": float(np.median(v)) * 1000 for k, v in measured.items()}}
        print(f"  {kind}: {row}", flush=True)
        rows.append(row)
    return rows


def print_tables(model: str, steps: list[dict[str, Any]], compiles: list[dict[str, Any]]) -> None:
    """The step table (with the target) and the compile table."""
    print(f"\n{model}: decode step, every sequence constrained (median ms; extra vs plain)")
    step_rows = [
        [
            str(r["batch"]),
            f"{r['plain_ms']:.1f}",
            f"{r['constrained_ms']:.1f}",
            f"{r['constrained_extra']:+.1%}",
            f"{r['constrained_extra_outside']:+.1%}",
            f"{r['serial_ms']:.1f}",
            f"{r['serial_extra']:+.1%}",
            f"{r['serial_extra_outside']:+.1%}",
            f"{r['mask_ms']:.2f}",
        ]
        for r in steps
    ]
    headers = ["batch", "plain", "constrained", "extra", "extra outside forward", "serial",
               "extra", "extra outside forward", "masks alone"]  # fmt: skip
    print(markdown_table(headers, step_rows))
    at_32 = [r for r in steps if r["batch"] == 32]
    if at_32:
        verdict = "met" if at_32[0]["constrained_extra"] < TARGET_OVERHEAD else "MISSED"
        print(f"target: < {TARGET_OVERHEAD:.0%} extra per step at 32 sequences: {verdict}")
    print("\nspec to matcher (median ms): cold = new spec, cached = compiled before")
    compile_rows = [
        [
            r["kind"],
            f"{r['cold_ms']:.2f}",
            f"{r['cached_ms']:.3f}",
            f"{r['cold_mask_ms']:.2f}",
            f"{r['cached_mask_ms']:.2f}",
        ]
        for r in compiles
    ]
    headers = ["kind", "cold", "cached", "first mask (cold)", "first mask (cached)"]
    print(markdown_table(headers, compile_rows), end="\n\n", flush=True)


def plot(path: Path, model: str, steps: list[dict[str, Any]], compiles: list[dict[str, Any]]
         ) -> None:  # fmt: skip
    """Step time against batch size per mode; compile times per kind, cold and cached."""
    fig = figure(12, 4.5)
    left, right = fig.subplots(1, 2)
    batches = [r["batch"] for r in steps]
    for mode in MODES:
        left.plot(batches, [r[f"{mode}_ms"] for r in steps], marker="o", label=mode)
    left.plot(batches, [r["mask_ms"] for r in steps], marker="x", ls="--", label="masks alone")
    left.set_xscale("log", base=2)
    left.set_xlabel("sequences in the batch (all constrained)")
    left.set_ylabel("decode step, median (ms)")
    left.set_title(f"Step time ({model})")
    left.legend()
    left.grid(alpha=0.3)
    x = np.arange(len(compiles))
    right.bar(x - 0.2, [r["cold_ms"] for r in compiles], 0.4, label="cold")
    right.bar(x + 0.2, [r["cached_ms"] for r in compiles], 0.4, label="cached")
    right.set_xticks(x, [r["kind"] for r in compiles])
    right.set_yscale("log")
    right.set_ylabel("spec to matcher, median (ms)")
    right.set_title("Compile time")
    right.legend()
    right.grid(alpha=0.3, axis="y")
    save_figure(fig, path)


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--steps", type=int, default=16, help="timed decode steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--compile-repeats", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "structured_bench.json")
    return parser.parse_args()


def main() -> None:
    """Run both parts and write the JSON and plot."""
    args = parse_args()
    model, model_dir = benchmark_model()
    steps = bench_steps(args, model_dir)
    compiles = bench_compile(model_dir, args.compile_repeats)
    print_tables(model, steps, compiles)
    report = {
        "machine": machine(),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "model": model,
        "model_dir": str(model_dir),
        "target_overhead_at_32": TARGET_OVERHEAD,
        "steps": steps,
        "compile": compiles,
    }
    write_json(args.out, report)
    plot(args.out.with_suffix(".png"), model, steps, compiles)
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
