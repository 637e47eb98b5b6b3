"""Clients people already point at OpenAI-compatible servers, unmodified, over real HTTP.

The official ``openai`` SDK (sync, async, streaming with usage), guidellm 0.8.1's exact request
payloads (vLLM's ``continuous_usage_stats``, ``ignore_eos``, ``stop: null``), and LangChain's
``ChatOpenAI``. Every answer must parse in the client and agree, text and usage, with the same
request made directly with httpx. Greedy decoding makes the texts comparable.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import openai
import pytest
from langchain_core.messages import AIMessageChunk, HumanMessage, SystemMessage
from langchain_openai import ChatOpenAI

from serve_app.text.tokenizer import Tokenizer

MODEL = "demo"
PROMPT = "The for statement is used to"
SYSTEM = "You answer questions about Python."
QUESTION = "What does the return statement do?"
MESSAGES = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
MAX_TOKENS = 12
GUIDELLM_OUTPUT_TOKENS = 24  # guidellm asks for exactly this many: ignore_eos, no stop
API_KEY = "unused"  # the clients insist on one; this app runs without keys


def direct(client: httpx.Client, route: str, body: dict[str, Any]) -> dict[str, Any]:
    """A unary answer as the server gives it to a plain HTTP client."""
    response = client.post(route, json={"model": MODEL, **body})
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


@pytest.fixture(scope="module")
def reference(client: httpx.Client) -> dict[str, dict[str, Any]]:
    """The greedy completion and chat answers the clients must reproduce."""
    limits = {"max_tokens": MAX_TOKENS, "temperature": 0}
    return {
        "completion": direct(client, "/v1/completions", {"prompt": PROMPT, **limits}),
        "chat": direct(client, "/v1/chat/completions", {"messages": MESSAGES, **limits}),
    }


def text_of(answer: dict[str, Any]) -> str:
    choice = answer["choices"][0]
    return str(choice["text"] if "text" in choice else choice["message"]["content"])


def usage_of(answer: dict[str, Any]) -> tuple[int, int, int]:
    usage = answer["usage"]
    return usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]


def sdk_usage(usage: Any) -> tuple[int, int, int]:
    return usage.prompt_tokens, usage.completion_tokens, usage.total_tokens


# The openai SDK


@pytest.fixture(scope="module")
def sdk(served_app: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served_app}/v1", api_key=API_KEY, max_retries=0)


def test_openai_sdk_unary_answers_match_plain_http(
    sdk: openai.OpenAI, reference: dict[str, dict[str, Any]]
) -> None:
    completion = sdk.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0
    )
    assert completion.choices[0].text == text_of(reference["completion"])
    assert sdk_usage(completion.usage) == usage_of(reference["completion"])
    chat = sdk.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=MAX_TOKENS,
        temperature=0,  # type: ignore[arg-type]
    )
    assert chat.choices[0].message.content == text_of(reference["chat"])
    assert sdk_usage(chat.usage) == usage_of(reference["chat"])


def test_openai_sdk_streams_match_plain_http(
    sdk: openai.OpenAI, reference: dict[str, dict[str, Any]]
) -> None:
    stream_usage = {"stream": True, "stream_options": {"include_usage": True}}
    chunks = list(
        sdk.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, **stream_usage
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text_of(
        reference["completion"]
    )
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert sdk_usage(chunks[-1].usage) == usage_of(reference["completion"])

    chat_chunks = list(
        sdk.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,  # type: ignore[arg-type]
            max_completion_tokens=MAX_TOKENS,
            temperature=0,
            **stream_usage,
        )
    )
    content = "".join(c.choices[0].delta.content or "" for c in chat_chunks if c.choices)
    assert content == text_of(reference["chat"])
    assert chat_chunks[0].choices[0].delta.role == "assistant"
    assert chat_chunks[-1].usage is not None
    assert sdk_usage(chat_chunks[-1].usage) == usage_of(reference["chat"])


def test_async_openai_sdk_matches_plain_http(
    served_app: str, reference: dict[str, dict[str, Any]]
) -> None:
    async def scenario() -> tuple[str, Any, str, Any]:
        async with openai.AsyncOpenAI(
            base_url=f"{served_app}/v1", api_key=API_KEY, max_retries=0
        ) as sdk:
            # The commonly sent OpenAI fields that mean nothing here are accepted.
            chat_call = sdk.chat.completions.create(
                model=MODEL,
                messages=MESSAGES,  # type: ignore[arg-type]
                max_tokens=MAX_TOKENS,
                temperature=0,
                user="user-1",
                store=False,
                metadata={"suite": "clients"},
                service_tier="auto",
                parallel_tool_calls=False,
                reasoning_effort="low",
                modalities=["text"],
            )
            stream_call = sdk.completions.create(
                model=MODEL,
                prompt=PROMPT,
                max_tokens=MAX_TOKENS,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
            chat, stream = await asyncio.gather(chat_call, stream_call)
            chunks = [chunk async for chunk in stream]
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        return str(chat.choices[0].message.content), chat.usage, text, chunks[-1].usage

    chat_text, chat_usage, completion_text, completion_usage = asyncio.run(scenario())
    assert (chat_text, sdk_usage(chat_usage)) == (
        text_of(reference["chat"]),
        usage_of(reference["chat"]),
    )
    assert (completion_text, sdk_usage(completion_usage)) == (
        text_of(reference["completion"]),
        usage_of(reference["completion"]),
    )


# guidellm 0.8.1 (guidellm/backends/openai/request_handlers.py), payloads copied verbatim


def guidellm_completion_body(stream: bool, extras: dict[str, Any]) -> dict[str, Any]:
    """``TextCompletionsRequestHandler.format`` for a prompt with fixed output tokens;
    ``extras`` is the ``body`` of guidellm's ``--backend-kwargs`` extras, merged where it does."""
    body: dict[str, Any] = {"model": MODEL}
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
    body["max_tokens"] = GUIDELLM_OUTPUT_TOKENS
    body["stop"] = None
    body["ignore_eos"] = True
    body.update(extras)
    body["prompt"] = PROMPT
    return body


def guidellm_chat_body(stream: bool, extras: dict[str, Any]) -> dict[str, Any]:
    """``ChatCompletionsRequestHandler.format``: a system prefix, then user content parts."""
    body: dict[str, Any] = {"model": MODEL}
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
    body.update({"max_completion_tokens": GUIDELLM_OUTPUT_TOKENS, "stop": None, "ignore_eos": True})
    body.update(extras)
    body["messages"] = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": [{"type": "text", "text": QUESTION}]},
    ]
    return body


def guidellm_stream(
    client: httpx.Client, route: str, body: dict[str, Any]
) -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
    """Read a stream the way guidellm's ``add_streaming_line`` does: ``data:`` lines until
    ``[DONE]``; text from the first choice, the last non-empty usage wins."""
    texts, usage, events = [], {}, []
    with client.stream("POST", route, json=body) as response:
        assert response.status_code == 200, response.read().decode()
        for line in response.iter_lines():
            line = line.strip()
            if not line.startswith("data:"):
                continue
            data = line[len("data:") :].strip()
            if data == "[DONE]":
                break
            event = json.loads(data)
            assert "error" not in event, event
            events.append(event)
            choice = event["choices"][0] if event.get("choices") else {}
            text = choice.get("text") or (choice.get("delta") or {}).get("content")
            if text:
                texts.append(text)
            usage = event.get("usage") or usage
    return "".join(texts), usage, events


@pytest.mark.parametrize(
    ("route", "build"),
    [("/v1/completions", guidellm_completion_body), ("/v1/chat/completions", guidellm_chat_body)],
    ids=["completions", "chat"],
)
def test_guidellm_requests_stream_usage_on_every_chunk(
    client: httpx.Client, route: str, build: Any
) -> None:
    # guidellm's start-up: validate the backend, then take the first model listed.
    assert client.get("/health").status_code == 200
    assert client.get("/v1/models").json()["data"][0]["id"] == MODEL

    # Its payload as sent by default (the server's default sampling).
    prompt_tokens = usage_of(direct(client, route, build(stream=False, extras={})))[0]
    text, usage, events = guidellm_stream(client, route, build(stream=True, extras={}))
    assert text  # guidellm's post_validation rejects an answer without text
    assert usage == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": GUIDELLM_OUTPUT_TOKENS,  # ignore_eos: every token asked for
        "total_tokens": prompt_tokens + GUIDELLM_OUTPUT_TOKENS,
    }
    # continuous_usage_stats: every chunk counts the tokens so far, never going back.
    assert all(e["usage"] is not None for e in events)
    counted = [e["usage"]["completion_tokens"] for e in events]
    assert counted == sorted(counted) and counted[-1] == GUIDELLM_OUTPUT_TOKENS
    assert {e["usage"]["prompt_tokens"] for e in events} == {prompt_tokens}

    # Greedy through guidellm's extras: the stream's text is the unary answer's.
    greedy = {"temperature": 0}
    unary = direct(client, route, build(stream=False, extras=greedy))
    text, usage, _ = guidellm_stream(client, route, build(stream=True, extras=greedy))
    assert text == text_of(unary)
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (
        usage_of(unary)
    )


# LangChain's ChatOpenAI


def test_langchain_chat_openai_matches_plain_http(
    served_app: str, reference: dict[str, dict[str, Any]]
) -> None:
    llm = ChatOpenAI(
        model=MODEL,
        base_url=f"{served_app}/v1",
        api_key=API_KEY,  # type: ignore[arg-type]
        temperature=0,
        max_tokens=MAX_TOKENS,  # type: ignore[call-arg]
        max_retries=0,
        stream_usage=True,
    )
    messages = [SystemMessage(SYSTEM), HumanMessage(QUESTION)]
    prompt_tokens, completion_tokens, total_tokens = usage_of(reference["chat"])

    answer = llm.invoke(messages)
    assert answer.content == text_of(reference["chat"])
    assert answer.usage_metadata is not None
    assert answer.usage_metadata["input_tokens"] == prompt_tokens
    assert answer.usage_metadata["output_tokens"] == completion_tokens

    streamed: AIMessageChunk | None = None
    for chunk in llm.stream(messages):
        streamed = chunk if streamed is None else streamed + chunk
    assert streamed is not None and streamed.content == text_of(reference["chat"])
    assert streamed.usage_metadata is not None
    assert streamed.usage_metadata["total_tokens"] == total_tokens


# vLLM's extensions and the unknown-field policy, as SDK users send them (extra_body)


def test_stop_token_ids_through_the_sdks_extra_body(
    sdk: openai.OpenAI, tokenizer: Tokenizer
) -> None:
    greedy = {"model": MODEL, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0}
    tokens = sdk.completions.create(**greedy, logprobs=0).choices[0].logprobs.tokens  # type: ignore[union-attr]
    ids = [tokenizer.encode(t) for t in tokens]
    # The first generated token that is one whole token and did not come up before it.
    at = next(j for j in range(1, len(ids)) if len(ids[j]) == 1 and ids[j] not in ids[:j])
    stop_id = ids[at][0]
    for include in (False, True):
        choice = sdk.completions.create(
            **greedy,
            extra_body={"stop_token_ids": [stop_id], "include_stop_str_in_output": include},
        )
        assert choice.choices[0].finish_reason == "stop"
        assert choice.choices[0].text == "".join(tokens[: at + 1 if include else at])
        assert choice.usage is not None and choice.usage.completion_tokens == at + 1


def test_an_unknown_field_is_a_400_naming_it(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        sdk.completions.create(model=MODEL, prompt=PROMPT, extra_body={"max_token": 5})
    assert raised.value.status_code == 400
    assert isinstance(raised.value.body, dict) and raised.value.body.get("param") == "max_token"
