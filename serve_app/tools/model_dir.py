"""The served model directory: the files beside ``model.onnx``, checks on them, writing a graph."""

from __future__ import annotations

import shutil
from pathlib import Path

import onnx

ONNX_FILE = "model.onnx"
# What the engine and tokenizer read besides the graph; generation_config.json is optional there.
REQUIRED_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")
OPTIONAL_FILES = (
    "generation_config.json",
    "special_tokens_map.json",
    # Where transformers >= 4.47 and Optimum save the chat template (see text/chat_template.py).
    "chat_template.jinja",
    "chat_template.json",
)
CHAT_TEMPLATE_DIR = "additional_chat_templates"  # named templates, NAME.jinja
_PROTOBUF_LIMIT = 2**31 - 1  # one .onnx file cannot hold more; larger weights go to .onnx.data


class ModelDirError(ValueError):
    """A directory given to a tool is missing, lacks files, or would overwrite its input."""


def check_input_dir(path: Path, required: tuple[str, ...]) -> None:
    """Raise `ModelDirError` naming `path` unless it is a directory holding `required`."""
    if not path.is_dir():
        raise ModelDirError(f"{path} is not a directory")
    missing = [name for name in required if not (path / name).is_file()]
    if missing:
        raise ModelDirError(f"{path} lacks {', '.join(missing)}")


def check_output_dir(out_dir: Path, input_dir: Path) -> None:
    """Raise `ModelDirError` if writing `out_dir` would overwrite `input_dir` or a file."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ModelDirError(f"{out_dir} exists and is not a directory")
    if out_dir.resolve() == input_dir.resolve():
        raise ModelDirError(f"the output directory {out_dir} must differ from the input")


def copy_served_files(src: Path, dst: Path) -> None:
    """Copy the config, tokenizer and chat template files `src` has from `src` to `dst`."""
    for name in REQUIRED_FILES + OPTIONAL_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    if (src / CHAT_TEMPLATE_DIR).is_dir():
        shutil.copytree(src / CHAT_TEMPLATE_DIR, dst / CHAT_TEMPLATE_DIR, dirs_exist_ok=True)


def needs_external_data(model: onnx.ModelProto) -> bool:
    """Whether the weights are too large for one protobuf file."""
    return sum(tensor.ByteSize() for tensor in model.graph.initializer) >= _PROTOBUF_LIMIT


def save_onnx(model: onnx.ModelProto, path: Path) -> None:
    """Write `model` to `path`, weights in `<name>.data` beside it when they exceed 2 GiB."""
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=needs_external_data(model),
        all_tensors_to_one_file=True,
        location=f"{path.name}.data",
    )


def onnx_mib(model_dir: Path) -> float:
    """Size of the directory's graph and its external weights, in MiB."""
    files = [model_dir / ONNX_FILE, model_dir / f"{ONNX_FILE}.data"]
    return sum(f.stat().st_size for f in files if f.is_file()) / 2**20
