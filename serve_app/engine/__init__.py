"""Continuous-batching generation over ONNX Runtime; knows nothing of Ray or HTTP."""

from serve_app.engine.async_engine import AsyncLLMEngine, GenerationRequest
from serve_app.engine.config import EngineConfig, EngineOptions, ExecutionProvider
from serve_app.engine.engine import LLMEngine
from serve_app.engine.errors import (
    EngineDeadError,
    EngineError,
    EngineOverloadedError,
    InvalidRequestError,
    InvalidSamplingParamsError,
)
from serve_app.engine.model_config import ModelConfig, ModelLoadError
from serve_app.engine.sampling_params import SamplingParams
from serve_app.engine.sequence import FinishReason, SequenceOutput, TokenLogprob
from serve_app.engine.stats import StepStats

__all__ = [
    "AsyncLLMEngine",
    "EngineConfig",
    "EngineDeadError",
    "EngineError",
    "EngineOptions",
    "EngineOverloadedError",
    "ExecutionProvider",
    "FinishReason",
    "GenerationRequest",
    "InvalidRequestError",
    "InvalidSamplingParamsError",
    "LLMEngine",
    "ModelConfig",
    "ModelLoadError",
    "SamplingParams",
    "SequenceOutput",
    "StepStats",
    "TokenLogprob",
]
