"""The OpenAI-compatible API's wire types: completions, chat completions, models.

Request models own their conversion to engine ``SamplingParams``.

Unknown fields are a 400 naming them, as OpenAI's own API answers, so that a misspelt or
unimplemented parameter never silently changes the output (vLLM instead ignores them with a
warning). Fields that clients commonly send but that mean nothing here (``store``, ``metadata``,
``service_tier``, ``user``, ``parallel_tool_calls``, ``reasoning_effort``, ``modalities:
["text"]``) are accepted and ignored; ``IGNORED_FIELDS`` lists them.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from serve_app.api.errors import InvalidParam
from serve_app.engine import SamplingParams
from serve_app.messages import TextOptions

MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_CHOICES = 16
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for top_logprobs


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


class _SamplingFields(StrictRequest):
    """Sampling parameters shared by completions and chat completions."""

    model: str = Field(description="Served model name, as listed by /v1/models.")
    temperature: float = Field(default=1.0, ge=0, le=2, description="0 means greedy decoding.")
    top_p: float = Field(default=1.0, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: int = Field(default=0, ge=0, description="Keep the k most likely tokens; 0: all.")
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
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(
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

    IGNORED_FIELDS: ClassVar[frozenset[str]] = frozenset({"user"})
    """Accepted fields that cannot change the output (left out of response-cache keys)."""

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
        )


class CompletionRequest(_SamplingFields):
    """``POST /v1/completions``."""

    prompt: str | list[str] | list[int] | list[list[int]] = Field(
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


class ChatMessage(StrictRequest):
    """One message of a conversation."""

    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]]
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _text_parts_only(cls, content: str | list[dict[str, Any]]) -> str | list[dict[str, Any]]:
        if isinstance(content, list) and any(part.get("type") != "text" for part in content):
            raise ValueError("only text content parts are supported")
        return content

    def text(self) -> str:
        """The message's text, with text parts joined."""
        if isinstance(self.content, str):
            return self.content
        return "".join(str(part.get("text", "")) for part in self.content)


class ChatCompletionRequest(_SamplingFields):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far.")
    max_tokens: int | None = Field(default=None, ge=1, description="Deprecated alias.")
    max_completion_tokens: int | None = Field(default=None, ge=1, description="Most new tokens.")
    logprobs: bool = Field(default=False, description="Return logprobs of the output tokens.")
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: dict[str, Any] | None = Field(default=None, description="Only type=text.")
    tools: list[dict[str, Any]] | None = Field(default=None, description="Not supported.")
    tool_choice: str | dict[str, Any] | None = Field(default=None, description="Not supported.")
    parallel_tool_calls: bool | None = Field(
        default=None, description="Accepted and ignored: tools are not supported."
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
            "parallel_tool_calls",
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
        if self.tools or self.tool_choice not in (None, "none"):
            raise InvalidParam("tools", "not supported")
        if self.response_format and self.response_format.get("type") != "text":
            raise InvalidParam("response_format", "only type 'text' is supported")
        if self.top_logprobs and not self.logprobs:
            raise InvalidParam("top_logprobs", "requires logprobs: true")
        return self

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
        )

    def message_dicts(self) -> list[dict[str, str]]:
        """Messages as the chat template expects them."""
        return [{"role": m.role, "content": m.text()} for m in self.messages]


def _estimate_tokens(text: str) -> int:
    # The ingress never tokenizes; ~4 characters a token, settled to the real count later.
    return len(text) // 4 + 1
