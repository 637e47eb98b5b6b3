"""The model versions a model-server replica holds: the one it serves and the ones retiring.

A hot swap loads the new version beside the old one; new micro-batches go to the new one, and
the old one shuts down once its last stream has ended, so nothing in flight fails.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from serve_app.config import ModelSource
from serve_app.engine import AsyncLLMEngine, EngineConfig, EngineOptions, LLMEngine, load_decoder
from serve_app.engine.decoder import count_parameters
from serve_app.engine.stats import StepStats
from serve_app.messages import ModelDescription


@dataclass(eq=False)
class LoadedModel:
    """An engine serving one model version, and how many streams still use it."""

    source: ModelSource
    engine: AsyncLLMEngine
    parameters: int
    loaded_at: float
    streams: int = 0
    retired: bool = False
    sequences: int = 0  # requests submitted to its engine

    def retire(self) -> None:
        """Stop serving it: shut it down now, or after its last stream if it has any."""
        if self.streams:
            self.retired = True
        else:
            self.engine.shutdown()

    def release(self) -> None:
        """One stream ended; a retired engine shuts down after its last one."""
        self.streams -= 1
        if self.retired and self.streams == 0:
            self.engine.shutdown()

    def describe(self) -> ModelDescription:
        """What this version is, for ``/v1/models`` and ``/v1/model_info``."""
        config = self.engine.model_config
        return ModelDescription(
            version=self.source.model_version,
            type=config.model_type,
            backend=self.engine.backend,
            parameters=self.parameters,
            context_length=config.context_length,
            loaded_at=self.loaded_at,
        )


def load_model(
    source: ModelSource, options: EngineOptions, on_step: Callable[[StepStats], None]
) -> LoadedModel:
    """Load ``source`` with ``options`` (device already resolved) and start its engine."""
    config = EngineConfig(model_path=source.model_path, **dict(options))
    engine = AsyncLLMEngine(LLMEngine(config, load_decoder(config)), on_step=on_step)
    parameters = count_parameters(config.model_path / config.onnx_file)
    return LoadedModel(source, engine, parameters, loaded_at=time.time())
