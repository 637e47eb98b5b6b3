"""Plain-data messages that cross the Ray hops: ingress -> batcher -> model and back."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from serve_app.engine import EngineError, EngineOverloadedError, SamplingParams, SequenceOutput


@dataclass(frozen=True)
class TextOptions:
    """How the batcher renders a request's prompt and turns its tokens into text (vLLM's
    extensions; the defaults are OpenAI's behaviour)."""

    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False  # also the text of a stop token that ended it
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    tools: list[dict[str, Any]] | None = None  # the chat template's ``tools`` (OpenAI's form)


@dataclass(frozen=True)
class PreparedRequest:
    """One choice to generate: a text prompt, a tokenized prompt or chat messages, and how to
    sample it."""

    request_id: str
    params: SamplingParams
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    stop: list[str] = field(default_factory=list)
    text: TextOptions = field(default_factory=TextOptions)
    prompt_token_ids: list[int] | None = None  # a tokenized prompt, used as it is
    trace_context: dict[str, str] = field(default_factory=dict)  # W3C traceparent of its caller


@dataclass(frozen=True)
class RequestError:
    """Why a request failed, as plain data; the ingress turns it into an HTTP error."""

    status: int
    message: str
    type: str | None = None  # None: the usual type for the status
    param: str | None = None
    code: str | None = None


@dataclass(frozen=True)
class TokenText:
    """A generated token's text and logprob, with its top alternatives."""

    text: str
    logprob: float
    top: list[tuple[str, float]]


@dataclass(frozen=True)
class PromptToken:
    """A prompt token's text and its logprob given the tokens before it (``None`` for the
    first, which nothing predicts), with its rank and top alternatives ``(id, text, logprob)``.
    """

    token_id: int
    text: str
    logprob: float | None
    rank: int | None
    top: list[tuple[int, str, float]]


@dataclass
class TextChunk:
    """What a request's stream carries: new text and tokens since its last chunk.

    ``error`` is set (and nothing else) when the request was rejected before it ran.
    ``prompt_logprobs``, when asked for, comes with the request's first chunk.
    """

    request_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenText] | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: RequestError | None = None
    model_version: str | None = None  # set on the final chunk: the version that produced it
    prompt_logprobs: list[PromptToken] | None = None

    def merge(self, later: TextChunk) -> None:
        """Append a later chunk of the same request (coalescing while the consumer is behind)."""
        self.text += later.text
        self.token_ids.extend(later.token_ids)
        if later.logprobs is not None:
            self.logprobs = (self.logprobs or []) + later.logprobs
        self.finish_reason = later.finish_reason
        self.prompt_tokens = later.prompt_tokens or self.prompt_tokens
        self.completion_tokens = later.completion_tokens
        self.error = later.error
        self.model_version = later.model_version
        self.prompt_logprobs = self.prompt_logprobs or later.prompt_logprobs


@dataclass(frozen=True)
class RejectedRequest:
    """A request of a micro-batch that the engine refused; the others still run."""

    message: str
    param: str | None
    status: int = 400  # 503 when the engine's waiting queue is full
    code: str | None = None  # "overloaded" then, as for every queue bound

    @classmethod
    def from_engine_error(cls, error: EngineError) -> RejectedRequest:
        """Why the engine refused a request, as the batcher reports it to the caller."""
        if isinstance(error, EngineOverloadedError):
            return cls(str(error), None, status=503, code="overloaded")
        return cls(str(error), getattr(error, "param", None))


@dataclass(frozen=True)
class ModelStep:
    """One engine step's outputs for one micro-batch (one message per step, not per token).

    The first message of a stream names the replica serving it, so aborts can reach it, and
    lists the requests the engine rejected.
    """

    outputs: list[SequenceOutput]
    replica_id: str | None = None
    model_version: str | None = None
    rejected: dict[str, RejectedRequest] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelDescription:
    """What a model replica serves; the ingress adds the served name."""

    version: str
    type: str
    backend: str
    parameters: int
    context_length: int
    loaded_at: float
    # Its variants (folders of its variants directory), with when each last changed, by name.
    variants: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class TokenizedPrompt:
    """A prompt's token ids as the batcher would give them to the model (``/tokenize``).

    ``error`` is set (and nothing else) when the chat template rejected the messages.
    """

    token_ids: list[int] = field(default_factory=list)
    token_texts: list[str] | None = None  # each token's text, when asked
    error: RequestError | None = None


@dataclass(frozen=True)
class DetokenizedText:
    """The text of token ids (``/detokenize``); ``error`` is set for ids outside the vocabulary."""

    text: str = ""
    error: RequestError | None = None
