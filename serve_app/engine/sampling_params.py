"""Per-request sampling parameters.

Their ranges are checked once, by the request models at the HTTP tier; whether a request fits
this model (context length, vocabulary, KV budget) is checked once, by the engine, when it
creates the sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from serve_app.engine.structured import StructuredOutput

MAX_TOP_LOGPROBS = 20  # OpenAI's limit for top_logprobs
GREEDY_BELOW_TEMPERATURE = 1e-5  # a temperature under this decodes greedily


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence is decoded.

    ``temperature`` 0 (or under ``GREEDY_BELOW_TEMPERATURE``) means greedy decoding; every other
    filter then has no effect.
    ``top_k == 0`` and ``top_p == 1`` disable those filters. ``logprobs`` is the number of
    top alternatives to return per token (``0``: only the sampled token's logprob,
    ``None``: no logprobs at all). ``prompt_logprobs`` asks the same of every prompt token
    given the tokens before it (the first has none); with it, ``max_tokens`` may be 0: the
    prompt is scored and nothing generated. ``fit_to_context``: a ``max_tokens`` that the
    context cannot hold is shortened to the room left instead of refused (for chat requests
    that gave no ``max_tokens``). ``structured``: what the output must match (a JSON Schema,
    regex, choice or grammar), enforced token by token; the sequence ends (``stop``) where the
    grammar does, whatever ``min_tokens`` and ``ignore_eos`` say.
    """

    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    fit_to_context: bool = False
    structured: StructuredOutput | None = None

    @property
    def greedy(self) -> bool:
        """Whether the next token is always the most likely one."""
        # As vLLM: dividing logits by a smaller temperature overflows float32 and samples noise.
        return self.temperature < GREEDY_BELOW_TEMPERATURE

    @property
    def has_penalties(self) -> bool:
        """Whether any repetition, presence or frequency penalty applies."""
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )
