"""The seed's native API contract, exactly: every native answer decoded over real HTTP into types
that mirror the seed's Go declarations.

The mirrors decode the way Go's ``encoding/json`` does where it matters for a client: a JSON
value of the wrong type fails (a list or a float for an ``int``, an object for a ``string``, a
string for a number), times must be RFC 3339, and fields the seed does not declare are ignored.
They are stricter than Go in one way, on purpose: every seed field must be present (only
``error`` is ``omitempty``) and never ``null``, because the service promises to send them all.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import httpx
import pytest
from pydantic import BaseModel, ConfigDict, PlainValidator, TypeAdapter, ValidationError

RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})")


def rfc3339(value: Any) -> datetime:
    """Go's ``time.Time`` JSON decoding: an RFC 3339 string, with its offset."""
    if not isinstance(value, str) or not RFC3339.fullmatch(value):
        raise ValueError(f"not an RFC 3339 time: {value!r}")
    seconds, _, rest = value.partition(".")
    if rest:  # Python parses at most microseconds; Go sends up to nanoseconds
        digits = re.match(r"\d+", rest)
        assert digits is not None
        value = f"{seconds}.{digits.group()[:6]}{rest[len(digits.group()) :]}"
    return datetime.fromisoformat(value)


Time = Annotated[datetime, PlainValidator(rfc3339)]


class GoStruct(BaseModel):
    """Decoded like Go's ``json.Unmarshal``: no coercion; undeclared fields ignored."""

    model_config = ConfigDict(strict=True, extra="ignore")


class Usage(GoStruct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class InferenceResponse(GoStruct):
    """``type InferenceResponse struct { Text string; Tokens int; Latency float64;
    Error string `json:"error,omitempty"`; Usage Usage; FinishReason string }``"""

    text: str
    tokens: int
    latency: float
    error: str = ""
    usage: Usage
    finish_reason: str


class ModelInfo(GoStruct):
    """``type ModelInfo struct { Name, Version, Type string; Parameters int64; MaxTokens int;
    CreatedAt time.Time }``"""

    name: str
    version: str
    type: str
    parameters: int
    max_tokens: int
    created_at: Time


class Health(GoStruct):
    """``{"status": "ok", "time": <RFC 3339>}``"""

    status: str
    time: Time


BATCH = TypeAdapter(list[InferenceResponse])


def decode_events(response: httpx.Response) -> list[InferenceResponse]:
    """``/v1/stream_infer``: ``data: <InferenceResponse JSON>`` events, then ``data: [DONE]``."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [e for e in response.text.split("\n\n") if e and not e.startswith(":")]
    assert all(e.startswith("data: ") for e in events), events
    data = [e.removeprefix("data: ") for e in events]
    assert data[-1] == "[DONE]" and "[DONE]" not in data[:-1]
    return [InferenceResponse.model_validate_json(item) for item in data[:-1]]


def test_infer_answers_the_seeds_inference_response(client: httpx.Client) -> None:
    response = client.post("/v1/infer", json={"prompt": "The seed contract", "max_tokens": 6})

    assert response.status_code == 200, response.text
    answer = InferenceResponse.model_validate_json(response.content)
    assert "error" not in response.json()  # omitempty
    assert answer.text and answer.error == ""
    assert answer.tokens == answer.usage.completion_tokens == len(response.json()["token_ids"])
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.tokens
    assert answer.finish_reason in ("stop", "length")
    assert 0 < answer.latency < 60  # seconds


def test_batch_infer_takes_and_answers_a_json_array_with_per_item_errors(
    client: httpx.Client,
) -> None:
    requests: list[Any] = [
        {"prompt": "import", "max_tokens": 4},
        {"prompt": "", "max_tokens": 4},
        {"prompt": "def", "max_tokens": "five"},
        {"prompt": "word " * 3000},
        "not a request",
        {"prompt": "while", "max_tokens": 4, "stop_words": ["\n"]},
    ]
    response = client.post("/v1/batch_infer", json=requests)

    assert response.status_code == 200, response.text
    answers = BATCH.validate_json(response.content)
    assert len(answers) == len(requests)
    assert [a.error != "" for a in answers] == [False, True, True, True, True, False]
    assert [item.get("status") for item in response.json()] == [None, 400, 400, 400, 400, None]
    assert "context length" in answers[3].error
    for good in (answers[0], answers[5]):
        assert good.text and good.tokens == good.usage.completion_tokens >= 1
    for bad in answers[1:5]:
        assert (bad.text, bad.tokens, bad.finish_reason) == ("", 0, "")


def test_batch_infer_still_takes_the_object_form_and_answers_the_same_array(
    client: httpx.Client,
) -> None:
    items = [{"prompt": "class", "max_tokens": 3}, {"prompt": "return", "max_tokens": 3}]
    as_object = client.post("/v1/batch_infer", json={"requests": items})
    as_array = client.post("/v1/batch_infer", json=items)

    assert as_object.status_code == as_array.status_code == 200
    by_object, by_array = (
        BATCH.validate_json(as_object.content),
        BATCH.validate_json(as_array.content),
    )
    assert [a.text for a in by_object] == [a.text for a in by_array]  # greedy: the same text


def test_stream_infer_sends_inference_response_events_then_done(client: httpx.Client) -> None:
    request = {"prompt": "The stream contract", "max_tokens": 10}
    unary = InferenceResponse.model_validate_json(client.post("/v1/infer", json=request).content)
    response = client.post("/v1/stream_infer", json=request)

    events = decode_events(response)
    assert "".join(e.text for e in events) == unary.text
    assert sum(e.tokens for e in events) == unary.tokens
    assert [e.finish_reason for e in events[:-1]] == [""] * (len(events) - 1)
    assert events[-1].finish_reason == unary.finish_reason
    assert events[-1].usage == unary.usage
    assert all(e.error == "" for e in events)
    assert [e.latency for e in events] == sorted(e.latency for e in events)


def test_model_info_answers_the_seeds_model_info(client: httpx.Client) -> None:
    response = client.get("/v1/model_info")

    assert response.status_code == 200, response.text
    info = ModelInfo.model_validate_json(response.content)
    assert (info.name, info.type) == ("demo", "llama")
    assert info.version and info.parameters > 100_000
    assert info.max_tokens == response.json()["context_length"] > 0
    assert datetime.now(UTC) - timedelta(hours=1) < info.created_at <= datetime.now(UTC)


def test_health_answers_ok_and_the_time(client: httpx.Client) -> None:
    response = client.get("/health")

    assert response.status_code == 200, response.text
    health = Health.model_validate_json(response.content)
    assert health.status == "ok"
    assert abs(health.time - datetime.now(UTC)) < timedelta(minutes=1)


# The mirrors can fail: the shapes this service answered before, and other near misses.

GOOD_ANSWER = {"text": "a", "tokens": 1, "latency": 0.5, "usage": {"prompt_tokens": 1,
               "completion_tokens": 1, "total_tokens": 2}, "finish_reason": "stop"}  # fmt: skip
GOOD_INFO = {"name": "demo", "version": "v1", "type": "llama", "parameters": 10,
             "max_tokens": 512, "created_at": "2023-11-14T22:13:20.75Z"}  # fmt: skip


@pytest.mark.parametrize(
    ("model", "changes"),
    [
        (InferenceResponse, {"tokens": [1, 2]}),  # a list of ids for an int
        (InferenceResponse, {"error": {"message": "bad", "type": "invalid_request_error"}}),
        (InferenceResponse, {"finish_reason": None}),
        (InferenceResponse, {"usage": None}),
        (InferenceResponse, {"latency": "0.5"}),
        (ModelInfo, {"created_at": 1_700_000_000.75}),
        (ModelInfo, {"created_at": "2023-11-14T22:13:20"}),  # no offset
        (ModelInfo, {"created_at": "2023-11-14 22:13:20Z"}),
        (ModelInfo, {"max_tokens": None}),
        (ModelInfo, {"parameters": 1.5e6}),
    ],
)
def test_the_mirrors_refuse_a_wrong_json_type(
    model: type[GoStruct], changes: dict[str, Any]
) -> None:
    good = GOOD_ANSWER if model is InferenceResponse else GOOD_INFO
    model.model_validate_json(json.dumps(good))  # the unchanged answer decodes
    with pytest.raises(ValidationError):
        model.model_validate_json(json.dumps({**good, **changes}))


def test_the_health_mirror_needs_an_rfc3339_time() -> None:
    Health.model_validate_json('{"status": "ok", "time": "2026-01-02T03:04:05.123456789+02:00"}')
    with pytest.raises(ValidationError):
        Health.model_validate_json('{"status": "ok"}')
