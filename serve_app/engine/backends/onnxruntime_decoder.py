"""The onnxruntime backend: a decoder-with-past ONNX model on the CPU, CUDA or TensorRT EP.

The layout is the one ``optimum-cli export onnx --task text-generation-with-past`` writes:
``input_ids``, ``attention_mask``, optional ``position_ids`` and ``past_key_values.N.key/value``
in; ``logits`` and ``present.N.key/value`` out. On a GPU every run goes through IOBinding, so
``present`` is written on the device and fed back as the next ``past`` without a host round
trip; only the last position's logits are copied out.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from serve_app.engine.backends.device import Device, resolve_device
from serve_app.engine.backends.host_ops import HostTensorOps
from serve_app.engine.backends.tensorrt_profiles import decoder_profiles, tensorrt_provider_shapes
from serve_app.engine.config import EngineConfig
from serve_app.engine.decoder import (
    ForwardResult,
    ModelIO,
    TensorOps,
    read_onnx_signature,
)
from serve_app.engine.errors import EngineError
from serve_app.engine.model_config import ModelConfig, ModelLoadError
from serve_app.engine.runtime_install import missing_provider_fix

_NUMPY_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16"}
_OPTIMIZATION = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
Provider = tuple[str, dict[str, str]]


class OnnxDecoder:
    """One onnxruntime session over a decoder-with-past model."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = ModelConfig.from_dir(config.model_path)
        onnx_path = config.model_path / config.onnx_file
        if not onnx_path.is_file():
            raise ModelLoadError(f"{config.onnx_file} not found in {config.model_path}")
        self.device = resolve_device(config)
        self.session = ort.InferenceSession(
            str(onnx_path),
            sess_options=session_options(config),
            providers=session_providers(config, self.device, onnx_path, self.config),
        )
        inputs = {
            i.name: (_NUMPY_TYPES.get(i.type, i.type), list(i.shape))
            for i in self.session.get_inputs()
        }
        outputs = [o.name for o in self.session.get_outputs()]
        self.io = ModelIO.from_signature(inputs, outputs, self.config)
        self.ops: TensorOps
        if self.device.is_gpu:
            # Imported here: its graphs need onnx, about a second to import, on GPU only.
            from serve_app.engine.backends.device_ops import DeviceTensorOps

            self.ops, self.run = DeviceTensorOps(self.io, self.device), self.run_on_device
        else:
            self.ops, self.run = HostTensorOps(self.io), self.run_on_host
        self._output_names = ["logits", *self.io.present_names]

    def describe(self) -> str:
        """The backend and its execution providers, e.g. for ``/v1/model_info``."""
        return f"onnxruntime ({', '.join(self.session.get_providers())})"

    def forward(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        past: list[ort.OrtValue],
        *,
        all_positions: bool = False,
    ) -> ForwardResult:
        """Run the model over ``input_ids`` given the cache ``past``; ``all_positions`` also
        returns every input position's logits."""
        host_inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.io.has_position_ids:
            host_inputs["position_ids"] = position_ids
        try:
            logits, *present = self.run(host_inputs, past)
        except Exception as exc:  # onnxruntime raises bare RuntimeError/Fail types
            raise EngineError(f"onnxruntime run failed: {exc}") from exc
        every = self.ops.all_logits(logits) if all_positions else None
        return ForwardResult(self.ops.last_logits(logits), present, every)

    def run_on_host(
        self, host_inputs: dict[str, np.ndarray], past: list[ort.OrtValue]
    ) -> list[ort.OrtValue]:
        """Outputs in host memory; on CPU this is ~25 us a step cheaper than IOBinding."""
        feeds = {name: ort.OrtValue.ortvalue_from_numpy(a) for name, a in host_inputs.items()}
        feeds.update(zip(self.io.past_names, past, strict=True))
        outputs: list[ort.OrtValue] = self.session.run_with_ort_values(self._output_names, feeds)
        return outputs

    def run_on_device(
        self, host_inputs: dict[str, np.ndarray], past: list[ort.OrtValue]
    ) -> list[ort.OrtValue]:
        """Outputs left on the model's device (otherwise onnxruntime copies them to the host)."""
        binding = self.session.io_binding()
        for name, array in host_inputs.items():
            binding.bind_cpu_input(name, array)
        for name, value in zip(self.io.past_names, past, strict=True):
            binding.bind_ortvalue_input(name, value)
        for name in self._output_names:
            binding.bind_output(name, self.device.kind, self.device.index)
        self.session.run_with_iobinding(binding)
        outputs: list[ort.OrtValue] = binding.get_outputs()
        return outputs


def session_providers(
    config: EngineConfig, device: Device, onnx_path: Path, model: ModelConfig
) -> list[Provider]:
    """The execution providers to ask for: the configured ones, or the device's defaults.

    TensorRT gets its shape profiles and an on-disk engine cache unless the config sets them.
    """
    chosen: list[Provider]
    if config.execution_providers is None:
        names = ["CUDAExecutionProvider"] if device.is_gpu else []
        chosen = [(name, {}) for name in [*names, "CPUExecutionProvider"]]
    else:
        chosen = [
            (p.name, {k: str(v) for k, v in p.options.items()}) for p in config.execution_providers
        ]
    available = ort.get_available_providers()
    for name, _ in chosen:
        if name not in available:
            raise ModelLoadError(
                f"execution provider {name} is not available in this onnxruntime build "
                f"(available: {', '.join(available)}); {missing_provider_fix(name)}"
            )
    providers = []
    for name, options in chosen:
        if name == "CUDAExecutionProvider":
            options = {"device_id": str(device.index), **options}
        elif name == "TensorrtExecutionProvider":
            options = {**_tensorrt_defaults(config, device, onnx_path, model), **options}
        providers.append((name, options))
    return providers


def _tensorrt_defaults(
    config: EngineConfig, device: Device, onnx_path: Path, model: ModelConfig
) -> dict[str, str]:
    """Profiles from the deployment's limits, and engine and timing caches on disk."""
    inputs, outputs = read_onnx_signature(onnx_path)
    io = ModelIO.from_signature(inputs, outputs, model)
    profiles = decoder_profiles(
        io, config.max_num_seqs, config.max_prefill_tokens, model.context_length
    )
    cache = config.tensorrt_cache_dir / "onnxruntime-ep"
    return {
        "device_id": str(device.index),
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(cache),
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": str(cache),
        **tensorrt_provider_shapes(profiles),
    }


def session_options(config: EngineConfig) -> ort.SessionOptions:
    """Threads, graph optimization and spinning as the engine config sets them."""
    options = ort.SessionOptions()
    options.graph_optimization_level = _OPTIMIZATION[config.graph_optimization]
    options.intra_op_num_threads = config.intra_op_num_threads
    options.inter_op_num_threads = 1  # one sequential graph; parallelism lives inside operators
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry(
        "session.intra_op.allow_spinning", "1" if config.allow_spinning else "0"
    )
    return options
