"""The native API's wire types: the seed's ``InferenceRequest``, ``InferenceResponse`` and
``ModelInfo``, on ``/v1/infer``, ``/v1/batch_infer``, ``/v1/stream_infer``, ``/v1/model_info`` and
``/health``, answered on the same path as OpenAI completions.

The seed's fields keep the seed's names and JSON types exactly (a Go client decodes them into the
seed's structs); anything more is an additional field, never a seed field with another type.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, RootModel, field_validator, model_validator

from serve_app.api.errors import ErrorInfo, InvalidParam
from serve_app.api.openai import (
    MAX_STOP_STRINGS,
    CompletionRequest,
    StrictRequest,
    json_schema_output,
)
from serve_app.api.openai_responses import Usage

MAX_BATCH_ITEMS = 256


def _is_none(value: object) -> bool:
    return value is None


class InferRequest(StrictRequest):
    """The seed's ``InferenceRequest``: ``POST /v1/infer`` and ``/v1/stream_infer``, and one item
    of ``/v1/batch_infer``."""

    prompt: str = Field(min_length=1, description="Text to continue.")
    max_tokens: int = Field(default=64, ge=1, description="Most tokens to generate.")
    temperature: float = Field(default=0.0, ge=0, le=2, description="0 means greedy decoding.")
    top_p: float = Field(default=1.0, gt=0, le=1, description="Nucleus sampling mass.")
    stream: bool = Field(default=False, description="Only /v1/stream_infer streams.")
    stop_words: list[str] = Field(default_factory=list, max_length=MAX_STOP_STRINGS)
    seed: int | None = Field(default=None, ge=0, lt=2**63, description="Reproducible sampling.")
    user_id: str | None = Field(default=None, description="Caller's user id, for logs.")
    session_id: str | None = Field(default=None, description="Caller's session id, for logs.")
    # Additional fields, beyond the seed's.
    model: str | None = Field(
        default=None, description="Served model (name or alias); the first one when unset."
    )
    json_schema: dict[str, Any] | None = Field(
        default=None,
        description="The text is JSON matching this JSON Schema (OpenAI's json_schema format).",
    )

    @field_validator("json_schema")
    @classmethod
    def _compiles(cls, schema: dict[str, Any] | None) -> dict[str, Any] | None:
        if schema is not None:
            json_schema_output("json_schema", schema)
        return schema

    @field_validator("stop_words")
    @classmethod
    def _non_empty_stops(cls, stops: list[str]) -> list[str]:
        if any(not s for s in stops):
            raise ValueError("stop words must not be empty")
        return stops

    def to_completion_request(self, model: str) -> CompletionRequest:
        """The same request in OpenAI terms, so both APIs share one path."""
        return CompletionRequest(
            model=model,
            prompt=self.prompt,
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            stop=self.stop_words or None,
            seed=self.seed,
            user=self.user_id,
            guided_json=self.json_schema,
        )


class InferResponse(BaseModel):
    """The seed's ``InferenceResponse``: the answer of ``/v1/infer``, one item of
    ``/v1/batch_infer`` and one event of ``/v1/stream_infer`` (whose ``text`` and ``tokens`` are
    the event's delta and whose ``usage`` is the request's so far)."""

    text: str = Field(default="", description="Generated text.")
    tokens: int = Field(default=0, description="Number of generated tokens.")
    latency: float = Field(default=0.0, description="Seconds from arrival to the last token.")
    error: str | None = Field(
        default=None, exclude_if=_is_none, description="Why the item failed; absent on success."
    )
    usage: Usage = Field(
        default_factory=lambda: Usage(prompt_tokens=0, completion_tokens=0, total_tokens=0)
    )
    finish_reason: str = Field(
        default="", description="stop or length; empty until the request has finished."
    )
    # Additional fields, beyond the seed's.
    token_ids: list[int] = Field(default_factory=list, description="Generated token ids.")
    status: int | None = Field(
        default=None,
        exclude_if=_is_none,
        description="With error: the HTTP status the call would have had on its own.",
    )
    error_detail: ErrorInfo | None = Field(
        default=None,
        exclude_if=_is_none,
        description="With error: the error object of the API's error shape (type, param, code).",
    )

    @classmethod
    def failed(cls, status: int, info: ErrorInfo, latency_s: float = 0.0) -> InferResponse:
        """The answer of an item (or a stream) that failed with ``status``."""
        return cls(latency=latency_s, error=info.message, status=status, error_detail=info)


class BatchInferRequest(RootModel[list[Any]]):
    """``POST /v1/batch_infer``: a JSON array of ``InferRequest`` (the seed's form), or
    ``{"requests": [...]}`` (this service's earlier form). Items are validated one by one, so
    one bad item fails alone."""

    root: list[Any] = Field(description=f"1 to {MAX_BATCH_ITEMS} InferRequest objects.")

    @model_validator(mode="before")
    @classmethod
    def _unwrap(cls, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = sorted(set(data) - {"requests"})
            if unknown:
                raise InvalidParam(unknown[0], "unsupported parameter")
            data = data.get("requests")
        if not isinstance(data, list):
            raise InvalidParam("requests", "must be a JSON array of requests")
        if not 1 <= len(data) <= MAX_BATCH_ITEMS:
            raise InvalidParam("requests", f"must hold 1 to {MAX_BATCH_ITEMS} requests")
        return data


class ModelInfo(BaseModel):
    """The seed's ``ModelInfo``: ``GET /v1/model_info``."""

    name: str = Field(description="The served model's name.")
    version: str
    type: str = Field(description="Architecture from config.json, e.g. llama.")
    parameters: int = Field(description="Parameter count from the model's weights.")
    max_tokens: int = Field(description="The context length: prompt and completion together.")
    created_at: datetime = Field(description="When the served version finished loading (UTC).")
    # Additional fields, beyond the seed's.
    backend: str = Field(description="Runtime and execution providers.")
    context_length: int = Field(description="Same as max_tokens.")


class Health(BaseModel):
    """``GET /health``: the seed's ``{"status", "time"}``, plus the model replica's queue
    numbers when one answered."""

    model_config = ConfigDict(extra="allow")

    status: str = Field(description="ok, or unavailable (with status 503).")
    time: datetime = Field(description="The server's time (UTC).")
    circuit_breakers: dict[str, str] = Field(
        default_factory=dict,
        description="Each model's circuit breaker: closed, open or half_open; while one is "
        "open the status is unavailable.",
    )
