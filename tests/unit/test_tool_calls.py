"""Unit tests of tool calls: reading them from a choice's text (whole and streamed, which must
agree however the text is split) and rendering them as OpenAI ``tool_calls``."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from serve_app.api import render, tool_calls
from serve_app.api.openai import ChatCompletionRequest
from serve_app.api.tool_calls import FunctionCall, ToolCallFormat
from serve_app.messages import TextChunk
from serve_app.results import Accumulator, ChoiceDelta, ChoiceResult, CompletionResult

USER_HI = [{"role": "user", "content": "hi"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather"}}]
CALLS = (
    '[{"name":"get_weather","parameters":{"city":"Pa\\"ris","days":[1,{"a":2}]}},'
    '{"name":"get_time","parameters":{}}]'
)
HERMES = (
    "Let me check.\n"
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
)


def streamed(tool_format: ToolCallFormat, parts: list[str]) -> tuple[str, list[FunctionCall]]:
    """Content and calls as a client assembles them from a stream of ``parts``."""
    stream = tool_format.stream()
    pieces = [stream.feed(part) for part in parts] + [stream.end()]
    content = "".join(p.content for p in pieces)
    names: dict[int, str] = {}
    arguments: dict[int, str] = {}
    for piece in (call for p in pieces for call in p.calls):
        if piece.name is not None:
            assert piece.index not in names, "a call is announced once"
            names[piece.index] = piece.name
        assert piece.index in names, "arguments come after the call's name"
        arguments[piece.index] = arguments.get(piece.index, "") + piece.arguments
    return content, [FunctionCall(names[i], arguments[i]) for i in sorted(names)]


def splits(text: str) -> list[list[str]]:
    """The text whole, character by character, and in chunks of 3 and 7."""
    return [
        [text],
        list(text),
        *([text[i : i + n] for i in range(0, len(text), n)] for n in (3, 7)),
    ]


# Reading calls


@pytest.mark.parametrize("parts", splits(CALLS))
def test_required_calls_stream_their_arguments_exactly_as_written(parts: list[str]) -> None:
    content, calls = streamed(tool_calls.RequiredCalls(), parts)
    assert content == ""
    assert calls == [
        FunctionCall("get_weather", '{"city":"Pa\\"ris","days":[1,{"a":2}]}'),
        FunctionCall("get_time", "{}"),
    ]
    assert tool_calls.RequiredCalls().extract(CALLS).calls == calls


def test_a_truncated_required_call_keeps_its_partial_arguments() -> None:
    extracted = tool_calls.RequiredCalls().extract('[{"name":"get_weather","parameters":{"ci')
    assert extracted.calls == [FunctionCall("get_weather", '{"ci')]
    assert extracted.content is None


@pytest.mark.parametrize("parts", splits(HERMES))
def test_hermes_calls_are_read_from_any_split_of_the_text(parts: list[str]) -> None:
    content, calls = streamed(tool_calls.HermesToolCalls(), parts)
    assert content == "Let me check.\n"
    assert calls == [
        FunctionCall("get_weather", '{"city": "Oslo"}'),
        FunctionCall("get_time", "{}"),
    ]


@pytest.mark.parametrize(
    "text",
    [
        "No tools needed: 1 < 2.",
        "a <tool_call>not json</tool_call> b",
        'unclosed <tool_call>{"name": "f", "argu',
        "ends with the start of a tag <tool_",
    ],
)
def test_hermes_text_without_a_valid_call_stays_content(text: str) -> None:
    for parts in splits(text):
        assert streamed(tool_calls.HermesToolCalls(), parts) == (text, [])
    assert tool_calls.HermesToolCalls().extract(text) == tool_calls.ExtractedCalls(text, [])


def test_a_hermes_call_cut_short_before_its_closing_tag_is_still_a_call() -> None:
    text = '<tool_call>{"name": "f", "arguments": {"x": 1}}'
    extracted = tool_calls.HermesToolCalls().extract(text)
    assert extracted == tool_calls.ExtractedCalls(None, [FunctionCall("f", '{"x": 1}')])


def test_a_named_call_is_the_whole_text_even_empty() -> None:
    named = tool_calls.NamedFunction("get_weather")
    assert named.extract('{"city":"Oslo"}').calls == [
        FunctionCall("get_weather", '{"city":"Oslo"}')
    ]
    assert named.extract("").calls == [FunctionCall("get_weather", "")]
    assert streamed(named, ['{"ci', 'ty":"Oslo"}'])[1] == named.extract('{"city":"Oslo"}').calls


MISTRAL = 'Checking.[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Oslo"}}, {"name": "get_time", "arguments": {}}]'  # noqa: E501


@pytest.mark.parametrize("parts", splits(MISTRAL))
def test_mistral_calls_are_read_from_any_split_of_the_text(parts: list[str]) -> None:
    content, calls = streamed(tool_calls.MistralToolCalls(), parts)
    assert content == "Checking."
    assert calls == [
        FunctionCall("get_weather", '{"city": "Oslo"}'),
        FunctionCall("get_time", "{}"),
    ]


@pytest.mark.parametrize(
    "text",
    [
        "No tools needed: [1, 2].",
        "[TOOL_CALLS] not json",
        '[TOOL_CALLS][{"name": "f", "argu',
        '[TOOL_CALLS][{"arguments": {}}]',
        "ends with the start of the marker [TOOL_",
    ],
)
def test_mistral_text_without_a_valid_call_array_stays_content(text: str) -> None:
    for parts in splits(text):
        assert streamed(tool_calls.MistralToolCalls(), parts) == (text, [])
    assert tool_calls.MistralToolCalls().extract(text) == tool_calls.ExtractedCalls(text, [])


def test_every_parser_is_registered_under_its_name() -> None:
    assert isinstance(tool_calls.tool_call_parser("hermes"), tool_calls.HermesToolCalls)
    assert isinstance(tool_calls.tool_call_parser("mistral"), tool_calls.MistralToolCalls)


# Rendering


def chat(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "demo", "messages": USER_HI, **fields})


def finished(text: str, finish_reason: str = "stop") -> CompletionResult:
    return CompletionResult([ChoiceResult(text, [1, 2], [], finish_reason)], 3, 2)


def test_a_finished_call_renders_as_tool_calls_with_null_content() -> None:
    response = render.chat_response(
        "chatcmpl-1", "demo", finished('{"city":"Oslo"}'), tool_calls.NamedFunction("get_weather")
    )
    (choice,) = response.choices
    assert choice.finish_reason == "tool_calls"
    body = choice.message.model_dump(mode="json")
    assert body["content"] is None
    (call,) = body["tool_calls"]
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"] == {"name": "get_weather", "arguments": '{"city":"Oslo"}'}


def test_a_call_cut_short_keeps_finish_reason_length() -> None:
    result = finished('{"city":"Os', "length")
    response = render.chat_response("c", "demo", result, tool_calls.NamedFunction("get_weather"))
    assert response.choices[0].finish_reason == "length"


def test_text_without_calls_renders_as_before() -> None:
    response = render.chat_response("c", "demo", finished("Hello"), tool_calls.HermesToolCalls())
    body = response.choices[0].model_dump(mode="json")
    assert body["message"] == {"role": "assistant", "content": "Hello"}  # no tool_calls key
    assert body["finish_reason"] == "stop"


async def deltas_of(parts: list[str]) -> AsyncIterator[ChoiceDelta]:
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        chunk = TextChunk("r", part, [i], finish_reason="stop" if last else None, prompt_tokens=3)
        yield ChoiceDelta(0, chunk)


def stream_events(body: ChatCompletionRequest, parts: list[str]) -> list[dict[str, Any]]:
    async def collect() -> list[dict[str, Any]]:
        chunks = render.chat_chunks(
            body, deltas_of(parts), Accumulator.of(body), body.tool_call_format("hermes")
        )
        return [json.loads(c.model_dump_json()) async for c in chunks]

    return asyncio.run(collect())


def test_streamed_calls_go_out_as_delta_tool_calls_like_openais() -> None:
    body = chat(tools=TOOLS, tool_choice="required", stream=True)
    parts = ['[{"name":"get_wea', 'ther","parameters":{"ci', 'ty":"Oslo"}}]']
    events = stream_events(body, parts)
    deltas = [e["choices"][0]["delta"] for e in events]
    assert deltas[0] == {"role": "assistant", "content": ""}
    calls = [call for d in deltas for call in d.get("tool_calls", [])]
    assert calls[0]["index"] == 0 and calls[0]["id"].startswith("call_")
    assert calls[0]["type"] == "function" and calls[0]["function"]["name"] == "get_weather"
    assert all(set(c) == {"index", "function"} for c in calls[1:])
    assert "".join(c["function"]["arguments"] for c in calls) == '{"city":"Oslo"}'
    assert all(d["content"] is None for d in deltas[1:])
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_auto_streams_content_then_holds_a_call_until_it_is_whole() -> None:
    body = chat(tools=TOOLS, stream=True)
    parts = ["Sure. <tool", '_call>{"name": "get_weather", ', '"arguments": {}}</tool_call>']
    events = stream_events(body, parts)
    deltas = [e["choices"][0]["delta"] for e in events[1:]]
    assert deltas[0] == {"role": None, "content": "Sure. "}  # the possible opener held back
    (call_delta,) = deltas[1]["tool_calls"]
    assert call_delta["function"] == {"name": "get_weather", "arguments": "{}"}
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"
