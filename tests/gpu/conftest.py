"""GPU tests skip, naming what is missing, on machines that cannot run them."""

from __future__ import annotations

import onnxruntime as ort
import pytest

from serve_app.engine import ModelLoadError
from serve_app.engine.backends.device import cuda_device_count
from serve_app.engine.backends.tensorrt_build import import_cudart, import_tensorrt


@pytest.fixture(scope="session")
def requires_cuda() -> None:
    """A CUDA device and onnxruntime's CUDA execution provider (onnxruntime-gpu)."""
    if cuda_device_count() == 0:
        pytest.skip("no CUDA device is visible to this process")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime lacks CUDAExecutionProvider; install the gpu extra")


@pytest.fixture(scope="session")
def requires_tensorrt_provider(requires_cuda: None) -> None:
    """onnxruntime's TensorRT execution provider, on a CUDA device."""
    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime lacks TensorrtExecutionProvider (needs TensorRT's libraries)")


@pytest.fixture(scope="session")
def requires_tensorrt(requires_cuda: None) -> None:
    """The tensorrt and cuda-python packages the native backend needs, on a CUDA device."""
    try:
        import_tensorrt()
        import_cudart()
    except ModelLoadError as missing:
        pytest.skip(str(missing))
