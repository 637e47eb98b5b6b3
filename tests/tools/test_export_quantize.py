"""The model tools end to end: tiny random checkpoints exported, quantized, served by the engine."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import onnxruntime as ort
import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, PretrainedConfig

from serve_app import DEMO_MODEL_DIR
from serve_app.engine import EngineConfig, LLMEngine, SamplingParams, TokenLogprob, load_decoder
from serve_app.text.tokenizer import Tokenizer
from serve_app.tools.__main__ import main
from serve_app.tools.export import export_checkpoint
from serve_app.tools.onnx_export import HFDecoder, verify_decoder_with_past
from serve_app.tools.quantize import QuantizeOptions, quantize_model

PROMPTS = [
    "The return statement",
    "A list is a mutable sequence type that",
    "def",
    "Raise an exception when the given key is not found in the mapping, and",
    "The with statement is used to",
    "Return the",
    "This module provides",
    "The built-in function",
]
NEW_TOKENS = 32
VOCAB = 4096  # the demo tokenizer's, so prompts are real text

ARCHITECTURES: dict[str, Callable[[], PretrainedConfig]] = {
    # transformers' default init (std 0.02): greedy continuations keep changing token.
    "llama": lambda: LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    ),
    # Untied: a random tied head mostly predicts the current token again, over and over.
    "gpt2": lambda: GPT2Config(
        tie_word_embeddings=False,
        vocab_size=VOCAB,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=256,
        bos_token_id=0,
        eos_token_id=0,
    ),
}


def save_checkpoint(architecture: str, out_dir: Path, seed: int = 0) -> Path:
    """A randomly initialised checkpoint with the demo model's tokenizer files."""
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(ARCHITECTURES[architecture]()).save_pretrained(out_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(DEMO_MODEL_DIR / name, out_dir / name)
    return out_dir


def greedy_continuations(
    engine: LLMEngine, requests: list[tuple[list[int], int]]
) -> list[list[int]]:
    """The engine's greedy continuations of ``(prompt, max_tokens)`` requests, all added
    before the first step, run to the end."""
    for index, (prompt, max_tokens) in enumerate(requests):
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        engine.add_request(str(index), prompt, params)
    tokens: dict[str, list[int]] = {}
    while engine.has_work():
        for output in engine.step():
            tokens.setdefault(output.request_id, []).extend(output.new_token_ids)
    return [tokens[str(index)] for index in range(len(requests))]


def run_engine(model_dir: Path, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Greedy continuations of all prompts, batched by the engine."""
    config = EngineConfig(model_path=model_dir, intra_op_num_threads=2)
    engine = LLMEngine(config, load_decoder(config))
    return greedy_continuations(engine, [(prompt, max_tokens) for prompt in prompts])


def torch_greedy(decoder: HFDecoder, prompt: list[int]) -> list[int]:
    """Greedy continuation by full forwards in torch, no cache: the reference for the engine."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            logits, _ = decoder(ids, torch.ones_like(ids), torch.arange(ids.shape[1])[None], None)
            ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
    return ids[0, len(prompt) :].tolist()


def agreement(reference: list[list[int]], other: list[list[int]]) -> float:
    """Fraction of positions where the two continuations hold the same token."""
    pairs = [
        pair
        for ref, out in zip(reference, other, strict=True)
        for pair in zip(ref, out, strict=True)
    ]
    return sum(a == b for a, b in pairs) / sum(len(ref) for ref in reference)


def teacher_forced_agreement(
    model_dir: Path, prompts: list[list[int]], reference: list[list[int]]
) -> float:
    """Fraction of reference tokens the model also picks when fed the reference's prefix.

    The engine scores each prompt plus its reference once (``prompt_logprobs``): a reference
    token of rank 1 is the model's greedy pick there, without one request per prefix.
    """
    config = EngineConfig(model_path=model_dir, intra_op_num_threads=2)
    engine = LLMEngine(config, load_decoder(config))
    params = SamplingParams(max_tokens=0, prompt_logprobs=0)
    for index, (prompt, ref) in enumerate(zip(prompts, reference, strict=True)):
        engine.add_request(str(index), prompt + ref, params)
    scored: dict[str, tuple[TokenLogprob | None, ...]] = {}
    while engine.has_work():
        for output in engine.step():
            if output.prompt_logprobs is not None:
                scored[output.request_id] = output.prompt_logprobs
    picks = []
    for index, (prompt, ref) in enumerate(zip(prompts, reference, strict=True)):
        records = scored[str(index)][len(prompt) :]
        assert [record.token_id for record in records if record is not None] == ref
        picks.extend(record is not None and record.rank == 1 for record in records)
    return sum(picks) / len(picks)


@pytest.fixture(scope="module")
def prompts(tokenizer: Tokenizer) -> list[list[int]]:
    return [tokenizer.encode(text) for text in PROMPTS]


@pytest.fixture(scope="module")
def llama_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_checkpoint("llama", tmp_path_factory.mktemp("llama-hf"))


@pytest.fixture(scope="module")
def llama_fp32(tmp_path_factory: pytest.TempPathFactory, llama_checkpoint: Path) -> Path:
    out_dir = tmp_path_factory.mktemp("llama-fp32")
    export_checkpoint(llama_checkpoint, out_dir)
    return out_dir


@pytest.fixture(scope="module")
def llama_fp32_tokens(llama_fp32: Path, prompts: list[list[int]]) -> list[list[int]]:
    return run_engine(llama_fp32, prompts, NEW_TOKENS)


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_engine_serves_the_export_token_for_token_like_torch(
    architecture: str, tmp_path: Path, prompts: list[list[int]]
) -> None:
    checkpoint = save_checkpoint(architecture, tmp_path / "hf")
    result = export_checkpoint(checkpoint, tmp_path / "onnx")

    assert max(result.diffs["fp32"].values()) < 1e-4
    for name in ("model.onnx", "config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "onnx" / name).is_file()
    decoder = HFDecoder.from_pretrained(checkpoint)
    served = run_engine(tmp_path / "onnx", prompts, NEW_TOKENS)
    assert served == [torch_greedy(decoder, prompt) for prompt in prompts]
    assert min(len(set(tokens)) for tokens in served) >= 8, "greedy decoding degenerated"


def test_export_layout_matches_the_optimum_decoder_with_past(llama_fp32: Path) -> None:
    session = ort.InferenceSession(str(llama_fp32 / "model.onnx"))
    inputs = {i.name: i.shape for i in session.get_inputs()}
    outputs = {o.name: o.shape for o in session.get_outputs()}
    total = "past_sequence_length + sequence_length"
    assert inputs["input_ids"] == ["batch_size", "sequence_length"]
    assert inputs["attention_mask"] == ["batch_size", total]
    assert inputs["position_ids"] == ["batch_size", "sequence_length"]
    assert outputs["logits"] == ["batch_size", "sequence_length", VOCAB]
    for layer in range(2):
        for kind in ("key", "value"):
            assert inputs[f"past_key_values.{layer}.{kind}"] == [
                "batch_size",
                2,
                "past_sequence_length",
                16,
            ]
            assert outputs[f"present.{layer}.{kind}"] == ["batch_size", 2, total, 16]
    assert len(inputs) == 3 + 4 and len(outputs) == 1 + 4


def test_verification_fails_loudly_when_the_graph_is_not_the_model(
    tmp_path: Path, llama_fp32: Path
) -> None:
    other = HFDecoder.from_pretrained(save_checkpoint("llama", tmp_path, seed=1))
    with pytest.raises(RuntimeError, match="ONNX self-check failed: prefill_vs_torch"):
        verify_decoder_with_past(other, llama_fp32 / "model.onnx")


def test_cli_exports_fp16_that_the_engine_serves(
    tmp_path: Path,
    llama_checkpoint: Path,
    prompts: list[list[int]],
    llama_fp32_tokens: list[list[int]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    # In process: a fresh interpreter would spend most of the test importing torch again;
    # ``python -m serve_app.tools`` itself runs in tests/engine/test_tensorrt_build.py.
    out_dir = tmp_path / "fp16"
    main(["export", str(llama_checkpoint), str(out_dir), "--dtype", "fp16"])
    assert "fp16 vs torch" in capsys.readouterr().out

    session = ort.InferenceSession(str(out_dir / "model.onnx"))
    kv_types = {i.type for i in session.get_inputs() if i.name.startswith("past_key_values")}
    assert kv_types == {"tensor(float16)"}
    assert session.get_outputs()[0].type == "tensor(float16)"
    served = run_engine(out_dir, prompts, NEW_TOKENS)
    forced = teacher_forced_agreement(out_dir, prompts, llama_fp32_tokens)
    print(
        f"\nfp16 vs fp32: {agreement(llama_fp32_tokens, served):.3f} of tokens, "
        f"{forced:.3f} teacher-forced"
    )
    assert forced >= 0.95  # measured 1.000


def test_quantized_models_serve_and_agree_with_fp32(
    tmp_path: Path,
    llama_fp32: Path,
    prompts: list[list[int]],
    llama_fp32_tokens: list[list[int]],
) -> None:
    measured = {}
    for method in ("int8", "int4"):
        out_dir = tmp_path / method
        quantize_model(llama_fp32, out_dir, method, QuantizeOptions(block_size=32))
        assert json.loads((out_dir / "config.json").read_text())["vocab_size"] == VOCAB
        served = run_engine(out_dir, prompts, NEW_TOKENS)
        assert all(len(tokens) == NEW_TOKENS for tokens in served)
        assert all(0 <= token < VOCAB for tokens in served for token in tokens)
        measured[method] = (
            agreement(llama_fp32_tokens, served),
            teacher_forced_agreement(out_dir, prompts, llama_fp32_tokens),
        )
        print(
            f"\n{method} vs fp32: {measured[method][0]:.3f} of tokens, "
            f"{measured[method][1]:.3f} teacher-forced"
        )
    # Teacher-forced, because free-running agreement on a random model hangs on near-ties: one
    # flip and the rest of the continuation differs (int8: 0.48-0.94 across seeds and sizes).
    # Measured 0.969 and 0.746; int8's bar is above what int4 reaches, chance is 1/4096.
    assert measured["int8"][1] >= 0.9
    assert measured["int4"][1] >= 0.5


def test_quantizing_the_demo_model_keeps_its_greedy_choices(
    tmp_path: Path, model_dir: Path, prompts: list[list[int]]
) -> None:
    reference = run_engine(model_dir, prompts, NEW_TOKENS)
    forced = {}
    for method in ("int8", "int4"):
        quantize_model(model_dir, tmp_path / method, method, QuantizeOptions())
        served = run_engine(tmp_path / method, prompts, NEW_TOKENS)
        forced[method] = teacher_forced_agreement(tmp_path / method, prompts, reference)
        print(
            f"\ndemo {method} vs fp32: {agreement(reference, served):.3f} of tokens, "
            f"{forced[method]:.3f} teacher-forced"
        )
    # A trained model's choices are less fragile: measured 0.984 and 0.941 teacher-forced.
    assert forced["int8"] >= 0.95
    assert forced["int4"] >= 0.85


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["export", "{missing}", "{out}"], "is not a directory"),
        (["quantize", "{empty}", "{out}", "--method", "int8"], "lacks model.onnx, config.json"),
        (["quantize", "{model}", "{model}", "--method", "int8"], "must differ from the input"),
        (["quantize", "{model}", "{out}", "--method", "int3"], "invalid choice: 'int3'"),
        (
            ["quantize", "{model}", "{out}", "--method", "int4", "--block-size", "24"],
            "power of two",
        ),
        (["quantize", "{model}", "{out}"], "the following arguments are required: --method"),
    ],
)
def test_bad_arguments_exit_2_with_the_reason(
    argv: list[str],
    message: str,
    model_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / "empty").mkdir()
    paths = {
        "missing": tmp_path / "missing",
        "empty": tmp_path / "empty",
        "out": tmp_path / "out",
        "model": model_dir,
    }
    with pytest.raises(SystemExit) as exit_info:
        main([arg.format(**paths) for arg in argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
