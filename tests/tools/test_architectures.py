"""Tiny random models of the Hugging Face architectures in docs/MODELS.md, exported and served.

Each architecture is exported with `export_checkpoint` and served by the engine, and its greedy
continuations must equal transformers' `generate` token for token: each prompt alone, all
prompts in one left-padded batch, and each prompt prefilled in chunks smaller than the window.
The prompts are longer than the sliding-window models' window.
The whole matrix runs in this one process on tiny configs to stay inside the fast tier's budget.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnxruntime as ort
import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, PretrainedConfig

from serve_app import DEMO_MODEL_DIR
from serve_app.engine import EngineConfig, LLMEngine, load_decoder
from serve_app.engine.model_config import ModelConfig, ModelLoadError
from serve_app.text.chat_template import ChatTemplate
from serve_app.tools.__main__ import main
from serve_app.tools.export import export_checkpoint
from serve_app.tools.model_dir import ModelDirError
from tests.tools.test_export_quantize import greedy_continuations

VOCAB = 512
WINDOW = 8  # the sliding-window models' window, so the prompts can be longer than it
NEW_TOKENS = 6
PROMPT_LENGTHS = (3, 11, 17)  # alone, and batched: left pads of 14 and 6
CONTEXT = 128

_TOKENS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "tie_word_embeddings": False}
_LLAMA_LIKE = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": CONTEXT,
    **_TOKENS,
}
_WINDOWED = {"sliding_window": WINDOW, "head_dim": 8}


def _config(name: str, **kwargs: Any) -> Callable[[], PretrainedConfig]:
    config_class: type[PretrainedConfig] = getattr(transformers, name)
    return lambda: config_class(**kwargs)


ARCHITECTURES: dict[str, Callable[[], PretrainedConfig]] = {
    "llama": _config("LlamaConfig", **_LLAMA_LIKE),
    "mistral": _config("MistralConfig", **_LLAMA_LIKE, **_WINDOWED),
    # Layers from max_window_layers on use the window: here the second of two.
    "qwen2": _config(
        "Qwen2Config", **_LLAMA_LIKE, **_WINDOWED, use_sliding_window=True, max_window_layers=1
    ),
    "qwen3": _config("Qwen3Config", **_LLAMA_LIKE, head_dim=8),
    "phi3": _config("Phi3Config", **_LLAMA_LIKE),
    "gemma2": _config("Gemma2Config", **_LLAMA_LIKE, **_WINDOWED),
    "gemma3_text": _config(
        "Gemma3TextConfig",
        **_LLAMA_LIKE,
        **_WINDOWED,
        layer_types=["sliding_attention", "full_attention"],
    ),
    "gpt2": _config(
        "GPT2Config",
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=CONTEXT,
        **_TOKENS,
    ),
    "gpt_neox": _config(
        "GPTNeoXConfig",
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=CONTEXT,
        **_TOKENS,
    ),
    "opt": _config(
        "OPTConfig",
        vocab_size=VOCAB,
        hidden_size=32,
        word_embed_proj_dim=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=CONTEXT,
        **_TOKENS,
    ),
    # ALiBi, no position_ids: the Falcon-RW / Falcon-7B-ALiBi layout.
    "falcon": _config(
        "FalconConfig",
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        alibi=True,
        max_position_embeddings=CONTEXT,
        **_TOKENS,
    ),
    # ALiBi, no position_ids, and no context length in config.json.
    "bloom": _config(
        "BloomConfig", vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4, **_TOKENS
    ),
}
NO_POSITION_IDS = {"falcon", "bloom"}


def save_checkpoint(config: PretrainedConfig, out_dir: Path) -> PretrainedConfig:
    """A random-weight checkpoint (fixed seed) with the demo tokenizer's files; its model."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(out_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(DEMO_MODEL_DIR / name, out_dir / name)
    # Bloom's context must come from the export flag, not the demo tokenizer's limit.
    tokenizer_config = json.loads((out_dir / "tokenizer_config.json").read_text())
    tokenizer_config.pop("model_max_length", None)
    # Where transformers 5 and Optimum keep the chat template.
    (out_dir / "chat_template.jinja").write_text(tokenizer_config.pop("chat_template"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return model


def prompts() -> list[list[int]]:
    generator = torch.Generator().manual_seed(7)
    return [torch.randint(3, VOCAB, (n,), generator=generator).tolist() for n in PROMPT_LENGTHS]


def transformers_greedy(model: Any, prompt: list[int]) -> list[int]:
    """transformers' own greedy generate of one prompt: the reference."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
        )
    return list(out[0, len(prompt) :].tolist())


def engine_greedy(engine: LLMEngine, batch: list[list[int]]) -> list[list[int]]:
    """The engine's greedy continuations of `batch`, all added before the first step."""
    return greedy_continuations(engine, [(prompt, NEW_TOKENS) for prompt in batch])


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_export_serves_token_for_token_like_transformers_alone_and_batched(
    architecture: str, tmp_path: Path
) -> None:
    config = ARCHITECTURES[architecture]()
    model = save_checkpoint(config, tmp_path / "hf")
    context = CONTEXT if architecture == "bloom" else None
    result = export_checkpoint(tmp_path / "hf", tmp_path / "onnx", context_length=context)

    assert max(result.diffs["fp32"].values()) < 1e-4
    inputs = {i.name for i in ort.InferenceSession(str(tmp_path / "onnx/model.onnx")).get_inputs()}
    assert ("position_ids" in inputs) == (architecture not in NO_POSITION_IDS)
    assert ModelConfig.from_dir(tmp_path / "onnx").context_length == CONTEXT
    chat = ChatTemplate(tmp_path / "onnx").render([{"role": "user", "content": "hi"}])
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    engine_config = EngineConfig(model_path=tmp_path / "onnx", intra_op_num_threads=2)
    engine = LLMEngine(engine_config, load_decoder(engine_config))

    batch = prompts()
    reference = [transformers_greedy(model, prompt) for prompt in batch]
    assert len({token for tokens in reference for token in tokens}) > NEW_TOKENS, "degenerate"
    alone = [engine_greedy(engine, [prompt])[0] for prompt in batch]
    assert alone == reference
    assert engine_greedy(engine, batch) == reference
    # Prefilled in chunks of 4 tokens, under the window, over a past longer than the window.
    chunked = LLMEngine(engine_config.model_copy(update={"max_prefill_tokens": 4}), engine.decoder)
    assert [engine_greedy(chunked, [prompt])[0] for prompt in batch] == reference


def test_sliding_window_models_are_exported_with_their_window(tmp_path: Path) -> None:
    """The matrix above is only a window test if transformers really applies one."""
    config = ARCHITECTURES["mistral"]()
    model = save_checkpoint(config, tmp_path)
    unwindowed = AutoModelForCausalLM.from_pretrained(tmp_path, sliding_window=None).eval()
    long_prompt = prompts()[-1]
    assert transformers_greedy(model, long_prompt) != transformers_greedy(unwindowed, long_prompt)


def test_a_config_without_a_context_length_is_refused_with_the_key_to_add(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    save_checkpoint(ARCHITECTURES["bloom"](), tmp_path / "hf")

    with pytest.raises(ModelLoadError, match='add "max_position_embeddings": N'):
        ModelConfig.from_dir(tmp_path / "hf")
    with pytest.raises(ModelDirError, match="--context-length N"):
        export_checkpoint(tmp_path / "hf", tmp_path / "onnx")
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(tmp_path / "hf"), str(tmp_path / "onnx")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "gives no context length" in err and "Traceback" not in err
    assert not (tmp_path / "onnx").exists()


def test_the_tokenizer_limit_gives_the_context_when_config_json_has_none(tmp_path: Path) -> None:
    save_checkpoint(ARCHITECTURES["bloom"](), tmp_path)
    tokenizer_config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    tokenizer_config["model_max_length"] = 2048
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    assert ModelConfig.from_dir(tmp_path).context_length == 2048

    # transformers' "no limit" sentinel is not a context length.
    tokenizer_config["model_max_length"] = int(1e30)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    with pytest.raises(ModelLoadError, match="gives no context length"):
        ModelConfig.from_dir(tmp_path)


def test_a_failing_export_exits_1_with_the_stage_and_cause_not_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    save_checkpoint(ARCHITECTURES["llama"](), tmp_path / "hf")

    def broken_graph(*args: Any, **kwargs: Any) -> dict[str, float]:
        raise ort.capi.onnxruntime_pybind11_state.Fail("[ONNXRuntimeError] : 1 : FAIL : Concat\nx")

    monkeypatch.setattr("serve_app.tools.onnx_export.verify_decoder_with_past", broken_graph)
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(tmp_path / "hf"), str(tmp_path / "onnx")])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "failed while checking fp32: Fail: [ONNXRuntimeError] : 1 : FAIL : Concat\n" in err
    assert "Traceback" not in err
    assert not (tmp_path / "onnx").exists()
