"""Every wire type of the service: OpenAI completions and chat, the native ``/v1/infer`` family,
and errors. Request models own their conversion to engine ``SamplingParams``.

Requests forbid unknown fields so that a parameter the service does not implement is a clear
400 instead of being silently ignored.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from serve_app.engine import SamplingParams
from serve_app.engine.sampling_params import MAX_TOP_LOGPROBS

MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_CHOICES = 16


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Request):
    """Options of a streamed response."""

    include_usage: bool = Field(default=False, description="Send a final chunk with usage.")


class _SamplingFields(_Request):
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
    user: str | None = Field(default=None, description="End-user id, for logs.")
    logit_bias: dict[str, float] | None = Field(default=None, description="Not supported.")

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

    def _sampling_params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
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
            ignore_eos=self.ignore_eos,
        )


class CompletionRequest(_SamplingFields):
    """``POST /v1/completions``."""

    prompt: str | list[str] = Field(description="A prompt or a list of prompts.")
    max_tokens: int = Field(default=16, ge=1, description="Most tokens to generate per choice.")
    logprobs: int | None = Field(default=None, ge=0, le=5, description="Top logprobs per token.")
    echo: bool = Field(default=False, description="Not supported.")
    suffix: str | None = Field(default=None, description="Not supported.")
    best_of: int | None = Field(default=None, description="Only best_of == n is supported.")

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, prompt: str | list[str]) -> str | list[str]:
        if isinstance(prompt, list) and not prompt:
            raise ValueError("the prompt list is empty")
        return prompt

    @model_validator(mode="after")
    def _reject_unsupported(self) -> CompletionRequest:
        if self.echo:
            raise ValueError("echo is not supported")
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of is not supported (only best_of == n)")
        return self

    @property
    def prompts(self) -> list[str]:
        """The prompts as a list."""
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def to_sampling_params(self) -> SamplingParams:
        """Engine parameters for one choice."""
        return self._sampling_params(self.max_tokens, self.logprobs)

    def reserved_tokens(self, default_max_tokens: int) -> int:
        """Tokens a rate limit reserves up front: estimated prompts plus every choice's limit."""
        del default_max_tokens  # completions always carry max_tokens
        prompt = sum(_estimate_tokens(p) for p in self.prompts)
        return prompt + self.max_tokens * self.n * len(self.prompts)


class ChatMessage(_Request):
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

    @model_validator(mode="after")
    def _reject_unsupported(self) -> ChatCompletionRequest:
        if self.tools or self.tool_choice not in (None, "none"):
            raise ValueError("tools are not supported")
        if self.response_format and self.response_format.get("type") != "text":
            raise ValueError("only response_format type 'text' is supported")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs: true")
        return self

    def to_sampling_params(self, default_max_tokens: int) -> SamplingParams:
        """Engine parameters for one choice."""
        max_tokens = self.max_completion_tokens or self.max_tokens or default_max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling_params(max_tokens, logprobs)

    def reserved_tokens(self, default_max_tokens: int) -> int:
        """Tokens a rate limit reserves up front: estimated prompt plus every choice's limit."""
        prompt = sum(_estimate_tokens(m.text()) for m in self.messages)
        max_tokens = self.max_completion_tokens or self.max_tokens or default_max_tokens
        return prompt + max_tokens * self.n

    def message_dicts(self) -> list[dict[str, str]]:
        """Messages as the chat template expects them."""
        return [{"role": m.role, "content": m.text()} for m in self.messages]


class Usage(BaseModel):
    """Token counts of a request."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """Legacy completions logprobs, one entry per generated token."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    """One choice of a completion (or a chunk of it)."""

    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    """A completion, or one streamed chunk of it (``object`` is the same for both)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    """An alternative token at one position."""

    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    """A generated token with its alternatives."""

    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    """Chat logprobs of the content tokens."""

    content: list[ChatTokenLogprob]


class ChatResponseMessage(BaseModel):
    """The assistant's reply."""

    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    """One choice of a chat completion."""

    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    """A chat completion."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    """The new part of the assistant's message in a chunk."""

    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    """One choice of a streamed chat chunk."""

    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    """One entry of ``GET /v1/models``."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "serve_app"


class ModelList(BaseModel):
    """``GET /v1/models``."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class InferRequest(_Request):
    """``POST /v1/infer`` and ``/v1/stream_infer``, and one item of ``/v1/batch_infer``."""

    prompt: str = Field(min_length=1, description="Text to continue.")
    max_tokens: int = Field(default=64, ge=1, description="Most tokens to generate.")
    temperature: float = Field(default=0.0, ge=0, le=2, description="0 means greedy decoding.")
    top_p: float = Field(default=1.0, gt=0, le=1, description="Nucleus sampling mass.")
    stream: bool = Field(default=False, description="Only /v1/stream_infer streams.")
    stop_words: list[str] = Field(default_factory=list, max_length=MAX_STOP_STRINGS)
    seed: int | None = Field(default=None, ge=0, lt=2**63, description="Reproducible sampling.")
    user_id: str | None = Field(default=None, description="Caller's user id, for logs.")
    session_id: str | None = Field(default=None, description="Caller's session id, for logs.")

    @field_validator("stop_words")
    @classmethod
    def _non_empty_stops(cls, stops: list[str]) -> list[str]:
        if any(not s for s in stops):
            raise ValueError("stop words must not be empty")
        return stops

    def to_completion_request(self, model: str) -> CompletionRequest:
        """The same request in OpenAI terms, so both APIs share one path."""
        return CompletionRequest(
            model=model,
            prompt=self.prompt,
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            stop=self.stop_words or None,
            seed=self.seed,
            user=self.user_id,
        )


class ErrorInfo(BaseModel):
    """The ``error`` object of OpenAI's error shape."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """``{"error": {...}}``, the body of every error response."""

    error: ErrorInfo


class InferResponse(BaseModel):
    """Result of ``/v1/infer``, and one item of ``/v1/batch_infer``."""

    text: str = ""
    tokens: list[int] = Field(default_factory=list, description="Generated token ids.")
    latency: float = Field(default=0.0, description="Seconds from arrival to the last token.")
    usage: Usage | None = None
    finish_reason: str | None = None
    error: ErrorInfo | None = None


class BatchInferRequest(_Request):
    """``POST /v1/batch_infer``: items are validated one by one, so one bad item fails alone."""

    requests: list[dict[str, Any]] = Field(min_length=1, max_length=256)


class BatchInferResponse(BaseModel):
    """One result per request item, in order."""

    results: list[InferResponse]


class StreamInferChunk(BaseModel):
    """One server-sent event of ``/v1/stream_infer``."""

    text: str
    tokens: list[int]
    finish_reason: str | None = None
    usage: Usage | None = None


class ModelInfo(BaseModel):
    """``GET /v1/model_info``."""

    name: str
    version: str
    type: str = Field(description="Architecture from config.json, e.g. llama.")
    backend: str = Field(description="Runtime and execution providers.")
    parameters: int = Field(description="Parameter count from the model's weights.")
    context_length: int
    loaded_at: float = Field(description="Unix time the model finished loading.")


def _estimate_tokens(text: str) -> int:
    # The ingress never tokenizes; ~4 characters a token, settled to the real count later.
    return len(text) // 4 + 1


def new_id(prefix: str) -> str:
    """An OpenAI-style object id."""
    return f"{prefix}-{uuid.uuid4().hex}"
