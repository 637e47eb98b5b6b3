"""An offline training corpus from text Python ships, and the byte-level BPE tokenizer for it."""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import io
import json
import pkgutil
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]  # ids 0, 1, 2

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Importing these opens windows, browsers or runs test suites; the rest only define things.
_SKIPPED_MODULES = frozenset(
    {"test", "idlelib", "tkinter", "turtle", "turtledemo", "antigravity", "this", "lib2to3"}
)
_MIN_DOC_CHARS = 40  # shorter docstrings ("Return self==value.") are boilerplate


@dataclass(frozen=True)
class CorpusSplit:
    """Documents split deterministically by content hash into train and held-out sets."""

    train: list[str]
    held_out: list[str]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Swallow the prints and warnings some modules emit when imported."""
    sink = io.StringIO()
    with (
        warnings.catch_warnings(),
        contextlib.redirect_stdout(sink),
        contextlib.redirect_stderr(sink),
    ):
        warnings.simplefilter("ignore")
        yield


def _import_quietly(name: str) -> ModuleType | None:
    with _quiet():
        try:
            return importlib.import_module(name)
        except BaseException:
            return None


def _ignore_import_error(_: str) -> None:
    return None


def _module_names() -> Iterator[str]:
    """Standard-library modules and their public submodules, sorted."""
    for top in sorted(sys.stdlib_module_names):
        if top in _SKIPPED_MODULES:
            continue
        module = _import_quietly(top)
        if module is None:
            continue
        yield top
        if not hasattr(module, "__path__"):
            continue
        with _quiet():
            subnames = sorted(
                info.name
                for info in pkgutil.walk_packages(
                    module.__path__, prefix=f"{top}.", onerror=_ignore_import_error
                )
            )
        for name in subnames:
            parts = name.split(".")
            # `_`-prefixed parts include `__main__`, which runs a program when imported.
            if not any(p.startswith("_") or "test" in p or p in _SKIPPED_MODULES for p in parts):
                yield name


def _docstrings(module: ModuleType) -> Iterator[str]:
    """The module's docstring, then those of its public classes, functions and methods.

    Re-exported objects repeat here; `collect_documents` keeps only the first copy.
    """
    yield module.__doc__ or ""
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_"):
            continue
        if inspect.isclass(obj):
            yield obj.__doc__ or ""
            for attr_name, attr in sorted(vars(obj).items()):
                if not attr_name.startswith("_") and callable(attr):
                    yield getattr(attr, "__doc__", None) or ""
        elif callable(obj):
            yield obj.__doc__ or ""


def collect_documents() -> list[str]:
    """pydoc topics then standard-library docstrings, in a fixed order, deduplicated.

    Docstrings are read in this process, so imports that monkeypatch the standard library
    change the result (torch replaces `inspect.getfile` with an undocumented wrapper); callers
    fix their imports and record a hash of the documents.
    """
    from pydoc_data.topics import topics

    seen: set[str] = set()
    documents: list[str] = []

    def add(text: str) -> None:
        text = inspect.cleandoc(text).strip() if isinstance(text, str) else ""
        if len(text) >= _MIN_DOC_CHARS and text not in seen:
            seen.add(text)
            documents.append(text)

    for key in sorted(topics):
        add(topics[key])
    for name in _module_names():
        module = _import_quietly(name)
        if module is not None:
            for doc in _docstrings(module):
                add(doc)
    return documents


def split_documents(documents: list[str], held_out_every: int = 20) -> CorpusSplit:
    """Hold out about 1/`held_out_every` of documents, chosen by a hash of their text."""
    train: list[str] = []
    held_out: list[str] = []
    for doc in documents:
        bucket = int.from_bytes(hashlib.sha256(doc.encode()).digest()[:8], "big")
        (held_out if bucket % held_out_every == 0 else train).append(doc)
    return CorpusSplit(train=train, held_out=held_out)


def train_bpe_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """A GPT-2 style byte-level BPE of exactly `vocab_size` ids, ChatML specials at ids 0-2."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    missing = vocab_size - tokenizer.get_vocab_size()
    if missing > 0:
        # Too little text for that many merges: fill up so every id a model emits decodes.
        tokenizer.add_tokens([f"<|reserved_{i}|>" for i in range(missing)])
    return tokenizer


def token_id(tokenizer: Tokenizer, token: str) -> int:
    """The id of a token the tokenizer must have, such as a special token."""
    found = tokenizer.token_to_id(token)
    if found is None:
        raise KeyError(f"tokenizer has no {token!r}")
    return found


def save_tokenizer_files(tokenizer: Tokenizer, out_dir: Path, model_max_length: int) -> None:
    """Write `tokenizer.json` and a `tokenizer_config.json` with the ChatML chat template."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": ENDOFTEXT,
        "eos_token": ENDOFTEXT,
        "pad_token": ENDOFTEXT,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "added_tokens_decoder": {
            str(token_id(tokenizer, token)): {
                "content": token,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for token in SPECIAL_TOKENS
        },
        "chat_template": CHATML_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
