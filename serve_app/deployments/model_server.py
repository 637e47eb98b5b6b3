"""The ``LLMModel`` deployment: one continuous-batching engine per replica, swappable in place.

Which model a replica serves (path and version) is its ``user_config``: changing it calls
``reconfigure``, which loads the new engine beside the old one, sends new micro-batches to the
new one, and shuts the old one down once its last stream has ended. Nothing in flight fails.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import ray
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_app import tracing
from serve_app.clients.best_effort import BestEffortHandle
from serve_app.config import DRAIN_POLL_S, ModelSource, TracingConfig
from serve_app.deployments.replica_router import ReplicaAffinityRouter
from serve_app.engine import EngineOptions, GenerationRequest, SequenceOutput
from serve_app.messages import ModelDescription, ModelStep, RejectedRequest
from serve_app.metrics import EngineMetrics
from serve_app.model_versions import LoadedModel, load_model

logger = logging.getLogger("ray.serve")

CACHE_TIMEOUT_S = 1.0


@serve.deployment(
    # Each call is a whole micro-batch stream, so a few dozen calls keep the engine full.
    max_ongoing_requests=64,
    health_check_period_s=5,
    # On stop, Serve stops routing here and waits this long for streams in flight to finish.
    graceful_shutdown_timeout_s=120,
    graceful_shutdown_wait_loop_s=DRAIN_POLL_S,
    request_router_config={"request_router_class": ReplicaAffinityRouter},
)
class LLMModel:
    """Owns the engine; streams one ``ModelStep`` per engine step per micro-batch."""

    def __init__(
        self,
        engine_options: EngineOptions,
        cache: DeploymentHandle | None,
        trace: TracingConfig | None = None,
    ) -> None:
        self._tracer_provider = tracing.configure(trace or TracingConfig(), "LLMModel")
        if engine_options.device == "auto" and not ray.get_gpu_ids():
            # Ray hides no GPUs from a replica that asked for none.
            engine_options = engine_options.model_copy(update={"device": "cpu"})
        self.engine_options = engine_options
        # Tells the response cache which version is live, so it never answers for another.
        self._cache = (
            BestEffortHandle(cache, CACHE_TIMEOUT_S, "cached answers stay off until it answers")
            if cache
            else None
        )
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.metrics = EngineMetrics()
        self._current: LoadedModel | None = None
        self._retiring: list[LoadedModel] = []

    async def reconfigure(self, config: dict[str, Any]) -> None:
        """Serve the model ``config`` names; a no-op if it is the one already loaded."""
        source = ModelSource.model_validate(config)
        if self._current is not None and self._current.source == source:
            return
        loaded = await asyncio.to_thread(
            load_model, source, self.engine_options, self.metrics.record
        )
        await self._announce(source.model_version)
        previous, self._current = self._current, loaded
        logger.info("replica %s now serves %s", self.replica_id, source.model_version)
        if previous is None:
            return
        if previous.streams:
            previous.retired = True  # its last stream shuts it down
            self._retiring.append(previous)
        else:
            previous.engine.shutdown()

    async def generate_batch(
        self,
        requests: list[GenerationRequest],
        trace_contexts: dict[str, dict[str, str]] | None = None,
    ) -> AsyncIterator[ModelStep]:
        """Stream a micro-batch. Requests the engine refuses are reported in the first message
        and the rest still run; cancelling the call aborts every sequence still running.
        ``trace_contexts``: the W3C trace context of each traced request, by request id."""
        model = self._serving()
        model.streams += 1
        submitted = None
        version = model.source.model_version
        traces = {
            request_id: tracing.GenerationSpans(
                carrier, request_id, replica_id=self.replica_id, model_version=version
            )
            for request_id, carrier in (trace_contexts or {}).items()
        }
        try:
            submitted = model.engine.submit(requests)
            for request_id, error in submitted.rejected.items():
                if request_id in traces:
                    traces.pop(request_id).end(error=str(error))
            rejected = {
                request_id: RejectedRequest.from_engine_error(error)
                for request_id, error in submitted.rejected.items()
            }
            yield ModelStep(
                outputs=[],
                replica_id=self.replica_id,
                model_version=model.source.model_version,
                rejected=rejected,
            )
            async for outputs in submitted.outputs():
                if traces:
                    _trace_outputs(traces, outputs)
                yield ModelStep(outputs=outputs)
        finally:
            if submitted is not None:
                submitted.abort()  # cancelled before its outputs were read: abort what runs
            for unfinished in traces.values():
                unfinished.end(error="cancelled")
            model.release()
            self._retiring = [m for m in self._retiring if m.streams > 0]

    async def abort(self, request_ids: list[str], replica_id: str) -> None:
        """Abort sequences; ``replica_id`` makes the router deliver this call to their replica."""
        del replica_id  # consumed by ReplicaAffinityRouter
        for model in [self._serving(), *self._retiring]:
            for request_id in request_ids:
                model.engine.abort(request_id)

    def describe(self) -> ModelDescription:
        """What this replica serves, for ``/v1/models`` and ``/v1/model_info``."""
        return self._serving().describe()

    def stats(self) -> dict[str, float]:
        """Queue and batch occupancy; raises when the engine loop has died."""
        engine = self._serving().engine
        engine.check_health()
        return {
            "num_running": engine.num_running,
            "num_waiting": engine.num_waiting,
            "kv_cache_usage": engine.kv_cache_usage,
        }

    async def check_health(self) -> None:
        """Raise when the engine loop has died, so Serve replaces this replica."""
        model = self._serving()
        model.engine.check_health()
        await self._announce(model.source.model_version)

    async def _announce(self, version: str) -> None:
        if self._cache is None:
            return
        try:
            await self._cache.call("set_live_version", version)
        except Exception as exc:
            self._cache.record_error("announcing the live version to the response cache", exc)

    def __del__(self) -> None:
        for model in [self._current, *getattr(self, "_retiring", [])]:
            if model is not None:
                model.engine.shutdown()
        tracing.shutdown(getattr(self, "_tracer_provider", None))  # exports what it buffers

    def _serving(self) -> LoadedModel:
        if self._current is None:
            raise RuntimeError("LLMModel has no model: its user_config must name one")
        return self._current


def _trace_outputs(
    traces: dict[str, tracing.GenerationSpans], outputs: list[SequenceOutput]
) -> None:
    """Time each traced request's queue wait, prefill and decode from its outputs."""
    for output in outputs:
        spans = traces.get(output.request_id)
        if spans is None:
            continue
        spans.output(len(output.new_token_ids), output.prefill_started_at)
        if output.finish_reason is not None:
            del traces[output.request_id]
            spans.end(
                finish_reason=output.finish_reason.value,
                prompt_tokens=output.num_prompt_tokens,
                completion_tokens=output.num_output_tokens,
            )
