"""The one place that maps failures to HTTP statuses and OpenAI's error shape.

``{"error": {"message", "type", "param", "code"}}``; validation errors are 400 (not FastAPI's
422); a 500 never shows internals but carries the request id so logs can be found.
"""

from __future__ import annotations

import logging
import math

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from serve_app.engine import EngineDeadError, EngineOverloadedError, InvalidRequestError
from serve_app.messages import RequestError

logger = logging.getLogger("ray.serve")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          429: "rate_limit_error", 503: "service_unavailable"}  # fmt: skip


class ErrorInfo(BaseModel):
    """The ``error`` object of OpenAI's error shape."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """``{"error": {...}}``, the body of every error response."""

    error: ErrorInfo


class InvalidParam(ValueError):
    """Raised by a request model's cross-field checks, naming the parameter at fault (pydantic
    gives such checks no location of their own)."""

    def __init__(self, param: str, problem: str) -> None:
        super().__init__(f"{param}: {problem}")
        self.param = param


class ApiError(Exception):
    """A failure the client should see as ``status`` with OpenAI's error body.

    It is also what Python handle callers get raised, so it holds plain data only.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        retry_after: str | None = None,
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after or ("1" if status in (429, 503) else None)
        self.status = status
        self.message = message
        self.type = type or _TYPES.get(
            status, "invalid_request_error" if status < 500 else "server_error"
        )
        self.param = param
        self.code = code

    def __reduce__(self) -> tuple[object, ...]:
        # Exceptions pickle through ``args``; keep every field when crossing a Ray hop.
        fields = (self.status, self.message, self.type, self.param, self.code, self.retry_after)
        return (_rebuild, fields)

    @classmethod
    def from_request_error(cls, error: RequestError) -> ApiError:
        """The error a batcher stream reported for one request."""
        return cls(error.status, error.message, type=error.type, param=error.param, code=error.code)

    def body(self) -> ErrorResponse:
        """The response body."""
        info = ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code)
        return ErrorResponse(error=info)


def _rebuild(
    status: int,
    message: str,
    type_: str,
    param: str | None,
    code: str | None,
    retry_after: str | None,
) -> ApiError:
    return ApiError(status, message, type=type_, param=param, code=code, retry_after=retry_after)


def at_capacity(retry_after_s: int | None) -> ApiError:
    """The 503 of a model whose queues are full, whichever bound refused it."""
    return ApiError(
        503,
        "the service is at capacity; retry shortly",
        code="overloaded",
        retry_after=None if retry_after_s is None else str(retry_after_s),
    )


def model_unavailable() -> ApiError:
    """The 503 of a model whose deployments do not answer (not deployed, or going away)."""
    return ApiError(503, "the model is unavailable; retry shortly", code="model_unavailable")


def to_api_error(exc: BaseException, request_id: str) -> ApiError:
    """Map any exception raised while serving a request to what the client sees."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, RequestValidationError | ValidationError):
        return _validation_error(exc)
    if isinstance(exc, InvalidRequestError):
        return ApiError(400, str(exc), param=exc.param)
    if isinstance(exc, EngineOverloadedError):
        return ApiError(503, str(exc), code="overloaded")
    if isinstance(exc, EngineDeadError):
        return ApiError(503, "the model is unavailable; retry shortly", code="engine_dead")
    if isinstance(exc, DeploymentUnavailableError):  # e.g. its application was just deleted
        return model_unavailable()
    if isinstance(exc, BackPressureError):  # a Serve queue bound (max_queued_requests) is full
        retry_after = exc.retry_after_s
        return at_capacity(None if retry_after is None else max(1, math.ceil(retry_after)))
    logger.error("request %s failed", request_id, exc_info=exc)
    return ApiError(500, f"internal error (request id {request_id})", type="server_error")


def _is_type_tag(part: object) -> bool:
    """Pydantic puts the body and the tried union member (``str``, ``list[str]``) in ``loc``."""
    text = str(part)
    return text in ("body", "str", "int", "float", "bool", "dict", "list", "none") or "[" in text


def _validation_error(exc: RequestValidationError | ValidationError) -> ApiError:
    errors = exc.errors()
    first = errors[0] if errors else {}
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, InvalidParam):
        return ApiError(400, str(cause), param=cause.param)
    location = [str(part) for part in first.get("loc", ()) if not _is_type_tag(part)]
    param = ".".join(location) or None
    message = str(first.get("msg", "invalid request"))
    if first.get("type") == "extra_forbidden":
        message = f"unsupported parameter '{param}'"
    elif first.get("type") == "json_invalid":
        return ApiError(400, "the request body is not valid JSON", code="invalid_json")
    elif param:
        message = f"{param}: {message}"
    return ApiError(400, message, param=param)
