"""Reading a model directory: config aliases, graph discovery and clear load errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from serve_app.engine import EngineConfig, ExecutionProvider, ModelConfig, ModelLoadError
from serve_app.engine.backends.onnxruntime_decoder import OnnxDecoder


def test_layout_is_discovered_from_the_graph_and_config(model_dir: Path) -> None:
    model = OnnxDecoder(EngineConfig(model_path=model_dir))
    config = json.loads((model_dir / "config.json").read_text())
    assert model.io.num_layers == config["num_hidden_layers"]
    assert model.io.num_kv_heads == config["num_key_value_heads"]
    assert model.io.num_kv_heads < config["num_attention_heads"]  # the demo model uses GQA
    assert model.io.has_position_ids
    assert model.io.past_names[:2] == ["past_key_values.0.key", "past_key_values.0.value"]
    assert (
        model.io.kv_bytes_per_token
        == 2 * model.io.num_layers * model.io.num_kv_heads * model.io.head_dim * 4
    )


def test_gpt2_style_config_keys_are_understood(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "gpt2",
                "n_layer": 12,
                "n_head": 12,
                "n_embd": 768,
                "n_positions": 1024,
                "vocab_size": 50257,
                "eos_token_id": 50256,
            }
        )
    )
    config = ModelConfig.from_dir(tmp_path)
    assert (config.num_layers, config.num_heads, config.num_kv_heads) == (12, 12, 12)
    assert (config.head_dim, config.context_length) == (64, 1024)
    assert config.eos_token_ids == (50256,)
    assert config.pad_token_id == 50256


def test_generation_config_eos_list_wins(tmp_path: Path, model_dir: Path) -> None:
    shutil.copy(model_dir / "config.json", tmp_path / "config.json")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
    assert ModelConfig.from_dir(tmp_path).eos_token_ids == (7, 9)


def test_missing_files_are_named(tmp_path: Path, model_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"config\.json not found"):
        OnnxDecoder(EngineConfig(model_path=tmp_path))
    shutil.copy(model_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(ModelLoadError, match=r"model\.onnx not found"):
        OnnxDecoder(EngineConfig(model_path=tmp_path))


def test_config_missing_a_quantity_is_named(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 10, "hidden_size": 8}))
    with pytest.raises(ModelLoadError, match="num_heads"):
        ModelConfig.from_dir(tmp_path)


def test_unavailable_execution_provider_is_a_clear_error(model_dir: Path) -> None:
    config = EngineConfig(
        model_path=model_dir,
        execution_providers=[ExecutionProvider(name="NoSuchExecutionProvider")],
    )
    with pytest.raises(ModelLoadError, match=r"NoSuchExecutionProvider is not available.*CPU"):
        OnnxDecoder(config)


def test_engine_config_rejects_unknown_keys(model_dir: Path) -> None:
    with pytest.raises(ValueError, match="max_batch"):
        EngineConfig.model_validate({"model_path": str(model_dir), "max_batch": 4})
