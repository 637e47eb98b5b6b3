"""The backends that run a model, by name: what ``EngineOptions.backend`` selects.

Each loads ``config.model_path`` onto a device and returns a ``Decoder``; the engine only ever
sees that protocol, so it is built as ``LLMEngine(config, load_decoder(config))``. A folder from
onnxruntime-genai's model builder (``genai_config.json`` and a ``GroupQueryAttention`` graph) is
recognised by its files and loads as a ``SlotDecoder`` that keeps its KV cache in place.
"""

from __future__ import annotations

from collections.abc import Callable

from serve_app.engine.backends.gqa_decoder import GQADecoder, genai_onnx_file
from serve_app.engine.backends.onnxruntime_decoder import OnnxDecoder
from serve_app.engine.config import Backend, EngineConfig
from serve_app.engine.decoder import Decoder, SlotDecoder


def _tensorrt(config: EngineConfig) -> Decoder:
    from serve_app.engine.backends.tensorrt_decoder import TensorRTDecoder  # needs the gpu extra

    return TensorRTDecoder(config)


BACKENDS: dict[Backend, Callable[[EngineConfig], Decoder]] = {
    "onnxruntime": OnnxDecoder,
    "tensorrt": _tensorrt,
}


def load_decoder(config: EngineConfig) -> Decoder | SlotDecoder:
    """Load ``config.model_path`` with the configured backend on the configured device; a
    fused-attention folder with its in-place KV cache (raises ``ModelLoadError`` where the
    configured backend or device cannot run that)."""
    if genai_onnx_file(config.model_path) is not None:
        return GQADecoder(config)
    return BACKENDS[config.backend](config)
