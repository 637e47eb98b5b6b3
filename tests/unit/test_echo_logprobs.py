"""Completions' ``echo``, ``logprobs`` over the prompt and vLLM's ``prompt_logprobs``: request
rules, accumulation, and the response shapes of OpenAI's legacy completions and vLLM."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pydantic import ValidationError

from serve_app.api import render
from serve_app.api.openai import CompletionRequest
from serve_app.api.openai_responses import CompletionResponse
from serve_app.messages import PromptToken, TextChunk, TokenText
from serve_app.results import Accumulator, ChoiceDelta

# "The cat sat" scored: ids 10, 11, 12; each later position has two alternatives.
PROMPT = [
    PromptToken(10, "The", None, None, []),
    PromptToken(11, " cat", -3.0, 4, [(20, " dog", -1.0), (21, " man", -2.0)]),
    PromptToken(12, " sat", -0.5, 1, [(12, " sat", -0.5), (22, " ran", -1.5)]),
]
GENERATED = [TokenText(" down", -0.25, [(" down", -0.25)])]


def completion(**fields: Any) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "demo", "prompt": "The cat sat", **fields})


def answer(request: CompletionRequest, chunks: list[TextChunk]) -> dict[str, Any]:
    accumulator = Accumulator.of(request)
    for chunk in chunks:
        accumulator.add(ChoiceDelta(0, chunk))
    response = render.completion_response("cmpl-1", "demo", accumulator.result())
    dumped: dict[str, Any] = response.model_dump(mode="json")
    return dumped


def scored_chunk(generated: list[TokenText] | None = None) -> TextChunk:
    """The one chunk of a request the engine scored (and, with ``generated``, continued)."""
    return TextChunk(
        "r-0",
        text="".join(t.text for t in generated or []),
        token_ids=[30] * len(generated or []),
        logprobs=generated,
        finish_reason="length",
        prompt_tokens=3,
        completion_tokens=len(generated or []),
        prompt_logprobs=PROMPT,
    )


# Requests


def test_max_tokens_zero_needs_echo_with_logprobs_or_prompt_logprobs() -> None:
    assert completion(max_tokens=0, echo=True, logprobs=1).max_tokens == 0
    assert completion(max_tokens=0, prompt_logprobs=0).max_tokens == 0
    refused: list[dict[str, Any]] = [{}, {"echo": True}, {"logprobs": 1}]
    for fields in refused:
        with pytest.raises(ValidationError, match="max_tokens: may be 0 only with echo"):
            completion(max_tokens=0, **fields)


def test_the_engine_scores_the_prompt_as_much_as_any_part_asks() -> None:
    assert completion(echo=True).to_sampling_params().prompt_logprobs is None
    assert completion(logprobs=2).to_sampling_params().prompt_logprobs is None
    assert completion(echo=True, logprobs=2).to_sampling_params().prompt_logprobs == 2
    assert (
        completion(prompt_logprobs=5, echo=True, logprobs=1).to_sampling_params().prompt_logprobs
        == 5
    )
    # An echoed tokenized prompt needs its tokens' texts, which come with their scores.
    assert completion(prompt=[1, 2], echo=True).to_sampling_params().prompt_logprobs == 0


def test_prompts_may_be_token_ids() -> None:
    assert completion(prompt=[5, 6, 7]).prompts == [[5, 6, 7]]
    assert completion(prompt=[[5, 6], [7]]).prompts == [[5, 6], [7]]
    assert completion(prompt=["a", "b"]).prompts == ["a", "b"]
    with pytest.raises(ValidationError):
        completion(prompt=[[5], []])


# Finished responses


def test_echo_with_logprobs_and_no_tokens_is_the_scored_prompt() -> None:
    """OpenAI's legacy shape (and vLLM's): the prompt's tokens, the first with null logprob
    and null alternatives; alternatives include the prompt token itself."""
    (choice,) = answer(completion(echo=True, logprobs=1, max_tokens=0), [scored_chunk()])["choices"]
    assert choice["text"] == "The cat sat"
    assert choice["finish_reason"] == "length"
    assert choice["logprobs"] == {
        "tokens": ["The", " cat", " sat"],
        "token_logprobs": [None, -3.0, -0.5],
        "top_logprobs": [None, {" dog": -1.0, " cat": -3.0}, {" sat": -0.5}],
        "text_offset": [0, 3, 7],
    }
    assert choice["prompt_logprobs"] is None, "vLLM's field only when asked for"


def test_echo_with_logprobs_then_the_completion() -> None:
    request = completion(echo=True, logprobs=1, max_tokens=1)
    (choice,) = answer(request, [scored_chunk(GENERATED)])["choices"]
    assert choice["text"] == "The cat sat down"
    logprobs = choice["logprobs"]
    assert logprobs["tokens"] == ["The", " cat", " sat", " down"]
    assert logprobs["token_logprobs"] == [None, -3.0, -0.5, -0.25]
    assert logprobs["top_logprobs"][-1] == {" down": -0.25}
    assert logprobs["text_offset"] == [0, 3, 7, 11]
    assert choice["logprobs"]["text_offset"][-1] == choice["text"].index(" down")


def test_echo_without_logprobs_only_prepends_the_prompt() -> None:
    unscored = TextChunk("r-0", " down", [30], None, "length", 3, 1)
    (choice,) = answer(completion(echo=True), [unscored])["choices"]
    assert choice["text"] == "The cat sat down"
    assert choice["logprobs"] is None


def test_an_echoed_tokenized_prompt_is_its_tokens_texts() -> None:
    request = completion(prompt=[10, 11, 12], echo=True, max_tokens=1)
    (choice,) = answer(request, [scored_chunk(GENERATED)])["choices"]
    assert choice["text"] == "The cat sat down"


def test_prompt_logprobs_in_vllm_shape() -> None:
    request = completion(prompt_logprobs=1, max_tokens=0)
    (choice,) = answer(request, [scored_chunk()])["choices"]
    assert choice["text"] == ""
    assert choice["logprobs"] is None
    assert choice["prompt_logprobs"] == [
        None,
        {
            "20": {"logprob": -1.0, "rank": 1, "decoded_token": " dog"},
            "11": {"logprob": -3.0, "rank": 4, "decoded_token": " cat"},
        },
        {"12": {"logprob": -0.5, "rank": 1, "decoded_token": " sat"}},
    ]


def test_echo_and_prompt_logprobs_each_get_their_own_number_of_alternatives() -> None:
    request = completion(echo=True, logprobs=0, prompt_logprobs=2, max_tokens=0)
    (choice,) = answer(request, [scored_chunk()])["choices"]
    assert choice["logprobs"]["top_logprobs"] == [None, {" cat": -3.0}, {" sat": -0.5}]
    assert set(choice["prompt_logprobs"][1]) == {"20", "21", "11"}


# Streams


async def stream(request: CompletionRequest, chunks: list[TextChunk]) -> list[CompletionResponse]:
    async def deltas() -> AsyncIterator[ChoiceDelta]:
        for chunk in chunks:
            yield ChoiceDelta(0, chunk)

    rendered = render.completion_chunks(request, deltas(), Accumulator.of(request))
    return [chunk async for chunk in rendered]


def test_a_stream_echoes_the_prompt_in_its_first_chunk_and_offsets_continue() -> None:
    first = TextChunk("r-0", prompt_tokens=3, prompt_logprobs=PROMPT)
    second = TextChunk("r-0", " down", [30], GENERATED, "length", 3, 1)
    request = completion(echo=True, logprobs=1, max_tokens=1, stream=True)
    chunks = asyncio.run(stream(request, [first, second]))
    texts = [c.choices[0].text for c in chunks]
    assert "".join(texts) == "The cat sat down"
    assert texts[0] == "The cat sat"
    opening, closing = chunks[0].choices[0].logprobs, chunks[1].choices[0].logprobs
    assert opening is not None and closing is not None
    assert opening.token_logprobs == [None, -3.0, -0.5]
    assert closing.tokens == [" down"] and closing.text_offset == [11]
