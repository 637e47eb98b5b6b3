"""Backends by name: what ``EngineOptions.backend`` selects."""

from __future__ import annotations

from collections.abc import Callable

from serve_app.engine.config import Backend, EngineConfig
from serve_app.engine.decoder import Decoder
from serve_app.engine.onnx_model import OnnxDecoder


def _tensorrt(config: EngineConfig) -> Decoder:
    from serve_app.engine.tensorrt_model import TensorRTDecoder  # needs the gpu extra

    return TensorRTDecoder(config)


BACKENDS: dict[Backend, Callable[[EngineConfig], Decoder]] = {
    "onnxruntime": OnnxDecoder,
    "tensorrt": _tensorrt,
}


def load_decoder(config: EngineConfig) -> Decoder:
    """Load ``config.model_path`` with the configured backend on the configured device."""
    return BACKENDS[config.backend](config)
