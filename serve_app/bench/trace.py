"""Raw measurements of one request, as the client saw them."""

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
    input_len: int  # requested prompt length, in words
    max_tokens: int
    status: str = OK
    error: str | None = None
    e2e: float | None = None
    chunks: list[ChunkEvent] = field(default_factory=list)
    token_source: TokenSource = "chunks"
    prompt_tokens: int | None = None
    completion_tokens: int | None = None  # exact count from the final usage chunk

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
