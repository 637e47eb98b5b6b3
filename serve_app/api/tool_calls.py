"""Tool calls: the JSON a forced call is generated as, and turning a choice's text into OpenAI
``tool_calls``, piece by piece (a stream) or whole (a finished answer, assembled from the same
pieces so that both agree).

Three formats, chosen by ``tool_choice``:

- a named function (``{"type": "function", "function": {"name": ...}}``): the output is
  constrained to that function's ``parameters`` schema, so the whole text is its arguments;
- ``"required"``: the output is constrained to vLLM's shape, a JSON array of
  ``{"name": ..., "parameters": {...}}`` (one item when ``parallel_tool_calls`` is false);
- ``"auto"``: the model writes calls in its own family's syntax, read by a parser from
  ``TOOL_CALL_PARSERS`` (the app option ``tool_call_parser``); text outside calls is content.
"""

from __future__ import annotations

import json
import uuid
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

# A function declared without ``parameters`` takes none (OpenAI's meaning).
EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class FunctionCall:
    """One finished call: the function's name and its arguments as JSON text."""

    name: str
    arguments: str


@dataclass(frozen=True)
class CallPiece:
    """A streamed fragment of call ``index``: its name on its first piece, then arguments."""

    index: int
    name: str | None = None
    arguments: str = ""


@dataclass
class Pieces:
    """What a stream lets out for some text: content, and fragments of calls."""

    content: str = ""
    calls: list[CallPiece] = field(default_factory=list)

    def add_arguments(self, index: int, text: str) -> None:
        """Append ``text`` to call ``index``'s arguments, merging with its last fragment."""
        if self.calls and self.calls[-1].index == index:
            last = self.calls[-1]
            self.calls[-1] = CallPiece(index, last.name, last.arguments + text)
        else:
            self.calls.append(CallPiece(index, None, text))

    def extend(self, later: Pieces) -> None:
        """Append what a later step let out."""
        self.content += later.content
        for piece in later.calls:
            if piece.name is not None:
                self.calls.append(piece)
            else:
                self.add_arguments(piece.index, piece.arguments)


@dataclass(frozen=True)
class ExtractedCalls:
    """A finished choice's text as content and calls (content is None when only calls)."""

    content: str | None
    calls: list[FunctionCall]


class ToolCallStream(ABC):
    """Reads one choice's text as it streams in."""

    @abstractmethod
    def feed(self, text: str) -> Pieces:
        """What ``text`` (the next part of the output) lets out; a stream may hold text back."""

    @abstractmethod
    def end(self) -> Pieces:
        """What was held back, once the output is over."""


class ToolCallFormat(ABC):
    """How a choice's text holds tool calls."""

    @abstractmethod
    def stream(self) -> ToolCallStream:
        """A reader for one choice's streamed text."""

    def extract(self, text: str) -> ExtractedCalls:
        """A finished choice's content and calls, exactly as a stream of it would give them."""
        stream = self.stream()
        pieces = stream.feed(text)
        pieces.extend(stream.end())
        names: dict[int, str] = {}
        arguments: dict[int, str] = {}
        for piece in pieces.calls:
            if piece.name is not None:
                names[piece.index] = piece.name
            arguments[piece.index] = arguments.get(piece.index, "") + piece.arguments
        calls = [FunctionCall(names[i], arguments.get(i, "")) for i in sorted(names)]
        content = pieces.content if pieces.content or not calls else None
        return ExtractedCalls(content, calls)


def finish_reason(reason: str | None, has_calls: bool) -> str | None:
    """OpenAI's ``tool_calls`` for a choice that ended by itself after calling tools."""
    return "tool_calls" if has_calls and reason == "stop" else reason


def new_call_id() -> str:
    """An OpenAI-style tool call id."""
    return f"call_{uuid.uuid4().hex[:24]}"


# Forced calls: the schemas the output is constrained to, and their readers.


def required_calls_schema(
    functions: Sequence[tuple[str, dict[str, Any]]], parallel: bool
) -> dict[str, Any]:
    """The JSON Schema of ``tool_choice: "required"``: an array of one or more
    ``{"name", "parameters"}`` calls of the given functions (``(name, parameters schema)``).

    Each function's ``$defs`` move to the top, where its ``#/$defs/...`` references resolve.
    """
    definitions: dict[str, Any] = {}
    variants = []
    for name, parameters in functions:
        parameters = dict(parameters)
        definitions.update(parameters.pop("$defs", {}))
        variants.append(
            {
                "type": "object",
                "properties": {"name": {"const": name}, "parameters": parameters},
                "required": ["name", "parameters"],
                "additionalProperties": False,
            }
        )
    items = variants[0] if len(variants) == 1 else {"anyOf": variants}
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": items}
    if not parallel:
        schema["maxItems"] = 1
    if definitions:
        schema["$defs"] = definitions
    return schema


class NamedFunction(ToolCallFormat):
    """A forced call of one function: the whole output is its arguments."""

    def __init__(self, name: str) -> None:
        self.name = name

    def stream(self) -> ToolCallStream:
        return _NamedFunctionStream(self.name)


class _NamedFunctionStream(ToolCallStream):
    def __init__(self, name: str) -> None:
        self._name: str | None = name  # None once announced

    def feed(self, text: str) -> Pieces:
        if self._name is None:
            return Pieces(calls=[CallPiece(0, None, text)] if text else [])
        name, self._name = self._name, None
        return Pieces(calls=[CallPiece(0, name, text)])

    def end(self) -> Pieces:
        return self.feed("") if self._name is not None else Pieces()


class RequiredCalls(ToolCallFormat):
    """``tool_choice: "required"``: the output is ``required_calls_schema``'s array."""

    def stream(self) -> ToolCallStream:
        return _CallArrayStream()


class _CallArrayStream(ToolCallStream):
    """Reads ``[{"name": ..., "parameters": ...}, ...]`` character by character: a call is
    announced once its name is read, and its arguments are the ``parameters`` value's text,
    let out as it arrives."""

    _CALL_DEPTH = 2  # the depth of a call object's own keys: inside the array, then the object

    def __init__(self) -> None:
        self._depth = 0
        self._in_string = False
        self._escaped = False
        self._string = ""  # the string being read (keys and the name are decoded from it)
        self._expect_key = True
        self._key: str | None = None
        self._capturing = False  # inside the parameters value
        self._index = -1
        self._announced = True  # whether the current call's name has been let out
        self._held = ""  # arguments read before the call's name
        self._out = Pieces()

    def feed(self, text: str) -> Pieces:
        for char in text:
            self._step(char)
        out, self._out = self._out, Pieces()
        return out

    def end(self) -> Pieces:
        return Pieces()

    def _step(self, char: str) -> None:
        at_call_level = self._depth == self._CALL_DEPTH and not self._in_string
        if self._capturing and at_call_level and char in ",}":
            self._capturing = False
        elif (
            at_call_level
            and not self._capturing
            and not self._expect_key
            and self._key == "parameters"
            and not char.isspace()
        ):
            self._capturing = True
        if self._capturing:
            self._arguments(char)
        self._track(char)

    def _track(self, char: str) -> None:
        if self._in_string:
            if self._escaped:
                self._escaped = False
            elif char == "\\":
                self._escaped = True
            elif char == '"':
                self._in_string = False
                self._string_read()
                return
            self._string += char
        elif char == '"':
            self._in_string, self._string = True, ""
        elif char in "{[":
            self._depth += 1
            if self._depth == self._CALL_DEPTH and char == "{":
                self._index += 1
                self._announced, self._held = False, ""
                self._expect_key, self._key = True, None
        elif char in "}]":
            self._depth -= 1
        elif self._depth == self._CALL_DEPTH and char in ":,":
            self._expect_key = char == ","

    def _string_read(self) -> None:
        if self._depth != self._CALL_DEPTH or self._capturing:
            return
        value = json.loads(f'"{self._string}"')
        if self._expect_key:
            self._key = value
        elif self._key == "name" and not self._announced:
            self._announced = True
            self._out.calls.append(CallPiece(self._index, value, self._held))

    def _arguments(self, char: str) -> None:
        if self._announced:
            self._out.add_arguments(self._index, char)
        else:
            self._held += char


# Parsers of calls the model writes itself (tool_choice "auto").


class HermesToolCalls(ToolCallFormat):
    """Hermes' and Qwen's ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``."""

    OPEN = "<tool_call>"
    CLOSE = "</tool_call>"

    def stream(self) -> ToolCallStream:
        return _TaggedCallStream(self.OPEN, self.CLOSE)


class _TaggedCallStream(ToolCallStream):
    """Content streams as it comes, except text that may begin the opening tag; a call is
    held until its closing tag, then let out whole. A call that is not valid JSON stays
    content, tags and all."""

    def __init__(self, open_tag: str, close_tag: str) -> None:
        self._open, self._close = open_tag, close_tag
        self._buffer = ""
        self._in_call = False
        self._calls = 0

    def feed(self, text: str) -> Pieces:
        self._buffer += text
        out = Pieces()
        while True:
            if not self._in_call:
                start = self._buffer.find(self._open)
                if start < 0:
                    held = _partial_tag_length(self._buffer, self._open)
                    self._content(out, self._buffer[: len(self._buffer) - held])
                    self._buffer = self._buffer[len(self._buffer) - held :]
                    return out
                self._content(out, self._buffer[:start])
                self._buffer = self._buffer[start + len(self._open) :]
                self._in_call = True
            end = self._buffer.find(self._close)
            if end < 0:
                return out
            self._call(out, self._buffer[:end], closed=True)
            self._buffer = self._buffer[end + len(self._close) :]
            self._in_call = False

    def end(self) -> Pieces:
        out = Pieces()
        if self._in_call:
            self._call(out, self._buffer, closed=False)
        else:
            self._content(out, self._buffer)
        self._buffer = ""
        return out

    def _content(self, out: Pieces, text: str) -> None:
        if self._calls and text.isspace():
            return  # the line breaks between and after calls are not content
        out.content += text

    def _call(self, out: Pieces, body: str, closed: bool) -> None:
        call = _parse_call(body)
        if call is None:
            out.content += self._open + body + (self._close if closed else "")
            return
        out.calls.append(CallPiece(self._calls, call.name, call.arguments))
        self._calls += 1


class MistralToolCalls(ToolCallFormat):
    """Mistral's ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`` at the end of the
    output (its v3 tokenizers' format)."""

    MARKER = "[TOOL_CALLS]"

    def stream(self) -> ToolCallStream:
        return _MarkedCallsStream(self.MARKER)


class _MarkedCallsStream(ToolCallStream):
    """Content streams as it comes, except text that may begin the marker; everything after
    the marker is held to the end and read as a JSON array of calls. Text that is not one stays
    content, marker and all."""

    def __init__(self, marker: str) -> None:
        self._marker = marker
        self._buffer = ""
        self._marked = False

    def feed(self, text: str) -> Pieces:
        self._buffer += text
        out = Pieces()
        if self._marked:
            return out
        start = self._buffer.find(self._marker)
        if start < 0:
            held = _partial_tag_length(self._buffer, self._marker)
            out.content = self._buffer[: len(self._buffer) - held]
            self._buffer = self._buffer[len(self._buffer) - held :]
            return out
        out.content = self._buffer[:start]
        self._buffer = self._buffer[start + len(self._marker) :]
        self._marked = True
        return out

    def end(self) -> Pieces:
        out = Pieces()
        calls = _parse_call_array(self._buffer) if self._marked else None
        if calls is None:
            out.content = (self._marker if self._marked else "") + self._buffer
        else:
            out.calls = [CallPiece(i, c.name, c.arguments) for i, c in enumerate(calls)]
        self._buffer = ""
        return out


def _parse_call_array(text: str) -> list[FunctionCall] | None:
    """A JSON array of ``{"name": ..., "arguments": ...}`` as calls; None if it is not one."""
    try:
        items = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(items, list) or not items:
        return None
    calls = []
    for item in items:
        call = _call_of(item)
        if call is None:
            return None
        calls.append(call)
    return calls


def _partial_tag_length(text: str, tag: str) -> int:
    """The length of the longest end of ``text`` that begins ``tag``."""
    for length in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-length:]):
            return length
    return 0


def _parse_call(body: str) -> FunctionCall | None:
    """``{"name": ..., "arguments": ...}`` (or ``"parameters"``) as a call; None if it is not."""
    try:
        call = json.loads(body)
    except json.JSONDecodeError:
        return None
    return _call_of(call)


def _call_of(call: Any) -> FunctionCall | None:
    """A decoded ``{"name": ..., "arguments": ...}`` (or ``"parameters"``) as a call."""
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    arguments = call.get("arguments", call.get("parameters", {}))
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return FunctionCall(call["name"], arguments)


TOOL_CALL_PARSERS: dict[str, type[ToolCallFormat]] = {
    "hermes": HermesToolCalls,
    "mistral": MistralToolCalls,
}
"""Parsers of ``tool_choice: "auto"`` answers by model family; ``AppArgs.tool_call_parser``
names one. (Qwen2.5 and Qwen3 write Hermes' syntax.)"""


def tool_call_parser(name: str) -> ToolCallFormat:
    """The parser named ``name`` (one of ``TOOL_CALL_PARSERS``)."""
    return TOOL_CALL_PARSERS[name]()
