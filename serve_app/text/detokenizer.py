"""Streaming text out of token ids, and OpenAI stop strings over that stream.

Both objects hold one request's state; the batching deployment keeps one pair per request and
feeds them each engine step's new tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

INITIAL_CONTEXT_TOKENS = 5  # prompt tokens decoded before the output, as vLLM does
MAX_PENDING_TOKENS = 16  # valid UTF-8 completes within a few tokens; this bounds byte garbage
REPLACEMENT_CHARACTER = "\ufffd"


class TokenDecoder(Protocol):
    """Anything that turns token ids into text, such as `serve_app.text.tokenizer.Tokenizer`."""

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of ``token_ids``, with or without special tokens."""
        ...


class IncrementalDetokenizer:
    """Turns a sequence's tokens into text deltas, decoding only a short window per token.

    This is the prefix-offset/read-offset scheme of vLLM and TGI: the window starts with the
    tokens emitted last, kept as context that fixes spacing, and ``read_offset`` marks where the
    unemitted tokens begin. Text ending in U+FFFD holds half a multi-byte character, so it waits
    for the tokens that complete it.
    """

    def __init__(
        self,
        tokenizer: TokenDecoder,
        prompt_token_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._window = list(prompt_token_ids[-INITIAL_CONTEXT_TOKENS:])
        self._read_offset = len(self._window)  # window index where unemitted tokens start
        self._prefix_text = self._decode(self._window)

    def add(self, token_ids: Sequence[int]) -> str:
        """Append new tokens and return the text that is now complete ("" if none is)."""
        deltas = []
        for token_id in token_ids:
            self._window.append(token_id)
            deltas.append(self._emit(force=False))
        return "".join(deltas)

    def flush(self) -> str:
        """Return the text still held back at the end of the sequence, broken characters too."""
        return self._emit(force=True)

    def _emit(self, force: bool) -> str:
        """Text of the tokens after ``read_offset`` if it is complete, moving the window."""
        if self._read_offset == len(self._window):
            return ""
        text = self._decode(self._window)
        if not force and self._must_wait(text):
            return ""
        # The emitted tokens become the next window's context; older ones are never decoded again.
        del self._window[: self._read_offset]
        self._read_offset = len(self._window)
        delta = text[len(self._prefix_text) :]
        self._prefix_text = self._decode(self._window)
        return delta

    def _decode(self, token_ids: list[int]) -> str:
        if self._skip_special_tokens:
            return self._tokenizer.decode(token_ids)  # the default: any plain decoder will do
        return self._tokenizer.decode(token_ids, skip_special_tokens=False)

    def _must_wait(self, text: str) -> bool:
        """Whether the window's text may still change: a split character or no new text yet."""
        if len(self._window) - self._read_offset >= MAX_PENDING_TOKENS:
            return False
        # Text that has not grown (skipped special tokens) waits so the context stays real text.
        return text.endswith(REPLACEMENT_CHARACTER) or len(text) <= len(self._prefix_text)


class StopStringMatcher:
    """Cuts a text stream at the first stop string, never emitting any part of one.

    The longest tail that could still grow into a stop string is held back until the next
    delta shows whether it does. The stop that completes first wins (the earliest-starting one
    among those ending together), so the result does not depend on how the text was chunked.
    """

    def __init__(self, stop: Sequence[str], include_stop: bool = False) -> None:
        self._stop = [s for s in stop if s]  # an empty stop string would match everywhere
        self._include_stop = include_stop  # vLLM's include_stop_str_in_output
        self._held = ""
        self._stopped = False

    def feed(self, delta: str) -> tuple[str, bool]:
        """Return the text that is safe to emit now and whether a stop string was reached."""
        if self._stopped:
            return "", True
        text = self._held + delta
        match = self._first_stop(text)
        if match is not None:
            self._stopped = True
            self._held = ""
            start, end = match
            return text[: end if self._include_stop else start], True
        held = self._partial_stop_length(text)
        self._held = text[len(text) - held :]
        return text[: len(text) - held], False

    def flush(self) -> str:
        """Return the held-back text when the sequence ends without a stop string."""
        held, self._held = self._held, ""
        return held

    def _first_stop(self, text: str) -> tuple[int, int] | None:
        """Where the first stop string to complete in ``text`` starts and ends, if any does."""
        matches = []
        for stop in self._stop:
            start = text.find(stop)
            if start >= 0:
                matches.append((start + len(stop), start))
        if not matches:
            return None
        end, start = min(matches)
        return start, end

    def _partial_stop_length(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that begins some stop string."""
        longest = max((len(s) - 1 for s in self._stop), default=0)
        for length in range(min(longest, len(text)), 0, -1):
            tail = text[-length:]
            if any(s.startswith(tail) for s in self._stop):
                return length
        return 0
