"""Quantize a served model directory: int8 dynamic or int4 weight-only (MatMulNBits).

    python -m serve_app.tools quantize MODEL_DIR OUT_DIR --method int8|int4
        [--block-size 32] [--accuracy-level 0-4]

int8: MatMuls with constant weights run as MatMulInteger on int8 weights (one scale per output
channel), their activations quantized to uint8 on the fly. int4: the same weights become 4-bit
symmetric blocks of ``--block-size`` input rows in ``com.microsoft.MatMulNBits``;
``--accuracy-level`` is the precision its kernel computes in (0 unset, 1 fp32, 2 fp16, 3 bf16,
4 int8 activations). OUT_DIR also gets the config and tokenizer files, so the engine serves it
as is. Needs only the serving install.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnxruntime.quantization import QuantType, quantize_dynamic

from serve_app.tools.model_dir import (
    ONNX_FILE,
    REQUIRED_FILES,
    check_input_dir,
    check_output_dir,
    copy_served_files,
    needs_external_data,
    onnx_mib,
)
from serve_app.tools.progress import StageBar

ACCURACY_LEVELS = (0, 1, 2, 3, 4)


@dataclass(frozen=True)
class QuantizeOptions:
    """Settings of the int4 method (int8 has none to choose)."""

    block_size: int = 32
    accuracy_level: int | None = None


def quantize_int8(model: onnx.ModelProto, out_path: Path, options: QuantizeOptions) -> None:
    """Dynamic int8: int8 weights per output channel, uint8 activations quantized per call."""
    quantize_dynamic(
        model,
        out_path,
        op_types_to_quantize=["MatMul"],
        per_channel=True,
        weight_type=QuantType.QInt8,
        use_external_data_format=needs_external_data(model),
    )


def quantize_int4(model: onnx.ModelProto, out_path: Path, options: QuantizeOptions) -> None:
    """Weight-only int4: symmetric blocks along the input dimension, in MatMulNBits nodes."""
    # Imported on use: importing it calls logging.basicConfig(level=INFO) for the whole process.
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(
        model,
        bits=4,
        block_size=options.block_size,
        is_symmetric=True,
        accuracy_level=options.accuracy_level,
    )
    quantizer.process()
    quantizer.model.save_model_to_file(str(out_path), needs_external_data(quantizer.model.model))


METHODS: dict[str, Callable[[onnx.ModelProto, Path, QuantizeOptions], None]] = {
    "int8": quantize_int8,
    "int4": quantize_int4,
}


def block_size(text: str) -> int:
    """argparse type: a power of two of at least 16, as MatMulNBits requires."""
    value = int(text)
    if value < 16 or value & (value - 1):
        raise argparse.ArgumentTypeError(f"{value} is not a power of two >= 16")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the command's arguments."""
    parser.add_argument("model_dir", type=Path, help="served model directory (model.onnx, ...)")
    parser.add_argument("out_dir", type=Path, help="directory to write the quantized model to")
    parser.add_argument("--method", choices=sorted(METHODS), required=True)
    parser.add_argument(
        "--block-size", type=block_size, default=QuantizeOptions.block_size, help="int4 only"
    )
    parser.add_argument(
        "--accuracy-level", type=int, choices=ACCURACY_LEVELS, default=None, help="int4 only"
    )


def run(args: argparse.Namespace) -> None:
    """Quantize, then print where the model went."""
    options = QuantizeOptions(args.block_size, args.accuracy_level)
    seconds = quantize_model(args.model_dir, args.out_dir, args.method, options)
    print(
        f"wrote {args.out_dir} ({onnx_mib(args.out_dir):.1f} MiB of ONNX) "
        f"in {sum(seconds.values()):.1f}s"
    )


def quantize_model(
    model_dir: Path, out_dir: Path, method: str, options: QuantizeOptions
) -> dict[str, float]:
    """Write `method`'s quantization of `model_dir` to `out_dir`; returns seconds per stage."""
    check_input_dir(model_dir, (ONNX_FILE, *REQUIRED_FILES))
    check_output_dir(out_dir, model_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with StageBar(f"quantize {model_dir.name} to {method}", 3) as bar:
        with bar.stage("load"):
            model = onnx.load(str(model_dir / ONNX_FILE))
        with bar.stage(f"quantize {method}"), _quiet_root_logger():
            METHODS[method](model, out_dir / ONNX_FILE, options)
        with bar.stage("copy config and tokenizer"):
            copy_served_files(model_dir, out_dir)
    return bar.seconds


@contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """Hold the root logger at WARNING: both quantizers log every node at INFO through it."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.WARNING)
    try:
        yield
    finally:
        root.setLevel(level)
