"""Packaging: the runtime extras never co-install both ONNX Runtimes, the install errors name the
fix, and the Dockerfile is what docs/CONTAINER.md says it is.

Resolving every extra in full (``pip install --dry-run --report``) takes 1-2 minutes and cannot
finish here (``tensorrt-cu13``'s libraries come from pypi.nvidia.com). So the conflict is checked
in two layers: the requirements pyproject.toml declares, extras expanded, and the package
metadata of every direct requirement of the runtime-bearing extras (one ``--no-deps`` dry run
against PyPI, about 10 s, so it is in the e2e tier), which is where a second runtime would come
from (as onnxruntime-genai pulls ``onnxruntime``). The install the Dockerfile runs is made for
real in tests/e2e/test_container_install.py.
"""

from __future__ import annotations

import json
import logging
import re
import shlex
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from serve_app.engine import EngineConfig, ModelLoadError, load_decoder
from serve_app.engine import runtime_install as runtime
from serve_app.engine.backends import device as device_module
from serve_app.engine.backends.device import require_cuda_provider, resolve_device

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = canonicalize_name(PYPROJECT["project"]["name"])
EXTRAS: dict[str, list[str]] = PYPROJECT["project"]["optional-dependencies"]
RUNTIMES = {"onnxruntime", "onnxruntime-gpu"}
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def declared(extras: set[str]) -> dict[str, Requirement]:
    """The requirements of the base install plus ``extras``, self-references expanded."""
    found = {
        canonicalize_name(r.name): r for r in map(Requirement, PYPROJECT["project"]["dependencies"])
    }
    todo, seen = list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for line in EXTRAS[extra]:
            requirement = Requirement(line)
            if canonicalize_name(requirement.name) == PROJECT:
                todo.extend(requirement.extras)
            else:
                found[canonicalize_name(requirement.name)] = requirement
    return found


# --- the extras ----------------------------------------------------------------------------


@pytest.mark.parametrize("extra", sorted(EXTRAS))
def test_no_extra_declares_both_runtimes(extra: str) -> None:
    assert not set(declared({extra})) >= RUNTIMES


def test_each_runtime_comes_from_its_own_extra() -> None:
    assert not RUNTIMES & set(declared(set()))  # the base install has no runtime
    assert RUNTIMES & set(declared({"cpu"})) == {"onnxruntime"}
    assert RUNTIMES & set(declared({"gpu"})) == {"onnxruntime-gpu"}
    assert RUNTIMES & set(declared({"test"})) == {"onnxruntime"}  # the suite runs on the CPU
    assert RUNTIMES & set(declared({"train"})) == {"onnxruntime"}  # the tools venv exports


def test_gpu_extra_is_pinned_to_one_cuda_major() -> None:
    gpu = declared({"gpu"})
    ort = gpu["onnxruntime-gpu"]
    assert {"cuda", "cudnn"} <= ort.extras  # the CUDA runtime and cuDNN as wheels
    assert Version("1.26.0") not in ort.specifier  # the last CUDA 12 build
    assert Version("1.27.0") in ort.specifier
    assert Version("2.0.0") not in ort.specifier
    assert f"tensorrt-cu{runtime.CUDA_MAJOR}" in gpu
    cuda_python = gpu["cuda-python"].specifier
    assert Version(f"{runtime.CUDA_MAJOR}.0.0") in cuda_python
    assert Version(f"{runtime.CUDA_MAJOR - 1}.9.0") not in cuda_python
    assert Version(f"{runtime.CUDA_MAJOR + 1}.0.0") not in cuda_python
    pyproject_text = (ROOT / "pyproject.toml").read_text()
    assert f"CUDA {runtime.CUDA_MAJOR} " in pyproject_text  # the comment states the major
    assert f"CUDA {runtime.CUDA_MAJOR}" in (ROOT / "docs" / "BACKENDS.md").read_text()


def _pypi_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
    except OSError:
        return False
    return True


@pytest.mark.e2e  # a real resolution against PyPI, like the install in the e2e tier
def test_runtime_extras_direct_requirements_pull_no_second_runtime(tmp_path: Path) -> None:
    """The metadata of each requirement of cpu and gpu, as pip resolves it from PyPI (no deps)."""
    if not _pypi_reachable():
        pytest.skip("pypi.org is not reachable from this machine")
    direct = {
        canonicalize_name(requirement.name): requirement
        for requirement in map(Requirement, EXTRAS["cpu"] + EXTRAS["gpu"])
    }
    report = tmp_path / "report.json"
    pip = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-deps"]
    result = subprocess.run(
        [*pip, "--quiet", "--report", str(report), *map(str, direct.values())],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    resolved = {
        canonicalize_name(item["metadata"]["name"]): item["metadata"]
        for item in json.loads(report.read_text())["install"]
    }
    assert set(resolved) == set(direct)
    pulls = {
        name: {
            canonicalize_name(r.name)
            for r in map(Requirement, meta.get("requires_dist", []))
            if r.marker is None
            or any(r.marker.evaluate({"extra": e}) for e in {"", *direct[name].extras})
        }
        for name, meta in resolved.items()
    }
    for name in declared({"gpu"}):
        if name in resolved:
            assert "onnxruntime" not in pulls[name], f"{name} pulls onnxruntime into the gpu extra"
    for name in declared({"cpu"}):
        if name in resolved:
            assert "onnxruntime-gpu" not in pulls[name]
    # the wheels the gpu extra resolves to are built for the CUDA major it states
    cuda_runtime = [
        Requirement(line)
        for line in resolved["onnxruntime-gpu"]["requires_dist"]
        if Requirement(line).name.startswith("nvidia-cuda-runtime")
    ]
    assert cuda_runtime, resolved["onnxruntime-gpu"]["requires_dist"]
    for requirement in cuda_runtime:
        assert Version(f"{runtime.CUDA_MAJOR}.0") in requirement.specifier
        assert Version(f"{runtime.CUDA_MAJOR + 1}.0") not in requirement.specifier


# --- the errors at start-up ---------------------------------------------------------------


@pytest.fixture
def installed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The distributions ``importlib.metadata`` reports; a test fills the list."""
    present: list[str] = []
    real = metadata.distribution

    def distribution(name: str) -> metadata.Distribution:
        if name in RUNTIMES:
            if name not in present:
                raise metadata.PackageNotFoundError(name)
            return real("onnxruntime")  # any distribution object: only presence is read
        return real(name)

    monkeypatch.setattr(runtime.metadata, "distribution", distribution)
    return present


def test_no_runtime_names_both_extras(
    installed: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    with pytest.raises(ImportError) as raised:
        runtime.require_onnxruntime()
    message = str(raised.value)
    assert "no ONNX Runtime is installed" in message
    assert 'pip install "serve_app[cpu]"' in message
    assert 'pip install "serve_app[gpu]"' in message
    assert "CUDA 13" in message


def test_a_half_uninstalled_runtime_says_reinstall(
    installed: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    installed.append("onnxruntime-gpu")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match=r"pip uninstall -y onnxruntime onnxruntime-gpu, then"):
        runtime.require_onnxruntime()


def test_engine_import_without_a_runtime_fails_with_the_extras() -> None:
    """The real start-up path: a fresh interpreter importing the app with onnxruntime hidden."""
    hide = "import sys; sys.modules['onnxruntime'] = None; import serve_app.app"
    result = subprocess.run(
        [sys.executable, "-c", hide], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert result.returncode != 0
    assert "RuntimeMissingError" in result.stderr
    assert 'pip install "serve_app[cpu]"' in result.stderr
    assert 'pip install "serve_app[gpu]"' in result.stderr


def gpu_config(model_dir: Path, **options: object) -> EngineConfig:
    return EngineConfig.model_validate({"model_path": model_dir, "device": "cuda", **options})


@pytest.mark.parametrize(
    ("present", "fix"),
    [
        (
            ["onnxruntime", "onnxruntime-gpu"],
            r"both onnxruntime and onnxruntime-gpu are installed.*"
            r'pip uninstall -y onnxruntime onnxruntime-gpu && pip install "serve_app\[gpu\]"',
        ),
        (
            ["onnxruntime"],
            r"needs the gpu extra \(onnxruntime-gpu, CUDA 13\).*"
            r'pip uninstall -y onnxruntime && pip install "serve_app\[gpu\]"',
        ),
        ([], r'needs the gpu extra.*: pip install "serve_app\[gpu\]"'),
    ],
)
def test_gpu_config_on_a_cpu_runtime_names_the_fix(
    model_dir: Path,
    installed: list[str],
    monkeypatch: pytest.MonkeyPatch,
    present: list[str],
    fix: str,
) -> None:
    installed.extend(present)
    monkeypatch.setattr(device_module, "cuda_device_count", lambda: 1)
    with pytest.raises(ModelLoadError, match=r"CUDAExecutionProvider is not available.*" + fix):
        load_decoder(gpu_config(model_dir))
    with pytest.raises(ModelLoadError, match=fix):  # the native TensorRT backend's check
        require_cuda_provider()


def test_a_provider_no_extra_has_is_not_blamed_on_the_gpu_extra(installed: list[str]) -> None:
    installed.append("onnxruntime")
    fix = runtime.missing_provider_fix("OpenVINOExecutionProvider")
    assert "gpu extra" not in fix
    assert "needs an onnxruntime build that has it" in fix


def test_auto_on_a_gpu_with_the_cpu_runtime_warns_with_the_fix(
    model_dir: Path,
    installed: list[str],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    installed.extend(["onnxruntime", "onnxruntime-gpu"])
    monkeypatch.setattr(device_module, "cuda_device_count", lambda: 1)
    with caplog.at_level(logging.WARNING, logger=device_module.__name__):
        chosen = resolve_device(gpu_config(model_dir, device="auto"))
    assert chosen.kind == "cpu"
    assert "a CUDA device is visible but the model runs on the CPU" in caplog.text
    assert "pip uninstall -y onnxruntime onnxruntime-gpu" in caplog.text


@pytest.mark.parametrize(
    ("extra", "present", "problem"),
    [
        ("cpu", ["onnxruntime"], None),
        ("cpu", ["onnxruntime", "onnxruntime-gpu"], "found onnxruntime and onnxruntime-gpu"),
        ("gpu", ["onnxruntime"], "should install onnxruntime-gpu alone, but found onnxruntime"),
        ("gpu", [], "found no runtime"),
    ],
)
def test_install_check_the_dockerfile_runs(
    installed: list[str], extra: str, present: list[str], problem: str | None
) -> None:
    installed.extend(present)
    found = runtime.check_install(extra)
    assert found is None if problem is None else problem in (found or "")


# --- the Dockerfile -------------------------------------------------------------------------


def instructions() -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (KEYWORD, arguments), continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", DOCKERFILE)
    lines = [line.strip() for line in joined.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in lines
        if line and not line.startswith("#")
    ]


def test_every_path_the_dockerfile_copies_exists() -> None:
    copied = []
    for keyword, args in instructions():
        if keyword in {"COPY", "ADD"} and "--from=" not in args:
            *sources, _destination = [a for a in shlex.split(args) if not a.startswith("--")]
            copied.extend(sources)
    assert copied
    for source in copied:
        assert (ROOT / source).exists(), f"the Dockerfile copies {source}, which is not in the repo"
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert "*" in ignore  # an allow-list: each copied path must be let back in
    for source in copied:
        assert any(source.rstrip("/").startswith(p[1:].rstrip("/")) for p in ignore if p[:1] == "!")


def test_dockerfile_is_what_docs_container_describes() -> None:
    steps = instructions()
    args = dict(a.split("=", 1) for k, a in steps if k == "ARG" and "=" in a)
    assert args["PYTHON_VERSION"] == "3.11"
    assert args["EXTRA"] == "cpu"
    assert args["DEMO_MODEL"] == "1"
    stages = [a for k, a in steps if k == "FROM"]
    assert stages == [
        "python:${PYTHON_VERSION}-slim-bookworm AS builder",
        "python:${PYTHON_VERSION}-slim-bookworm AS runtime",
    ]
    users = [a for k, a in steps if k == "USER"]
    assert users and all(not u.startswith(("0", "root")) for u in users)
    assert [a for k, a in steps][-1] == '["configs/cpu_demo.yaml"]'
    assert ("ENTRYPOINT", '["serve", "run"]') in steps
    assert (ROOT / "configs" / "cpu_demo.yaml").exists()
    exposed = {p for k, a in steps if k == "EXPOSE" for p in a.split()}
    assert exposed == {"8000", "8265", "6379", "8080"}
    installs = [a for k, a in steps if k == "RUN" and "pip install" in a]
    assert installs and all('"/app[${EXTRA}]"' in a for a in installs)
    doc = (ROOT / "docs" / "CONTAINER.md").read_text()
    for word in ("python:3.11-slim-bookworm", "EXTRA", "DEMO_MODEL", "RAY_VERSION", "uid 1000"):
        assert word in doc


def test_image_ray_matches_kuberay_ray_version() -> None:
    """KubeRay needs rayVersion to be the Ray inside the image."""
    ray_version = re.search(r"^ARG RAY_VERSION=(\S+)$", DOCKERFILE, re.MULTILINE)
    assert ray_version is not None
    declared_versions = {
        match
        for path in (ROOT / "k8s").rglob("*.yaml")
        for match in re.findall(r"rayVersion:\s*\"?([\d.]+)", path.read_text())
    }
    if not declared_versions:
        pytest.skip("no RayService under k8s/ declares rayVersion")
    assert declared_versions == {ray_version.group(1)}
    assert Version(ray_version.group(1)) in declared(set())["ray"].specifier
