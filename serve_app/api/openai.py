"""The OpenAI-compatible API's wire types: completions, chat completions, models.

Request models own their conversion to engine ``SamplingParams``.

Unknown fields are a 400 naming them, as OpenAI's own API answers, so that a misspelt or
unimplemented parameter never silently changes the output (vLLM instead ignores them with a
warning). Fields that clients commonly send but that mean nothing here (``store``, ``metadata``,
``service_tier``, ``user``, ``reasoning_effort``, ``modalities: ["text"]``) are accepted and
ignored; ``IGNORED_FIELDS`` lists them.

Structured output (``response_format``, vLLM's ``structured_outputs`` and ``guided_*``, and forced
tool calls) is compiled here, once, so that an invalid schema, regex or grammar is a 400 naming
the parameter before the request is queued.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from serve_app.api import tool_calls
from serve_app.api.errors import InvalidParam
from serve_app.engine import SamplingParams
from serve_app.engine.structured import InvalidStructuredOutput, StructuredOutput, check
from serve_app.messages import TextOptions

MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_CHOICES = 16
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for top_logprobs
# A token id: tokenizers and ONNX graphs hold them in 32 bits, so a larger one is a 400 here
# rather than an overflow where the prompt is first decoded (the engine checks the vocabulary).
TokenId = Annotated[int, Field(ge=0, lt=2**31)]


class StrictRequest(BaseModel):
    """A request model: unknown fields are a 400 naming them, and so is text that is not valid
    Unicode (a lone surrogate such as ``"\\ud800"`` is valid JSON but cannot be tokenized)."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        _check_unicode(data, [])
        return data


def _check_unicode(value: Any, path: list[str]) -> None:
    """Raise ``InvalidParam`` naming the first string under ``value`` with a lone surrogate."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            param = ".".join(path) or "body"
            raise InvalidParam(
                param, "contains a lone surrogate, which is not valid Unicode"
            ) from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_unicode(key, path)
            _check_unicode(item, [*path, str(key)])
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_unicode(item, [*path, str(index)])


class StreamOptions(StrictRequest):
    """Options of a streamed response."""

    include_usage: bool = Field(default=False, description="Send a final chunk with usage.")
    continuous_usage_stats: bool = Field(
        default=False,
        description="vLLM extension: with include_usage, every chunk carries the usage so far.",
    )


# A schema sent again (every request of a client, or a native request and the completion it
# becomes) is not compiled again; only valid ones are remembered.
_check_structured = functools.lru_cache(maxsize=1024)(check)


def compile_structured(param: str, structured: StructuredOutput) -> StructuredOutput:
    """``structured``, once llguidance has compiled it; ``InvalidParam`` naming ``param`` if not."""
    try:
        _check_structured(structured)
    except InvalidStructuredOutput as exc:
        raise InvalidParam(param, f"cannot be compiled: {exc}") from None
    return structured


def json_schema_output(param: str, schema: dict[str, Any] | str) -> StructuredOutput:
    """A JSON Schema given as an object or as JSON text, checked."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise InvalidParam(param, f"is not valid JSON: {exc}") from None
    return compile_structured(param, StructuredOutput("json_schema", json.dumps(schema)))


class JsonSchemaFormat(StrictRequest):
    """``response_format.json_schema``: OpenAI's structured outputs."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(description="The schema's name (OpenAI requires one).")
    description: str | None = Field(default=None, description="What the output is for.")
    schema_: dict[str, Any] | None = Field(
        default=None, alias="schema", description="The JSON Schema; none: any JSON object."
    )
    strict: bool | None = Field(
        default=None, description="Accepted; the schema is always enforced exactly."
    )


class ResponseFormat(StrictRequest):
    """``response_format``: free text, any JSON object, or JSON matching a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is given exactly when type is 'json_schema'")
        return self

    def structured(self) -> tuple[str, StructuredOutput] | None:
        """(the parameter, its constraint), or None for free text."""
        if self.json_schema is not None and self.json_schema.schema_ is not None:
            param = "response_format.json_schema.schema"
            return param, json_schema_output(param, self.json_schema.schema_)
        if self.type == "text":
            return None
        return "response_format", StructuredOutput("json_object")


class StructuredOutputs(StrictRequest):
    """vLLM's ``structured_outputs``: exactly one of its constraints."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    json_: dict[str, Any] | str | None = Field(
        default=None, alias="json", description="A JSON Schema (an object or its JSON text)."
    )
    regex: str | None = Field(default=None, description="A regular expression.")
    choice: list[str] | None = Field(default=None, description="The output is one of these.")
    grammar: str | None = Field(default=None, description="A Lark grammar (llguidance's).")
    json_object: bool | None = Field(default=None, description="true: any JSON object.")

    def structured(self) -> tuple[str, StructuredOutput]:
        """(the parameter, its constraint)."""
        given = [
            name for name in type(self).model_fields if getattr(self, name) not in (None, False)
        ]
        if len(given) != 1:
            raise InvalidParam("structured_outputs", "give exactly one constraint")
        name = given[0]
        param = f"structured_outputs.{name.rstrip('_')}"
        if self.json_ is not None:
            return param, json_schema_output(param, self.json_)
        if self.json_object:
            return param, StructuredOutput("json_object")
        return param, _text_constraint(param, name, getattr(self, name))


def _text_constraint(param: str, kind: str, value: str | list[str]) -> StructuredOutput:
    """A regex, choice or grammar constraint, checked."""
    spec = json.dumps(value) if kind == "choice" else value
    assert isinstance(spec, str)
    return compile_structured(param, StructuredOutput(kind, spec))  # type: ignore[arg-type]


class _SamplingFields(StrictRequest):
    """Sampling parameters shared by completions and chat completions."""

    model: str = Field(description="Served model name, as listed by /v1/models.")
    temperature: float = Field(default=1.0, ge=0, le=2, description="0 means greedy decoding.")
    top_p: float = Field(default=1.0, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: int = Field(
        default=0,
        ge=0,
        lt=2**31,  # the sampler holds it in an integer array: a larger one failed the engine step
        description="Keep the k most likely tokens; 0 (or k past the vocabulary): all.",
    )
    min_p: float = Field(default=0.0, ge=0, le=1, description="Drop tokens below min_p x top prob.")
    n: int = Field(default=1, ge=1, le=MAX_CHOICES, description="Choices to generate.")
    stream: bool = Field(default=False, description="Stream chunks as server-sent events.")
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(default=None, description="Up to 4 stop strings.")
    seed: int | None = Field(default=None, ge=0, lt=2**63, description="Reproducible sampling.")
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    repetition_penalty: float = Field(default=1.0, gt=0, le=10)
    min_tokens: int = Field(default=0, ge=0, description="Tokens to generate before any stop.")
    ignore_eos: bool = Field(default=False, description="Keep generating past end-of-sequence.")
    stop_token_ids: list[TokenId] | None = Field(
        default=None, description="vLLM extension: token ids that end a choice like end-of-text."
    )
    skip_special_tokens: bool = Field(
        default=True, description="vLLM extension: leave special tokens out of the text."
    )
    include_stop_str_in_output: bool = Field(
        default=False,
        description="vLLM extension: keep the stop string (or stop token's text) in the text.",
    )
    user: str | None = Field(default=None, description="End-user id; accepted and ignored.")
    logit_bias: dict[str, float] | None = Field(default=None, description="Not supported.")
    response_format: ResponseFormat | None = Field(
        default=None, description="text, json_object, or json_schema with a JSON Schema."
    )
    structured_outputs: StructuredOutputs | None = Field(
        default=None, description="vLLM extension: json, regex, choice, grammar or json_object."
    )
    guided_json: dict[str, Any] | str | None = Field(
        default=None, description="vLLM extension (legacy): output matching this JSON Schema."
    )
    guided_regex: str | None = Field(
        default=None, description="vLLM extension (legacy): output matching this regex."
    )
    guided_choice: list[str] | None = Field(
        default=None, description="vLLM extension (legacy): output is one of these strings."
    )
    guided_grammar: str | None = Field(
        default=None, description="vLLM extension (legacy): output of this Lark grammar."
    )

    IGNORED_FIELDS: ClassVar[frozenset[str]] = frozenset({"user"})
    """Accepted fields that cannot change the output (left out of response-cache keys)."""

    _structured: StructuredOutput | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _compile_structured(self) -> _SamplingFields:
        constraints = self._constraints()
        if len(constraints) > 1:
            first, second = constraints[0][0], constraints[1][0]
            raise InvalidParam(second, f"only one output constraint is allowed ({first} is given)")
        self._structured = constraints[0][1] if constraints else None
        return self

    def _constraints(self) -> list[tuple[str, StructuredOutput]]:
        """Every output constraint the request gives, compiled: (its parameter, it)."""
        found: list[tuple[str, StructuredOutput] | None] = []
        if self.response_format is not None:
            found.append(self.response_format.structured())
        if self.structured_outputs is not None:
            found.append(self.structured_outputs.structured())
        if self.guided_json is not None:
            found.append(("guided_json", json_schema_output("guided_json", self.guided_json)))
        for kind in ("regex", "choice", "grammar"):
            value = getattr(self, f"guided_{kind}")
            if value is not None:
                param = f"guided_{kind}"
                found.append((param, _text_constraint(param, kind, value)))
        return [constraint for constraint in found if constraint is not None]

    @property
    def structured(self) -> StructuredOutput | None:
        """What the output must match, if anything."""
        return self._structured

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are allowed")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return stop

    @field_validator("logit_bias")
    @classmethod
    def _reject_logit_bias(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        if bias:
            raise ValueError("logit_bias is not supported")
        return bias

    @property
    def stop_strings(self) -> list[str]:
        """The stop strings as a list."""
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        """Whether a streamed response ends with a usage chunk."""
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def continuous_usage(self) -> bool:
        """Whether every streamed chunk carries the usage so far (vLLM's behaviour: only
        together with ``include_usage``)."""
        options = self.stream_options
        return options is not None and options.include_usage and options.continuous_usage_stats

    def to_text_options(self) -> TextOptions:
        """How the batcher renders the prompt and turns this request's tokens into text."""
        return TextOptions(
            skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
        )

    def _sampling_params(
        self, max_tokens: int, logprobs: int | None, fit_to_context: bool = False
    ) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            seed=self.seed,
            logprobs=logprobs,
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
            fit_to_context=fit_to_context,
            structured=self._structured,
        )


class CompletionRequest(_SamplingFields):
    """``POST /v1/completions``."""

    prompt: str | list[str] | list[TokenId] | list[list[TokenId]] = Field(
        description="A prompt, a list of prompts, or token ids (one prompt or a list of them)."
    )
    max_tokens: int = Field(
        default=16,
        ge=0,
        description="Most tokens to generate per choice; 0 (only with echo and logprobs, or "
        "prompt_logprobs) scores the prompt and generates nothing.",
    )
    logprobs: int | None = Field(
        default=None,
        ge=0,
        le=5,
        description="Top logprobs per token; with echo, of the prompt's tokens too.",
    )
    echo: bool = Field(default=False, description="Start each choice's text with its prompt.")
    prompt_logprobs: int | None = Field(
        default=None,
        ge=0,
        le=MAX_TOP_LOGPROBS,
        description="vLLM extension: each prompt token's logprob and this many alternatives, "
        "in the choice's prompt_logprobs.",
    )
    suffix: str | None = Field(default=None, description="Not supported.")
    best_of: int | None = Field(default=None, description="Only best_of == n is supported.")

    @field_validator("prompt")
    @classmethod
    def _check_prompt(
        cls, prompt: str | list[str] | list[int] | list[list[int]]
    ) -> str | list[str] | list[int] | list[list[int]]:
        if isinstance(prompt, list) and not prompt:
            raise ValueError("the prompt list is empty")
        if isinstance(prompt, list) and any(isinstance(p, list) and not p for p in prompt):
            raise ValueError("a tokenized prompt is empty")
        return prompt

    @model_validator(mode="after")
    def _reject_unsupported(self) -> CompletionRequest:
        if self.min_tokens > self.max_tokens:
            raise InvalidParam("min_tokens", f"must be <= max_tokens ({self.max_tokens})")
        scores_prompt = self.prompt_logprobs is not None or (
            self.echo and self.logprobs is not None
        )
        if self.max_tokens == 0 and not scores_prompt:
            raise InvalidParam(
                "max_tokens", "may be 0 only with echo and logprobs, or with prompt_logprobs"
            )
        if self.suffix:
            raise InvalidParam("suffix", "not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise InvalidParam("best_of", "not supported (only best_of == n)")
        return self

    @property
    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list: texts, or token ids."""
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            return [prompt]  # type: ignore[list-item]  # one text or one tokenized prompt
        return list(prompt)  # type: ignore[arg-type]  # texts or tokenized prompts

    @property
    def scored_prompt_logprobs(self) -> int | None:
        """Alternatives per prompt token the engine reports (``None``: no prompt logprobs).

        Echo with logprobs scores the prompt like the completion (OpenAI's legacy behaviour);
        echo of a tokenized prompt needs the prompt tokens' texts, which come with them.
        """
        wanted = [self.prompt_logprobs]
        if self.echo:
            wanted.append(self.logprobs)
            if any(not isinstance(p, str) for p in self.prompts):
                wanted.append(0)
        present = [n for n in wanted if n is not None]
        return max(present) if present else None

    def to_sampling_params(self) -> SamplingParams:
        """Engine parameters for one choice."""
        params = self._sampling_params(self.max_tokens, self.logprobs)
        return dataclasses.replace(params, prompt_logprobs=self.scored_prompt_logprobs)

    def reserved_tokens(self, default_max_tokens: int) -> int:
        """Tokens a rate limit reserves up front: estimated prompts plus every choice's limit."""
        del default_max_tokens  # completions always carry max_tokens
        prompt = sum(_estimate_tokens(p) if isinstance(p, str) else len(p) for p in self.prompts)
        return prompt + self.max_tokens * self.n * len(self.prompts)


class FunctionDefinition(StrictRequest):
    """A function the model may call."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$", description="OpenAI's name rule.")
    description: str | None = Field(default=None, description="What the function does.")
    parameters: dict[str, Any] | None = Field(
        default=None, description="JSON Schema of the arguments; none: no arguments."
    )
    strict: bool | None = Field(
        default=None, description="Accepted; forced calls always follow the schema exactly."
    )

    @property
    def parameters_schema(self) -> dict[str, Any]:
        """The arguments' schema (an empty object when the function declares none)."""
        return self.parameters if self.parameters is not None else tool_calls.EMPTY_PARAMETERS


class ToolDefinition(StrictRequest):
    """One entry of ``tools``."""

    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(StrictRequest):
    """A function named by ``tool_choice``."""

    name: str


class NamedToolChoice(StrictRequest):
    """``tool_choice: {"type": "function", "function": {"name": ...}}``: call that function."""

    type: Literal["function"]
    function: FunctionName


class CalledFunction(StrictRequest):
    """The function an assistant message called, with its arguments as JSON text."""

    name: str
    arguments: str


class AssistantToolCall(StrictRequest):
    """A tool call of an earlier assistant message."""

    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(StrictRequest):
    """One message of a conversation: a tool's result (``role: "tool"``) names the call it
    answers; an assistant message that called tools may have no content."""

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[AssistantToolCall] | None = None
    tool_call_id: str | None = None

    @field_validator("content")
    @classmethod
    def _text_parts_only(
        cls, content: str | list[dict[str, Any]] | None
    ) -> str | list[dict[str, Any]] | None:
        if isinstance(content, list) and any(part.get("type") != "text" for part in content):
            raise ValueError("only text content parts are supported")
        return content

    @model_validator(mode="after")
    def _roles_fields(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content may be null only in an assistant message with tool_calls")
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise ValueError("a tool message, and only one, names the call in tool_call_id")
        return self

    def text(self) -> str:
        """The message's text, with text parts joined (empty when it has none)."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(str(part.get("text", "")) for part in self.content)

    def template_dict(self) -> dict[str, Any]:
        """The message as chat templates read it (as vLLM hands it to them): text content,
        and tool calls with their arguments decoded, as templates print them with tojson."""
        message: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.tool_calls is not None:
            message["tool_calls"] = [
                {
                    "id": call.id,
                    "type": call.type,
                    "function": {
                        "name": call.function.name,
                        "arguments": _decoded(call.function.arguments),
                    },
                }
                for call in self.tool_calls
            ]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


def _decoded(arguments: str) -> Any:
    """Arguments JSON as data; text that is not JSON stays text."""
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments


class ChatCompletionRequest(_SamplingFields):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far.")
    max_tokens: int | None = Field(default=None, ge=1, description="Deprecated alias.")
    max_completion_tokens: int | None = Field(default=None, ge=1, description="Most new tokens.")
    logprobs: bool = Field(default=False, description="Return logprobs of the output tokens.")
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[ToolDefinition] | None = Field(
        default=None, description="Functions the model may call; the chat template sees them."
    )
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        default=None,
        description="none, auto (the default with tools: the model's own calls are parsed), "
        "required (some call, constrained to its schema) or one named function.",
    )
    parallel_tool_calls: bool | None = Field(
        default=None, description="false: a required call is exactly one call."
    )
    store: bool | None = Field(default=None, description="Accepted and ignored: nothing is stored.")
    metadata: dict[str, str] | None = Field(
        default=None, description="Accepted and ignored (OpenAI's tags for stored completions)."
    )
    service_tier: str | None = Field(
        default=None, description="Accepted and ignored: there is one tier."
    )
    reasoning_effort: str | None = Field(
        default=None, description="Accepted and ignored: the served model does not reason."
    )
    modalities: list[Literal["text", "audio"]] | None = Field(
        default=None, description="Output modalities; only text is produced."
    )
    add_generation_prompt: bool = Field(
        default=True,
        description="vLLM extension: end the prompt where the assistant's reply begins.",
    )
    chat_template_kwargs: dict[str, Any] | None = Field(
        default=None, description="vLLM extension: extra variables for the chat template."
    )

    IGNORED_FIELDS: ClassVar[frozenset[str]] = frozenset(
        {
            "user",
            "store",
            "metadata",
            "service_tier",
            "reasoning_effort",
            "modalities",
        }
    )

    @model_validator(mode="after")
    def _reject_unsupported(self) -> ChatCompletionRequest:
        if self.modalities is not None and "audio" in self.modalities:
            raise InvalidParam("modalities", "only text output is supported")
        limit = self.max_completion_tokens or self.max_tokens
        if limit is not None and self.min_tokens > limit:
            raise InvalidParam("min_tokens", f"must be <= max_completion_tokens ({limit})")
        if self.top_logprobs and not self.logprobs:
            raise InvalidParam("top_logprobs", "requires logprobs: true")
        return self

    def _constraints(self) -> list[tuple[str, StructuredOutput]]:
        forced = self._forced_call()
        constraints = super()._constraints()
        return constraints if forced is None else [forced, *constraints]

    def _forced_call(self) -> tuple[str, StructuredOutput] | None:
        """The constraint of a required or named tool call: (the parameter, it)."""
        choice, tools = self.tool_choice, self.tools or []
        if choice not in (None, "none") and not tools:
            raise InvalidParam("tool_choice", "needs tools")
        if isinstance(choice, NamedToolChoice):
            names = [tool.function.name for tool in tools]
            if choice.function.name not in names:
                raise InvalidParam(
                    "tool_choice", f"names no function of tools: {choice.function.name!r}"
                )
            index = names.index(choice.function.name)
            param = f"tools.{index}.function.parameters"
            return param, json_schema_output(param, tools[index].function.parameters_schema)
        if choice != "required":
            return None
        for index, tool in enumerate(tools):  # so that a bad schema's error names its tool
            json_schema_output(
                f"tools.{index}.function.parameters", tool.function.parameters_schema
            )
        functions = [(tool.function.name, tool.function.parameters_schema) for tool in tools]
        schema = tool_calls.required_calls_schema(functions, self.parallel_tool_calls is not False)
        return "tool_choice", json_schema_output("tools", schema)

    def tool_call_format(self, parser: str) -> tool_calls.ToolCallFormat | None:
        """How the answer's text holds tool calls (None: it is all content); ``parser`` names
        the model family's syntax for calls it writes itself (``tool_choice: "auto"``)."""
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice):
            return tool_calls.NamedFunction(choice.function.name)
        if choice == "required":
            return tool_calls.RequiredCalls()
        if self.tools and choice in (None, "auto"):
            return tool_calls.tool_call_parser(parser)
        return None

    def to_sampling_params(self, default_max_tokens: int) -> SamplingParams:
        """Engine parameters for one choice."""
        limit = self.max_completion_tokens or self.max_tokens
        max_tokens = limit or max(default_max_tokens, self.min_tokens)
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        # Without a limit of its own, a reply may use whatever room the context has left.
        return self._sampling_params(max_tokens, logprobs, fit_to_context=limit is None)

    def reserved_tokens(self, default_max_tokens: int) -> int:
        """Tokens a rate limit reserves up front: estimated prompt plus every choice's limit."""
        prompt = sum(_estimate_tokens(m.text()) for m in self.messages)
        max_tokens = self.max_completion_tokens or self.max_tokens or default_max_tokens
        return prompt + max_tokens * self.n

    def to_text_options(self) -> TextOptions:
        """How the batcher renders the prompt and turns this request's tokens into text."""
        return TextOptions(
            skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            add_generation_prompt=self.add_generation_prompt,
            chat_template_kwargs=dict(self.chat_template_kwargs or {}),
            tools=[tool.model_dump(exclude_none=True) for tool in self.tools or []] or None,
        )

    def message_dicts(self) -> list[dict[str, Any]]:
        """Messages as the chat template expects them."""
        return [m.template_dict() for m in self.messages]


def _estimate_tokens(text: str) -> int:
    # The ingress never tokenizes; ~4 characters a token, settled to the real count later.
    return len(text) // 4 + 1
