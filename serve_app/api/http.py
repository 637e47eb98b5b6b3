"""The HTTP surface around the routes: the FastAPI app, API-key authentication, the request
limits (body size, content type), the exception handlers that give every error the documented
shape, the API's own documentation (``/docs``, ``/openapi.json``), and response helpers.

(No ``from __future__ import annotations`` here: FastAPI reads the signatures at runtime.)
"""

import asyncio
import copy
import email.message
import json
import math
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel
from ray.serve import context as serve_context
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve_app.api.auth import ApiKey, ApiKeyRegistry
from serve_app.api.errors import ApiError, ErrorResponse, to_api_error
from serve_app.metrics import request_errors

CACHE_HEADER = "X-Cache"
OPEN_PATHS = ("/health",)  # answered without an API key, for load balancers and probes
DEFAULT_MAX_REQUEST_BODY_BYTES = 4 * 1024 * 1024  # IngressSettings sets the live value
DEFAULT_BODY_READ_TIMEOUT_S = 30.0  # likewise
JSON = b"application/json"
EVENT_STREAM_HEADERS = {"Cache-Control": "no-cache"}  # no proxy may cache or hold back a stream


def request_id() -> str:
    """Serve's id of the current request: the client's ``X-Request-Id`` if it sent one.

    The proxy echoes it in the response header and Serve's logs carry it, so error bodies
    name the same id. Serve has no public accessor for it yet.
    """
    return str(serve_context._get_serve_request_context().request_id or uuid.uuid4().hex)


async def _authenticate(request: Request) -> None:
    """With API keys configured, every route but ``/health`` needs ``Bearer <key>``."""
    registry: ApiKeyRegistry | None = getattr(request.app.state, "api_keys", None)
    if registry is None or not registry.enabled or request.url.path in OPEN_PATHS:
        return
    key = registry.authenticate(request.headers.get("authorization"))
    if key is None:
        raise ApiError(
            401,
            "a valid API key is required: send 'Authorization: Bearer <key>'",
            code="invalid_api_key",
        )
    request.state.api_key = key


def is_json(content_type: str) -> bool:
    """Whether a ``Content-Type`` names JSON (``application/json`` or ``application/*+json``),
    the same test FastAPI applies before it parses a body as JSON."""
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json")
    )


async def _require_json(request: Request) -> None:
    """415 for a body declared as something other than JSON on a route that takes JSON.

    Without this, ``curl -d`` (form-encoded) gets a puzzling "Input should be a valid
    dictionary". (``RequestBodyPolicy`` gives a body without a ``Content-Type`` JSON's.)
    """
    route = request.scope.get("route")
    content_type = request.headers.get("content-type")
    if getattr(route, "body_field", None) is None or content_type is None:
        return
    if not is_json(content_type):
        raise ApiError(
            415,
            f"the request body must be JSON (Content-Type: application/json), not '{content_type}'",
            code="unsupported_media_type",
        )


def api_key(request: Request) -> ApiKey | None:
    """The key the request was authenticated with; None when keys are off."""
    return getattr(request.state, "api_key", None)


# FastAPI's own /docs and /openapi.json would be served without the key check (they are not
# API routes, so the app's dependencies skip them): the routes below replace them.
app = FastAPI(
    title="serve_app",
    summary="OpenAI-compatible and native LLM inference on Ray Serve.",
    docs_url=None,
    redoc_url=None,
    openapi_url=None,
    dependencies=[Depends(_authenticate), Depends(_require_json)],
    responses={"4XX": {"model": ErrorResponse}, "5XX": {"model": ErrorResponse}},
)


MAX_JSON_DEPTH = 32  # deeper bodies are a 400: no request type nests more than a few levels


class _InvalidJson(ValueError):
    """Raised from inside the JSON parser's hooks; becomes a 400."""


def parse_json(body: bytes) -> Any:
    """A request body as JSON, strictly (RFC 8259): UTF-8, no ``NaN``/``Infinity``, no number
    out of a float's range, no key twice in an object, at most ``MAX_JSON_DEPTH`` levels.

    Python's own parser accepts all of these; left to it, a duplicated key silently keeps its
    last value and deep nesting fails later, in a recursive check, as a 500. Raises ``ApiError``
    (400, ``invalid_json``) naming the problem.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _json_error(f"it is not valid UTF-8 (byte {exc.start})") from None
    try:
        value = json.loads(
            text,
            object_pairs_hook=_object_without_duplicates,
            parse_constant=_reject_constant,
            parse_float=_finite_float,
        )
    except json.JSONDecodeError as exc:
        raise _json_error(f"{exc.msg} (line {exc.lineno}, column {exc.colno})") from None
    except RecursionError:
        raise _json_error(f"it nests deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as exc:  # ours, or an integer literal of more than 4300 digits
        raise _json_error(str(exc)) from None
    if _depth(value) > MAX_JSON_DEPTH:
        raise _json_error(f"it nests deeper than {MAX_JSON_DEPTH} levels")
    return value


def _json_error(problem: str) -> ApiError:
    return ApiError(400, f"the request body is not valid JSON: {problem}", code="invalid_json")


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    value = dict(pairs)
    if len(value) < len(pairs):
        keys = [key for key, _ in pairs]
        duplicate = next(key for i, key in enumerate(keys) if key in keys[:i])
        raise _InvalidJson(f"the key {duplicate!r} appears twice in one object")
    return value


def _reject_constant(name: str) -> float:
    raise _InvalidJson(f"{name} is not a JSON number")


def _finite_float(literal: str) -> float:
    number = float(literal)
    if not math.isfinite(number):
        raise _InvalidJson(f"the number {literal[:32]} is out of range")
    return number


def _depth(value: Any) -> int:
    """How many arrays and objects deep ``value`` nests (iteratively: it may be deep)."""
    deepest, pending = 0, [(value, 1)] if isinstance(value, dict | list) else []
    while pending:
        item, depth = pending.pop()
        deepest = max(deepest, depth)
        children = item.values() if isinstance(item, dict) else item
        pending.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return deepest


class _StrictJsonRequest(Request):
    """A request whose JSON body is ``parse_json``'s, parsed once."""

    _parsed: Any

    async def json(self) -> Any:
        if not hasattr(self, "_parsed"):
            self._parsed = parse_json(await self.body())
        return self._parsed


class StrictJsonRoute(APIRoute):
    """A route that parses a JSON body with ``parse_json`` before FastAPI reads it, so that a
    bad body is a 400 naming its problem (FastAPI would answer "There was an error parsing the
    body" for most, and accept the rest)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        takes_body = self.body_field is not None

        async def parse_then_handle(request: Request) -> Response:
            request = _StrictJsonRequest(request.scope, request.receive)
            content_type = request.headers.get("content-type", "application/json")
            if takes_body and is_json(content_type) and await request.body():
                await request.json()  # raises here, outside FastAPI's catch-all
            return await handler(request)

        return parse_then_handle


app.router.route_class = StrictJsonRoute


class RequestBodyPolicy:
    """413 for a request body over ``app.state.max_request_body_bytes``, before any route reads
    it whole: at once when ``Content-Length`` says so, else as soon as the bytes received pass
    the limit (a chunked body). 408 for a body not complete ``app.state.body_read_timeout_s``
    after the request began (neither uvicorn nor Serve's proxy bounds a body's arrival, so a
    client trickling bytes would hold the request forever). A body sent without a
    ``Content-Type`` is read as JSON (recent FastAPI would treat it as bytes and fail
    validation with a puzzling message)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope["app"].state
        limit = int(getattr(state, "max_request_body_bytes", DEFAULT_MAX_REQUEST_BODY_BYTES))
        timeout_s = float(getattr(state, "body_read_timeout_s", DEFAULT_BODY_READ_TIMEOUT_S))
        deadline = asyncio.get_running_loop().time() + timeout_s
        declared = _content_length(scope)
        if not any(name == b"content-type" for name, _ in scope["headers"]):
            scope = {**scope, "headers": [*scope["headers"], (b"content-type", JSON)]}
        if declared is not None and declared > limit:
            response = error_response(_body_too_large(limit), request_id())
            await response(scope, receive, send)
            return
        received = 0
        body_complete = False

        async def limited_receive() -> Message:
            nonlocal received, body_complete
            if body_complete:  # later reads wait for a disconnect, for as long as a stream lasts
                return await receive()
            remaining = deadline - asyncio.get_running_loop().time()
            try:
                message = await asyncio.wait_for(receive(), max(remaining, 0.0))
            except TimeoutError:
                # FastAPI re-raises its HTTPException from body parsing (anything else is a 400).
                raise HTTPException(408, _body_too_slow(timeout_s).message) from None
            body_complete = message["type"] != "http.request" or not message.get("more_body")
            received += len(message.get("body", b""))
            if received > limit:
                raise HTTPException(413, _body_too_large(limit).message)
            return message

        await self.app(scope, limited_receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _body_too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is larger than {limit} bytes", code="request_too_large")


app.add_middleware(RequestBodyPolicy)


def _body_too_slow(timeout_s: float) -> ApiError:
    return ApiError(
        408, f"the request body did not arrive within {timeout_s:g} s", code="request_timeout"
    )


_FRAMEWORK_CODES = {408: "request_timeout", 413: "request_too_large"}


def error_response(exc: BaseException, request_id: str) -> JSONResponse:
    """The JSON error response for any exception."""
    error = to_api_error(exc, request_id)
    request_errors().inc(tags={"error_type": error.type})
    headers = {"Retry-After": error.retry_after} if error.retry_after else {}
    if error.status == 401:
        headers["WWW-Authenticate"] = "Bearer"  # RFC 9110: a 401 names the scheme to use
    return JSONResponse(error.body().model_dump(), status_code=error.status, headers=headers)


@app.exception_handler(RequestValidationError)
async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(exc, request_id())


@app.exception_handler(StarletteHTTPException)
async def _on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    # The framework's own answers (unknown route, wrong method) in the documented shape.
    code = _FRAMEWORK_CODES.get(exc.status_code)
    return error_response(ApiError(exc.status_code, str(exc.detail), code=code), request_id())


@app.exception_handler(ApiError)
async def _on_api_error(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc, request_id())


@app.exception_handler(Exception)
async def _on_unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    return error_response(exc, request_id())


# The API's documentation: plain routes, so that the API-key check covers them too.


@app.get("/openapi.json", include_in_schema=False)
async def _openapi(request: Request) -> JSONResponse:
    return JSONResponse(openapi_document(request.app))


@app.get("/docs", include_in_schema=False)
async def _docs(request: Request) -> HTMLResponse:
    # The document is inlined: a browser fetching /openapi.json would not send the API key.
    return get_swagger_ui_html(
        openapi_url="/openapi.json",
        title=f"{request.app.title} - API",
        swagger_ui_parameters={"spec": openapi_document(request.app)},
    )


def openapi_document(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI document of ``app``: every API route with its request and response models,
    the streamed chunk types, and the bearer-key scheme (built once, then cached)."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    # A copy: the document shares dicts with the routes' ``responses``, edited below.
    document = copy.deepcopy(
        get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
    )
    components = document.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    for path_item in document.get("paths", {}).values():
        for operation in path_item.values():
            for status in ("4XX", "5XX"):  # errors are JSON whatever the route answers
                if status in operation.get("responses", {}):
                    operation["responses"][status]["content"] = error
            for response in operation.get("responses", {}).values():
                content = response.get("content", {})
                if "text/event-stream" not in content:
                    continue
                if content.get("application/json") == {"schema": {}}:
                    del content["application/json"]  # a route that only streams
                for name, schema in content["text/event-stream"]["schema"].pop("$defs", {}).items():
                    schemas.setdefault(name, schema)
    components["securitySchemes"] = {"apiKey": {"type": "http", "scheme": "bearer"}}
    document["security"] = [{"apiKey": []}]
    for path in OPEN_PATHS:
        for operation in document.get("paths", {}).get(path, {}).values():
            operation["security"] = []
    app.openapi_schema = document
    return document


def event_stream_responses(
    chunk: type[BaseModel], json_model: type[BaseModel] | None = None
) -> dict[int | str, dict[str, Any]]:
    """The ``responses`` of a route that answers server-sent events of ``chunk`` (and, when it
    also answers JSON, ``json_model``), for the OpenAPI document."""
    schema = chunk.model_json_schema(ref_template="#/components/schemas/{model}")
    description = (
        f"`data: <{chunk.__name__} JSON>` events, then `data: [DONE]`; "
        "`: keep-alive` comments before the first event while the request waits"
    )
    if json_model is not None:
        description = f'JSON; or, with `"stream": true`, {description}'
    ok: dict[str, Any] = {
        "description": description,
        "content": {"text/event-stream": {"schema": schema}},
    }
    if json_model is not None:
        ok["model"] = json_model
    return {200: ok}


def cached_json(payload: BaseModel, cache_hit: bool) -> JSONResponse:
    """A JSON response that says whether the response cache answered it."""
    headers = {CACHE_HEADER: "hit" if cache_hit else "miss"}
    return JSONResponse(payload.model_dump(mode="json"), headers=headers)


def event_stream(events: AsyncIterator[str], cache_hit: bool) -> StreamingResponse:
    """A ``text/event-stream`` response of already framed events."""
    headers = {CACHE_HEADER: "hit" if cache_hit else "miss", **EVENT_STREAM_HEADERS}
    return StreamingResponse(events, media_type="text/event-stream", headers=headers)
