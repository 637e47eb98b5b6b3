"""The OpenAI-compatible API over real HTTP: httpx for the wire format, the official SDK."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from serve_app.text.tokenizer import Tokenizer

PROMPT = "The for statement is used to"
MESSAGES = [{"role": "user", "content": "What does the return statement do?"}]


def sse_events(response: httpx.Response) -> list[str]:
    """The ``data:`` payloads of an SSE response, checking the framing on the way."""
    body = response.read().decode()
    assert body.endswith("\n\n")
    events = body.split("\n\n")[:-1]
    assert all(event.startswith("data: ") for event in events), events
    return [event.removeprefix("data: ") for event in events]


def complete(client: httpx.Client, **body: object) -> dict:
    response = client.post("/v1/completions", json={"model": "demo", "prompt": PROMPT, **body})
    assert response.status_code == 200, response.text
    return response.json()


def test_completion_text_and_usage_match_the_tokenizer(
    client: httpx.Client, tokenizer: Tokenizer
) -> None:
    body = complete(client, max_tokens=12, temperature=0, logprobs=0)
    choice = body["choices"][0]
    assert body["object"] == "text_completion"
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["prompt_tokens"] == len(tokenizer.encode(PROMPT))
    assert usage["completion_tokens"] == len(choice["logprobs"]["tokens"]) <= 12
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert choice["text"] == "".join(choice["logprobs"]["tokens"])


def test_streamed_completion_is_framed_and_equals_the_unary_one(client: httpx.Client) -> None:
    expected = complete(client, max_tokens=16, temperature=0, logprobs=0)["choices"][0]
    request = {
        "model": "demo",
        "prompt": PROMPT,
        "max_tokens": 16,
        "temperature": 0,
        "logprobs": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with client.stream("POST", "/v1/completions", json=request) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] > 0
    text = "".join(c["choices"][0]["text"] for c in chunks[:-1])
    assert text == expected["text"]
    assert chunks[-2]["choices"][0]["finish_reason"] == expected["finish_reason"]


def test_chat_completion_unary_and_streamed_agree(client: httpx.Client) -> None:
    request = {
        "model": "demo",
        "messages": MESSAGES,
        "max_tokens": 16,
        "temperature": 0,
        "logprobs": True,
    }
    response = client.post("/v1/chat/completions", json=request)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion"
    message = body["choices"][0]["message"]
    assert message["role"] == "assistant"
    assert len(body["choices"][0]["logprobs"]["content"]) == body["usage"]["completion_tokens"]

    with client.stream("POST", "/v1/chat/completions", json={**request, "stream": True}) as r:
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    streamed = "".join(c["choices"][0]["delta"]["content"] or "" for c in chunks)
    assert streamed == message["content"]


def test_stop_string_ends_the_text_before_it(client: httpx.Client) -> None:
    free = complete(client, max_tokens=24, temperature=0, ignore_eos=True)["choices"][0]["text"]
    stop = free[8:11]
    assert stop.strip(), f"pick a visible stop string from {free!r}"
    stopped = complete(client, max_tokens=24, temperature=0, ignore_eos=True, stop=[stop])
    choice = stopped["choices"][0]
    assert choice["text"] == free[: free.index(stop)]
    assert choice["finish_reason"] == "stop"


def test_seeded_sampling_is_reproducible_over_http(client: httpx.Client) -> None:
    # logprobs keeps these requests out of the response cache, so the engine samples twice.
    request = {"max_tokens": 20, "temperature": 1.0, "seed": 1234, "logprobs": 0}
    first = complete(client, **request)["choices"][0]["text"]
    second = complete(client, **request)["choices"][0]["text"]
    assert first == second
    other = complete(client, **{**request, "seed": 99})["choices"][0]["text"]
    assert other != first


def test_n_choices_for_each_prompt(client: httpx.Client) -> None:
    body = complete(client, prompt=["def", "class"], n=3, max_tokens=8, temperature=1.0, seed=5)
    assert [c["index"] for c in body["choices"]] == list(range(6))
    texts = [c["text"] for c in body["choices"]]
    assert len(set(texts[:3])) > 1  # choices of one prompt sample with different seeds


def test_openai_sdk_works_unchanged(served_app: str) -> None:
    sdk = openai.OpenAI(base_url=f"{served_app}/v1", api_key="unused")
    assert [m.id for m in sdk.models.list().data] == ["demo"]
    completion = sdk.completions.create(model="demo", prompt=PROMPT, max_tokens=8, temperature=0)
    assert completion.choices[0].text
    chat = sdk.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=8, temperature=0)
    assert chat.choices[0].message.content
    stream = sdk.chat.completions.create(
        model="demo", messages=MESSAGES, max_tokens=8, temperature=0, stream=True
    )
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert streamed == chat.choices[0].message.content
    text_stream = sdk.completions.create(
        model="demo", prompt=PROMPT, max_tokens=8, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in text_stream) == completion.choices[0].text


def test_sdk_sees_errors_as_api_errors(served_app: str) -> None:
    sdk = openai.OpenAI(base_url=f"{served_app}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError) as info:
        sdk.completions.create(model="gpt-4", prompt="hi")
    assert "gpt-4" in info.value.message


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"model": "demo", "prompt": 5}, "prompt"),
        ("/v1/completions", {"model": "demo", "prompt": "x", "max_tokens": -3}, "max_tokens"),
        ("/v1/completions", {"model": "demo", "prompt": "x", "max_tokens": "many"}, "max_tokens"),
        ("/v1/completions", {"model": "demo", "prompt": "x", "temperature": 9}, "temperature"),
        ("/v1/completions", {"model": "demo", "prompt": "x", "frobnicate": 1}, "frobnicate"),
        ("/v1/completions", {"model": "demo", "prompt": "x", "suffix": "y"}, "suffix"),
        ("/v1/completions", {"prompt": "x"}, "model"),
        ("/v1/completions", {"model": "nope", "prompt": "x"}, "model"),
        ("/v1/completions", {"model": "demo", "prompt": "x", "max_tokens": 100_000}, "max_tokens"),
        ("/v1/completions", {"model": "demo", "prompt": "word " * 3000}, "prompt"),
        ("/v1/chat/completions", {"model": "demo", "messages": []}, "messages"),
        ("/v1/chat/completions", {"model": "demo", "messages": [{"role": "x"}]}, "messages.0.role"),
        (
            "/v1/chat/completions",
            {"model": "demo", "messages": MESSAGES, "tools": [{}]},
            "tools.0.type",
        ),
        ("/v1/completions", {"model": "demo", "prompt": "x\ud800"}, "prompt"),
        (
            "/v1/chat/completions",
            {"model": "demo", "messages": [{"role": "user", "content": "\udfff"}]},
            "messages.0.content",
        ),
        ("/v1/infer", {"prompt": "lone \ud800 surrogate"}, "prompt"),
        ("/tokenize", {"model": "demo", "prompt": "\ud800"}, "prompt"),
    ],
)
def test_bad_input_is_a_4xx_in_openai_error_shape(
    client: httpx.Client, path: str, body: dict, param: str | None
) -> None:
    # Escaped JSON, as any client sends it: a lone surrogate is valid JSON ("\\ud800").
    payload = json.dumps(body, ensure_ascii=True)
    response = client.post(path, content=payload, headers={"Content-Type": "application/json"})
    assert 400 <= response.status_code < 500, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if param is not None:
        assert error["param"] == param
    assert response.headers["x-request-id"]


def test_malformed_json_is_a_400(client: httpx.Client) -> None:
    response = client.post(
        "/v1/completions",
        content=b'{"model": "demo",',
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json"


def test_client_request_id_is_echoed(client: httpx.Client) -> None:
    response = client.get("/v1/models", headers={"X-Request-Id": "abc-123"})
    assert response.headers["x-request-id"] == "abc-123"
