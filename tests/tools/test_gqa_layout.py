"""The fused-attention layout: a tiny Llama built by onnxruntime-genai's model builder, served
with its KV cache in place, token for token like transformers' own greedy generate."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
from transformers import AutoModelForCausalLM, MistralConfig

from serve_app import DEMO_MODEL_DIR
from serve_app.engine import EngineConfig, LLMEngine, ModelLoadError, SamplingParams, load_decoder
from serve_app.engine.backends.gqa_decoder import GQADecoder
from serve_app.engine.backends.onnxruntime_decoder import OnnxDecoder
from serve_app.engine.decoder import graph_op_types
from serve_app.tools.__main__ import main
from serve_app.tools.export import export_checkpoint
from tests.tools.test_export_quantize import greedy_continuations, save_checkpoint

NUM_REQUESTS = 16
ROWS = 8  # fewer rows than requests: rows are freed and reused while others run
CONTEXT = 256  # the tiny checkpoint's


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_checkpoint("llama", tmp_path_factory.mktemp("llama-hf"))


@pytest.fixture(scope="module")
def gqa_dir(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out_dir = tmp_path_factory.mktemp("llama-gqa")
    result = export_checkpoint(checkpoint, out_dir, layout="gqa")
    assert max(result.diffs["fp32"].values()) < 1e-4  # checked against torch by the export
    return out_dir


@pytest.fixture(scope="module")
def model(checkpoint: Path) -> Any:
    return AutoModelForCausalLM.from_pretrained(checkpoint).eval()


def engine_config(model_dir: Path, **options: Any) -> EngineConfig:
    defaults = {"max_num_seqs": ROWS, "kv_cache_tokens": ROWS * CONTEXT}
    return EngineConfig(
        model_path=model_dir,
        intra_op_num_threads=1,
        allow_spinning=False,
        **{**defaults, **options},
    )


def reference(model: Any, prompt: list[int], new_tokens: int) -> list[int]:
    """transformers' own greedy continuation."""
    ids = torch.tensor([prompt])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 15x faster for this tiny model on a busy 2-core machine
    try:
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
            )
    finally:
        torch.set_num_threads(threads)
    return list(out[0, len(prompt) :].tolist())


def staggered(engine: LLMEngine, requests: list[tuple[list[int], int]]) -> list[list[int]]:
    """Greedy continuations, one request added before each step: they join at different steps
    and, generating different numbers of tokens, leave at different steps."""
    tokens: dict[str, list[int]] = {}
    pending = list(enumerate(requests))
    while pending or engine.has_work():
        if pending:
            index, (prompt, max_tokens) = pending.pop(0)
            params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
            engine.add_request(str(index), prompt, params)
        for output in engine.step():
            tokens.setdefault(output.request_id, []).extend(output.new_token_ids)
    return [tokens[str(index)] for index in range(len(requests))]


def random_requests(count: int, seed: int) -> list[tuple[list[int], int]]:
    rng = np.random.default_rng(seed)
    return [
        ([int(t) for t in rng.integers(3, 4096, int(n))], int(m))
        for n, m in zip(rng.integers(1, 40, count), rng.integers(1, 24, count), strict=True)
    ]


def test_the_builder_folder_is_recognised_and_served_in_place(
    gqa_dir: Path, checkpoint: Path
) -> None:
    for name in ("genai_config.json", "model.onnx", "config.json", "tokenizer.json"):
        assert (gqa_dir / name).is_file()
    decoder = load_decoder(engine_config(gqa_dir))
    assert isinstance(decoder, GQADecoder)
    assert "GroupQueryAttention" in decoder.describe()
    assert [b.shape for b in decoder.buffers] == [(ROWS, 2, CONTEXT, 16)] * 4  # 2 layers, K and V
    inputs = {i.name for i in decoder.session.get_inputs()}
    assert "position_ids" not in inputs  # the graph rotates by each row's mask length


def test_one_request_alone_matches_transformers(gqa_dir: Path, model: Any) -> None:
    config = engine_config(gqa_dir)
    engine = LLMEngine(config, load_decoder(config))
    [(prompt, _)] = random_requests(1, seed=1)
    assert staggered(engine, [(prompt, 32)]) == [reference(model, prompt, 32)]


def test_sixteen_requests_joining_and_leaving_match_transformers(gqa_dir: Path, model: Any) -> None:
    requests = random_requests(NUM_REQUESTS, seed=2)
    config = engine_config(gqa_dir)
    engine = LLMEngine(config, load_decoder(config))
    expected = [reference(model, prompt, n) for prompt, n in requests]
    served = staggered(engine, requests)
    assert served == expected
    assert len({t for tokens in served for t in tokens}) > 32, "greedy decoding degenerated"
    assert engine.num_running == 0 and engine.kv_cache_usage == 0
    # All queued at once: the first 8 are prefilled together, right-padded, in one run.
    assert greedy_continuations(engine, requests) == expected


def test_an_int4_build_serves_batched_as_alone(checkpoint: Path, tmp_path: Path) -> None:
    export_checkpoint(checkpoint, tmp_path / "int4", "int4", layout="gqa")
    config = engine_config(tmp_path / "int4")
    decoder = load_decoder(config)
    assert isinstance(decoder, GQADecoder)
    assert "MatMulNBits" in graph_op_types(tmp_path / "int4" / "model.onnx")
    requests = random_requests(NUM_REQUESTS, seed=8)
    alone = [greedy_continuations(LLMEngine(config, decoder), [request])[0] for request in requests]
    assert greedy_continuations(LLMEngine(config, decoder), requests) == alone


def test_a_prompt_longer_than_the_chunk_budget_is_prefilled_in_chunks(
    gqa_dir: Path, model: Any
) -> None:
    config = engine_config(gqa_dir, max_prefill_tokens=16)
    engine = LLMEngine(config, load_decoder(config))
    rng = np.random.default_rng(3)
    long_prompt = [int(t) for t in rng.integers(3, 4096, 150)]
    requests = [*random_requests(3, seed=4), (long_prompt, 12), *random_requests(3, seed=5)]
    assert staggered(engine, requests) == [reference(model, p, n) for p, n in requests]


def test_a_reused_prefix_gives_the_tokens_of_a_whole_prefill(gqa_dir: Path, model: Any) -> None:
    rng = np.random.default_rng(7)
    system = [int(t) for t in rng.integers(3, 4096, 40)]  # two whole blocks and a partial one
    requests = [(system + [int(t) for t in rng.integers(3, 4096, n)], 8) for n in (5, 9, 3, 12)]
    without = engine_config(gqa_dir, prefix_cache_tokens=0)
    expected = staggered(LLMEngine(without, load_decoder(without)), requests)
    assert expected == [reference(model, p, n) for p, n in requests]
    config = engine_config(gqa_dir)
    engine = LLMEngine(config, load_decoder(config))
    # One joins per step: each after the first copies the prefix into the spare row.
    assert staggered(engine, requests) == expected
    engine.add_request("again", requests[0][0], SamplingParams(temperature=0, max_tokens=1))
    engine.step()
    assert engine.last_stats.prefix_cache_hits == 32


def test_prompt_logprobs_match_the_optimum_layout(gqa_dir: Path, checkpoint: Path) -> None:
    optimum_dir = gqa_dir.parent / "llama-optimum"
    export_checkpoint(checkpoint, optimum_dir)
    requests = random_requests(3, seed=6)
    params = SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=2, ignore_eos=True)
    scored = []
    for model_dir in (gqa_dir, optimum_dir):
        config = engine_config(model_dir, max_prefill_tokens=32)
        engine = LLMEngine(config, load_decoder(config))
        for index, (prompt, _) in enumerate(requests):
            engine.add_request(str(index), prompt, params)
        outputs = {}
        while engine.has_work():
            for output in engine.step():
                if output.prompt_logprobs is not None:
                    outputs[output.request_id] = output.prompt_logprobs
        scored.append([outputs[str(i)] for i in range(len(requests))])
    assert isinstance(load_decoder(engine_config(optimum_dir)), OnnxDecoder)
    for gqa, optimum in zip(*scored, strict=True):
        assert [p and p.token_id for p in gqa] == [p and p.token_id for p in optimum]
        assert [p and [t for t, _ in p.top] for p in gqa] == [
            p and [t for t, _ in p.top] for p in optimum
        ]
        for a, b in zip(gqa[1:], optimum[1:], strict=True):
            assert a is not None and b is not None and abs(a.logprob - b.logprob) < 1e-3


def test_a_row_range_view_writes_into_the_buffer_itself(gqa_dir: Path) -> None:
    """The in-place path binds ``buffer[first:last]`` as past and present: the OrtValue must
    wrap the buffer's memory, not a copy, and the run must touch only those rows."""
    buffer = np.zeros((4, 2, CONTEXT, 16), dtype=np.float32)
    view = ort.OrtValue.ortvalue_from_numpy(buffer[1:3])
    assert view.data_ptr() == buffer[1:3].ctypes.data
    decoder = load_decoder(engine_config(gqa_dir, max_num_seqs=4, kv_cache_tokens=4 * CONTEXT))
    assert isinstance(decoder, GQADecoder)
    decoder.buffers[0][:] = 7.0
    decoder.run_rows(1, np.array([[5, 6, 7], [8, 9, 10]]), np.array([3, 2]))
    key = decoder.buffers[0]
    assert (key[[0, 3]] == 7.0).all()  # rows outside the range untouched
    assert (key[1, :, :3] != 7.0).all() and (key[2, :, :2] != 7.0).all()
    assert (key[1:3, :, 3:] == 7.0).all()  # nothing past the prompt (padding included)


def test_a_kv_buffer_over_the_budget_is_refused_at_load_with_its_size(gqa_dir: Path) -> None:
    with pytest.raises(ModelLoadError) as error:
        load_decoder(engine_config(gqa_dir, max_num_seqs=64, kv_cache_tokens=8192))
    message = str(error.value)
    assert "64 rows (engine.max_num_seqs) x 256 tokens" in message
    assert "16384 token slots, 0.01 GiB" in message
    assert "engine.kv_cache_tokens (8192)" in message


def test_backends_that_keep_the_optimum_layout_refuse_the_folder(gqa_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match="serves only the Optimum layout"):
        load_decoder(engine_config(gqa_dir, backend="tensorrt"))
    with pytest.raises(ModelLoadError, match="CPU execution provider only"):
        load_decoder(engine_config(gqa_dir, device="cuda"))


def test_a_folder_the_builder_wrote_serves_without_config_json(
    gqa_dir: Path, tmp_path: Path, model: Any
) -> None:
    raw = tmp_path / "raw"
    shutil.copytree(gqa_dir, raw)
    (raw / "config.json").unlink()
    (raw / "generation_config.json").unlink(missing_ok=True)
    config = engine_config(raw)
    engine = LLMEngine(config, load_decoder(config))
    [(prompt, _)] = random_requests(1, seed=7)
    assert staggered(engine, [(prompt, 8)]) == [reference(model, prompt, 8)]


def test_the_gqa_layout_refuses_dtypes_the_builder_does_not_write_for_the_cpu(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--layout", "gqa", "--dtype", "fp16", str(checkpoint), str(tmp_path)])
    assert exit_info.value.code == 2
    assert "--dtype fp16: the gqa layout writes fp32, int4" in capsys.readouterr().err


def test_a_sliding_window_the_builder_does_not_apply_fails_the_export(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The builder leaves Mistral's window out of the graph (``local_window_size`` -1), which
    only shows past the window: the export's check against torch refuses to write it."""
    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=4096,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=CONTEXT,
        sliding_window=16,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "hf")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(DEMO_MODEL_DIR / name, tmp_path / "hf" / name)
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--layout", "gqa", str(tmp_path / "hf"), str(tmp_path / "gqa")])
    assert exit_info.value.code == 1
    error = capsys.readouterr().err
    assert "disagrees with torch (prefill" in error and "sliding window 16" in error
    assert not (tmp_path / "gqa").exists()  # nothing servable left behind
