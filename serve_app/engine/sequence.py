"""Sequences and what a step reports about them."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import numpy as np
from llguidance import LLMatcher

from serve_app.engine.sampling_params import SamplingParams


class FinishReason(str, enum.Enum):
    """Why a sequence stopped, in OpenAI's words."""

    STOP = "stop"  # an end-of-sequence or stop token was sampled, or the grammar ended
    LENGTH = "length"  # max_tokens or the context length was reached
    ABORT = "abort"  # the caller cancelled it


@dataclass(frozen=True)
class TokenLogprob:
    """Log-probability of one token and the top alternatives at its position; ``rank`` (1 for
    the most likely token) is reported for prompt tokens."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()
    rank: int | None = None


@dataclass(frozen=True)
class SequenceOutput:
    """What one engine step produced for one sequence.

    ``new_token_ids`` holds the token(s) produced this step (empty when the sequence was
    aborted); ``finish_reason`` is set on the sequence's last output. ``prompt_logprobs``, when
    the sequence asked for them, comes with its first output: one record per prompt token, the
    first ``None`` (nothing precedes it).
    """

    request_id: str
    new_token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] | None
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_output_tokens: int
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
    # When its prefill began (``time.monotonic()``), on the first output only: the model server
    # reports queue wait and prefill time from it.
    prefill_started_at: float | None = None

    @property
    def finished(self) -> bool:
        """Whether this is the sequence's final output."""
        return self.finish_reason is not None


@dataclass(eq=False)
class Sequence:
    """One request's prompt and generated tokens as the engine tracks them; ``matcher``, for a
    structured request, is its grammar's state after the tokens generated so far."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_length: int  # prompt plus the most tokens it may generate, capped by the context
    rng: np.random.Generator
    output_token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    matcher: LLMatcher | None = None

    @property
    def num_prompt_tokens(self) -> int:
        """Length of the prompt in tokens."""
        return len(self.prompt_token_ids)

    @property
    def length(self) -> int:
        """Tokens this sequence holds in the KV cache after its next step's input."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def last_token_id(self) -> int:
        """The token fed to the model at the next decode step."""
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    @property
    def finished(self) -> bool:
        """Whether the sequence has stopped."""
        return self.finish_reason is not None
