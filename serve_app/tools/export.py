"""Export a Hugging Face causal-LM checkpoint to a served model directory (ONNX decoder with past).

    python -m serve_app.tools export CHECKPOINT_DIR OUT_DIR [--dtype fp32|fp16] [--context-length N]
    python -m serve_app.tools export --layout gqa CHECKPOINT_DIR OUT_DIR [--dtype fp32|int4]

Loads the checkpoint with transformers (eager attention), traces it into ``model.onnx`` in the
``optimum-cli export onnx --task text-generation-with-past`` layout, checks the graph against
torch (prefill, one cached decode step, a left-padded batch), and copies ``config.json``,
``generation_config.json`` and the tokenizer files. ``--dtype fp16`` converts the checked fp32
graph to fp16 (KV cache and logits too) and checks it again at fp16 precision. Inputs the model
does not use are left out of the graph (``position_ids`` under ALiBi: Bloom, Falcon). The KV cache
is never cut to a sliding window: the window is applied by the attention mask, and the self-check
runs prompts longer than the window. A config.json that names no context length (Bloom) needs
``--context-length``, which is written into the exported config.json as
``max_position_embeddings``. Needs torch and transformers (the ``train`` extra).

``--layout gqa`` writes the fused-attention layout instead (``GroupQueryAttention``, KV cache
kept in place by the engine) with onnxruntime-genai's model builder (``gqa_export.py``; the
``genai`` extra).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnxruntime.transformers.float16 import convert_float_to_float16

from serve_app.engine.model_config import ModelConfig, ModelLoadError
from serve_app.tools.model_dir import (
    ONNX_FILE,
    REQUIRED_FILES,
    ModelDirError,
    check_input_dir,
    check_output_dir,
    copy_served_files,
    onnx_mib,
    save_onnx,
)
from serve_app.tools.progress import StageBar

# Max abs logit diff allowed against torch, relative to the largest logit (see verify).
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}
# The dtypes each layout writes: the Optimum layout's own tracer; the builder's CPU precisions.
DTYPES = {"optimum": tuple(TOLERANCE), "gqa": ("fp32", "int4")}


class ExportError(RuntimeError):
    """Tracing or checking the graph failed; the message names the stage and the cause."""


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
        "--layout",
        choices=sorted(DTYPES),
        default="optimum",
        help="optimum: decoder with past, traced here; gqa: fused attention with the KV cache "
        "in place, by onnxruntime-genai's model builder",
    )
    parser.add_argument(
        "--dtype",
        choices=sorted({d for dtypes in DTYPES.values() for d in dtypes}),
        default="fp32",
        help="weights, KV cache and logits (optimum: fp32, fp16; gqa: fp32, int4 weights)",
    )
    parser.add_argument(
        "--context-length",
        type=int,
        default=None,
        metavar="N",
        help="longest sequence the model takes, for configs that name none (Bloom); "
        "written into config.json as max_position_embeddings",
    )


def run(args: argparse.Namespace) -> None:
    """Export, then print where the model went and how it checked out."""
    result = export_checkpoint(
        args.checkpoint_dir,
        args.out_dir,
        args.dtype,
        context_length=args.context_length,
        layout=args.layout,
    )
    print(
        f"wrote {result.out_dir} ({onnx_mib(result.out_dir):.1f} MiB of ONNX) "
        f"in {sum(result.seconds.values()):.1f}s"
    )
    for dtype, diffs in result.diffs.items():
        checks = ", ".join(f"{name} {diff:.2g}" for name, diff in diffs.items())
        print(f"{dtype} vs torch, max abs logit diff: {checks}")


def export_checkpoint(
    checkpoint_dir: Path,
    out_dir: Path,
    dtype: str = "fp32",
    *,
    context_length: int | None = None,
    layout: str = "optimum",
) -> ExportResult:
    """Export `checkpoint_dir` to `out_dir`.

    Raises `ModelDirError` before any work if the folder is not one the engine could serve (e.g.
    no context length and no `context_length`), and `ExportError` naming the stage if tracing
    fails or the graph disagrees with torch.
    """
    check_input_dir(checkpoint_dir, REQUIRED_FILES)
    check_output_dir(out_dir, checkpoint_dir)
    if dtype not in DTYPES[layout]:
        written = ", ".join(DTYPES[layout])
        raise ModelDirError(f"--dtype {dtype}: the {layout} layout writes {written}")
    if layout == "gqa" and context_length is not None:
        raise ModelDirError(
            "--context-length is for the optimum layout (the builder reads config.json)"
        )
    if context_length is not None and context_length < 1:
        raise ModelDirError(f"--context-length must be positive, got {context_length}")
    if context_length is None:
        try:
            ModelConfig.from_dir(checkpoint_dir)
        except ModelLoadError as error:
            raise ModelDirError(str(error)) from None
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        if layout == "gqa":
            return _export_gqa(checkpoint_dir, out_dir, dtype)
        return _export(checkpoint_dir, out_dir, dtype, context_length)
    except ExportError:
        if created and not any(out_dir.iterdir()):
            out_dir.rmdir()  # leave no empty folder behind a failed export
        raise


def _export(
    checkpoint_dir: Path, out_dir: Path, dtype: str, context_length: int | None
) -> ExportResult:
    # torch loads only for this command: quantize and the CLI itself run on the serving install.
    from serve_app.tools.onnx_export import (
        HFDecoder,
        export_decoder_with_past,
        verify_decoder_with_past,
    )

    diffs: dict[str, dict[str, float]] = {}
    with (
        StageBar(f"export {checkpoint_dir.name}", 6 if dtype == "fp16" else 5) as bar,
        tempfile.TemporaryDirectory(dir=out_dir) as scratch,
    ):
        traced, final = Path(scratch) / "traced" / ONNX_FILE, Path(scratch) / ONNX_FILE
        traced.parent.mkdir()
        with bar.stage("load checkpoint"), _failing_stage("loading it", checkpoint_dir):
            decoder = HFDecoder.from_pretrained(checkpoint_dir)
        with bar.stage("trace to ONNX"), _failing_stage("tracing to ONNX", checkpoint_dir):
            export_decoder_with_past(decoder, traced)
        with bar.stage("verify fp32 vs torch"), _failing_stage("checking fp32", checkpoint_dir):
            diffs["fp32"] = verify_decoder_with_past(decoder, traced, TOLERANCE["fp32"])
        with bar.stage(f"write {dtype} graph"):
            graph = onnx.load(str(traced))
            if dtype == "fp16":
                graph = convert_float_to_float16(graph, keep_io_types=False)
            save_onnx(graph, final)
        if dtype == "fp16":
            with (
                bar.stage("verify fp16 vs torch"),
                _failing_stage("checking fp16", checkpoint_dir),
            ):
                diffs["fp16"] = verify_decoder_with_past(decoder, final, TOLERANCE["fp16"])
        with bar.stage("move into place, copy config and tokenizer"):
            for path in Path(scratch).glob(f"{ONNX_FILE}*"):
                path.replace(out_dir / path.name)
            copy_served_files(checkpoint_dir, out_dir)
            if context_length is not None:
                _set_context_length(out_dir / "config.json", context_length)
    return ExportResult(out_dir, diffs, bar.seconds)


def _export_gqa(checkpoint_dir: Path, out_dir: Path, dtype: str) -> ExportResult:
    from serve_app.tools.gqa_export import build_gqa, verify_gqa  # needs the genai extra

    diffs: dict[str, dict[str, float]] = {}
    with (
        StageBar(f"export {checkpoint_dir.name} (gqa)", 2 if dtype == "fp32" else 1) as bar,
        tempfile.TemporaryDirectory(dir=out_dir) as scratch,
    ):
        built = Path(scratch)  # moved into place only once checked
        with bar.stage("build with onnxruntime-genai"), _failing_stage("building", checkpoint_dir):
            build_gqa(checkpoint_dir, built, dtype)
        if dtype == "fp32":
            with bar.stage("verify vs torch"), _failing_stage("checking fp32", checkpoint_dir):
                diffs["fp32"] = verify_gqa(checkpoint_dir, built, TOLERANCE["fp32"])
        for path in built.iterdir():
            path.replace(out_dir / path.name)
    return ExportResult(out_dir, diffs, bar.seconds)


@contextlib.contextmanager
def _failing_stage(stage: str, checkpoint_dir: Path) -> Iterator[None]:
    """Turn whatever torch or onnxruntime raise into one `ExportError` naming the stage."""
    try:
        yield
    except ExportError:
        raise
    except Exception as error:  # torch and onnxruntime raise many unrelated types
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ExportError(
            f"exporting {checkpoint_dir} failed while {stage}: {type(error).__name__}: {first_line}"
        ) from error


def _set_context_length(config_path: Path, context_length: int) -> None:
    """Write the context length where the engine reads it first."""
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["max_position_embeddings"] = context_length
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
