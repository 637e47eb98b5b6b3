"""Build the native TensorRT engine for a model and deployment limits, or find it cached.

    python -m serve_app.tools build-trt MODEL_DIR [--max-num-seqs N]
        [--max-prefill-tokens N] [--cache-dir DIR] [--device-id 0]

The engine's optimization profiles follow --max-num-seqs and --max-prefill-tokens, so pass the
values the deployment serves with (backend: tensorrt); its replicas then load the engine from
--cache-dir instead of building it at start-up. Engines are specific to the GPU model and the
TensorRT version, so build on the kind of GPU that will serve. Prints the engine's path.
Needs a CUDA GPU and the gpu extra (tensorrt, cuda-python, onnxruntime-gpu).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from serve_app.engine.backends.device import resolve_device
from serve_app.engine.backends.tensorrt_build import (
    deployment_profiles,
    ensure_engine,
    import_cudart,
    import_tensorrt,
    read_model,
)
from serve_app.engine.config import EngineConfig, EngineOptions
from serve_app.engine.errors import EngineError
from serve_app.tools.model_dir import REQUIRED_FILES, check_input_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the command's arguments."""
    fields = EngineOptions.model_fields
    parser.add_argument("model_dir", type=Path, help="served model directory (model.onnx, ...)")
    for flag, name in [
        ("--max-num-seqs", "max_num_seqs"),
        ("--max-prefill-tokens", "max_prefill_tokens"),
    ]:
        parser.add_argument(
            flag, type=positive_int, default=fields[name].default, help=fields[name].description
        )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=fields["tensorrt_cache_dir"].get_default(call_default_factory=True),
        help="where engines are cached; the deployment's tensorrt_cache_dir",
    )
    parser.add_argument("--device-id", type=int, default=0, help="CUDA device to build on")


def run(args: argparse.Namespace) -> None:
    """Build or find the engine and print its path; exits non-zero with a reason on failure."""
    check_input_dir(args.model_dir, REQUIRED_FILES)
    config = EngineConfig(
        model_path=args.model_dir,
        backend="tensorrt",
        device="cuda",
        device_id=args.device_id,
        tensorrt_cache_dir=args.cache_dir,
        max_num_seqs=args.max_num_seqs,
        max_prefill_tokens=args.max_prefill_tokens,
    )
    try:
        import_tensorrt()  # the toolchain first: without it no machine can build
        import_cudart()
        model, io = read_model(config)
        resolve_device(config)
        path = ensure_engine(config, deployment_profiles(config, model, io))
    except EngineError as error:
        raise SystemExit(f"build-trt: error: {error}") from None
    print(path)


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive whole number")
    return value
