"""Chat templates of real model families render exactly as transformers' apply_chat_template.

Each template is written out here as its model ships it (trimmed where noted), saved into a model
folder the way that model's tools save it, and rendered both by `ChatTemplate` and by
transformers' own `apply_chat_template` on a tokenizer loaded from the same folder (the demo
model's tokenizer.json; no hub access).
"""

from __future__ import annotations

import json
import shutil
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import pytest
from transformers import PreTrainedTokenizerFast

from serve_app.text.chat_template import ChatTemplate, ChatTemplateError

# meta-llama/Meta-Llama-3-8B-Instruct, verbatim.
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim "
    "+ '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Qwen/Qwen2.5-7B-Instruct's tool template, plus the reversed search for the last user turn
# with `{% break %}` that Qwen3-style templates use to show only the latest reasoning.
QWEN2_TOOLS = """\
{%- set ns = namespace(last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- if message.role == "user" %}
        {%- set ns.last_query_index = messages|length - 1 - loop.index0 %}
        {%- break %}
    {%- endif %}
{%- endfor %}
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\
\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and \
arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \
\\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful \
assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or \
(message.role == "assistant" and not message.tool_calls) %}
        {%- set reasoning = message.reasoning_content if message.reasoning_content is defined \
and loop.index0 > ns.last_query_index else '' %}
        {%- if reasoning %}
            {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning + '\\n</think>\\n\\n' \
+ message.content + '<|im_end|>' + '\\n' }}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
        {%- endif %}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""

# google/gemma-2-2b-it, verbatim.
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}"
    "{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

# meta-llama/Llama-3.2-1B-Instruct, with its custom-tools branch trimmed.
LLAMA32 = """\
{{- bos_token }}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ \
message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

CHAT = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "  What is a <list> in Python? \u00e9\u00e8  "},
    {"role": "assistant", "content": "A mutable sequence."},
    {"role": "user", "content": "And a tuple?"},
]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": 'Weather for a city, e.g. <Z\u00fcrich> & "Paris"',
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
TOOL_CHAT = [
    {"role": "user", "content": "Weather in Z\u00fcrich?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Z\u00fcrich"}},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "12 C & <sunny>"},
    {"role": "tool", "tool_call_id": "call_1", "content": "wind 3 m/s"},
    {"role": "assistant", "content": "12 C and sunny.", "reasoning_content": "Easy."},
    {"role": "user", "content": "Thanks"},
    {"role": "assistant", "content": "You're welcome.", "reasoning_content": "Be polite."},
]


def model_folder(
    path: Path, template: str | list[dict[str, str]] | None, *, jinja_file: bool = False
) -> Path:
    """The demo tokenizer with `template` in tokenizer_config.json, or in chat_template.jinja
    as Optimum and recent transformers save it."""
    path.mkdir(parents=True, exist_ok=True)
    demo = Path(__file__).resolve().parents[2] / "models" / "demo"
    shutil.copyfile(demo / "tokenizer.json", path / "tokenizer.json")
    config = json.loads((demo / "tokenizer_config.json").read_text())
    config.pop("chat_template")
    if jinja_file:
        assert isinstance(template, str)
        (path / "chat_template.jinja").write_text(template)
    elif template is not None:
        config["chat_template"] = template
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def transformers_render(folder: Path, messages: list[dict[str, Any]], **kwargs: Any) -> str:
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    rendered = tokenizer.apply_chat_template(
        messages,
        tokenize=False,
        add_generation_prompt=kwargs.pop("add_generation_prompt", True),
        **kwargs,
    )
    assert isinstance(rendered, str)
    return rendered


def test_llama3_renders_like_transformers(tmp_path: Path) -> None:
    folder = model_folder(tmp_path, LLAMA3)
    template = ChatTemplate(folder)
    assert template.render(CHAT) == transformers_render(folder, CHAT)
    assert template.render(CHAT, add_generation_prompt=False) == transformers_render(
        folder, CHAT, add_generation_prompt=False
    )
    assert template.render(CHAT).startswith("<|endoftext|><|start_header_id|>system")


def test_qwen2_tools_template_from_chat_template_jinja_renders_like_transformers(
    tmp_path: Path,
) -> None:
    folder = model_folder(tmp_path, QWEN2_TOOLS, jinja_file=True)
    template = ChatTemplate(folder)

    with_tools = template.render(TOOL_CHAT, tools=TOOLS)
    assert with_tools == transformers_render(folder, TOOL_CHAT, tools=TOOLS)
    # tojson as transformers': no HTML escaping, no ASCII escaping.
    assert '"Weather for a city, e.g. <Z\u00fcrich> & \\"Paris\\""' in with_tools
    assert '"arguments": {"city": "Z\u00fcrich"}' in with_tools
    # {% break %} stopped at the last user turn: only the reasoning after it is shown.
    assert "<think>\nBe polite.\n</think>" in with_tools and "Easy." not in with_tools

    assert template.render(CHAT) == transformers_render(folder, CHAT)
    variables = {"enable_thinking": False}
    assert template.render(CHAT, True, variables) == transformers_render(
        folder, CHAT, enable_thinking=False
    )


def test_gemma_raise_exception_is_a_value_error_and_valid_chats_render_like_transformers(
    tmp_path: Path,
) -> None:
    folder = model_folder(tmp_path, GEMMA)
    template = ChatTemplate(folder)

    with pytest.raises(ValueError, match="System role not supported"):
        template.render(CHAT)
    with pytest.raises(jinja2.TemplateError, match="System role not supported"):
        transformers_render(folder, CHAT)
    with pytest.raises(ValueError, match="roles must alternate"):
        template.render([CHAT[1], CHAT[1]])
    assert template.render(CHAT[1:]) == transformers_render(folder, CHAT[1:])


def test_strftime_now_renders_todays_date_like_transformers(tmp_path: Path) -> None:
    folder = model_folder(tmp_path, LLAMA32)
    template = ChatTemplate(folder)
    for _ in range(2):  # once more if the date turned between the two renders
        today = datetime.now().strftime("%d %b %Y")
        ours, theirs = template.render(CHAT), transformers_render(folder, CHAT)
        if datetime.now().strftime("%d %b %Y") == today:
            break
    assert ours == theirs
    assert f"Today Date: {today}\n" in ours
    # A date given by the caller wins, as in transformers.
    fixed = {"date_string": "01 Jan 2030"}
    assert template.render(CHAT, True, fixed) == transformers_render(folder, CHAT, **fixed)
    assert "Today Date: 01 Jan 2030" in template.render(CHAT, True, fixed)


def test_named_templates_use_default_and_tool_use_like_transformers(tmp_path: Path) -> None:
    named = [
        {"name": "default", "template": LLAMA3},
        {"name": "tool_use", "template": QWEN2_TOOLS},
    ]
    folder = model_folder(tmp_path, named)
    template = ChatTemplate(folder)
    assert template.names == ["default", "tool_use"]
    assert template.render(CHAT) == transformers_render(folder, CHAT)
    assert template.render(TOOL_CHAT, tools=TOOLS) == transformers_render(
        folder, TOOL_CHAT, tools=TOOLS
    )
    assert "<tools>" in template.render(TOOL_CHAT, tools=TOOLS)


def test_a_template_that_does_not_compile_fails_at_load_naming_the_file(tmp_path: Path) -> None:
    folder = model_folder(tmp_path, "{% for m in messages %}{{ m.content }}", jinja_file=True)
    with pytest.raises(ChatTemplateError, match=r"chat_template\.jinja does not compile"):
        ChatTemplate(folder)


def test_a_model_without_a_template_refuses_chats_with_a_value_error(tmp_path: Path) -> None:
    template = ChatTemplate(model_folder(tmp_path, None))
    assert template.names == []
    with pytest.raises(ValueError, match="no chat template"):
        template.render(CHAT)


def test_templates_cannot_reach_python_internals(tmp_path: Path) -> None:
    escape = "{{ messages.__class__.__mro__ }}{% set ns = namespace() %}{% set ns._x = 1 %}"
    template = ChatTemplate(model_folder(tmp_path, escape))
    with pytest.raises(ValueError, match="the chat template rejected the messages"):
        template.render(CHAT)
