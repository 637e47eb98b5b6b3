"""Unit tests of the native API's wire types and rendering: the seed's ``InferenceResponse``,
``ModelInfo`` and health answer, and the batch request's two accepted forms."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import ValidationError

from serve_app.api import render
from serve_app.api.errors import ApiError, InvalidParam, to_api_error
from serve_app.api.native import MAX_BATCH_ITEMS, BatchInferRequest, InferResponse
from serve_app.api.openai_responses import Usage
from serve_app.messages import ModelDescription, TextChunk
from serve_app.results import Accumulator, ChoiceDelta, ChoiceResult, CompletionResult

DESCRIPTION = ModelDescription("v3", "llama", "onnxruntime (CPU)", 1_000_000, 2048, 1.7e9 + 0.25)


async def from_list(deltas: list[ChoiceDelta]) -> AsyncIterator[ChoiceDelta]:
    for delta in deltas:
        yield delta


def stream(deltas: list[ChoiceDelta]) -> list[InferResponse]:
    async def collect() -> list[InferResponse]:
        chunks = render.infer_chunks(from_list(deltas), Accumulator(1, 1), 0.0)
        return [chunk async for chunk in chunks]

    return asyncio.run(collect())


ONCE_UPON = [
    ChoiceDelta(0, TextChunk("r-0", text="Once", token_ids=[5], prompt_tokens=2)),
    ChoiceDelta(0, TextChunk("r-0", text=" upon", token_ids=[6, 7], finish_reason="length")),
]


def test_an_infer_response_counts_its_tokens_and_lists_their_ids_apart() -> None:
    result = CompletionResult([ChoiceResult("Once upon", [4, 5, 6], [], "stop")], 4, 3)
    response = render.infer_response(result, latency_s=0.25)

    assert response.model_dump(mode="json") == {
        "text": "Once upon",
        "tokens": 3,
        "latency": 0.25,
        "usage": {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7},
        "finish_reason": "stop",
        "token_ids": [4, 5, 6],
    }  # no "error": the seed's omitempty


def test_stream_events_carry_their_delta_and_the_usage_so_far() -> None:
    events = stream(ONCE_UPON)

    assert [(e.text, e.tokens, e.token_ids, e.finish_reason) for e in events] == [
        ("Once", 1, [5], ""),
        (" upon", 2, [6, 7], "length"),
    ]
    assert [e.usage.completion_tokens for e in events] == [1, 3]
    assert events[-1].usage == Usage(prompt_tokens=2, completion_tokens=3, total_tokens=5)
    assert all(e.error is None and e.latency > 0 for e in events)


@pytest.mark.parametrize(
    ("failure", "status", "message"),
    [
        (ApiError(503, "the model is unavailable"), 503, "the model is unavailable"),
        (RuntimeError("secret path /opt/x"), 500, "internal error (request id req-1)"),
        (ApiError(429, "slow down", code="rate_limited"), 429, "slow down"),
    ],
)
def test_a_failure_is_the_seeds_error_string_with_the_status_it_would_have_had(
    failure: Exception, status: int, message: str
) -> None:
    answer = render.infer_failure(to_api_error(failure, "req-1"), latency_s=0.5)

    body = json.loads(answer.model_dump_json())
    assert (body["error"], body["status"], body["latency"]) == (message, status, 0.5)
    assert (body["text"], body["tokens"], body["finish_reason"]) == ("", 0, "")
    assert body["usage"] == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    assert body["error_detail"]["message"] == message
    assert "secret" not in answer.model_dump_json()


def test_model_info_gives_the_context_as_max_tokens_and_the_load_time_in_rfc3339() -> None:
    info = render.model_info("demo", DESCRIPTION).model_dump(mode="json")

    assert info == {
        "name": "demo",
        "version": "v3",
        "type": "llama",
        "parameters": 1_000_000,
        "max_tokens": 2048,
        "created_at": "2023-11-14T22:13:20.250000Z",
        "backend": "onnxruntime (CPU)",
        "context_length": 2048,
    }
    assert datetime.fromisoformat(info["created_at"]).timestamp() == 1.7e9 + 0.25


def test_health_is_ok_with_stats_or_unavailable_and_always_tells_the_time() -> None:
    ok = render.health({"num_running": 1, "num_waiting": 0}).model_dump(mode="json")
    down = render.health(None).model_dump(mode="json")

    assert (ok["status"], ok["num_running"], down["status"]) == ("ok", 1, "unavailable")
    for body in (ok, down):
        assert abs(datetime.fromisoformat(body["time"]) - datetime.now(UTC)).total_seconds() < 60
        assert body["time"].endswith("Z")


@pytest.mark.parametrize(
    "payload",
    [[{"prompt": "a"}, {"prompt": ""}], {"requests": [{"prompt": "a"}, {"prompt": ""}]}],
)
def test_a_batch_is_a_json_array_or_the_older_object_form(payload: Any) -> None:
    batch = BatchInferRequest.model_validate(payload)
    assert batch.root == [{"prompt": "a"}, {"prompt": ""}]  # items are validated one by one


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ([], "requests"),
        ({"requests": []}, "requests"),
        ([{"prompt": "a"}] * (MAX_BATCH_ITEMS + 1), "requests"),
        ({"prompt": "a"}, "prompt"),
        ("a", "requests"),
    ],
)
def test_a_batch_that_is_neither_form_names_what_is_wrong(payload: Any, param: str) -> None:
    with pytest.raises(ValidationError) as raised:
        BatchInferRequest.model_validate(payload)
    cause = raised.value.errors()[0]["ctx"]["error"]
    assert isinstance(cause, InvalidParam) and cause.param == param
