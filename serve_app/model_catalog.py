"""The served models as the ingress routes to them: each model's deployments and its
``CompletionService``, found by the request's ``model`` (a name or an alias)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from ray.serve.handle import DeploymentHandle

from serve_app.api.errors import model_unavailable
from serve_app.api.openai_responses import ModelCard
from serve_app.clients.response_cache import ResponseCacheClient
from serve_app.config import CircuitBreakerConfig
from serve_app.messages import ModelDescription
from serve_app.metrics import request_metrics
from serve_app.orchestration import CompletionService, model_not_found

logger = logging.getLogger("ray.serve")

DESCRIBE_TIMEOUT_S = 5.0  # a replica answers in milliseconds; a model not running never does


@dataclass(frozen=True)
class ServedModel:
    """One model's deployments, as ``app.compose`` binds them for the ingress: its own, or in
    the ``model_apps`` form handles to those of the model's own application."""

    name: str
    batcher: DeploymentHandle
    model: DeploymentHandle
    cache: DeploymentHandle | None = None
    aliases: tuple[str, ...] = ()
    owned_by: str = "serve_app"
    admission_limit: int | None = None  # generation streams in flight per ingress replica
    tool_call_parser: str | None = None  # unset: the application's


class ModelCatalog:
    """Every served model by name and alias; the first is the default of the native API."""

    def __init__(
        self,
        models: Sequence[ServedModel],
        default_max_tokens: int,
        circuit_breaker: CircuitBreakerConfig | None = None,
        coalesce: bool = True,
    ) -> None:
        if not models:
            raise ValueError("an application serves at least one model")
        self.models = list(models)
        self._by_name = {name: m for m in models for name in (m.name, *m.aliases)}
        self._services = {
            m.name: CompletionService(
                m.batcher,
                ResponseCacheClient(m.cache),
                m.name,
                default_max_tokens,
                request_metrics(m.name),
                m.aliases,
                circuit_breaker=circuit_breaker,
                coalesce=coalesce,
                admission_limit=m.admission_limit,
            )
            for m in models
        }

    @property
    def default(self) -> ServedModel:
        """The model of requests that name none (the native API's)."""
        return self.models[0]

    def get(self, name: str | None) -> ServedModel:
        """The model ``name`` (or an alias) denotes, the default for None; else a 404."""
        if name is None:
            return self.default
        model = self._by_name.get(name)
        if model is None:
            raise model_not_found(name, list(self._by_name))
        return model

    def service(self, name: str) -> CompletionService:
        """The ``CompletionService`` of the model ``name`` denotes (404 if none)."""
        return self._services[self.get(name).name]

    def circuit_states(self) -> dict[str, str]:
        """Each model's circuit breaker state (closed, open, half_open), by model name."""
        return {name: service.circuit_state.label for name, service in self._services.items()}

    async def describe(self, name: str | None) -> ModelDescription:
        """What a replica of the model ``name`` denotes serves; 503 ``model_unavailable`` when
        none answers within ``DESCRIBE_TIMEOUT_S`` (a handle to an application not running
        waits for it without end)."""
        call = self.get(name).model.describe.remote()
        try:
            description: ModelDescription = await asyncio.wait_for(call, DESCRIBE_TIMEOUT_S)
        except TimeoutError:
            raise model_unavailable() from None
        return description

    async def cards(self) -> list[ModelCard]:
        """``/v1/models``: a card per model that answers, then one per alias naming it as root
        and parent. A model that does not answer is left out, not the whole list."""
        described = await asyncio.gather(
            *(self.describe(m.name) for m in self.models), return_exceptions=True
        )
        cards = []
        for model, description in zip(self.models, described, strict=True):
            if isinstance(description, BaseException):
                if not isinstance(description, Exception):
                    raise description  # cancellation
                logger.warning("/v1/models leaves out %s: %s", model.name, description)
                continue
            card = ModelCard(
                id=model.name,
                created=int(description.loaded_at),
                owned_by=model.owned_by,
                root=model.name,
                max_model_len=description.context_length,
            )
            cards.append(card)
            cards.extend(
                card.model_copy(update={"id": alias, "parent": model.name})
                for alias in model.aliases
            )
        return cards
