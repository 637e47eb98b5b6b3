"""Unit tests of rendering: finished results and streamed deltas as OpenAI responses (the native
API's are in test_native_api.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

import pytest

from serve_app.api import render
from serve_app.api.openai import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    StreamOptions,
)
from serve_app.api.openai_responses import Usage
from serve_app.messages import TextChunk, TokenText
from serve_app.results import Accumulator, ChoiceDelta, ChoiceResult, CompletionResult

T = TypeVar("T")

HELLO = [  # "Hello world" in three tokens, with the alternatives the engine considered
    TokenText("He", -0.1, [("He", -0.1), ("Hi", -2.5)]),
    TokenText("llo", -0.2, [("llo", -0.2)]),
    TokenText(" world", -0.3, [(" world", -0.3), (" there", -1.7)]),
]


def run(scenario: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(scenario)


async def from_list(deltas: list[ChoiceDelta]) -> AsyncIterator[ChoiceDelta]:
    for delta in deltas:
        yield delta


async def collect(chunks: AsyncIterator[T]) -> list[T]:
    return [chunk async for chunk in chunks]


def result(*texts: str, logprobs: list[TokenText] | None = None) -> CompletionResult:
    choices = [ChoiceResult(text, [1] * len(text), list(logprobs or []), "stop") for text in texts]
    return CompletionResult(choices, prompt_tokens=4, completion_tokens=sum(map(len, texts)))


# Finished responses


def test_completion_logprobs_offset_each_token_by_the_text_before_it() -> None:
    response = render.completion_response("cmpl-1", "demo", result("Hello world", logprobs=HELLO))
    (choice,) = response.choices
    assert choice.logprobs is not None
    assert choice.logprobs.tokens == ["He", "llo", " world"]
    assert choice.logprobs.text_offset == [0, 2, 5]
    assert choice.logprobs.token_logprobs == [-0.1, -0.2, -0.3]
    assert choice.logprobs.top_logprobs[0] == {"He": -0.1, "Hi": -2.5}
    assert (choice.text, choice.finish_reason) == ("Hello world", "stop")


def test_a_finished_completion_lists_its_choices_and_usage() -> None:
    response = render.completion_response("cmpl-1", "demo", result("ab", "cde"))
    assert [(c.index, c.text, c.logprobs) for c in response.choices] == [
        (0, "ab", None),
        (1, "cde", None),
    ]
    assert response.usage == Usage(prompt_tokens=4, completion_tokens=5, total_tokens=9)
    assert (response.id, response.model, response.object) == ("cmpl-1", "demo", "text_completion")


def test_chat_logprobs_carry_each_tokens_utf8_bytes() -> None:
    tokens = [TokenText("caf", -0.5, [("caf", -0.5)]), TokenText("é", -0.25, [("é", -0.25)])]
    response = render.chat_response("chatcmpl-1", "demo", result("café", logprobs=tokens))
    (choice,) = response.choices
    assert choice.message.role == "assistant" and choice.message.content == "café"
    assert choice.logprobs is not None
    accented = choice.logprobs.content[1]
    assert (accented.token, accented.logprob, accented.bytes) == ("é", -0.25, [0xC3, 0xA9])
    assert accented.top_logprobs[0].bytes == [0xC3, 0xA9]
    assert choice.logprobs.content[0].bytes == list(b"caf")
    assert response.usage.total_tokens == 4 + 4


def test_a_chat_response_without_logprobs_has_none() -> None:
    (choice,) = render.chat_response("chatcmpl-1", "demo", result("hi")).choices
    assert choice.logprobs is None


# Streamed chunks


def test_the_chat_role_chunk_opens_every_choice() -> None:
    chunk = render.chat_role_chunk("chatcmpl-1", "demo", n=3)
    assert [(c.index, c.delta.role, c.delta.content) for c in chunk.choices] == [
        (0, "assistant", ""),
        (1, "assistant", ""),
        (2, "assistant", ""),
    ]
    assert chunk.object == "chat.completion.chunk"


def deltas_of_two_choices() -> list[ChoiceDelta]:
    """Two choices of one prompt, interleaved; like the batcher's, every chunk carries the prompt's
    token count."""
    return [
        ChoiceDelta(0, TextChunk("r-0", text="He", token_ids=[1], prompt_tokens=3)),
        ChoiceDelta(1, TextChunk("r-1", text="Yo", token_ids=[7, 8], prompt_tokens=3)),
        ChoiceDelta(
            0, TextChunk("r-0", text="y", token_ids=[2], finish_reason="length", prompt_tokens=3)
        ),
        ChoiceDelta(
            1, TextChunk("r-1", text="", token_ids=[], finish_reason="stop", prompt_tokens=3)
        ),
    ]


@pytest.mark.parametrize("include_usage", [True, False])
def test_completion_chunks_end_with_usage_when_asked(include_usage: bool) -> None:
    options = StreamOptions(include_usage=include_usage)
    body = CompletionRequest(model="demo", prompt="x", n=2, stream=True, stream_options=options)
    accumulator = Accumulator.of(body)
    chunks = run(
        collect(render.completion_chunks(body, from_list(deltas_of_two_choices()), accumulator))
    )

    content = chunks[:4]
    assert [(c.choices[0].index, c.choices[0].text) for c in content] == [
        (0, "He"), (1, "Yo"), (0, "y"), (1, ""),
    ]  # fmt: skip
    assert [c.choices[0].finish_reason for c in content] == [None, None, "length", "stop"]
    assert all(c.usage is None for c in content)
    assert len({c.id for c in chunks}) == 1  # one response id for the whole stream
    if include_usage:
        (last,) = chunks[4:]
        assert last.choices == []
        # The prompt counts once for both of its choices.
        assert last.usage == Usage(prompt_tokens=3, completion_tokens=4, total_tokens=7)
    else:
        assert len(chunks) == 4
    assert accumulator.result().usage.total_tokens == 7  # what the ingress settles afterwards


def test_chat_chunks_open_with_the_role_and_end_with_usage() -> None:
    body = ChatCompletionRequest(
        model="demo",
        messages=[ChatMessage(role="user", content="hi")],
        n=2,
        stream=True,
        stream_options=StreamOptions(include_usage=True),
    )
    chunks = run(
        collect(render.chat_chunks(body, from_list(deltas_of_two_choices()), Accumulator.of(body)))
    )
    assert [c.delta.role for c in chunks[0].choices] == ["assistant", "assistant"]
    assert [c.choices[0].delta.content for c in chunks[1:5]] == ["He", "Yo", "y", ""]
    assert all(c.choices[0].delta.role is None for c in chunks[1:5])
    assert chunks[5].choices == [] and chunks[5].usage is not None
    assert chunks[5].usage.total_tokens == 7
    assert len(chunks) == 6


def test_a_chat_chunk_carries_its_tokens_logprobs() -> None:
    delta = ChoiceDelta(0, TextChunk("r-0", text="He", token_ids=[1], logprobs=HELLO[:1]))
    chunk = render.chat_chunk("chatcmpl-1", "demo", delta)
    (choice,) = chunk.choices
    assert choice.logprobs is not None
    assert [t.token for t in choice.logprobs.content] == ["He"]
    assert [t.token for t in choice.logprobs.content[0].top_logprobs] == ["He", "Hi"]


def test_streamed_logprob_offsets_continue_across_chunks() -> None:
    body = CompletionRequest(model="demo", prompt="x", logprobs=1, stream=True)
    deltas = [
        ChoiceDelta(0, TextChunk("r-0", text="Hello", token_ids=[1, 2], logprobs=HELLO[:2])),
        ChoiceDelta(0, TextChunk("r-0", text=" world", token_ids=[3], logprobs=HELLO[2:])),
    ]
    chunks = run(collect(render.completion_chunks(body, from_list(deltas), Accumulator.of(body))))
    logprobs = [c.choices[0].logprobs for c in chunks]
    assert logprobs[0] is not None and logprobs[1] is not None
    assert logprobs[0].text_offset + logprobs[1].text_offset == [0, 2, 5]
