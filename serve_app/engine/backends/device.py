"""Which device a model runs on: the configured choice resolved against the hardware present."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Literal

import onnxruntime as ort

from serve_app.engine.config import EngineOptions
from serve_app.engine.model_config import ModelLoadError

GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


@dataclass(frozen=True)
class Device:
    """A device that holds the model's weights and KV cache."""

    kind: Literal["cpu", "cuda"]
    index: int = 0

    @property
    def is_gpu(self) -> bool:
        """Whether tensors on this device need copies to reach the host."""
        return self.kind == "cuda"


def cuda_device_count() -> int:
    """CUDA devices visible to this process (honours CUDA_VISIBLE_DEVICES); 0 without a driver."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if driver.cuInit(0) != 0 or driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def resolve_device(options: EngineOptions) -> Device:
    """The device ``options`` asks for, checked against this machine; raises ``ModelLoadError``."""
    listed = [p.name for p in options.execution_providers or []]
    listed_gpu = [name for name in listed if name in GPU_PROVIDERS]
    if options.device == "cpu":
        if options.backend == "tensorrt":
            raise ModelLoadError(
                "backend tensorrt runs on CUDA devices only; in a Serve deployment give the "
                "model replicas a GPU (ray_actor_options.num_gpus)"
            )
        if listed_gpu:
            raise ModelLoadError(
                f"device is cpu but execution_providers lists {listed_gpu[0]}; in a Serve "
                "deployment give the model replicas a GPU (ray_actor_options.num_gpus)"
            )
        return Device("cpu")
    visible = cuda_device_count()
    wants_gpu = options.device == "cuda" or options.backend == "tensorrt" or bool(listed_gpu)
    if not wants_gpu:  # auto, with nothing that needs a GPU
        gpu_usable = "CUDAExecutionProvider" in ort.get_available_providers() and not listed
        if visible == 0 or not gpu_usable:
            return Device("cpu")
    if options.device_id >= visible:
        raise ModelLoadError(
            f"device cuda:{options.device_id} was asked for but this process sees {visible} "
            "CUDA device(s); check the replica's num_gpus and CUDA_VISIBLE_DEVICES"
        )
    return Device("cuda", options.device_id)
