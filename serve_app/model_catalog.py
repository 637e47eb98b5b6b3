"""The served models as the ingress routes to them: each model's deployments and its
``CompletionService``, found by the request's ``model`` (a name or an alias)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from ray.serve.handle import DeploymentHandle

from serve_app.api.errors import ApiError, model_unavailable
from serve_app.api.openai_responses import ModelCard
from serve_app.clients.response_cache import ResponseCacheClient
from serve_app.config import VARIANT_SEPARATOR, CircuitBreakerConfig, split_variant
from serve_app.messages import ModelDescription, RequestError
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
        """The model ``name`` (or an alias, or ``<model>:<variant>``) denotes, the default for
        None; else a 404."""
        if name is None:
            return self.default
        model = self._by_name.get(name)
        split = split_variant(name) if model is None else None
        if split is not None:
            model = self._by_name.get(split[0])
        if model is None:
            raise model_not_found(name, list(self._by_name))
        return model

    def served_name(self, name: str | None) -> str:
        """The name answers carry for a request naming ``name``: the model's own name (for
        an alias too), ``<model>:<variant>`` for a variant; 404 as ``get``."""
        model, variant = self._resolve(name)
        return model.name if variant is None else f"{model.name}{VARIANT_SEPARATOR}{variant}"

    def _resolve(self, name: str | None) -> tuple[ServedModel, str | None]:
        """The model ``name`` denotes, and the variant of it that it names, if any."""
        model = self.get(name)
        variant = None if name is None else self._services[model.name].variant_of(name)
        return model, variant

    def service(self, name: str) -> CompletionService:
        """The ``CompletionService`` of the model ``name`` denotes (404 if none)."""
        return self._services[self.get(name).name]

    def circuit_states(self) -> dict[str, str]:
        """Each model's circuit breaker state (closed, open, half_open), by model name."""
        return {name: service.circuit_state.label for name, service in self._services.items()}

    async def describe(self, name: str | None) -> ModelDescription:
        """What a replica of the model ``name`` denotes serves (for a variant: the variant,
        loaded by a replica if none holds it); 503 ``model_unavailable`` when none answers
        within ``DESCRIBE_TIMEOUT_S`` (a handle to an application not running waits for it
        without end), the variant's 404 or 503 when it cannot be served."""
        model, variant = self._resolve(name)
        if variant is None:
            call = model.model.describe.remote()
        else:
            handle = model.model.options(multiplexed_model_id=variant)
            call = handle.describe_variant.remote(variant)
        try:
            description: ModelDescription | RequestError = await asyncio.wait_for(
                call, DESCRIBE_TIMEOUT_S
            )
        except TimeoutError:
            raise model_unavailable() from None
        if isinstance(description, RequestError):
            raise ApiError.from_request_error(description)
        return description

    async def cards(self) -> list[ModelCard]:
        """``/v1/models``: a card per model that answers, then one per alias naming it as root
        and parent, and one per variant naming it as parent. A model that does not answer is
        left out, not the whole list."""
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
            for variant, changed_at in description.variants.items():
                named = f"{model.name}{VARIANT_SEPARATOR}{variant}"
                update = {"id": named, "root": named, "parent": model.name}
                cards.append(card.model_copy(update={**update, "created": int(changed_at)}))
        return cards
