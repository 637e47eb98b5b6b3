"""``python -m serve_app.bench``: sweep concurrency or request rate against an OpenAI endpoint.

The engine benchmarks under ``benchmarks/`` measure in-process systems with the same traces,
summaries and report (``serve_app.bench.inprocess``).

python -m serve_app.bench --concurrency 1 4 16 32 --num-requests 64 --out results.json
python -m serve_app.bench --request-rate 2 4 8 inf --endpoint chat --api-key sk-...
"""

from __future__ import annotations

import argparse
import asyncio
import math
from pathlib import Path
from typing import Any

from serve_app.bench.client import PATHS, Target
from serve_app.bench.dataset import LengthRange, random_requests
from serve_app.bench.load import Concurrency, LoadShape, RequestRate
from serve_app.bench.report import markdown_tables, plot, write_json
from serve_app.bench.sweep import run_sweep

DEFAULT_CONCURRENCY = [1, 4, 16, 32]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)  # accepts "inf"
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _spread(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; see ``--help``."""
    parser = argparse.ArgumentParser(
        prog="python -m serve_app.bench",
        description="Load generator for an OpenAI-compatible endpoint (streaming requests).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    target = parser.add_argument_group("target")
    target.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="API root")
    target.add_argument("--model", default="demo", help="served model name")
    target.add_argument("--endpoint", choices=list(PATHS), default="completions", help="API")
    target.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY'")
    target.add_argument("--timeout", type=_positive_float, default=300.0, help="per request, s")

    load = parser.add_argument_group("load (one of)").add_mutually_exclusive_group()
    load.add_argument(
        "--concurrency",
        type=_positive_int,
        nargs="+",
        default=DEFAULT_CONCURRENCY,
        help="closed loop: requests kept in flight, one point each",
    )
    load.add_argument(
        "--request-rate",
        type=_positive_float,
        nargs="+",
        help="open loop: Poisson arrivals per second, one point each; inf sends all at once",
    )

    data = parser.add_argument_group("dataset")
    data.add_argument("--num-requests", type=_positive_int, default=128, help="per sweep point")
    data.add_argument("--input-len", type=_positive_int, default=64, help="prompt words (~tokens)")
    data.add_argument("--input-range", type=_spread, default=0.25, help="uniform +- this fraction")
    data.add_argument("--output-len", type=_positive_int, default=64, help="max_tokens")
    data.add_argument("--output-range", type=_spread, default=0.25, help="uniform +- this fraction")
    data.add_argument("--seed", type=int, default=0, help="prompts, lengths and arrival times")
    data.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    data.add_argument(
        "--ignore-eos",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="send ignore_eos so every request generates its full max_tokens",
    )

    data.add_argument(
        "--logprobs",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="ask for logprobs so chunks carrying several tokens are counted exactly",
    )

    parser.add_argument(
        "--out",
        type=Path,
        help="write the summary JSON here, a PNG plot next to it, and every request's trace to "
        "raw/ beside it",
    )
    return parser.parse_args(argv)


def load_shapes(args: argparse.Namespace) -> list[LoadShape]:
    """The sweep points the command line asks for."""
    if args.request_rate:
        return [RequestRate(rate) for rate in args.request_rate]
    return [Concurrency(level) for level in args.concurrency]


def settings(args: argparse.Namespace, shapes: list[LoadShape]) -> dict[str, Any]:
    """The run's settings as plain JSON (an infinite rate is written as "inf")."""
    values = {k: v for k, v in vars(args).items() if k != "api_key"}  # never write the key
    values["out"] = str(args.out) if args.out else None
    values["points"] = [shape.label for shape in shapes]
    if args.request_rate:
        values["request_rate"] = [r if math.isfinite(r) else "inf" for r in args.request_rate]
    del values["concurrency" if args.request_rate else "request_rate"]  # the unused load shape
    return values


def main(argv: list[str] | None = None) -> None:
    """Run the sweep, print the tables, and write JSON and the plot when ``--out`` is given."""
    args = parse_args(argv)
    shapes = load_shapes(args)
    target = Target(
        model=args.model,
        endpoint=args.endpoint,
        temperature=args.temperature,
        ignore_eos=args.ignore_eos,
        logprobs=args.logprobs,
        timeout_s=args.timeout,
    )
    requests = random_requests(
        args.num_requests * len(shapes),
        LengthRange(args.input_len, args.input_range),
        LengthRange(args.output_len, args.output_range),
        args.seed,
    )
    points = asyncio.run(
        run_sweep(args.base_url, args.api_key, target, shapes, requests, args.seed)
    )
    print(markdown_tables(points))
    if args.out:
        raw = write_json(args.out, {"settings": settings(args, shapes), "points": points})
        plot(args.out.with_suffix(".png"), points)
        print(f"\nwrote {args.out}, {args.out.with_suffix('.png')} and {raw}")


if __name__ == "__main__":
    main()
