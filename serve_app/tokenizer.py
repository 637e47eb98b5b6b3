"""The model's tokenizer: `tokenizer.json` plus the chat template of `tokenizer_config.json`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jinja2
import jinja2.sandbox
from tokenizers import Tokenizer as HFTokenizer


class Tokenizer:
    """Encodes prompts, renders chat messages and decodes token ids."""

    def __init__(self, model_dir: Path) -> None:
        self._tokenizer = HFTokenizer.from_file(str(model_dir / "tokenizer.json"))
        config_path = model_dir / "tokenizer_config.json"
        config: dict[str, Any] = (
            json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        )
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        template = config.get("chat_template")
        # Templates come with the model; a sandbox keeps them from reaching Python internals.
        environment = jinja2.sandbox.ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True
        )
        self._chat_template = environment.from_string(template) if template else None

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, special tokens included."""
        return int(self._tokenizer.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special-token strings in it are treated as special."""
        ids: list[int] = self._tokenizer.encode(text, add_special_tokens=False).ids
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of many texts in one call (the library parallelizes it)."""
        encodings = self._tokenizer.encode_batch(texts, add_special_tokens=False)
        return [encoding.ids for encoding in encodings]

    def decode(self, token_ids: list[int]) -> str:
        """Text of ``token_ids`` without special tokens."""
        text: str = self._tokenizer.decode(token_ids, skip_special_tokens=True)
        return text

    def decode_token(self, token_id: int) -> str:
        """Text of a single token, special tokens included (for logprobs)."""
        text: str = self._tokenizer.decode([token_id], skip_special_tokens=False)
        return text

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        """Render chat messages into a prompt that ends where the assistant's reply begins."""
        if self._chat_template is None:
            raise ValueError("this model's tokenizer_config.json has no chat_template")
        try:
            return self._chat_template.render(
                messages=messages,
                add_generation_prompt=True,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except jinja2.TemplateError as exc:
            raise ValueError(f"the chat template rejected the messages: {exc}") from exc


def _token_text(token: str | dict[str, Any] | None) -> str:
    """Special tokens appear either as strings or as AddedToken dicts in tokenizer configs."""
    if isinstance(token, dict):
        return str(token.get("content", ""))
    return token or ""
