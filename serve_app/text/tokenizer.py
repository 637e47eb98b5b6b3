"""The model's tokenizer (`tokenizer.json`): text to token ids and back."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer


class Tokenizer:
    """Encodes prompts and decodes token ids."""

    def __init__(self, model_dir: Path) -> None:
        self._tokenizer = HFTokenizer.from_file(str(model_dir / "tokenizer.json"))
        added = self._tokenizer.get_added_tokens_decoder()
        self._special_ids = frozenset(i for i, token in added.items() if token.special)

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

    def is_special(self, token_id: int) -> bool:
        """Whether ``token_id`` is a special token (end-of-text, chat markers...)."""
        return token_id in self._special_ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of ``token_ids``, by default without special tokens."""
        text: str = self._tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)
        return text

    def decode_token(self, token_id: int) -> str:
        """Text of a single token, special tokens included (for logprobs)."""
        text: str = self._tokenizer.decode([token_id], skip_special_tokens=False)
        return text
