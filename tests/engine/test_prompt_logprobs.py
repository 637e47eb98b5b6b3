"""Prompt logprobs (scoring a prompt, what lm-eval's loglikelihood asks) on the demo model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from serve_app.engine import (
    EngineConfig,
    FinishReason,
    InvalidRequestError,
    LLMEngine,
    SamplingParams,
    SequenceOutput,
)
from serve_app.engine.backends.device import Device
from serve_app.engine.backends.device_ops import DeviceTensorOps
from serve_app.engine.backends.onnxruntime_decoder import OnnxDecoder
from serve_app.engine.sampler import prompt_logprobs
from serve_app.text.tokenizer import Tokenizer
from tests.engine.test_engine import PROMPTS, run_to_completion, tokens_of


@pytest.fixture(scope="module")
def decoder(model_dir: Path) -> OnnxDecoder:
    return OnnxDecoder(EngineConfig(model_path=model_dir, intra_op_num_threads=2))


@pytest.fixture
def engine(model_dir: Path, decoder: OnnxDecoder) -> LLMEngine:
    return LLMEngine(EngineConfig(model_path=model_dir), decoder)


def direct_log_softmax(model_dir: Path, token_ids: list[int]) -> np.ndarray:
    """log_softmax of the model's logits at every position of ``token_ids``, computed in one
    plain onnxruntime run over the whole prompt (no engine, no padding), in float64."""
    session = ort.InferenceSession(
        str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    ids = np.array([token_ids], dtype=np.int64)
    feeds: dict[str, np.ndarray] = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    for value in session.get_inputs():
        if value.name == "position_ids":
            feeds["position_ids"] = np.arange(len(token_ids), dtype=np.int64)[None]
        elif value.name.startswith("past_key_values"):
            _, heads, _, head_dim = value.shape
            feeds[value.name] = np.zeros((1, heads, 0, head_dim), dtype=np.float32)
    logits = session.run(["logits"], feeds)[0][0].astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    result: np.ndarray = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return result


def scored(outputs: list[SequenceOutput]) -> list[tuple[int, float, int | None] | None]:
    """(token, logprob, rank) of each prompt position, from a sequence's first output."""
    records = outputs[0].prompt_logprobs
    assert records is not None
    return [None if r is None else (r.token_id, r.logprob, r.rank) for r in records]


def test_prompt_logprobs_equal_a_direct_log_softmax_over_the_prompt(
    engine: LLMEngine, model_dir: Path, tokenizer: Tokenizer
) -> None:
    prompt = tokenizer.encode(PROMPTS[4])
    engine.add_request("score", prompt, SamplingParams(max_tokens=0, prompt_logprobs=3))
    outputs = run_to_completion(engine)["score"]

    assert len(outputs) == 1, "a request for no tokens ends in the prefill step"
    (only,) = outputs
    assert only.finish_reason is FinishReason.LENGTH
    assert only.new_token_ids == () and only.num_output_tokens == 0
    records = only.prompt_logprobs
    assert records is not None and len(records) == len(prompt)
    assert records[0] is None, "nothing predicts the first token"
    expected = direct_log_softmax(model_dir, prompt)
    for position, record in enumerate(records[1:], start=1):
        assert record is not None
        row = expected[position - 1]
        assert record.token_id == prompt[position]
        assert record.logprob == pytest.approx(row[prompt[position]], abs=1e-4)
        assert record.rank == 1 + int((row > row[prompt[position]] + 1e-6).sum())
        assert [t for t, _ in record.top] == list(np.argsort(-row, kind="stable")[:3])
        np.testing.assert_allclose([lp for _, lp in record.top], np.sort(row)[::-1][:3], atol=1e-4)
    assert engine.num_running == 0 and engine.kv_cache_usage == 0


def test_prompt_logprobs_batched_equal_alone_and_generation_is_unchanged(
    engine: LLMEngine, tokenizer: Tokenizer
) -> None:
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    # Some only score, some score and generate, some only generate; different lengths pad.
    params = [
        SamplingParams(temperature=0, max_tokens=n, prompt_logprobs=k, ignore_eos=True)
        for n, k in [(0, 1), (5, 0), (3, None), (0, 2), (7, 1), (4, None)]
    ]
    alone = {}
    for index, (prompt, sp) in enumerate(zip(prompts, params, strict=True)):
        engine.add_request(f"alone-{index}", prompt, sp)
        alone[index] = run_to_completion(engine)[f"alone-{index}"]

    for index, (prompt, sp) in enumerate(zip(prompts, params, strict=True)):
        engine.add_request(str(index), prompt, sp)
    batched = run_to_completion(engine)

    for index, sp in enumerate(params):
        together, by_itself = batched[str(index)], alone[index]
        assert tokens_of(together) == tokens_of(by_itself)
        assert len(tokens_of(together)) == sp.max_tokens
        if sp.prompt_logprobs is None:
            assert all(o.prompt_logprobs is None for o in together)
            continue
        got, want = scored(together), scored(by_itself)
        assert [g and g[0] for g in got] == [w and w[0] for w in want]
        for g, w in zip(got[1:], want[1:], strict=True):
            assert g is not None and w is not None
            assert g[1] == pytest.approx(w[1], abs=1e-4)
        assert all(o.prompt_logprobs is None for o in together[1:]), "only the first output"
    assert engine.num_running == 0


def test_max_tokens_zero_needs_prompt_logprobs(engine: LLMEngine) -> None:
    with pytest.raises(InvalidRequestError) as raised:
        engine.add_request("r", [5, 6, 7], SamplingParams(max_tokens=0))
    assert raised.value.param == "max_tokens"


def test_a_prompt_filling_the_context_can_be_scored_but_not_continued(
    engine: LLMEngine, decoder: OnnxDecoder
) -> None:
    context = decoder.config.context_length
    full = [7] * context
    with pytest.raises(InvalidRequestError):
        engine.add_request("continue", full, SamplingParams(max_tokens=1))
    chunked = LLMEngine(
        EngineConfig(model_path=engine.config.model_path, max_prefill_tokens=context // 4), decoder
    )
    chunked.add_request("score", full, SamplingParams(max_tokens=0, prompt_logprobs=0))
    (output,) = run_to_completion(chunked)["score"]
    assert output.prompt_logprobs is not None and len(output.prompt_logprobs) == context


def test_prompt_logprobs_of_a_prompt_prefilled_in_chunks_equal_a_whole_prefill(
    engine: LLMEngine, decoder: OnnxDecoder, tokenizer: Tokenizer
) -> None:
    prompt = tokenizer.encode(" ".join(PROMPTS * 2))[:50]
    params = SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=2, ignore_eos=True)
    engine.add_request("whole", prompt, params)
    whole = run_to_completion(engine)["whole"]
    chunked = LLMEngine(
        EngineConfig(model_path=engine.config.model_path, max_prefill_tokens=16), decoder
    )
    chunked.add_request("chunked", prompt, params)
    in_chunks = run_to_completion(chunked)["chunked"]

    assert tokens_of(in_chunks) == tokens_of(whole)
    got, want = in_chunks[0].prompt_logprobs, whole[0].prompt_logprobs
    assert got is not None and want is not None and len(got) == len(want) == 50
    assert got[0] is None and want[0] is None
    for g, w in zip(got[1:], want[1:], strict=True):
        assert g is not None and w is not None
        assert (g.token_id, g.rank) == (w.token_id, w.rank)
        assert g.logprob == pytest.approx(w.logprob, abs=1e-4)
        assert [t for t, _ in g.top] == [t for t, _ in w.top]


def test_single_token_prompt_has_one_empty_record() -> None:
    assert prompt_logprobs(np.zeros((1, 8), np.float32), [3], 2) == (None,)


def test_device_ops_copy_every_position_as_float32(decoder: OnnxDecoder) -> None:
    device = DeviceTensorOps(decoder.io, Device("cpu"))
    logits = np.random.default_rng(0).standard_normal((2, 5, 11)).astype(np.float16)
    every = device.all_logits(ort.OrtValue.ortvalue_from_numpy(logits))
    assert every.dtype == np.float32
    np.testing.assert_array_equal(every, logits.astype(np.float32))
