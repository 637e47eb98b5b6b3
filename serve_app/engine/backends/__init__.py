"""The backends that run a model, by name: what ``EngineOptions.backend`` selects.

Each loads ``config.model_path`` onto a device and returns a ``Decoder``; the engine only ever
sees that protocol, so it is built as ``LLMEngine(config, load_decoder(config))``.
"""

from __future__ import annotations

from collections.abc import Callable

from serve_app.engine.backends.onnxruntime_decoder import OnnxDecoder
from serve_app.engine.config import Backend, EngineConfig
from serve_app.engine.decoder import Decoder


def _tensorrt(config: EngineConfig) -> Decoder:
    from serve_app.engine.backends.tensorrt_decoder import TensorRTDecoder  # needs the gpu extra

    return TensorRTDecoder(config)


BACKENDS: dict[Backend, Callable[[EngineConfig], Decoder]] = {
    "onnxruntime": OnnxDecoder,
    "tensorrt": _tensorrt,
}


def load_decoder(config: EngineConfig) -> Decoder:
    """Load ``config.model_path`` with the configured backend on the configured device."""
    return BACKENDS[config.backend](config)
