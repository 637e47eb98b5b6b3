"""Unit tests of the one exception-to-HTTP mapping, ``ApiError`` across process hops, and the
server-sent events framing that ends a failed stream with one error event."""

from __future__ import annotations

import asyncio
import json
import logging
import pickle
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from ray import cloudpickle
from ray.serve._private.common import DeploymentID
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from serve_app.api import sse
from serve_app.api.errors import ApiError, to_api_error
from serve_app.api.openai import ChatCompletionRequest, CompletionRequest
from serve_app.api.openai_responses import Usage
from serve_app.engine import EngineDeadError, EngineOverloadedError, InvalidRequestError
from serve_app.messages import RejectedRequest, RequestError

RID = "req-7f3a"


def validation_error(**fields: Any) -> ValidationError:
    with pytest.raises(ValidationError) as raised:
        CompletionRequest.model_validate({"model": "demo", "prompt": "hi", **fields})
    return raised.value


def http_validation_error(body: bytes) -> RequestValidationError:
    """The error FastAPI raises for ``body`` posted to a route taking a ``CompletionRequest``."""
    app = FastAPI()
    caught: list[RequestValidationError] = []

    @app.post("/v1/completions")
    async def create(request: CompletionRequest) -> None:
        raise AssertionError("the body should not have validated")

    @app.exception_handler(RequestValidationError)
    async def keep(request: Request, exc: RequestValidationError) -> JSONResponse:
        caught.append(exc)
        return JSONResponse({}, status_code=422)

    async def post() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            headers = {"content-type": "application/json"}
            await client.post("/v1/completions", content=body, headers=headers)

    asyncio.run(post())
    (error,) = caught
    return error


@pytest.fixture
def serve_log() -> Iterator[list[logging.LogRecord]]:
    """Records of the ``ray.serve`` logger (it does not propagate to pytest's capture)."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger, handler = logging.getLogger("ray.serve"), Keep(logging.DEBUG)
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


# to_api_error


def test_an_api_error_passes_through_unchanged() -> None:
    error = ApiError(404, "no such model", param="model", code="model_not_found")
    assert to_api_error(error, RID) is error


def test_a_field_out_of_bounds_is_a_400_naming_the_field() -> None:
    error = to_api_error(validation_error(temperature=3), RID)
    assert (error.status, error.type, error.param) == (400, "invalid_request_error", "temperature")
    assert error.message.startswith("temperature: ")
    assert "less than or equal to 2" in error.message
    assert error.retry_after is None


def test_an_unknown_field_is_named_as_unsupported() -> None:
    error = to_api_error(validation_error(logit_bias_v2={}), RID)
    assert (error.status, error.param) == (400, "logit_bias_v2")
    assert error.message == "unsupported parameter 'logit_bias_v2'"


def test_a_nested_field_is_named_by_its_path() -> None:
    with pytest.raises(ValidationError) as raised:
        ChatCompletionRequest.model_validate(
            {"model": "demo", "messages": [{"role": "robot", "content": "hi"}]}
        )
    error = to_api_error(raised.value, RID)
    assert (error.status, error.param) == (400, "messages.0.role")


def test_the_union_member_tried_is_not_part_of_the_name() -> None:
    error = to_api_error(validation_error(stop=7), RID)  # neither str nor list[str]
    assert error.param == "stop"


def test_a_cross_field_rule_names_its_param() -> None:
    error = to_api_error(validation_error(suffix="tail"), RID)
    assert (error.status, error.param) == (400, "suffix")
    assert error.message == "suffix: not supported"


def test_fastapis_validation_error_is_a_400_not_a_422() -> None:
    error = to_api_error(http_validation_error(b'{"model": "demo", "prompt": "x", "n": 0}'), RID)
    assert (error.status, error.param) == (400, "n")  # "body" is not part of the name
    assert error.message.startswith("n: ")


def test_a_missing_field_is_named() -> None:
    error = to_api_error(http_validation_error(b'{"prompt": "x"}'), RID)
    assert (error.status, error.param) == (400, "model")
    assert error.message == "model: Field required"


def test_a_body_that_is_not_json_says_so() -> None:
    error = to_api_error(http_validation_error(b'{"model": "demo", "prompt": '), RID)
    assert (error.status, error.code) == (400, "invalid_json")
    assert error.message == "the request body is not valid JSON"


def test_an_invalid_request_from_the_engine_is_a_400_with_its_param() -> None:
    error = to_api_error(InvalidRequestError("the prompt does not fit", "prompt"), RID)
    assert (error.status, error.message, error.param) == (400, "the prompt does not fit", "prompt")


def test_an_overloaded_engine_is_a_503_to_retry() -> None:
    error = to_api_error(EngineOverloadedError("the waiting queue is full"), RID)
    assert (error.status, error.code, error.type) == (503, "overloaded", "service_unavailable")
    assert error.message == "the waiting queue is full"
    assert error.retry_after == "1"


def test_serve_back_pressure_is_a_503_to_retry() -> None:
    exc = BackPressureError(num_queued_requests=10, max_queued_requests=10)
    error = to_api_error(exc, RID)
    assert (error.status, error.code, error.retry_after) == (503, "overloaded", "1")
    assert "num_queued_requests" not in error.message  # Serve's internals stay in the logs


def test_a_deployment_gone_away_is_a_503_to_retry() -> None:
    exc = DeploymentUnavailableError(DeploymentID("Batcher", "model-small"))
    error = to_api_error(exc, RID)
    assert (error.status, error.code, error.retry_after) == (503, "model_unavailable", "1")
    assert "model-small" not in error.message


def test_a_dead_engine_is_a_503_without_its_cause() -> None:
    error = to_api_error(EngineDeadError("CUDA error: an illegal memory access"), RID)
    assert (error.status, error.code, error.retry_after) == (503, "engine_dead", "1")
    assert "CUDA" not in error.message


def test_anything_else_is_a_500_with_the_request_id_and_no_internals(
    serve_log: list[logging.LogRecord],
) -> None:
    exc = KeyError("/srv/models/secret-path/config.json")
    error = to_api_error(exc, RID)
    assert (error.status, error.type, error.param) == (500, "server_error", None)
    assert RID in error.message
    assert "secret-path" not in error.message and "KeyError" not in error.message
    body = error.body().model_dump()
    assert body == {
        "error": {"message": error.message, "type": "server_error", "param": None, "code": None}
    }
    # The details go to the log, under the same request id.
    (record,) = [r for r in serve_log if r.levelno == logging.ERROR]
    assert RID in record.getMessage()
    assert record.exc_info is not None and record.exc_info[1] is exc


# ApiError


def test_api_error_defaults_follow_its_status() -> None:
    assert ApiError(400, "bad").type == "invalid_request_error"
    assert ApiError(401, "who").type == "authentication_error"
    assert ApiError(429, "slow").retry_after == "1"
    assert ApiError(503, "busy").retry_after == "1"
    assert ApiError(500, "oops").type == "server_error"
    assert ApiError(400, "bad").retry_after is None


@pytest.mark.parametrize("dumps", [pickle.dumps, cloudpickle.dumps], ids=["pickle", "cloudpickle"])
def test_api_error_keeps_every_field_across_a_process_hop(dumps: Any) -> None:
    error = ApiError(
        429, "too many tokens", type="tokens", param="max_tokens", code="rate", retry_after="12"
    )
    copy = pickle.loads(dumps(error))
    assert isinstance(copy, ApiError)
    fields = ("status", "message", "type", "param", "code", "retry_after")
    assert [getattr(copy, f) for f in fields] == [getattr(error, f) for f in fields]
    assert str(copy) == "too many tokens"


def test_a_batcher_request_error_becomes_the_same_api_error() -> None:
    error = ApiError.from_request_error(
        RequestError(400, "too long", type="context_error", param="prompt", code="ctx")
    )
    body = error.body().model_dump()["error"]
    assert body == {
        "message": "too long",
        "type": "context_error",
        "param": "prompt",
        "code": "ctx",
    }
    assert ApiError.from_request_error(RequestError(503, "full")).type == "service_unavailable"


# Server-sent events


class Source:
    """The deltas' stream a response is rendered from (already drained); records its closing."""

    def __init__(self) -> None:
        self.closed = False

    def __aiter__(self) -> Source:
        return self

    async def __anext__(self) -> Any:
        raise StopAsyncIteration

    async def aclose(self) -> None:
        self.closed = True


async def chunks_then(
    chunks: list[BaseModel], failure: Exception | None = None
) -> AsyncIterator[BaseModel]:
    for chunk in chunks:
        yield chunk
    if failure is not None:
        raise failure


def frame(chunks: AsyncIterator[BaseModel], source: Source) -> tuple[list[str], int]:
    """Every event ``sse.framed`` sends, and how often ``on_close`` ran."""
    closes = 0

    async def on_close() -> None:
        nonlocal closes
        closes += 1

    async def scenario() -> list[str]:
        return [e async for e in sse.framed(chunks, source, RID, on_close=on_close)]

    return asyncio.run(scenario()), closes


def usage(n: int) -> Usage:
    return Usage(prompt_tokens=n, completion_tokens=n, total_tokens=2 * n)


def payload(event: str) -> Any:
    assert event.startswith("data: ") and event.endswith("\n\n")
    return json.loads(event[len("data: ") : -2])


def test_each_chunk_is_one_event_then_done() -> None:
    source = Source()
    events, closes = frame(chunks_then([usage(1), usage(2)]), source)
    assert events[-1] == "data: [DONE]\n\n"
    assert [payload(e)["prompt_tokens"] for e in events[:-1]] == [1, 2]
    assert source.closed and closes == 1


def test_a_failure_after_the_first_event_is_one_final_error_event() -> None:
    source = Source()
    failure = ApiError(503, "the model went away", code="engine_dead")
    events, closes = frame(chunks_then([usage(1)], failure), source)
    assert len(events) == 2  # no [DONE] after an error
    assert payload(events[0])["prompt_tokens"] == 1
    assert payload(events[1]) == {
        "error": {
            "message": "the model went away",
            "type": "service_unavailable",
            "param": None,
            "code": "engine_dead",
        }
    }
    assert source.closed and closes == 1


def test_an_unexpected_failure_ends_with_a_500_event_naming_the_request() -> None:
    events, _ = frame(chunks_then([], RuntimeError("tensor shape mismatch")), Source())
    (error,) = events
    assert payload(error)["error"]["type"] == "server_error"
    assert RID in payload(error)["error"]["message"]
    assert "tensor" not in error


def test_a_client_that_leaves_closes_the_source() -> None:
    source = Source()
    closes = 0

    async def on_close() -> None:
        nonlocal closes
        closes += 1

    async def scenario() -> str:
        events = sse.framed(chunks_then([usage(1), usage(2)]), source, RID, on_close)
        first = await anext(events)
        assert not source.closed
        await events.aclose()  # type: ignore[attr-defined]
        return first

    assert payload(asyncio.run(scenario()))["prompt_tokens"] == 1
    assert source.closed and closes == 1


def test_framing_works_without_on_close() -> None:
    async def scenario() -> list[str]:
        return [e async for e in sse.framed(chunks_then([usage(3)]), Source(), RID)]

    assert asyncio.run(scenario())[-1] == sse.DONE


def test_serve_back_pressure_keeps_the_deployments_retry_after() -> None:
    exc = BackPressureError(num_queued_requests=4, max_queued_requests=4, retry_after_s=0.2)
    assert to_api_error(exc, RID).retry_after == "1"  # whole seconds, at least 1
    exc = BackPressureError(num_queued_requests=4, max_queued_requests=4, retry_after_s=4.5)
    assert to_api_error(exc, RID).retry_after == "5"


def test_an_engine_refusal_for_a_full_queue_is_reported_as_overloaded() -> None:
    """Like every queue bound: the batcher passes the code on to the client's 503."""
    full = RejectedRequest.from_engine_error(EngineOverloadedError("the waiting queue is full"))
    assert (full.status, full.code, full.param) == (503, "overloaded", None)
    invalid = RejectedRequest.from_engine_error(InvalidRequestError("too long", "max_tokens"))
    assert (invalid.status, invalid.code, invalid.param) == (400, None, "max_tokens")
