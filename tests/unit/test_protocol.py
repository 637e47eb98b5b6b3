"""Unit tests of the request models: what they refuse, and their conversions to engine terms."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from serve_app.api.errors import to_api_error
from serve_app.api.native import InferRequest
from serve_app.api.openai import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    StreamOptions,
)
from serve_app.engine import SamplingParams

USER_HI = [{"role": "user", "content": "hi"}]


def completion(**fields: Any) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "demo", "prompt": "hello", **fields})


def chat(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "demo", "messages": USER_HI, **fields})


def refusal(build: Any, **fields: Any) -> dict[str, Any]:
    """The first error pydantic reports for ``build(**fields)``."""
    with pytest.raises(ValidationError) as raised:
        build(**fields)
    return dict(raised.value.errors()[0])


# Unknown fields


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (completion, "functions"),
        (chat, "functions"),
        (lambda **f: InferRequest.model_validate({"prompt": "x", **f}), "temprature"),
        (lambda **f: ChatMessage.model_validate({"role": "user", "content": "x", **f}), "audio"),
        (lambda **f: StreamOptions.model_validate(f), "include_usages"),
    ],
    ids=["completion", "chat", "infer", "chat-message", "stream-options"],
)
def test_unknown_fields_are_refused_by_name(build: Any, field: str) -> None:
    error = refusal(build, **{field: 1})
    assert error["type"] == "extra_forbidden"
    assert error["loc"] == (field,)


# Bounds


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.1), ("temperature", 2.01), ("top_p", 0), ("top_p", 1.01),
        ("top_k", -1), ("min_p", -0.1), ("min_p", 1.1), ("n", 0), ("n", 17), ("seed", -1),
        ("seed", 2**63), ("presence_penalty", 2.5), ("frequency_penalty", -2.5),
        ("repetition_penalty", 0), ("repetition_penalty", 10.5), ("min_tokens", -1),
        ("max_tokens", -1), ("logprobs", -1), ("logprobs", 6),
    ],
)  # fmt: skip
def test_completion_values_out_of_bounds_are_refused(field: str, value: float) -> None:
    error = refusal(completion, **{field: value})
    assert error["loc"] == (field,)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", 0), ("temperature", 2), ("top_p", 1), ("top_k", 0), ("min_p", 1),
        ("n", 16), ("seed", 0), ("seed", 2**63 - 1), ("presence_penalty", -2),
        ("frequency_penalty", 2), ("repetition_penalty", 10), ("logprobs", 0), ("logprobs", 5),
    ],
)  # fmt: skip
def test_completion_values_at_their_bounds_are_accepted(field: str, value: float) -> None:
    assert getattr(completion(**{field: value}), field) == value


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_tokens", 0), ("max_completion_tokens", 0), ("top_logprobs", 21), ("n", 17)],
)
def test_chat_values_out_of_bounds_are_refused(field: str, value: int) -> None:
    fields: dict[str, Any] = {field: value, "logprobs": True}
    assert refusal(chat, **fields)["loc"] == (field,)


def test_infer_values_out_of_bounds_are_refused() -> None:
    def infer(**fields: Any) -> InferRequest:
        return InferRequest.model_validate({"prompt": "x", **fields})

    assert refusal(infer, prompt="")["loc"] == ("prompt",)
    assert refusal(infer, max_tokens=0)["loc"] == ("max_tokens",)
    assert refusal(infer, stop_words=["a", "b", "c", "d", "e"])["loc"] == ("stop_words",)
    assert "must not be empty" in refusal(infer, stop_words=["a", ""])["msg"]


def test_empty_prompts_and_conversations_are_refused() -> None:
    assert "the prompt list is empty" in refusal(completion, prompt=[])["msg"]
    assert refusal(chat, messages=[])["loc"] == ("messages",)


# Stop strings


def test_up_to_four_stop_strings_are_accepted_as_a_list() -> None:
    assert completion(stop="END").stop_strings == ["END"]
    assert completion(stop=["a", "b", "c", "d"]).stop_strings == ["a", "b", "c", "d"]
    assert completion().stop_strings == []


@pytest.mark.parametrize(
    ("stop", "message"),
    [
        (["a", "b", "c", "d", "e"], "at most 4 stop strings"),
        ("", "must not be empty"),
        (["a", ""], "must not be empty"),
    ],
)
def test_stop_string_rules(stop: Any, message: str) -> None:
    for build in (completion, chat):
        error = refusal(build, stop=stop)
        assert error["loc"] == ("stop",)
        assert message in error["msg"]


# Refusals of what the service does not implement


@pytest.mark.parametrize(
    ("build", "fields", "message"),
    [
        (completion, {"min_tokens": 17, "max_tokens": 16}, "min_tokens: must be <= max_tokens"),
        (completion, {"min_tokens": 20}, "min_tokens: must be <= max_tokens (16)"),
        (chat, {"min_tokens": 6, "max_tokens": 5}, "min_tokens: must be <= max_completion"),
        (chat, {"min_tokens": 6, "max_completion_tokens": 5}, "min_tokens: must be <="),
        (completion, {"logit_bias": {"50256": -100}}, "logit_bias is not supported"),
        (chat, {"logit_bias": {"50256": -100}}, "logit_bias is not supported"),
        (completion, {"echo": True, "max_tokens": 0}, "max_tokens: may be 0 only with echo"),
        (completion, {"suffix": "tail"}, "suffix: not supported"),
        (completion, {"best_of": 3}, "best_of: not supported"),
        (chat, {"tool_choice": "auto"}, "tool_choice: needs tools"),
        (chat, {"response_format": {"type": "json_schema"}}, "json_schema is given exactly when"),
        (chat, {"top_logprobs": 2}, "top_logprobs: requires logprobs"),
        (
            chat,
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "only text content parts are supported",
        ),
        (chat, {"messages": [{"role": "tool", "content": "42"}]}, "names the call in tool_call_id"),
        (chat, {"messages": [{"role": "robot", "content": "42"}]}, "Input should be"),
    ],
)
def test_unsupported_features_are_refused_with_a_reason(
    build: Any, fields: dict[str, Any], message: str
) -> None:
    assert message in refusal(build, **fields)["msg"]


@pytest.mark.parametrize(
    ("build", "fields"),
    [
        (completion, {"min_tokens": 16, "max_tokens": 16}),
        (completion, {"best_of": 2, "n": 2}),
        (completion, {"logit_bias": {}, "echo": False, "suffix": ""}),
        (chat, {"tool_choice": "none", "tools": []}),
        (chat, {"response_format": {"type": "text"}}),
        (chat, {"logprobs": True, "top_logprobs": 20}),
        (chat, {"top_logprobs": 0}),
        (chat, {"min_tokens": 100}),  # no limit: the default stretches to min_tokens
    ],
)
def test_their_harmless_forms_are_accepted(build: Any, fields: dict[str, Any]) -> None:
    build(**fields)


# Conversions to engine sampling parameters


def test_completion_sampling_params_carry_every_field() -> None:
    request = completion(
        max_tokens=40, min_tokens=2, temperature=0.7, top_k=50, top_p=0.9, min_p=0.05,
        repetition_penalty=1.1, presence_penalty=0.5, frequency_penalty=-0.5, seed=11,
        logprobs=3, ignore_eos=True,
    )  # fmt: skip
    assert request.to_sampling_params() == SamplingParams(
        max_tokens=40, min_tokens=2, temperature=0.7, top_k=50, top_p=0.9, min_p=0.05,
        repetition_penalty=1.1, presence_penalty=0.5, frequency_penalty=-0.5, seed=11,
        logprobs=3, ignore_eos=True, fit_to_context=False,
    )  # fmt: skip


def test_completion_defaults_to_sixteen_tokens_and_no_logprobs() -> None:
    params = completion().to_sampling_params()
    assert (params.max_tokens, params.logprobs, params.seed) == (16, None, None)
    assert not params.fit_to_context
    assert completion(logprobs=0).to_sampling_params().logprobs == 0  # the sampled token's only


@pytest.mark.parametrize(
    ("fields", "max_tokens", "fits"),
    [
        ({}, 32, True),
        ({"min_tokens": 50}, 50, True),
        ({"max_tokens": 8}, 8, False),
        ({"max_completion_tokens": 9}, 9, False),
        ({"max_tokens": 8, "max_completion_tokens": 9}, 9, False),
    ],
)
def test_chat_token_limit(fields: dict[str, Any], max_tokens: int, fits: bool) -> None:
    params = chat(**fields).to_sampling_params(default_max_tokens=32)
    assert (params.max_tokens, params.fit_to_context) == (max_tokens, fits)


@pytest.mark.parametrize(
    ("fields", "logprobs"),
    [
        ({}, None),
        ({"logprobs": True}, 0),
        ({"logprobs": True, "top_logprobs": 5}, 5),
        ({"logprobs": False, "top_logprobs": 0}, None),
    ],
)
def test_chat_logprobs_mapping(fields: dict[str, Any], logprobs: int | None) -> None:
    assert chat(**fields).to_sampling_params(32).logprobs == logprobs


def test_chat_sampling_params_carry_the_shared_fields() -> None:
    params = chat(temperature=0, top_k=3, seed=9, ignore_eos=True).to_sampling_params(32)
    assert (params.temperature, params.top_k, params.seed, params.ignore_eos) == (0, 3, 9, True)


def test_chat_text_parts_are_joined_for_the_template() -> None:
    parts = [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "world"}]
    system = {"role": "system", "content": "Be brief."}
    request = chat(messages=[system, {"role": "user", "content": parts}])
    assert request.message_dicts() == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello, world"},
    ]


def test_include_usage_needs_stream_options() -> None:
    assert not completion(stream=True).include_usage
    assert not completion(stream_options={"include_usage": False}).include_usage
    assert chat(stream=True, stream_options={"include_usage": True}).include_usage


# What a rate limit reserves


def test_completion_reserves_each_prompt_and_every_choice_limit() -> None:
    request = completion(prompt=["12345678", "1234"], max_tokens=10, n=3)
    # ~4 characters a token, plus one: 3 + 2 for the prompts; 10 tokens x 3 choices x 2 prompts.
    assert request.reserved_tokens(default_max_tokens=999) == 3 + 2 + 60


def test_chat_reserves_the_messages_and_its_limit_or_the_default() -> None:
    messages = [{"role": "system", "content": "1234"}, {"role": "user", "content": "12345678"}]
    assert chat(messages=messages, n=2).reserved_tokens(default_max_tokens=100) == 2 + 3 + 200
    assert chat(messages=messages, max_tokens=7).reserved_tokens(100) == 5 + 7
    assert chat(messages=messages, max_completion_tokens=9).reserved_tokens(100) == 5 + 9


# The native API


def test_infer_request_becomes_the_same_completion() -> None:
    native = InferRequest(
        prompt="Once", max_tokens=12, temperature=0.5, top_p=0.8, stop_words=["."], seed=4,
        user_id="u1", session_id="s1",
    )  # fmt: skip
    request = native.to_completion_request("demo")
    assert isinstance(request, CompletionRequest)
    assert (request.model, request.prompts, request.max_tokens) == ("demo", ["Once"], 12)
    assert (request.temperature, request.top_p, request.seed) == (0.5, 0.8, 4)
    assert (request.stop_strings, request.user, request.n) == (["."], "u1", 1)


def test_infer_defaults_are_greedy_and_without_stops() -> None:
    request = InferRequest(prompt="Once").to_completion_request("demo")
    assert request.stop is None
    params = request.to_sampling_params()
    assert (params.max_tokens, params.temperature, params.top_p) == (64, 0.0, 1.0)


@pytest.mark.parametrize(
    ("build", "fields", "param"),
    [
        (completion, {"prompt": "a\ud800"}, "prompt"),
        (completion, {"prompt": ["fine", "\udfff"]}, "prompt.1"),
        (completion, {"stop": ["\ud800"]}, "stop.0"),
        (chat, {"messages": [{"role": "user", "content": "x\ud800"}]}, "messages.0.content"),
    ],
)
def test_text_that_is_not_valid_unicode_is_a_400_naming_the_field(
    build: Any, fields: dict[str, Any], param: str
) -> None:
    with pytest.raises(ValidationError) as raised:
        build(**fields)
    error = to_api_error(raised.value, "r")
    assert (error.status, error.param) == (400, param)
    assert "lone surrogate" in error.message
