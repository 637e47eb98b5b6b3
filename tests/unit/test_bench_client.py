"""The SSE client's parsing against canned streams from an in-process fake server."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from serve_app.bench.client import RawChunk, Target, book_tokens, stream_request
from serve_app.bench.dataset import BenchRequest
from serve_app.bench.trace import RequestTrace

REQUEST = BenchRequest(prompt="the of and", input_len=3, output_len=5)


def sse(*events: dict[str, Any] | str) -> bytes:
    """A ``text/event-stream`` body; a string event is sent as is (``[DONE]``)."""
    lines = [f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events]
    return "".join(lines).encode()


def completion(text: str, **extra: Any) -> dict[str, Any]:
    choice = {"index": 0, "text": text, "finish_reason": None, **extra}
    return {"id": "cmpl-1", "object": "text_completion", "choices": [choice]}


def usage(completion_tokens: int, prompt_tokens: int = 3) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def run(
    body: bytes, status: int = 200, target: Target | None = None
) -> tuple[RequestTrace, list[httpx.Request]]:
    """Send REQUEST to a fake server answering ``body``; also returns what the server received."""
    sent: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(status, content=body, headers={"content-type": "text/event-stream"})

    async def go() -> RequestTrace:
        transport = httpx.MockTransport(handler)
        headers = {"Authorization": "Bearer sk-test"}
        async with httpx.AsyncClient(
            base_url="http://test/v1", transport=transport, headers=headers
        ) as client:
            return await stream_request(client, target or Target(model="demo"), REQUEST, 0.0)

    return asyncio.run(go()), sent


def test_a_completions_stream_is_timed_and_counted_from_its_final_usage() -> None:
    body = sse(
        completion("Hello"),
        completion(" world"),
        completion("", finish_reason="length"),
        {"id": "cmpl-1", "object": "text_completion", "choices": [], "usage": usage(5)},
        "[DONE]",
    )
    trace, _ = run(body)
    assert trace.ok
    assert trace.token_source == "chunks"
    assert [c.tokens for c in trace.chunks] == [1, 1]  # the empty last chunk is not a token
    assert trace.completion_tokens == 5 and trace.prompt_tokens == 3
    assert trace.chunks[0].t <= trace.chunks[1].t <= (trace.e2e or 0)


def test_the_request_body_asks_for_a_stream_with_usage_and_the_drawn_length() -> None:
    _, sent = run(sse(completion("x"), "[DONE]"))
    request = sent[0]
    assert request.url == "http://test/v1/completions"
    assert request.headers["authorization"] == "Bearer sk-test"
    body = json.loads(request.content)
    assert body == {
        "model": "demo",
        "prompt": "the of and",
        "max_tokens": 5,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }


def test_chat_reads_deltas_and_skips_the_role_chunk() -> None:
    def chunk(delta: dict[str, str]) -> dict[str, Any]:
        return {
            "id": "c",
            "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta}],
        }

    body = sse(
        chunk({"role": "assistant"}), chunk({"content": "Hi"}), chunk({"content": "!"}), "[DONE]"
    )
    target = Target(model="demo", endpoint="chat", ignore_eos=False, logprobs=True)
    trace, sent = run(body, target=target)
    assert [c.tokens for c in trace.chunks] == [1, 1]
    body_sent = json.loads(sent[0].content)
    assert sent[0].url.path == "/v1/chat/completions"
    assert body_sent["messages"] == [{"role": "user", "content": "the of and"}]
    assert "ignore_eos" not in body_sent
    assert body_sent["logprobs"] is True


def test_logprobs_count_the_tokens_of_a_coalesced_chunk() -> None:
    def logprobs(*tokens: str) -> dict[str, Any]:
        return {"tokens": list(tokens), "token_logprobs": [-0.1] * len(tokens)}

    body = sse(
        completion("a", logprobs=logprobs("a")),
        completion("bcd", logprobs=logprobs("b", "c", "d")),
        "[DONE]",
    )
    trace, _ = run(body)
    assert trace.token_source == "logprobs"
    assert [c.tokens for c in trace.chunks] == [1, 3]


def test_chat_logprobs_count_their_content_entries() -> None:
    def chunk(text: str) -> dict[str, Any]:
        entries = [{"token": t, "logprob": -0.1, "bytes": [], "top_logprobs": []} for t in text]
        choice = {"index": 0, "delta": {"content": text}, "logprobs": {"content": entries}}
        return {"id": "c", "object": "chat.completion.chunk", "choices": [choice]}

    trace, _ = run(sse(chunk("ab"), chunk("cde"), "[DONE]"), target=Target("demo", "chat"))
    assert trace.token_source == "logprobs"
    assert [c.tokens for c in trace.chunks] == [2, 3]


def test_usage_on_every_chunk_counts_tokens_by_its_growth() -> None:
    body = sse(
        {**completion("a"), "usage": usage(1)},
        {**completion(""), "usage": usage(2)},  # a token without text yet
        {**completion("bcd"), "usage": usage(5)},
        "[DONE]",
    )
    trace, _ = run(body)
    assert trace.token_source == "usage"
    assert [c.tokens for c in trace.chunks] == [1, 4]
    assert trace.completion_tokens == 5


def test_usage_only_on_the_last_text_chunk_is_not_a_per_chunk_count() -> None:
    raw = [
        RawChunk(t=0.1, has_text=True, usage_total=None, logprob_count=None),
        RawChunk(t=0.2, has_text=True, usage_total=7, logprob_count=None),
    ]
    events, source = book_tokens(raw)
    assert source == "chunks"
    assert [e.tokens for e in events] == [1, 1]


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (503, b'{"error": {"message": "overloaded"}}', "503"),
        (200, sse(completion("a"), {"error": {"message": "engine died"}}), "sse_error"),
        (200, sse(completion(""), "[DONE]"), "no_output"),
        (200, b"data: {not json\n\n", "bad_event"),
    ],
    ids=["http-status", "sse-error-event", "no-text", "bad-event"],
)
def test_failures_come_back_with_their_status(status: int, body: bytes, expected: str) -> None:
    trace, _ = run(body, status=status)
    assert trace.status == expected
    assert not trace.ok and trace.error


def test_a_request_past_its_total_timeout_fails_as_timeout() -> None:
    async def slow(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(1.0)
        return httpx.Response(200, content=sse(completion("late"), "[DONE]"))

    async def go() -> RequestTrace:
        transport = httpx.MockTransport(slow)
        async with httpx.AsyncClient(base_url="http://test/v1", transport=transport) as client:
            return await stream_request(client, Target(model="demo", timeout_s=0.05), REQUEST, 0.0)

    trace = asyncio.run(go())
    assert trace.status == "timeout"
    assert trace.e2e is not None and trace.e2e < 0.5
