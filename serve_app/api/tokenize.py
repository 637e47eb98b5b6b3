"""vLLM's ``/tokenize`` and ``/detokenize`` wire types.

``POST /tokenize`` takes a prompt or chat messages and answers the token ids the model would see
(the same ids, and the same count, as a completion of that prompt or chat);
``POST /detokenize`` turns token ids back into text.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, model_validator

from serve_app.api.errors import InvalidParam
from serve_app.api.openai import ChatMessage, StrictRequest


class TokenizeRequest(StrictRequest):
    """``POST /tokenize``: vLLM's ``{"model", "prompt"}`` or ``{"model", "messages",
    "add_generation_prompt"}``; chat messages are rendered by the model's chat template."""

    model: str | None = Field(default=None, description="Served model name; optional, as in vLLM.")
    prompt: str | None = Field(
        default=None, description="Text to tokenize as a completion's prompt; or give messages."
    )
    messages: list[ChatMessage] | None = Field(
        default=None, min_length=1, description="A conversation to tokenize; or give prompt."
    )
    add_generation_prompt: bool = Field(
        default=True,
        description="With messages: end the prompt where the assistant's reply begins.",
    )
    chat_template_kwargs: dict[str, Any] | None = Field(
        default=None, description="With messages: extra variables for the chat template."
    )
    return_token_strs: bool = Field(
        default=False, description="Also return each token's text (vLLM's token_strs)."
    )

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise InvalidParam("prompt", "give exactly one of prompt and messages")
        return self

    def message_dicts(self) -> list[dict[str, str]] | None:
        """Messages as the chat template expects them; None for a text prompt."""
        if self.messages is None:
            return None
        return [{"role": m.role, "content": m.text()} for m in self.messages]


class TokenizeResponse(BaseModel):
    """The prompt's token ids, their count, and the model's context length."""

    count: int = Field(description="Number of tokens.")
    max_model_len: int = Field(description="The model's context length, in tokens.")
    tokens: list[int] = Field(description="The token ids.")
    token_strs: list[str] | None = Field(
        default=None, description="Each token's text, when return_token_strs was set."
    )


class DetokenizeRequest(StrictRequest):
    """``POST /detokenize``."""

    model: str | None = Field(default=None, description="Served model name; optional.")
    tokens: list[int] = Field(description="Token ids to turn into text.")


class DetokenizeResponse(BaseModel):
    """The text of the token ids."""

    prompt: str = Field(description="The decoded text (special tokens skipped).")
