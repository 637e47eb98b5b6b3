"""Continuous-batching generation over an injected decoder; knows nothing of Ray or HTTP.

Build it as ``LLMEngine(config, load_decoder(config))``; the backends live in ``backends/``.
"""
# ruff: noqa: E402  (the runtime check runs before the modules below import onnxruntime)

from serve_app.engine.runtime_install import require_onnxruntime

require_onnxruntime()  # without a runtime extra: an ImportError naming [cpu] and [gpu]

from serve_app.engine.async_engine import AsyncLLMEngine, GenerationRequest, SubmittedBatch
from serve_app.engine.backends import load_decoder
from serve_app.engine.config import EngineConfig, EngineOptions, ExecutionProvider
from serve_app.engine.decoder import Decoder
from serve_app.engine.engine import LLMEngine
from serve_app.engine.errors import (
    EngineDeadError,
    EngineError,
    EngineOverloadedError,
    InvalidRequestError,
)
from serve_app.engine.model_config import ModelConfig, ModelLoadError
from serve_app.engine.sampling_params import SamplingParams
from serve_app.engine.sequence import FinishReason, SequenceOutput, TokenLogprob
from serve_app.engine.stats import StepStats
from serve_app.engine.structured import InvalidStructuredOutput, StructuredOutput

__all__ = [
    "AsyncLLMEngine",
    "Decoder",
    "EngineConfig",
    "EngineDeadError",
    "EngineError",
    "EngineOptions",
    "EngineOverloadedError",
    "ExecutionProvider",
    "FinishReason",
    "GenerationRequest",
    "InvalidRequestError",
    "InvalidStructuredOutput",
    "LLMEngine",
    "ModelConfig",
    "ModelLoadError",
    "SamplingParams",
    "SequenceOutput",
    "StepStats",
    "StructuredOutput",
    "SubmittedBatch",
    "TokenLogprob",
    "load_decoder",
]
