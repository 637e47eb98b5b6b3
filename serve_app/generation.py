"""Plain-data messages that cross the Ray hops: ingress -> batcher -> model and back."""

from __future__ import annotations

from dataclasses import dataclass, field

from serve_app.engine import SamplingParams, SequenceOutput


@dataclass(frozen=True)
class PreparedRequest:
    """One choice to generate: a text prompt or chat messages, and how to sample it."""

    request_id: str
    params: SamplingParams
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    stop: list[str] = field(default_factory=list)
    fit_to_context: bool = False  # True: shorten max_tokens to the room left instead of a 400


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


@dataclass
class TextChunk:
    """What a request's stream carries: new text and tokens since its last chunk.

    ``error`` is set (and nothing else) when the request was rejected before it ran.
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


@dataclass(frozen=True)
class RejectedRequest:
    """A request of a micro-batch that the engine refused; the others still run."""

    message: str
    param: str | None
    status: int = 400  # 503 when the engine's waiting queue is full


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
