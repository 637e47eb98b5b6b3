"""The ``LLMModel`` deployment: one continuous-batching engine per replica."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from serve_app.engine import (
    AsyncLLMEngine,
    EngineConfig,
    EngineOverloadedError,
    GenerationRequest,
    InvalidRequestError,
)
from serve_app.engine.onnx_model import count_parameters
from serve_app.generation import ModelDescription, ModelStep, RejectedRequest
from serve_app.metrics import EngineMetrics
from serve_app.routing import ReplicaAffinityRouter

logger = logging.getLogger("ray.serve")


@serve.deployment(
    # Each call is a whole micro-batch stream, so a few dozen calls keep the engine full.
    max_ongoing_requests=64,
    health_check_period_s=5,
    request_router_config={"request_router_class": ReplicaAffinityRouter},
)
class LLMModel:
    """Owns one ``AsyncLLMEngine``; streams one ``ModelStep`` per engine step per micro-batch."""

    def __init__(self, engine_config: EngineConfig | dict[str, Any]) -> None:
        self.config = EngineConfig.model_validate(engine_config)
        self.engine = AsyncLLMEngine(self.config, on_step=EngineMetrics().record)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.parameters = count_parameters(self.config.model_path / self.config.onnx_file)
        self.loaded_at = time.time()
        logger.info("model %s loaded on replica %s", self.config.model_path, self.replica_id)

    async def generate_batch(self, requests: list[GenerationRequest]) -> AsyncIterator[ModelStep]:
        """Stream a micro-batch. Requests the engine refuses are reported in the first message
        and the rest still run; cancelling the call aborts every sequence still running."""
        accepted: list[GenerationRequest] = []
        rejected: dict[str, RejectedRequest] = {}
        for request in requests:
            try:
                self.engine.check_request(request, ahead=len(accepted))
                accepted.append(request)
            except InvalidRequestError as exc:
                rejected[request.request_id] = RejectedRequest(str(exc), exc.param)
            except EngineOverloadedError as exc:
                rejected[request.request_id] = RejectedRequest(str(exc), None, status=503)
        yield ModelStep(outputs=[], replica_id=self.replica_id, rejected=rejected)
        if accepted:
            async for outputs in self.engine.generate_batch(accepted):
                yield ModelStep(outputs=outputs)

    async def abort(self, request_ids: list[str], replica_id: str) -> None:
        """Abort sequences; ``replica_id`` makes the router deliver this call to their replica."""
        del replica_id  # consumed by ReplicaAffinityRouter
        for request_id in request_ids:
            self.engine.abort(request_id)

    def describe(self) -> ModelDescription:
        """What this replica serves, for ``/v1/model_info``."""
        config = self.engine.engine.model_config
        providers = self.engine.engine.model.session.get_providers()
        return ModelDescription(
            type=config.model_type,
            backend=f"onnxruntime ({', '.join(providers)})",
            parameters=self.parameters,
            context_length=config.context_length,
            loaded_at=self.loaded_at,
        )

    def stats(self) -> dict[str, float]:
        """Queue and batch occupancy of this replica's engine."""
        return {
            "num_running": self.engine.num_running,
            "num_waiting": self.engine.num_waiting,
            "kv_cache_usage": self.engine.engine.kv_cache_usage,
        }

    def check_health(self) -> None:
        """Raise when the engine loop has died, so Serve replaces this replica."""
        self.engine.check_health()

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
