"""What the engine needs from a model directory's ``config.json`` and ``generation_config.json``
(or, in a folder onnxruntime-genai's model builder wrote, its ``genai_config.json``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serve_app.engine.errors import EngineError

# Hugging Face configs name the same quantity differently per architecture (GPT-2 vs Llama).
_ALIASES: dict[str, tuple[str, ...]] = {
    "num_layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "num_heads": ("num_attention_heads", "n_head", "num_heads"),
    "num_kv_heads": ("num_key_value_heads", "num_kv_heads"),
    "hidden_size": ("hidden_size", "n_embd", "d_model"),
    "context_length": ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"),
}


GENAI_CONFIG = "genai_config.json"  # what onnxruntime-genai's model builder writes

# transformers writes 1e30 (int(1e30)) as model_max_length when a tokenizer has no limit.
_UNSET_MAX_LENGTH = 10**12


class ModelLoadError(EngineError):
    """The model directory is missing files or describes a model the engine cannot run."""


@dataclass(frozen=True)
class ModelConfig:
    """Architecture facts and special tokens of a decoder model."""

    model_type: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    context_length: int
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    pad_token_id: int
    tie_word_embeddings: bool

    @classmethod
    def from_dir(cls, model_dir: Path) -> ModelConfig:
        """Read ``config.json`` (required unless ``genai_config.json`` is there) and
        ``generation_config.json`` (optional)."""
        if not (model_dir / "config.json").is_file() and (model_dir / GENAI_CONFIG).is_file():
            return cls.from_genai_config(model_dir / GENAI_CONFIG)
        config = _read_json(model_dir / "config.json", required=True)
        generation = _read_json(model_dir / "generation_config.json", required=False)
        num_heads = _lookup(config, "num_heads")
        hidden_size = _lookup(config, "hidden_size")
        kv_heads = _lookup(config, "num_kv_heads", default=num_heads)
        head_dim = config.get("head_dim") or hidden_size // num_heads
        eos = generation.get("eos_token_id", config.get("eos_token_id"))
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        bos = generation.get("bos_token_id", config.get("bos_token_id"))
        pad = generation.get("pad_token_id", config.get("pad_token_id"))
        if pad is None:
            pad = eos_ids[0] if eos_ids else 0  # pad positions are masked; any valid id works
        return cls(
            model_type=str(config.get("model_type", "unknown")),
            num_layers=_lookup(config, "num_layers"),
            num_heads=num_heads,
            num_kv_heads=kv_heads,
            head_dim=int(head_dim),
            vocab_size=int(config["vocab_size"]),
            context_length=_context_length(config, model_dir),
            eos_token_ids=eos_ids,
            bos_token_id=None if bos is None else int(bos),
            pad_token_id=int(pad[0] if isinstance(pad, list) else pad),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        )

    @classmethod
    def from_genai_config(cls, path: Path) -> ModelConfig:
        """Read the ``model`` section of onnxruntime-genai's ``genai_config.json``."""
        model = _read_json(path, required=True)["model"]
        decoder = model["decoder"]
        eos = model["eos_token_id"]
        eos_ids = tuple(eos) if isinstance(eos, list) else (int(eos),)
        pad = model.get("pad_token_id")
        return cls(
            model_type=str(model["type"]),
            num_layers=int(decoder["num_hidden_layers"]),
            num_heads=int(decoder["num_attention_heads"]),
            num_kv_heads=int(decoder["num_key_value_heads"]),
            head_dim=int(decoder["head_size"]),
            vocab_size=int(model["vocab_size"]),
            context_length=int(model["context_length"]),
            eos_token_ids=eos_ids,
            bos_token_id=model.get("bos_token_id"),
            pad_token_id=eos_ids[0] if pad is None else int(pad),
            tie_word_embeddings=False,  # not recorded; the graph holds the head either way
        )


def _context_length(config: dict[str, Any], model_dir: Path) -> int:
    """The longest sequence the model takes: config.json's, else the tokenizer's limit.

    ALiBi models (Bloom) name none in config.json; ``python -m serve_app.tools export
    --context-length N`` writes one, and a ``model_max_length`` in ``tokenizer_config.json``
    serves too (transformers' "unset" sentinel, 1e30, does not count).
    """
    for key in _ALIASES["context_length"]:
        if config.get(key) is not None:
            return int(config[key])
    tokenizer_config = _read_json(model_dir / "tokenizer_config.json", required=False)
    limit = tokenizer_config.get("model_max_length")
    if isinstance(limit, int) and 0 < limit < _UNSET_MAX_LENGTH:
        return limit
    raise ModelLoadError(
        f"{model_dir / 'config.json'} gives no context length (looked for "
        f"{', '.join(_ALIASES['context_length'])}, and model_max_length in "
        'tokenizer_config.json); add "max_position_embeddings": N with the longest sequence '
        "the model was trained on, or export with python -m serve_app.tools export "
        "--context-length N"
    )


def _read_json(path: Path, *, required: bool) -> dict[str, Any]:
    if not path.is_file():
        if required:
            raise ModelLoadError(f"{path.name} not found in {path.parent}")
        return {}
    with path.open(encoding="utf-8") as f:
        data: dict[str, Any] = json.load(f)
    return data


def _lookup(config: dict[str, Any], quantity: str, default: int | None = None) -> int:
    for key in _ALIASES[quantity]:
        if config.get(key) is not None:
            return int(config[key])
    if default is not None:
        return default
    raise ModelLoadError(
        f"config.json lacks {quantity} (looked for {', '.join(_ALIASES[quantity])})"
    )
