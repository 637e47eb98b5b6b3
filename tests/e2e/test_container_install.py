"""The Dockerfile's builder stage, run as written without Docker (CI has no daemon).

Its COPY instructions are applied to a temporary root (only the files the image gets), and its
RUN commands run in order through ``sh -c`` with the stage's ARG defaults in the environment
(as Docker passes them), ``/app`` and ``/opt/venv`` mapped into that root. So a fresh venv gets
the project with ``EXTRA=cpu`` exactly as the image does, and the image's own install check runs.
Only the pip cache setting is dropped (``PIP_NO_CACHE_DIR``), to reuse this machine's cache.
The ``gpu`` extra is not installed here: TensorRT's libraries come from pypi.nvidia.com.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
INSTALL_TIMEOUT_S = 900


def builder_stage() -> list[tuple[str, str]]:
    """The builder stage's instructions as (KEYWORD, arguments), continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    steps = []
    for line in (raw.strip() for raw in text.splitlines()):
        if not line or line.startswith("#"):
            continue
        keyword, _, args = line.partition(" ")
        steps.append((keyword.upper(), args.strip()))
    froms = [i for i, (keyword, _) in enumerate(steps) if keyword == "FROM"]
    assert steps[froms[0]][1].endswith("AS builder")
    return steps[froms[0] + 1 : froms[1]]


def copy_into(root: Path, workdir: str, args: str) -> None:
    """``COPY src... dest`` from the repository into ``root`` (dest relative to ``workdir``)."""
    *sources, destination = shlex.split(args)
    absolute = destination if destination.startswith("/") else f"{workdir}/{destination}"
    target = root / os.path.normpath(absolute).lstrip("/")
    assert target.is_relative_to(root), destination
    for source in sources:
        path = ROOT / source
        into = target / path.name if destination.endswith("/") else target
        into.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            shutil.copytree(path, into, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, into)


@pytest.mark.timeout(INSTALL_TIMEOUT_S)
def test_dockerfile_builder_commands_install_the_cpu_image(tmp_path: Path) -> None:
    root = tmp_path / "image"
    app, venv = root / "app", root / "opt" / "venv"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON"))}
    # `python` is the base image's interpreter; here, this interpreter's.
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}"
    workdir = "/"
    ran = []
    for keyword, args in builder_stage():
        if keyword == "ARG" and "=" in args:
            name, value = args.split("=", 1)
            env[name] = value
        elif keyword == "ENV":
            for assignment in shlex.split(args):
                name, value = assignment.split("=", 1)
                if name != "PIP_NO_CACHE_DIR":
                    env[name] = value
        elif keyword == "WORKDIR":
            workdir = args
            (root / args.lstrip("/")).mkdir(parents=True, exist_ok=True)
        elif keyword == "COPY":
            copy_into(root, workdir, args)
        elif keyword == "RUN":
            command = args.replace("/opt/venv", str(venv)).replace("/app", str(app))
            result = subprocess.run(
                ["sh", "-c", command],
                cwd=root / workdir.lstrip("/"),
                env=env,
                capture_output=True,
                text=True,
                timeout=INSTALL_TIMEOUT_S,
            )
            assert result.returncode == 0, (
                f"{args}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
            )
            ran.append(args)
    assert env["EXTRA"] == "cpu"
    assert any("pip install" in step for step in ran)

    # What the runtime stage then relies on: the entrypoint, the runtime alone, the demo model.
    assert (venv / "bin" / "serve").is_file()
    probe = (
        "import serve_app, onnxruntime; from importlib import metadata; "
        "print(serve_app.DEMO_MODEL_DIR); print(onnxruntime.get_available_providers()); "
        "print(sorted(d.metadata['Name'] for d in metadata.distributions()))"
    )
    result = subprocess.run(
        [str(venv / "bin" / "python"), "-c", probe],
        cwd=app,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    demo_dir, providers, names = result.stdout.splitlines()
    assert Path(demo_dir) == app / "models" / "demo"
    assert (Path(demo_dir) / "model.onnx").is_file()
    assert "CPUExecutionProvider" in providers
    assert "'onnxruntime'" in names
    assert "'onnxruntime-gpu'" not in names
