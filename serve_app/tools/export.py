"""Export a Hugging Face causal-LM checkpoint to a served model directory (ONNX decoder with past).

    python -m serve_app.tools export CHECKPOINT_DIR OUT_DIR [--dtype fp32|fp16]

Loads the checkpoint with transformers (eager attention), traces it into ``model.onnx`` in the
``optimum-cli export onnx --task text-generation-with-past`` layout, checks the graph against
torch (prefill, one cached decode step, a left-padded batch), and copies ``config.json``,
``generation_config.json`` and the tokenizer files. ``--dtype fp16`` converts the checked fp32
graph to fp16 (KV cache and logits too) and checks it again at fp16 precision. Needs torch and
transformers (the ``train`` extra).
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnxruntime.transformers.float16 import convert_float_to_float16

from serve_app.tools.model_dir import (
    ONNX_FILE,
    REQUIRED_FILES,
    check_input_dir,
    check_output_dir,
    copy_served_files,
    onnx_mib,
    save_onnx,
)
from serve_app.tools.progress import StageBar

# Max abs logit diff allowed against torch, relative to the largest logit (see verify).
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote and how closely each checked graph matched torch."""

    out_dir: Path
    diffs: dict[str, dict[str, float]]  # per checked dtype: check name -> max abs logit diff
    seconds: dict[str, float]  # per stage


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the command's arguments."""
    parser.add_argument("checkpoint_dir", type=Path, help="Hugging Face checkpoint directory")
    parser.add_argument("out_dir", type=Path, help="directory to write the served model to")
    parser.add_argument(
        "--dtype", choices=sorted(TOLERANCE), default="fp32", help="weights, KV cache and logits"
    )


def run(args: argparse.Namespace) -> None:
    """Export, then print where the model went and how it checked out."""
    result = export_checkpoint(args.checkpoint_dir, args.out_dir, args.dtype)
    print(
        f"wrote {result.out_dir} ({onnx_mib(result.out_dir):.1f} MiB of ONNX) "
        f"in {sum(result.seconds.values()):.1f}s"
    )
    for dtype, diffs in result.diffs.items():
        checks = ", ".join(f"{name} {diff:.2g}" for name, diff in diffs.items())
        print(f"{dtype} vs torch, max abs logit diff: {checks}")


def export_checkpoint(checkpoint_dir: Path, out_dir: Path, dtype: str = "fp32") -> ExportResult:
    """Export `checkpoint_dir` to `out_dir`; raises RuntimeError if ONNX disagrees with torch."""
    check_input_dir(checkpoint_dir, REQUIRED_FILES)
    check_output_dir(out_dir, checkpoint_dir)
    # torch loads only for this command: quantize and the CLI itself run on the serving install.
    from serve_app.tools.onnx_export import (
        HFDecoder,
        export_decoder_with_past,
        verify_decoder_with_past,
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    diffs: dict[str, dict[str, float]] = {}
    with (
        StageBar(f"export {checkpoint_dir.name}", 6 if dtype == "fp16" else 5) as bar,
        tempfile.TemporaryDirectory(dir=out_dir) as scratch,
    ):
        traced, final = Path(scratch) / "traced" / ONNX_FILE, Path(scratch) / ONNX_FILE
        traced.parent.mkdir()
        with bar.stage("load checkpoint"):
            decoder = HFDecoder.from_pretrained(checkpoint_dir)
        with bar.stage("trace to ONNX"):
            export_decoder_with_past(decoder, traced)
        with bar.stage("verify fp32 vs torch"):
            diffs["fp32"] = verify_decoder_with_past(decoder, traced, TOLERANCE["fp32"])
        with bar.stage(f"write {dtype} graph"):
            graph = onnx.load(str(traced))
            if dtype == "fp16":
                graph = convert_float_to_float16(graph, keep_io_types=False)
            save_onnx(graph, final)
        if dtype == "fp16":
            with bar.stage("verify fp16 vs torch"):
                diffs["fp16"] = verify_decoder_with_past(decoder, final, TOLERANCE["fp16"])
        with bar.stage("move into place, copy config and tokenizer"):
            for path in Path(scratch).glob(f"{ONNX_FILE}*"):
                path.replace(out_dir / path.name)
            copy_served_files(checkpoint_dir, out_dir)
    return ExportResult(out_dir, diffs, bar.seconds)
