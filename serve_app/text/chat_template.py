"""The model's chat template: renders messages into the prompt the model was trained on.

Templates are found where transformers looks for them: ``chat_template.jinja`` (what Optimum and
recent transformers write; named extras in ``additional_chat_templates/NAME.jinja``), else the
``chat_template`` of ``tokenizer_config.json`` (one string, or a list of named templates), else
``chat_template.json``. They render in an environment equivalent to transformers'
``apply_chat_template``: a sandbox with ``trim_blocks``/``lstrip_blocks`` and the ``loopcontrols``
extension (``{% break %}``, ``{% continue %}``), the ``{% generation %}`` tag, the globals
``raise_exception``, ``strftime_now``, ``dict`` and ``namespace``, a ``tojson`` filter that does
not escape HTML, and the variables ``messages``, ``tools``, ``documents``,
``add_generation_prompt`` and the named special tokens (``bos_token``, ``eos_token``, ...).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import jinja2.sandbox
import jinja2.utils

# The named special tokens transformers passes to every template (SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKENS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
# Names a message's reasoning arrives under; templates read one or the other (as transformers).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(ValueError):
    """The model folder's chat template cannot be loaded (the message names the file)."""


class ChatTemplate:
    """The chat template(s) of a model folder, compiled once."""

    def __init__(self, model_dir: Path) -> None:
        config = _read_json(model_dir / "tokenizer_config.json")
        token_map = _read_json(model_dir / "special_tokens_map.json")
        self.special_tokens = {
            name: _token_text(config.get(name, token_map.get(name)))
            for name in SPECIAL_TOKENS
            if config.get(name, token_map.get(name)) is not None
        }
        self.bos_token = self.special_tokens.get("bos_token", "")
        self.eos_token = self.special_tokens.get("eos_token", "")
        sources = dict(_template_sources(model_dir, config))
        environment = _environment()
        self._templates: dict[str, jinja2.Template] = {}
        for name, (source, origin) in sources.items():
            try:
                self._templates[name] = environment.from_string(source)
            except jinja2.TemplateError as exc:
                line = f" line {exc.lineno}" if isinstance(exc, jinja2.TemplateSyntaxError) else ""
                raise ChatTemplateError(
                    f"the chat template in {origin} does not compile ({line.strip() or 'at load'}"
                    f"): {exc}"
                ) from None

    @property
    def names(self) -> list[str]:
        """Names of the templates found ("default" for the unnamed one)."""
        return sorted(self._templates)

    def render(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        variables: Mapping[str, Any] | None = None,
        *,
        tools: list[dict[str, Any]] | None = None,
        documents: list[dict[str, Any]] | None = None,
    ) -> str:
        """Render chat messages into a prompt; with ``add_generation_prompt`` it ends where the
        assistant's reply begins. ``variables`` are extra template variables (vLLM's
        ``chat_template_kwargs``); they may override the special tokens, not the messages.
        ``tools`` (JSON schemas) and ``documents`` are the template variables of the same names.

        Raises ValueError (a 400 for the client) when the template rejects the messages, e.g.
        through ``raise_exception``, or when the model has no chat template.
        """
        template = self._choose(tools)
        context = {
            **self.special_tokens,
            **_plain(dict(variables or {})),
            "messages": [_message(m) for m in messages],
            "tools": _plain(tools),
            "documents": _plain(documents),
            "add_generation_prompt": add_generation_prompt,
        }
        try:
            return template.render(context)
        except jinja2.TemplateError as exc:
            raise ValueError(f"the chat template rejected the messages: {exc}") from exc
        except (TypeError, KeyError, IndexError, AttributeError, ValueError) as exc:
            # e.g. a template that concatenates message['content'] given a list of parts
            raise ValueError(
                f"the chat template rejected the messages: {type(exc).__name__}: {exc}"
            ) from exc

    def _choose(self, tools: list[dict[str, Any]] | None) -> jinja2.Template:
        """transformers' choice: "tool_use" when tools are given and it exists, else "default"."""
        if tools and "tool_use" in self._templates:
            return self._templates["tool_use"]
        if "default" in self._templates:
            return self._templates["default"]
        if not self._templates:
            raise ValueError(
                "this model has no chat template (no chat_template.jinja, and no chat_template "
                "in tokenizer_config.json); send a prompt to /v1/completions instead"
            )
        raise ValueError(
            f"this model has several chat templates ({', '.join(self.names)}) and none is "
            "named default"
        )


def _template_sources(
    model_dir: Path, config: dict[str, Any]
) -> Iterator[tuple[str, tuple[str, str]]]:
    """(name, (template source, where it came from)) for every template the folder holds."""
    jinja_file = model_dir / "chat_template.jinja"
    extras = model_dir / "additional_chat_templates"
    if jinja_file.is_file() or extras.is_dir():
        if jinja_file.is_file():
            yield "default", (jinja_file.read_text(encoding="utf-8"), jinja_file.name)
        for path in sorted(extras.glob("*.jinja")) if extras.is_dir() else []:
            yield path.stem, (path.read_text(encoding="utf-8"), f"{extras.name}/{path.name}")
        return
    template = config.get("chat_template")
    origin = "tokenizer_config.json"
    if template is None:
        template = _read_json(model_dir / "chat_template.json").get("chat_template")
        origin = "chat_template.json"
    if isinstance(template, str):
        yield "default", (template, origin)
    elif isinstance(template, list):
        for entry in template:
            if not (isinstance(entry, dict) and isinstance(entry.get("template"), str)):
                raise ChatTemplateError(
                    f"{origin}'s chat_template list holds an entry that is not "
                    '{"name": ..., "template": ...}'
                )
            name = str(entry.get("name", "default"))
            yield name, (entry["template"], f"{origin} (template {name!r})")
    elif template is not None:
        raise ChatTemplateError(
            f"{origin}'s chat_template must be a string or a list of named templates, "
            f"not {type(template).__name__}"
        )


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: marks assistant text for training masks in
    transformers; rendering only needs its body."""

    tags = {"generation"}  # noqa: RUF012 - typed by jinja2.ext.Extension

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        call = self.call_method("_body")
        return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return str(caller())


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # transformers' filter: unlike Jinja's own tojson it does not escape HTML characters.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _TemplateDict:
    """``dict(...)`` and ``dict.fromkeys(...)`` without the type itself reaching the template."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """Jinja's ``namespace`` refusing underscore-prefixed attributes, as transformers' does."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # Jinja's own signature trick
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _Namespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot set underscore-prefixed attributes on a namespace: {name!r}"
            )


def _environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    # Templates come with the model; the sandbox keeps them from reaching Python internals.
    environment = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    environment.globals["dict"] = _TemplateDict()
    environment.globals["namespace"] = _Namespace
    return environment


def _message(message: Mapping[str, Any]) -> dict[str, Any]:
    """A message as transformers hands it to templates: None-valued keys dropped, reasoning
    under both of the names templates read."""
    plain: dict[str, Any] = {k: _plain(v) for k, v in message.items() if v is not None}
    reasoning = next((plain[k] for k in _REASONING_FIELDS if plain.get(k) is not None), None)
    if reasoning is not None:
        plain = {"thinking": reasoning, **plain, "reasoning_content": reasoning}
    return plain


def _plain(value: Any) -> Any:
    """JSON-like data rebuilt from plain types, so a template sees no object's methods."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ChatTemplateError(f"{path.name} is not valid JSON: {exc}") from None
    return data if isinstance(data, dict) else {}


def _token_text(token: str | dict[str, Any] | None) -> str:
    """Special tokens appear either as strings or as AddedToken dicts in tokenizer configs."""
    if isinstance(token, dict):
        return str(token.get("content", ""))
    return token or ""
