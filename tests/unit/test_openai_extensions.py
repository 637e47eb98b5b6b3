"""The OpenAI fields clients send and vLLM's extensions: accepted, ignored or applied.

Request models, the text a micro-batch makes of the tokens (special tokens, stop strings and
stop tokens), the chat template's options, and streamed usage on every chunk.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from serve_app.api import render
from serve_app.api.errors import to_api_error
from serve_app.api.openai import ChatCompletionRequest, CompletionRequest
from serve_app.engine import FinishReason, SamplingParams, SequenceOutput
from serve_app.messages import ModelStep, PreparedRequest, TextChunk, TextOptions
from serve_app.micro_batch import MicroBatch
from serve_app.results import Accumulator, ChoiceDelta
from serve_app.text.chat_template import ChatTemplate
from serve_app.text.detokenizer import IncrementalDetokenizer, StopStringMatcher
from serve_app.text.tokenizer import Tokenizer

USER_HI = [{"role": "user", "content": "hi"}]
EOS = "<|endoftext|>"  # the demo tokenizer's special tokens
IM_END = "<|im_end|>"
STOP_TOKEN_ID = 9  # "'" in the demo vocabulary, a plain token

# What clients send beside the fields that shape the output; all are accepted and ignored.
IGNORED_CHAT_FIELDS = {
    "user": "user-1",
    "store": False,
    "metadata": {"team": "eval"},
    "service_tier": "auto",
    "reasoning_effort": "low",
    "modalities": ["text"],
}


def completion(**fields: Any) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "demo", "prompt": "hello", **fields})


def chat(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "demo", "messages": USER_HI, **fields})


# Request models


def test_fields_clients_send_are_accepted_and_change_nothing() -> None:
    plain = chat(temperature=0)
    with_extras = chat(temperature=0, **IGNORED_CHAT_FIELDS)
    assert with_extras.to_sampling_params(16) == plain.to_sampling_params(16)
    assert with_extras.to_text_options() == plain.to_text_options()
    assert set(IGNORED_CHAT_FIELDS) == ChatCompletionRequest.IGNORED_FIELDS
    assert set(ChatCompletionRequest.IGNORED_FIELDS) <= set(ChatCompletionRequest.model_fields)


def test_guidellms_stream_options_are_accepted() -> None:
    options = {"include_usage": True, "continuous_usage_stats": True}
    request = completion(stream=True, stream_options=options, stop=None, ignore_eos=True)
    assert request.include_usage and request.continuous_usage
    # As in vLLM, usage on every chunk only comes with include_usage.
    assert not completion(stream_options={"continuous_usage_stats": True}).continuous_usage


@pytest.mark.parametrize(
    ("build", "field"),
    [(completion, "max_token"), (chat, "parallel_tool_call"), (completion, "store")],
    ids=["misspelt", "chat-misspelt", "chat-only-field-on-completions"],
)
def test_unknown_fields_are_still_a_400_naming_them(build: Any, field: str) -> None:
    with pytest.raises(ValidationError) as raised:
        build(**{field: 1})
    error = to_api_error(raised.value, "req-1")
    assert error.status == 400
    assert error.param == field


def test_audio_output_is_refused_not_ignored() -> None:
    with pytest.raises(ValidationError) as raised:
        chat(modalities=["text", "audio"])
    error = to_api_error(raised.value, "req-1")
    assert (error.status, error.param) == (400, "modalities")


def test_vllm_sampling_extensions_reach_the_engine_and_the_batcher() -> None:
    request = completion(
        stop_token_ids=[5, 7], skip_special_tokens=False, include_stop_str_in_output=True
    )
    assert request.to_sampling_params().stop_token_ids == (5, 7)
    assert request.to_text_options() == TextOptions(
        skip_special_tokens=False, include_stop_str_in_output=True
    )
    options = chat(add_generation_prompt=False, chat_template_kwargs={"x": 1}).to_text_options()
    assert (options.add_generation_prompt, options.chat_template_kwargs) == (False, {"x": 1})
    with pytest.raises(ValidationError):
        completion(stop_token_ids=[-1])


# Detokenizer and stop strings


def test_special_tokens_are_kept_only_when_asked(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(f"Hello{IM_END} world")

    def text(skip: bool) -> str:
        detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip)
        return detokenizer.add(ids) + detokenizer.flush()

    assert text(skip=True) == "Hello world"
    assert text(skip=False) == f"Hello{IM_END} world"


@pytest.mark.parametrize(("include", "expected"), [(False, "one "), (True, "one STOP")])
def test_the_stop_string_is_kept_only_when_asked(include: bool, expected: str) -> None:
    matcher = StopStringMatcher(["STOP"], include_stop=include)
    emitted = [matcher.feed(delta) for delta in ["one S", "TO", "P two"]]
    assert "".join(text for text, _ in emitted) == expected
    assert emitted[-1][1]


# The micro-batch: prompt rendering and the text of stop tokens


@pytest.fixture(scope="module")
def template(model_dir: Path) -> ChatTemplate:
    return ChatTemplate(model_dir)


def prepared(
    text: TextOptions, prompt: str | None = "Once", messages: list[dict[str, str]] | None = None
) -> PreparedRequest:
    params = SamplingParams(stop_token_ids=(STOP_TOKEN_ID,))
    return PreparedRequest("r", params, prompt=prompt, messages=messages, text=text)


def finished_text(batch: MicroBatch, token_ids: list[int], finish: FinishReason) -> str:
    output = SequenceOutput("r", tuple(token_ids), None, finish, 0, len(token_ids))
    batch.on_step(ModelStep([output]))
    (chunk,) = [c for c in batch.collect() if isinstance(c, TextChunk)]
    return chunk.text


@pytest.mark.parametrize(
    ("options", "stop_token_text"),
    [
        (TextOptions(), ""),
        (TextOptions(include_stop_str_in_output=True), ""),  # the special token is still skipped
        (TextOptions(include_stop_str_in_output=True, skip_special_tokens=False), EOS),
        (TextOptions(skip_special_tokens=False), ""),  # a stop token is not text unless asked
    ],
)
def test_the_stop_token_that_ends_a_sequence_is_text_only_when_asked(
    tokenizer: Tokenizer, template: ChatTemplate, options: TextOptions, stop_token_text: str
) -> None:
    words, eos = tokenizer.encode(" upon a time"), tokenizer.encode(EOS)
    batch = MicroBatch([prepared(options)], tokenizer, template)
    batch.collect()
    text = finished_text(batch, words + eos, FinishReason.STOP)
    assert text == " upon a time" + stop_token_text


@pytest.mark.parametrize(
    ("include", "expected"), [(False, " upon a time"), (True, " upon a time'")]
)
def test_a_stop_token_id_ends_the_text_before_it_unless_asked(
    tokenizer: Tokenizer, template: ChatTemplate, include: bool, expected: str
) -> None:
    words = tokenizer.encode(" upon a time")
    options = TextOptions(include_stop_str_in_output=include)
    batch = MicroBatch([prepared(options)], tokenizer, template)
    batch.collect()
    assert finished_text(batch, [*words, STOP_TOKEN_ID], FinishReason.STOP) == expected


def test_a_sequence_cut_by_length_keeps_its_last_tokens_text(
    tokenizer: Tokenizer, template: ChatTemplate
) -> None:
    ids = tokenizer.encode(" upon a time")
    batch = MicroBatch([prepared(TextOptions())], tokenizer, template)
    batch.collect()
    assert finished_text(batch, ids, FinishReason.LENGTH) == " upon a time"


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (TextOptions(), "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"),
        (TextOptions(add_generation_prompt=False), "<|im_start|>user\nhi<|im_end|>\n"),
    ],
)
def test_add_generation_prompt_ends_the_prompt_where_the_reply_begins(
    tokenizer: Tokenizer, template: ChatTemplate, options: TextOptions, expected: str
) -> None:
    batch = MicroBatch([prepared(options, None, USER_HI)], tokenizer, template)
    (runnable,) = batch.runnable
    assert runnable.prompt_token_ids == tokenizer.encode(expected)


def test_chat_template_kwargs_are_template_variables(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text(
        '{"chat_template": "{{ messages[0].content }}{% if shout %}!{% endif %}'
        '{% if add_generation_prompt %}>{% endif %}"}'
    )
    template = ChatTemplate(tmp_path)
    assert template.render(USER_HI) == "hi>"
    assert template.render(USER_HI, variables={"shout": True}) == "hi!>"
    # The messages and add_generation_prompt are the request's, whatever the kwargs say.
    assert template.render(USER_HI, False, {"messages": [], "add_generation_prompt": True}) == "hi"


# Streamed usage on every chunk


async def scripted(deltas: list[ChoiceDelta]) -> AsyncIterator[ChoiceDelta]:
    for delta in deltas:
        yield delta


def two_deltas() -> list[ChoiceDelta]:
    first = TextChunk("r", text="a", token_ids=[1, 2], prompt_tokens=5, completion_tokens=2)
    last = TextChunk("r", text="b", token_ids=[3], prompt_tokens=5, completion_tokens=3)
    last.finish_reason = "length"
    return [ChoiceDelta(0, first), ChoiceDelta(0, last)]


def usages(chunks: list[Any]) -> list[tuple[int, int, int] | None]:
    return [
        None if c.usage is None else (c.usage.prompt_tokens, c.usage.completion_tokens,
                                      c.usage.total_tokens)
        for c in chunks
    ]  # fmt: skip


async def rendered(body: Any, chunks: Any) -> list[Any]:
    return [c async for c in chunks(body, scripted(two_deltas()), Accumulator.of(body))]


@pytest.mark.parametrize("continuous", [True, False])
def test_completion_chunks_carry_the_usage_so_far_when_asked(continuous: bool) -> None:
    options = {"include_usage": True, "continuous_usage_stats": continuous}
    chunks = asyncio.run(rendered(completion(stream_options=options), render.completion_chunks))
    running = [(5, 2, 7), (5, 3, 8)] if continuous else [None, None]
    assert usages(chunks) == [*running, (5, 3, 8)]
    assert chunks[-1].choices == []


@pytest.mark.parametrize("continuous", [True, False])
def test_chat_chunks_carry_the_usage_so_far_from_the_role_chunk_on(continuous: bool) -> None:
    options = {"include_usage": True, "continuous_usage_stats": continuous}
    chunks = asyncio.run(rendered(chat(stream_options=options), render.chat_chunks))
    assert chunks[0].choices[0].delta.role == "assistant"
    running = [(5, 0, 5), (5, 2, 7), (5, 3, 8)] if continuous else [None, None, None]
    assert usages(chunks) == [*running, (5, 3, 8)]
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == "ab"
