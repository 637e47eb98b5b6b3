"""The ``LLMModel`` deployment: one continuous-batching engine per replica, swappable in place,
and the model's variants, multiplexed.

Which model a replica serves (path and version) is its ``user_config``: changing it calls
``reconfigure``, which loads the new engine beside the old one, sends new micro-batches to the
new one, and shuts the old one down once its last stream has ended. Nothing in flight fails.

A model with variants (``VariantsConfig``) also serves each variant a micro-batch names
(Serve's multiplexed model id): loaded on first use into an LRU of
``max_loaded_per_replica`` engines that ``@serve.multiplexed`` keeps and reports, so that Serve
routes a variant's micro-batches to the replicas that hold it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator
from typing import Any

import ray
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_app import tracing
from serve_app.clients.best_effort import BestEffortHandle
from serve_app.config import DRAIN_POLL_S, ModelSource, TracingConfig, VariantsConfig
from serve_app.deployments.replica_router import ReplicaAffinityRouter
from serve_app.engine import EngineOptions, GenerationRequest, SequenceOutput
from serve_app.messages import ModelDescription, ModelStep, RejectedRequest, RequestError
from serve_app.metrics import EngineMetrics
from serve_app.model_variants import (
    LoadedVariant,
    VariantDirectory,
    VariantNotFound,
    VariantNotLoadable,
)
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
        variants: VariantsConfig | None = None,
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
        self._variant_config = variants
        self._variants: dict[str, LoadedModel] = {}  # loaded now, by name
        if variants is not None:
            # Decorated here, as its LRU size is configuration; Serve detects it on the
            # instance. Serve keeps its LRU on the function, so a function, not a bound method.
            async def load(variant: str) -> LoadedVariant:
                return await self._load_variant(variant)

            self._variant = serve.multiplexed(
                max_num_models_per_replica=variants.max_loaded_per_replica
            )(load)

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
        if previous is not None:
            self._retire(previous)

    async def generate_batch(
        self,
        requests: list[GenerationRequest],
        trace_contexts: dict[str, dict[str, str]] | None = None,
    ) -> AsyncIterator[ModelStep]:
        """Stream a micro-batch. Requests the engine refuses are reported in the first message
        and the rest still run; cancelling the call aborts every sequence still running.
        ``trace_contexts``: the W3C trace context of each traced request, by request id.
        A micro-batch for a variant (its multiplexed model id) runs on that variant."""
        variant = serve.get_multiplexed_model_id()
        try:
            model = await self._variant_model(variant) if variant else self._serving()
        except (VariantNotFound, VariantNotLoadable) as exc:
            refusal = _variant_refusal(variant, exc)
            yield ModelStep(
                outputs=[],
                replica_id=self.replica_id,
                rejected={request.request_id: refusal for request in requests},
            )
            return
        model.streams += 1  # at once after the load: an unload waits for this stream
        model.sequences += len(requests)
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
        for model in [self._serving(), *self._variants.values(), *self._retiring]:
            for request_id in request_ids:
                model.engine.abort(request_id)

    def describe(self) -> ModelDescription:
        """What this replica serves, for ``/v1/models`` and ``/v1/model_info``: its model,
        with the variants it can serve."""
        description = self._serving().describe()
        if self._variant_config is None:
            return description
        listed = VariantDirectory(self._variant_config, self._serving().source.model_path)
        return dataclasses.replace(description, variants=listed.listed())

    async def describe_variant(self, variant: str) -> ModelDescription | RequestError:
        """What ``variant`` is (loading it here if needed), or why it cannot be served."""
        try:
            return (await self._variant_model(variant)).describe()
        except (VariantNotFound, VariantNotLoadable) as exc:
            refusal = _variant_refusal(variant, exc)
            return RequestError(refusal.status, refusal.message, param="model", code=refusal.code)

    def variant_usage(self, replica_id: str) -> dict[str, int]:
        """The variants this replica holds now, with the requests each has run here; call it
        with a replica's id (``ReplicaAffinityRouter`` delivers it there)."""
        del replica_id  # consumed by ReplicaAffinityRouter
        return {name: model.sequences for name, model in self._variants.items()}

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
        for engine in [model.engine, *(m.engine for m in self._variants.values())]:
            engine.check_health()
        await self._announce(model.source.model_version)

    async def _announce(self, version: str) -> None:
        if self._cache is None:
            return
        try:
            await self._cache.call("set_live_version", version)
        except Exception as exc:
            self._cache.record_error("announcing the live version to the response cache", exc)

    def __del__(self) -> None:
        held = [*getattr(self, "_variants", {}).values(), *getattr(self, "_retiring", [])]
        for model in [self._current, *held]:
            if model is not None:
                model.engine.shutdown()
        tracing.shutdown(getattr(self, "_tracer_provider", None))  # exports what it buffers

    def _serving(self) -> LoadedModel:
        if self._current is None:
            raise RuntimeError("LLMModel has no model: its user_config must name one")
        return self._current

    def _retire(self, model: LoadedModel) -> None:
        """Stop serving ``model``; streams still running on it finish first."""
        model.retire()
        if model.retired:
            self._retiring.append(model)

    async def _variant_model(self, variant: str) -> LoadedModel:
        """``variant``'s engine, loaded here first if this replica does not hold it."""
        if self._variant_config is None:
            raise VariantNotFound(variant)
        if variant not in self._variants:  # found before Serve hears of it
            VariantDirectory(self._variant_config, self._serving().source.model_path).source(
                variant
            )
        loaded: LoadedVariant = await self._variant(variant)
        return loaded.model

    async def _load_variant(self, variant: str) -> LoadedVariant:
        """Serve's multiplexed loader: called for a variant this replica does not hold, after
        Serve unloaded the least recently used one if the replica held its limit."""
        assert self._variant_config is not None
        directory = VariantDirectory(self._variant_config, self._serving().source.model_path)
        source = directory.source(variant)
        model = await asyncio.to_thread(
            load_model, source, self.engine_options, self.metrics.record
        )
        self._variants[variant] = model
        logger.info("replica %s loaded variant %s", self.replica_id, source.model_version)

        def unload(unloaded: LoadedModel) -> None:
            if self._variants.get(variant) is unloaded:
                del self._variants[variant]
            self._retire(unloaded)

        return LoadedVariant(model, asyncio.get_running_loop(), unload)


def _variant_refusal(variant: str, exc: Exception) -> RejectedRequest:
    """How a micro-batch for a variant that cannot be served is refused."""
    if isinstance(exc, VariantNotFound):
        message = f"the model has no variant '{variant}'"
        return RejectedRequest(message, "model", status=404, code="model_not_found")
    return RejectedRequest(str(exc), "model", status=503, code="variant_unavailable")


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
