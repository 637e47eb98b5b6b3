"""Which device a model runs on: the configured choice resolved against the hardware present."""

from __future__ import annotations

import contextlib
import ctypes
import logging
from dataclasses import dataclass
from typing import Literal

import onnxruntime as ort

from serve_app.engine.config import EngineOptions
from serve_app.engine.model_config import ModelLoadError
from serve_app.engine.runtime_install import GPU_PROVIDERS, missing_provider_fix

logger = logging.getLogger(__name__)


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
        has_cuda_provider = "CUDAExecutionProvider" in ort.get_available_providers()
        if visible > 0 and not has_cuda_provider and not listed:
            logger.warning(
                "a CUDA device is visible but the model runs on the CPU: %s",
                missing_provider_fix("CUDAExecutionProvider"),
            )
        if visible == 0 or not has_cuda_provider or listed:
            return Device("cpu")
    if options.device_id >= visible:
        raise ModelLoadError(
            f"device cuda:{options.device_id} was asked for but this process sees {visible} "
            "CUDA device(s); check the replica's num_gpus and CUDA_VISIBLE_DEVICES"
        )
    load_cuda_libraries()
    return Device("cuda", options.device_id)


def require_cuda_provider() -> None:
    """Raise ``ModelLoadError`` naming the fix unless onnxruntime can place tensors on CUDA."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise ModelLoadError(
            "device tensors need onnxruntime's CUDAExecutionProvider, which this onnxruntime "
            f"build lacks; {missing_provider_fix('CUDAExecutionProvider')}"
        )


def load_cuda_libraries() -> None:
    """Load the CUDA and cuDNN libraries the gpu extra installs as wheels (``nvidia-*``).

    onnxruntime-gpu does not look for them there; with a system CUDA it loads those instead.
    """
    with contextlib.suppress(AttributeError, OSError, RuntimeError):  # CPU wheel, odd layouts
        ort.preload_dlls()
