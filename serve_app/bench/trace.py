"""Raw measurements of one request, as its client saw them: over HTTP or in process."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

OK = "200"

TokenSource = Literal["usage", "logprobs", "chunks"]


@dataclass(frozen=True)
class ChunkEvent:
    """A streamed chunk that carried text: when it arrived and how many tokens it holds."""

    t: float  # seconds since the request was sent
    tokens: int


@dataclass
class RequestTrace:
    """Everything measured about one request; ``status`` is ``"200"`` only for a success."""

    start: float  # seconds since the sweep point began
    input_len: int  # requested prompt length: words over HTTP, token ids in process
    max_tokens: int
    status: str = OK
    error: str | None = None
    e2e: float | None = None
    chunks: list[ChunkEvent] = field(default_factory=list)
    token_source: TokenSource = "chunks"
    prompt_tokens: int | None = None
    completion_tokens: int | None = None  # exact count from the final usage chunk

    def record(self, t: float, tokens: int = 1) -> None:
        """Note ``tokens`` that arrived ``t`` s after the send; an in-process request ends there."""
        self.chunks.append(ChunkEvent(t=t, tokens=tokens))
        self.e2e = t

    @property
    def ok(self) -> bool:
        """Whether the request succeeded and produced output."""
        return self.status == OK

    @property
    def output_tokens(self) -> int:
        """The exact completion token count when the server sent usage, else the chunk total."""
        if self.completion_tokens is not None:
            return self.completion_tokens
        return sum(c.tokens for c in self.chunks)
