"""What a request produced: its choices' results, accumulated from the deltas that stream in
(text, tokens, logprobs, the echoed prompt, and the usage at any point)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from serve_app.api.openai import ChatCompletionRequest, CompletionRequest
from serve_app.api.openai_responses import Usage
from serve_app.messages import PromptToken, TextChunk, TokenText

Request = CompletionRequest | ChatCompletionRequest


@dataclass
class ChoiceResult:
    """A finished choice, accumulated from its chunks."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenText] = field(default_factory=list)
    finish_reason: str | None = None
    echo: str | None = None  # the prompt, when the text is to start with it (completions' echo)
    echo_logprobs: list[PromptToken] | None = None  # its tokens, when echoed with logprobs
    prompt_logprobs: list[PromptToken] | None = None  # vLLM's prompt_logprobs, when asked


@dataclass
class CompletionResult:
    """A finished request: its choices in order and its token counts."""

    choices: list[ChoiceResult]
    prompt_tokens: int
    completion_tokens: int
    cache_hit: bool = False
    model_version: str | None = None  # of the model that generated it

    @property
    def usage(self) -> Usage:
        """OpenAI usage object."""
        total = self.prompt_tokens + self.completion_tokens
        return Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            total_tokens=total,
        )


class Accumulator:
    """Builds a ``CompletionResult`` from a stream of deltas (and its usage at any point)."""

    def __init__(
        self,
        num_choices: int,
        choices_per_prompt: int,
        prompts: PromptScoring | None = None,
    ) -> None:
        self.choices = [ChoiceResult() for _ in range(num_choices)]
        self._choices_per_prompt = choices_per_prompt
        self._prompt_tokens: dict[int, int] = {}
        self._model_version: str | None = None
        self._prompts = prompts or PromptScoring()

    @classmethod
    def of(cls, request: Request) -> Accumulator:
        """An accumulator sized for every prompt and choice of ``request``."""
        if not isinstance(request, CompletionRequest):
            return cls(request.n, request.n)
        prompts = request.prompts
        scoring = PromptScoring(
            echoed=prompts if request.echo else None,
            echo_top=request.logprobs if request.echo else None,
            prompt_top=request.prompt_logprobs,
        )
        return cls(len(prompts) * request.n, request.n, scoring)

    def add(self, delta: ChoiceDelta) -> None:
        """Fold in one delta."""
        choice, chunk = self.choices[delta.index], delta.chunk
        choice.text += chunk.text
        choice.token_ids.extend(chunk.token_ids)
        choice.logprobs.extend(chunk.logprobs or [])
        choice.finish_reason = chunk.finish_reason or choice.finish_reason
        if self._prompts.echoed is not None and choice.echo is None:
            choice.echo = self._echo_text(delta.index, chunk.prompt_logprobs)
        if chunk.prompt_logprobs is not None:
            choice.echo_logprobs = _top(chunk.prompt_logprobs, self._prompts.echo_top)
            choice.prompt_logprobs = _top(chunk.prompt_logprobs, self._prompts.prompt_top)
        # The prompt is counted once however many choices sample from it.
        if chunk.prompt_tokens:
            self._prompt_tokens[delta.index // self._choices_per_prompt] = chunk.prompt_tokens
        self._model_version = chunk.model_version or self._model_version

    def _echo_text(self, index: int, prompt_tokens: list[PromptToken] | None) -> str:
        """The prompt a choice echoes: its text, or a tokenized prompt's token texts (the
        engine scores echoed tokenized prompts, so their texts come with the first chunk)."""
        assert self._prompts.echoed is not None
        prompt = self._prompts.echoed[index // self._choices_per_prompt]
        if isinstance(prompt, str):
            return prompt
        return "".join(t.text for t in prompt_tokens or [])

    def result(self) -> CompletionResult:
        """The request so far."""
        completion_tokens = sum(len(c.token_ids) for c in self.choices)
        prompt_tokens = sum(self._prompt_tokens.values())
        return CompletionResult(
            self.choices, prompt_tokens, completion_tokens, model_version=self._model_version
        )


@dataclass(frozen=True)
class PromptScoring:
    """What a completions request wants of its prompts: echoed (these prompts), their tokens'
    logprobs with the echo (``echo_top`` alternatives each), vLLM's ``prompt_logprobs``."""

    echoed: list[str | list[int]] | None = None
    echo_top: int | None = None
    prompt_top: int | None = None


def _top(tokens: list[PromptToken], n_top: int | None) -> list[PromptToken] | None:
    """The prompt's tokens with ``n_top`` alternatives each (the engine scored the most any
    part of the request asked for); None when nobody asked."""
    if n_top is None:
        return None
    return [dataclasses.replace(t, top=t.top[:n_top]) for t in tokens]


@dataclass(frozen=True)
class ChoiceDelta:
    """New output of one choice in a stream (the choice index is OpenAI's ``index``)."""

    index: int
    chunk: TextChunk
