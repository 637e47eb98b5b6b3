"""Backend, device and execution-provider choice from the engine config, and its errors.

This machine has no GPU, so the paths that depend on one patch the two facts they read
(visible CUDA devices, onnxruntime's providers); nothing else is faked.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from serve_app.engine import EngineConfig, ExecutionProvider, ModelLoadError, load_decoder
from serve_app.engine.backends import device as device_module
from serve_app.engine.backends import onnxruntime_decoder
from serve_app.engine.backends.device import Device, resolve_device
from serve_app.engine.backends.onnxruntime_decoder import OnnxDecoder, session_providers
from serve_app.engine.backends.tensorrt_profiles import decoder_profiles, tensorrt_provider_shapes
from serve_app.engine.decoder import ModelIO, read_onnx_signature
from serve_app.engine.model_config import ModelConfig

ALL_PROVIDERS = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


@pytest.fixture
def one_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """A process that sees one CUDA device and has onnxruntime-gpu."""
    monkeypatch.setattr(device_module, "cuda_device_count", lambda: 1)
    monkeypatch.setattr(device_module.ort, "get_available_providers", lambda: ALL_PROVIDERS)


def config(model_dir: Path, **options: object) -> EngineConfig:
    return EngineConfig.model_validate({"model_path": model_dir, **options})


def test_auto_runs_on_cpu_without_a_gpu(model_dir: Path) -> None:
    decoder = load_decoder(config(model_dir))
    assert isinstance(decoder, OnnxDecoder)
    assert decoder.device == Device("cpu")
    assert decoder.describe() == "onnxruntime (CPUExecutionProvider)"


def test_auto_picks_the_gpu_when_the_replica_has_one(model_dir: Path, one_gpu: None) -> None:
    assert resolve_device(config(model_dir)) == Device("cuda", 0)
    cpu_only = [{"name": "CPUExecutionProvider"}]
    assert resolve_device(config(model_dir, execution_providers=cpu_only)) == Device("cpu")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"device": "cuda"}, r"cuda:0 was asked for but this process sees 0 CUDA device"),
        ({"backend": "tensorrt"}, r"sees 0 CUDA device"),
        ({"backend": "tensorrt", "device": "cpu"}, r"tensorrt runs on CUDA devices only"),
        (
            {"device": "cpu", "execution_providers": [{"name": "CUDAExecutionProvider"}]},
            r"device is cpu but execution_providers lists CUDAExecutionProvider",
        ),
        (
            {"execution_providers": [{"name": "TensorrtExecutionProvider"}]},
            r"sees 0 CUDA device",
        ),
    ],
)
def test_impossible_device_choices_are_named(
    model_dir: Path, options: dict[str, object], message: str
) -> None:
    with pytest.raises(ModelLoadError, match=message):
        load_decoder(config(model_dir, **options))


def test_missing_gpu_provider_names_the_gpu_extra(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A GPU is present but the CPU-only onnxruntime wheel is installed."""
    monkeypatch.setattr(device_module, "cuda_device_count", lambda: 1)
    with pytest.raises(ModelLoadError, match=r"CUDAExecutionProvider is not available.*gpu extra"):
        load_decoder(config(model_dir, device="cuda"))


def test_gpu_defaults_are_cuda_then_cpu_on_the_chosen_device(
    model_dir: Path, one_gpu: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(onnxruntime_decoder.ort, "get_available_providers", lambda: ALL_PROVIDERS)
    engine_config = config(model_dir, device="cuda")
    providers = session_providers(
        engine_config, Device("cuda", 3), model_dir / "model.onnx", ModelConfig.from_dir(model_dir)
    )
    assert providers == [
        ("CUDAExecutionProvider", {"device_id": "3"}),
        ("CPUExecutionProvider", {}),
    ]


def test_tensorrt_provider_gets_profiles_and_an_engine_cache(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(onnxruntime_decoder.ort, "get_available_providers", lambda: ALL_PROVIDERS)
    engine_config = config(
        model_dir,
        max_num_seqs=8,
        max_prefill_tokens=256,
        tensorrt_cache_dir=tmp_path,
        execution_providers=[
            ExecutionProvider(name="TensorrtExecutionProvider", options={"trt_fp16_enable": True}),
            ExecutionProvider(name="CUDAExecutionProvider"),
        ],
    )
    model = ModelConfig.from_dir(model_dir)
    providers = dict(
        session_providers(engine_config, Device("cuda", 0), model_dir / "model.onnx", model)
    )
    trt = providers["TensorrtExecutionProvider"]
    assert trt["trt_fp16_enable"] == "True"  # what the config sets is kept
    assert trt["trt_engine_cache_enable"] == "True"
    assert trt["trt_engine_cache_path"] == str(tmp_path / "onnxruntime-ep")
    # onnxruntime reads a repeated input name as the next profile: prefill, then decode.
    max_shapes = trt["trt_profile_max_shapes"].split(",")
    layers, context = model.num_layers, model.context_length
    heads, dim = model.num_kv_heads, model.head_dim
    assert len(max_shapes) == 2 * (3 + 2 * layers)
    assert max_shapes.count(f"past_key_values.0.key:8x{heads}x0x{dim}") == 1
    assert max_shapes.count(f"past_key_values.0.key:8x{heads}x{context - 1}x{dim}") == 1
    assert "input_ids:8x256" in max_shapes and "input_ids:8x1" in max_shapes
    assert f"attention_mask:8x{context}" in max_shapes


def test_profiles_cover_every_input_within_the_deployment_limits(model_dir: Path) -> None:
    model = ModelConfig.from_dir(model_dir)
    io = ModelIO.from_signature(*read_onnx_signature(model_dir / "model.onnx"), model)
    prefill, decode = decoder_profiles(
        io, max_batch=16, max_prefill_tokens=4096, context_length=512
    )
    expected_inputs = {"input_ids", "attention_mask", "position_ids", *io.past_names}
    for profile in (prefill, decode):
        assert set(profile.inputs) == expected_inputs
        for shape_range in profile.inputs.values():
            for low, opt, high in zip(
                shape_range.min, shape_range.opt, shape_range.max, strict=True
            ):
                assert low <= opt <= high
    assert prefill.inputs["input_ids"].max == (16, 511)  # a prompt leaves room for one token
    assert decode.inputs["attention_mask"].max == (16, 512)
    assert decode.inputs["input_ids"].max == (16, 1)
    options = tensorrt_provider_shapes([prefill, decode])
    assert set(options) == {f"trt_profile_{b}_shapes" for b in ("min", "opt", "max")}
