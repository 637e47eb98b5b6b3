"""Unit tests of structured-output and tool fields on the request models: what they compile to,
what they refuse (a 400 naming the exact parameter), and what reaches the chat template."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from serve_app.api import tool_calls
from serve_app.api.errors import ApiError, to_api_error
from serve_app.api.native import InferRequest
from serve_app.api.openai import ChatCompletionRequest, CompletionRequest
from serve_app.config import AppArgs
from serve_app.engine.structured import StructuredOutput
from serve_app.text.chat_template import ChatTemplate
from tests.unit.test_chat_template import QWEN2_TOOLS, model_folder, transformers_render

USER_HI = [{"role": "user", "content": "hi"}]
CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": CITY}},
    {"type": "function", "function": {"name": "get_time"}},
]


def completion(**fields: Any) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "demo", "prompt": "hello", **fields})


def chat(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "demo", "messages": USER_HI, **fields})


def infer(**fields: Any) -> InferRequest:
    return InferRequest.model_validate(fields)


def refusal(build: Any, **fields: Any) -> ApiError:
    """The API error a request built from ``fields`` is answered with."""
    with pytest.raises(ValidationError) as raised:
        build(**fields)
    return to_api_error(raised.value, "test")


# What each field compiles to


@pytest.mark.parametrize("build", [completion, chat])
@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "c", "schema": CITY},
                }
            },
            StructuredOutput("json_schema", json.dumps(CITY)),
        ),
        ({"response_format": {"type": "json_object"}}, StructuredOutput("json_object")),
        ({"response_format": {"type": "text"}}, None),
        (
            {"structured_outputs": {"json": json.dumps(CITY)}},
            StructuredOutput("json_schema", json.dumps(CITY)),
        ),
        ({"structured_outputs": {"regex": "[a-z]+"}}, StructuredOutput("regex", "[a-z]+")),
        (
            {"structured_outputs": {"choice": ["yes", "no"]}},
            StructuredOutput("choice", '["yes", "no"]'),
        ),
        ({"structured_outputs": {"json_object": True}}, StructuredOutput("json_object")),
        ({"guided_json": CITY}, StructuredOutput("json_schema", json.dumps(CITY))),
        ({"guided_regex": r"\d{3}"}, StructuredOutput("regex", r"\d{3}")),
        ({"guided_choice": ["a", "b"]}, StructuredOutput("choice", '["a", "b"]')),
        ({"guided_grammar": 'start: "x" | "y"'}, StructuredOutput("grammar", 'start: "x" | "y"')),
    ],
)
def test_each_constraint_field_reaches_the_sampling_params(
    build: Any, fields: dict[str, Any], expected: StructuredOutput | None
) -> None:
    request = build(**fields)
    params = request.to_sampling_params() if build is completion else request.to_sampling_params(16)
    assert params.structured == expected


def test_a_schema_keeps_its_property_order_which_is_the_generation_order() -> None:
    schema = {"type": "object", "properties": {"z": {"type": "integer"}, "a": {"type": "string"}}}
    spec = completion(guided_json=schema).structured
    assert spec is not None and list(json.loads(spec.spec)["properties"]) == ["z", "a"]


def test_a_request_survives_the_handles_revalidation_with_its_constraint() -> None:
    fields = {
        "response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": CITY}}
    }
    request = chat(**fields)
    again = ChatCompletionRequest.model_validate(request.model_dump(exclude_unset=True))
    assert again.structured == request.structured is not None


# Refusals name the exact parameter


@pytest.mark.parametrize(
    ("build", "fields", "param"),
    [
        (
            chat,
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "c", "schema": {"type": "nope"}},
                }
            },
            "response_format.json_schema.schema",
        ),
        (completion, {"guided_regex": "[a-"}, "guided_regex"),
        (completion, {"guided_json": '{"type": "object"'}, "guided_json"),
        (completion, {"guided_grammar": "start: undefined_rule"}, "guided_grammar"),
        (chat, {"guided_choice": []}, "guided_choice"),
        (chat, {"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs.regex"),
        (chat, {"structured_outputs": {"json": {"type": 3}}}, "structured_outputs.json"),
        (chat, {"structured_outputs": {}}, "structured_outputs"),
        (chat, {"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
        (completion, {"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
        (chat, {"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex"),
        (
            chat,
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
        (chat, {"tool_choice": "required"}, "tool_choice"),
        (
            chat,
            {
                "tools": [
                    {"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}
                ],
                "tool_choice": "required",
            },
            "tools.0.function.parameters",
        ),
        (
            chat,
            {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
            "response_format",
        ),
        (
            infer,
            {"prompt": "a", "json_schema": {"type": "nope"}},
            "json_schema",
        ),
    ],
)
def test_an_invalid_constraint_is_a_400_naming_its_parameter(
    build: Any, fields: dict[str, Any], param: str
) -> None:
    error = refusal(build, **fields)
    assert (error.status, error.param) == (400, param)
    assert error.message.startswith(f"{param}: ")


# Tools


def test_a_named_tool_choice_constrains_the_output_to_its_arguments() -> None:
    request = chat(
        tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}}
    )
    assert request.structured == StructuredOutput("json_schema", json.dumps(CITY))
    tool_format = request.tool_call_format("hermes")
    assert isinstance(tool_format, tool_calls.NamedFunction) and tool_format.name == "get_weather"


@pytest.mark.parametrize(("parallel", "max_items"), [(None, None), (True, None), (False, 1)])
def test_required_constrains_the_output_to_calls_of_the_tools(
    parallel: bool | None, max_items: int | None
) -> None:
    request = chat(tools=TOOLS, tool_choice="required", parallel_tool_calls=parallel)
    assert request.structured is not None
    schema = json.loads(request.structured.spec)
    assert schema["minItems"] == 1 and schema.get("maxItems") == max_items
    variants = schema["items"]["anyOf"]
    assert [v["properties"]["name"] for v in variants] == [
        {"const": "get_weather"},
        {"const": "get_time"},
    ]
    assert variants[1]["properties"]["parameters"] == tool_calls.EMPTY_PARAMETERS
    assert isinstance(request.tool_call_format("hermes"), tool_calls.RequiredCalls)


def test_tools_default_to_auto_parsed_with_the_models_parser_and_none_leaves_text() -> None:
    assert isinstance(chat(tools=TOOLS).tool_call_format("hermes"), tool_calls.HermesToolCalls)
    assert chat(tools=TOOLS).structured is None
    assert chat(tools=TOOLS, tool_choice="none").tool_call_format("hermes") is None
    assert chat().tool_call_format("hermes") is None


def test_required_tools_with_shared_definitions_resolve_their_references() -> None:
    with_defs = {
        "type": "object",
        "properties": {"unit": {"$ref": "#/$defs/unit"}},
        "$defs": {"unit": {"enum": ["C", "F"]}},
    }
    tools = [{"type": "function", "function": {"name": "temp", "parameters": with_defs}}]
    request = chat(tools=tools, tool_choice="required")
    assert request.structured is not None
    assert json.loads(request.structured.spec)["$defs"] == {"unit": {"enum": ["C", "F"]}}


def test_a_tool_round_trip_reaches_the_chat_template() -> None:
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
    }
    messages = [
        *USER_HI,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "-3 C", "tool_call_id": "call_1"},
    ]
    request = chat(messages=messages, tools=TOOLS)
    rendered = request.message_dicts()
    assert rendered[1] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Oslo"}},
            }
        ],
    }
    assert rendered[2] == {"role": "tool", "content": "-3 C", "tool_call_id": "call_1"}
    assert request.to_text_options().tools == [
        {"type": "function", "function": {"name": "get_weather", "parameters": CITY}},
        {"type": "function", "function": {"name": "get_time"}},
    ]


def test_constraints_and_tools_are_part_of_the_cache_key() -> None:
    fields = {"temperature": 0}
    plain = chat(**fields).model_dump()
    constrained = chat(guided_regex="[a-z]+", **fields).model_dump()
    other = chat(guided_regex="[0-9]+", **fields).model_dump()
    with_tools = chat(tools=TOOLS, tool_choice="required", **fields).model_dump()
    keys = [json.dumps(d, sort_keys=True) for d in (plain, constrained, other, with_tools)]
    assert len(set(keys)) == 4
    assert "parallel_tool_calls" not in ChatCompletionRequest.IGNORED_FIELDS


def test_a_wire_tool_round_trip_renders_like_transformers_given_the_same_chat(
    tmp_path: Path,
) -> None:
    call = {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
    wire = [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "function": call}]},
        {"role": "tool", "tool_call_id": "c1", "content": "-3 C"},
    ]
    request = chat(messages=wire, tools=TOOLS)
    folder = model_folder(tmp_path, QWEN2_TOOLS, jinja_file=True)
    rendered = ChatTemplate(folder).render(
        request.message_dicts(), tools=request.to_text_options().tools
    )
    as_transformers_takes_it = [
        wire[0],
        {
            "role": "assistant",
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Oslo"}},
                }
            ],
        },
        wire[2],
    ]
    expected = transformers_render(folder, as_transformers_takes_it, tools=TOOLS)
    assert rendered == expected
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}' in rendered


def test_the_tool_call_parser_option_names_a_registered_parser() -> None:
    assert AppArgs().tool_call_parser == "hermes"
    with pytest.raises(ValidationError, match="unknown tool call parser"):
        AppArgs(tool_call_parser="nope")


def test_a_model_entry_may_name_its_own_tool_call_parser() -> None:
    args = AppArgs.model_validate(
        {"models": [{"name": "a", "tool_call_parser": "mistral"}, {"name": "b"}]}
    )
    assert [entry.tool_call_parser for entry in args.model_entries()] == ["mistral", None]
    with pytest.raises(ValidationError, match="unknown tool call parser"):
        AppArgs.model_validate({"models": [{"name": "a", "tool_call_parser": "nope"}]})
