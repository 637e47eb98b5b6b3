"""Structured output: what a sequence is allowed to generate, as an llguidance grammar.

The request tier builds a ``StructuredOutput`` from the API's fields (``response_format``,
``guided_*``, tool calls) and calls ``check`` before the request is queued, so that an invalid
schema, regex or grammar is a 400 naming the parameter, never a failure inside a step. The
engine compiles ``grammar()`` against the model's tokenizer once per sequence.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

from llguidance import LLMatcher

StructuredKind = Literal["json_schema", "json_object", "regex", "choice", "grammar"]

# JSON output without free whitespace: compact answers, and a model cannot pad forever.
_JSON_OPTIONS = {"whitespace_flexible": False, "coerce_one_of": True}


class InvalidStructuredOutput(ValueError):
    """The schema, regex, choices or grammar cannot be compiled; the message says why."""


@dataclass(frozen=True)
class StructuredOutput:
    """A constraint on one sequence's output.

    ``spec`` is the JSON Schema as JSON text (``json_schema``), ignored (``json_object``: any
    JSON object), a regular expression (``regex``), a JSON list of strings (``choice``: the
    output is exactly one of them) or a Lark grammar in llguidance's dialect (``grammar``).
    The text form keeps the value hashable and identical across hops and cache keys.
    """

    kind: StructuredKind
    spec: str = ""

    def grammar(self) -> str:
        """The llguidance grammar (a JSON string) that accepts exactly the allowed outputs."""
        if self.kind == "json_schema":
            return LLMatcher.grammar_from_json_schema(self.spec, defaults=_JSON_OPTIONS)  # type: ignore[arg-type]
        if self.kind == "json_object":
            schema = {"type": "object"}
            return LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)  # type: ignore[arg-type]
        if self.kind == "regex":
            return LLMatcher.grammar_from_regex(self.spec)
        if self.kind == "choice":
            choices = json.loads(self.spec)
            alternatives = " | ".join(json.dumps(choice) for choice in choices)
            return LLMatcher.grammar_from_lark(f"start: {alternatives}")
        return LLMatcher.grammar_from_lark(self.spec)


def check(structured: StructuredOutput) -> None:
    """Raise ``InvalidStructuredOutput`` if ``structured`` cannot be compiled."""
    if structured.kind == "choice":
        choices = json.loads(structured.spec)
        if not choices or not all(isinstance(c, str) and c for c in choices):
            raise InvalidStructuredOutput("choices must be a non-empty list of non-empty strings")
    try:
        error = LLMatcher.validate_grammar(structured.grammar())
    except ValueError as exc:  # a schema that is not a JSON object
        raise InvalidStructuredOutput(str(exc)) from None
    if error:
        raise InvalidStructuredOutput(error.strip())
