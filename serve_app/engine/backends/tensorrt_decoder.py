"""The native TensorRT backend: an engine built from the model's ONNX file, run with enqueueV3.

The engine has two optimization profiles (``tensorrt_profiles.py``): prefill, over an empty
cache, and decode, one token per row. Each has its own execution context, so switching phase
costs no profile switch. Tensors live in onnxruntime ``OrtValue``s on the GPU, the same as
the onnxruntime backend's, so the KV-cache surgery of ``DeviceTensorOps`` and the engine's
bookkeeping work unchanged; TensorRT only sees their addresses. Needs the gpu extra
(tensorrt, cuda-python, onnxruntime-gpu).
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import onnxruntime as ort

from serve_app.engine.backends.device import require_cuda_provider, resolve_device
from serve_app.engine.backends.device_ops import DeviceTensorOps
from serve_app.engine.backends.tensorrt_build import (
    cuda_call,
    deployment_profiles,
    ensure_engine,
    import_cudart,
    import_tensorrt,
    read_model,
    tensorrt_logger,
)
from serve_app.engine.config import EngineConfig
from serve_app.engine.decoder import ForwardResult, TensorOps
from serve_app.engine.errors import EngineError
from serve_app.engine.model_config import ModelLoadError

PREFILL, DECODE = 0, 1  # profile indices, in the order deployment_profiles lists them


class TensorRTDecoder:
    """A serialized TensorRT engine over a decoder-with-past model, on one CUDA device."""

    def __init__(self, config: EngineConfig) -> None:
        self.config, self.io = read_model(config)
        self.device = resolve_device(config)
        self._trt, self._cudart = import_tensorrt(), import_cudart()
        require_cuda_provider()  # the KV cache and logits live in onnxruntime's CUDA OrtValues
        profiles = deployment_profiles(config, self.config, self.io)
        path = ensure_engine(config, profiles, show_progress=sys.stderr.isatty())
        cuda_call(self._cudart.cudaSetDevice(self.device.index))
        self._runtime = self._trt.Runtime(tensorrt_logger(self._trt))
        self.engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise ModelLoadError(
                f"TensorRT could not load the cached engine {path} (see its log); delete it "
                "to have it rebuilt"
            )
        self._dtypes = self._tensor_dtypes(len(profiles))
        self._stream = cuda_call(self._cudart.cudaStreamCreate())
        self._contexts = [self.engine.create_execution_context() for _ in profiles]
        for index, context in enumerate(self._contexts):
            if not context.set_optimization_profile_async(index, int(self._stream)):
                raise ModelLoadError(f"TensorRT could not select optimization profile {index}")
        cuda_call(self._cudart.cudaStreamSynchronize(self._stream))
        self.ops: TensorOps = DeviceTensorOps(self.io, self.device)
        # TensorRT wants a non-null address even for an empty tensor (the prefill's past).
        self._placeholders = {
            name: self._allocate([1], self.io.kv_dtype.type) for name in self.io.past_names
        }
        self._output_names = ["logits", *self.io.present_names]

    def __del__(self) -> None:
        # A model reload drops this decoder; its stream would otherwise outlive it.
        stream = getattr(self, "_stream", None)
        if stream is not None:
            self._cudart.cudaStreamDestroy(stream)

    def describe(self) -> str:
        """The backend, its version and device, e.g. for ``/v1/model_info``."""
        return f"tensorrt {self._trt.__version__} (cuda:{self.device.index})"

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
        cuda_call(self._cudart.cudaSetDevice(self.device.index))  # the calling thread's device
        profile = PREFILL if past[0].shape()[2] == 0 else DECODE
        context = self._contexts[profile]
        host = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.io.has_position_ids:
            host["position_ids"] = position_ids
        inputs = {name: self._upload(name, array) for name, array in host.items()}
        inputs.update(zip(self.io.past_names, past, strict=True))
        for name, value in inputs.items():
            self._bind_input(context, profile, name, value)
        outputs = []
        for name in self._output_names:
            shape = tuple(context.get_tensor_shape(name))
            if any(dim < 0 for dim in shape):
                raise EngineError(f"TensorRT could not infer the shape of {name}: {shape}")
            value = self._allocate(list(shape), self._dtypes[name])
            context.set_tensor_address(name, value.data_ptr())
            outputs.append(value)
        if not context.execute_async_v3(int(self._stream)):
            raise EngineError("TensorRT failed to enqueue the forward pass; see its log")
        cuda_call(self._cudart.cudaStreamSynchronize(self._stream))  # inputs may be freed now
        logits, *present = outputs
        every = self.ops.all_logits(logits) if all_positions else None
        return ForwardResult(self.ops.last_logits(logits), present, every)

    def _bind_input(self, context: Any, profile: int, name: str, value: ort.OrtValue) -> None:
        shape = value.shape()
        if not context.set_input_shape(name, shape):
            bounds = self.engine.get_tensor_profile_shape(name, profile)
            raise EngineError(
                f"{name} of shape {shape} is outside the TensorRT engine's profile {profile} "
                f"(min, opt, max: {[tuple(b) for b in bounds]}); rebuild it for these limits"
            )
        address = self._placeholders[name].data_ptr() if 0 in shape else value.data_ptr()
        context.set_tensor_address(name, address)

    def _upload(self, name: str, array: np.ndarray) -> ort.OrtValue:
        host = np.ascontiguousarray(array, dtype=self._dtypes[name])  # as the engine declares it
        return ort.OrtValue.ortvalue_from_numpy(host, self.device.kind, self.device.index)

    def _allocate(self, shape: list[int], dtype: Any) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_shape_and_type(
            shape, dtype, self.device.kind, self.device.index
        )

    def _tensor_dtypes(self, num_profiles: int) -> dict[str, Any]:
        """numpy types of the engine's I/O tensors; raises if the model's names are missing."""
        names = {self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)}
        expected = ["input_ids", "attention_mask", "logits", *self.io.past_names]
        expected += self.io.present_names + (["position_ids"] if self.io.has_position_ids else [])
        missing = [name for name in expected if name not in names]
        if missing:
            raise ModelLoadError(f"the TensorRT engine lacks the tensors {', '.join(missing)}")
        if self.engine.num_optimization_profiles != num_profiles:
            raise ModelLoadError(
                f"the TensorRT engine has {self.engine.num_optimization_profiles} optimization "
                f"profiles, not {num_profiles} (prefill and decode)"
            )
        return {name: self._trt.nptype(self.engine.get_tensor_dtype(name)) for name in expected}
