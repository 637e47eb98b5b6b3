"""The native TensorRT backend's CPU-testable parts: engine cache keys and clear load errors."""

from __future__ import annotations

import io
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from serve_app.engine import EngineConfig, ModelLoadError, load_decoder
from serve_app.engine.backends.tensorrt_build import (
    BuildProgress,
    EngineSpec,
    deployment_profiles,
    engine_path,
    import_cudart,
    import_tensorrt,
    model_sha256,
    profile_shapes,
    read_model,
)
from serve_app.engine.backends.tensorrt_profiles import decoder_profiles
from serve_app.engine.decoder import read_onnx_signature

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def spec(model_dir: Path) -> EngineSpec:
    config = EngineConfig(model_path=model_dir, max_num_seqs=8, max_prefill_tokens=512)
    model, model_io = read_model(config)
    return EngineSpec(
        model_sha256="a" * 64,
        gpu_name="NVIDIA H100 80GB HBM3",
        compute_capability=(9, 0),
        tensorrt_version="10.13.0.35",
        profiles=tuple(deployment_profiles(config, model, model_io)),
    )


def test_engine_cache_key_is_stable_and_changes_with_each_ingredient(
    spec: EngineSpec, model_dir: Path
) -> None:
    same = replace(spec, profiles=tuple(replace(p) for p in spec.profiles))
    assert same.key == spec.key
    assert engine_path(Path("/cache"), same) == engine_path(Path("/cache"), spec)

    _, model_io = read_model(EngineConfig(model_path=model_dir))
    variants = [
        replace(spec, model_sha256="b" * 64),
        replace(spec, gpu_name="NVIDIA A100-SXM4-80GB"),
        replace(spec, compute_capability=(8, 0)),
        replace(spec, tensorrt_version="11.4.0.106"),
        replace(spec, profiles=tuple(decoder_profiles(model_io, 16, 512, 1024))),  # batch
        replace(spec, profiles=tuple(decoder_profiles(model_io, 8, 256, 1024))),  # prompt
        replace(spec, profiles=tuple(decoder_profiles(model_io, 8, 512, 2048))),  # context
        replace(spec, profiles=spec.profiles[::-1]),  # profile order is profile indices
    ]
    keys = {spec.key, *(variant.key for variant in variants)}
    assert len(keys) == len(variants) + 1


def test_every_model_input_gets_profile_shapes(model_dir: Path, spec: EngineSpec) -> None:
    inputs, _ = read_onnx_signature(model_dir / "model.onnx")
    prefill, decode = (profile_shapes(p) for p in spec.profiles)
    assert set(prefill) == set(decode) == set(inputs)
    empty_past = prefill["past_key_values.0.key"]
    assert [shape[2] for shape in empty_past] == [0, 0, 0]  # prefill runs over an empty cache
    assert decode["input_ids"][2] == (8, 1)  # decode: every running row, one token each
    assert decode["attention_mask"][2] == (8, 1024)


def _tiny_model(directory: Path, weight: float) -> Path:
    """A MatMul whose weights live in model.onnx.data, as large exports keep them."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model.onnx.data").unlink(missing_ok=True)  # onnx appends to an existing one
    weights = numpy_helper.from_array(np.full((4, 4), weight, np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        initializer=[weights],
    )
    path = directory / "model.onnx"
    onnx.save_model(
        helper.make_model(graph),
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="model.onnx.data",
        size_threshold=0,
    )
    return path


def test_model_identity_follows_the_bytes_not_the_path(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    original = model_sha256(_tiny_model(tmp_path / "a", 1.0), cache)
    assert model_sha256(_tiny_model(tmp_path / "b", 1.0), cache) == original  # another mount

    graph_bytes = (tmp_path / "a" / "model.onnx").read_bytes()
    retrained = _tiny_model(tmp_path / "a", 2.0)  # same graph file, new external weights
    assert retrained.read_bytes() == graph_bytes
    assert model_sha256(retrained, cache) != original
    assert model_sha256(_tiny_model(tmp_path / "a", 1.0), cache) == original


def test_missing_packages_are_named_with_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` fail
    with pytest.raises(ModelLoadError, match=r"tensorrt package.*pip install 'serve_app\[gpu\]'"):
        import_tensorrt()
    monkeypatch.setitem(sys.modules, "cuda", None)
    with pytest.raises(ModelLoadError, match=r"cuda-python package.*gpu extra"):
        import_cudart()


def test_tensorrt_backend_without_a_gpu_says_so(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("serve_app.engine.backends.device.cuda_device_count", lambda: 0)
    config = EngineConfig(model_path=model_dir, backend="tensorrt", device="cuda")
    with pytest.raises(ModelLoadError, match=r"cuda:0 was asked for .* sees 0 CUDA device"):
        load_decoder(config)


def test_tensorrt_backend_on_a_gpu_without_tensorrt_names_the_extra(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("serve_app.engine.backends.device.cuda_device_count", lambda: 1)
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    config = EngineConfig(model_path=model_dir, backend="tensorrt", device="cuda")
    with pytest.raises(ModelLoadError, match=r"needs the tensorrt package.*gpu extra"):
        load_decoder(config)


def test_build_trt_without_tensorrt_exits_with_the_reason(model_dir: Path, tmp_path: Path) -> None:
    # A tensorrt that fails to import, so the test means the same where TensorRT is installed.
    (tmp_path / "tensorrt.py").write_text("raise ImportError('hidden by the test')\n")
    result = subprocess.run(
        [sys.executable, "-m", "serve_app.tools", "build-trt", str(model_dir)],
        cwd=ROOT,
        env={"PYTHONPATH": f"{tmp_path}:{ROOT}", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "needs the tensorrt package" in result.stderr
    assert "pip install 'serve_app[gpu]'" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_build_progress_shows_tensorrt_phases() -> None:
    out = io.StringIO()
    progress = BuildProgress(file=out)
    progress.phase_start("Building engine", None, 2)
    progress.phase_start("Tactic selection", "Building engine", 3)
    assert all(progress.step_complete("Tactic selection", step) for step in range(3))
    progress.phase_finish("Tactic selection")
    progress.step_complete("Building engine", 0)
    progress.step_complete("Building engine", 1)
    progress.phase_finish("Building engine")
    progress.phase_start("Left open by a failed build", None, 5)
    progress.close()
    text = out.getvalue()
    assert "Tactic selection" in text
    assert "Building engine" in text and "2/2" in text
