"""Constrained decoding in the engine, on the demo model: grammars hold, others are untouched."""

from __future__ import annotations

import asyncio
import json
import re
import threading
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
from llguidance.numpy import allocate_token_bitmask, apply_token_bitmask_inplace

from serve_app.engine import (
    AsyncLLMEngine,
    EngineConfig,
    FinishReason,
    GenerationRequest,
    InvalidRequestError,
    LLMEngine,
    SamplingParams,
    SequenceOutput,
)
from serve_app.engine.backends.onnxruntime_decoder import OnnxDecoder
from serve_app.engine.constrained import ConstrainedDecoding, TokenMasks
from serve_app.engine.decoder import ForwardResult
from serve_app.engine.structured import StructuredOutput
from serve_app.text.tokenizer import Tokenizer
from tests.engine.fake_decoder import fake_engine

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z]{1,6}$"},
        "kind": {"enum": ["file", "dir", "link"]},
        "size": {"type": "integer", "minimum": 0, "maximum": 999},
        "ratio": {"type": "number", "minimum": -1, "maximum": 1},
        "tags": {"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 3},
        "owner": {
            "type": "object",
            "properties": {"uid": {"type": "integer", "minimum": 0, "maximum": 99}},
            "required": ["uid"],
            "additionalProperties": False,
        },
        "note": {"type": "string", "maxLength": 4},
    },
    "required": ["name", "kind", "size", "tags", "owner"],
    "additionalProperties": False,
}
PROMPTS = ["The return statement", "A list is a mutable sequence type that", "def"]


@pytest.fixture(scope="module")
def decoder(model_dir: Path) -> OnnxDecoder:
    return OnnxDecoder(EngineConfig(model_path=model_dir, intra_op_num_threads=2))


@pytest.fixture
def engine(model_dir: Path, decoder: OnnxDecoder) -> LLMEngine:
    return LLMEngine(EngineConfig(model_path=model_dir), decoder)


def run(engine: LLMEngine, requests: dict[str, tuple[str, SamplingParams]], tokenizer: Tokenizer
        ) -> dict[str, tuple[list[int], FinishReason | None]]:  # fmt: skip
    """Each request's tokens and finish reason, all decoded in one batch."""
    for request_id, (prompt, params) in requests.items():
        engine.add_request(request_id, tokenizer.encode(prompt), params)
    outputs: dict[str, list[SequenceOutput]] = {}
    while engine.has_work():
        for output in engine.step():
            outputs.setdefault(output.request_id, []).append(output)
    return {
        request_id: ([t for o in outs for t in o.new_token_ids], outs[-1].finish_reason)
        for request_id, outs in outputs.items()
    }


def sampled(structured: StructuredOutput, seed: int, max_tokens: int = 160) -> SamplingParams:
    return SamplingParams(temperature=1.0, seed=seed, max_tokens=max_tokens, structured=structured)


def test_sampled_json_validates_against_its_schema(engine: LLMEngine, tokenizer: Tokenizer) -> None:
    structured = StructuredOutput("json_schema", json.dumps(SCHEMA))
    requests = {f"s{seed}": (PROMPTS[seed % 3], sampled(structured, seed)) for seed in range(8)}
    results = run(engine, requests, tokenizer)
    for token_ids, finish_reason in results.values():
        assert finish_reason == FinishReason.STOP  # the grammar's end, not max_tokens
        jsonschema.validate(json.loads(tokenizer.decode(token_ids)), SCHEMA)


def test_regex_and_choice_outputs_match(engine: LLMEngine, tokenizer: Tokenizer) -> None:
    pattern = r"[0-9]{3}-[a-z]{2,4}\."
    choices = ["file", "directory", "symbolic link"]
    regex = StructuredOutput("regex", pattern)
    choice = StructuredOutput("choice", json.dumps(choices))
    requests = {f"r{seed}": ("def", sampled(regex, seed)) for seed in range(4)}
    requests |= {f"c{seed}": ("def", sampled(choice, seed)) for seed in range(4)}
    requests["greedy"] = ("def", SamplingParams(temperature=0, max_tokens=32, structured=regex))
    for request_id, (token_ids, finish_reason) in run(engine, requests, tokenizer).items():
        text = tokenizer.decode(token_ids)
        assert finish_reason == FinishReason.STOP
        if request_id.startswith("c"):
            assert text in choices
        else:
            assert re.fullmatch(pattern, text), text


def test_unconstrained_rows_get_the_tokens_they_get_alone(
    model_dir: Path, decoder: OnnxDecoder, tokenizer: Tokenizer
) -> None:
    alone_params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone = {
        f"u{i}": run(
            LLMEngine(EngineConfig(model_path=model_dir), decoder),
            {f"u{i}": (prompt, alone_params)},
            tokenizer,
        )[f"u{i}"]
        for i, prompt in enumerate(PROMPTS)
    }
    structured = StructuredOutput("json_schema", json.dumps(SCHEMA))
    mixed = {f"u{i}": (prompt, alone_params) for i, prompt in enumerate(PROMPTS)}
    mixed |= {f"j{seed}": ("def", sampled(structured, seed)) for seed in range(3)}
    mixed["g"] = ("def", SamplingParams(temperature=0, max_tokens=40, structured=structured))
    together = run(LLMEngine(EngineConfig(model_path=model_dir), decoder), mixed, tokenizer)
    for request_id, result in alone.items():
        assert together[request_id] == result
    assert together["g"][0] != together["u2"][0][: len(together["g"][0])]  # the mask acted


def test_the_grammar_end_finishes_the_sequence_whatever_min_tokens_and_ignore_eos_say(
    engine: LLMEngine, tokenizer: Tokenizer
) -> None:
    choice = StructuredOutput("choice", json.dumps(["yes", "no"]))
    params = SamplingParams(
        temperature=0, max_tokens=50, min_tokens=40, ignore_eos=True, structured=choice
    )
    ((token_ids, finish_reason),) = run(engine, {"a": ("def", params)}, tokenizer).values()
    assert finish_reason == FinishReason.STOP
    assert tokenizer.decode(token_ids) in ("yes", "no")


def test_a_grammar_that_does_not_compile_is_refused_naming_structured(
    engine: LLMEngine, tokenizer: Tokenizer
) -> None:
    bad = StructuredOutput("regex", "([a-z]")  # grammar_from_regex accepts it; the matcher not
    with pytest.raises(InvalidRequestError, match="unclosed group") as refused:
        engine.add_request("bad", tokenizer.encode("def"), sampled(bad, 0))
    assert refused.value.param == "structured"
    assert not engine.has_work()
    good = StructuredOutput("regex", "ok")
    results = run(engine, {"good": ("def", sampled(good, 0))}, tokenizer)
    assert tokenizer.decode(results["good"][0]) == "ok"


def test_the_async_engine_reports_the_refusal_per_request(
    engine: LLMEngine, tokenizer: Tokenizer
) -> None:
    async def submit() -> list[str]:
        bad = SamplingParams(structured=StructuredOutput("json_schema", "[1]"))
        good = SamplingParams(temperature=0, max_tokens=3)
        batch = async_engine.submit(
            [
                GenerationRequest("bad", tokenizer.encode("def"), bad),
                GenerationRequest("good", tokenizer.encode("def"), good),
            ]
        )
        assert list(batch.rejected) == ["bad"]
        assert isinstance(batch.rejected["bad"], InvalidRequestError)
        assert batch.rejected["bad"].param == "structured"
        return [o.request_id async for outs in batch.outputs() for o in outs]

    async_engine = AsyncLLMEngine(engine)
    try:
        assert set(asyncio.run(submit())) == {"good"}
    finally:
        async_engine.shutdown()


def test_a_model_without_tokenizer_json_refuses_structured_requests() -> None:
    engine = fake_engine()  # its model folder does not exist
    params = SamplingParams(structured=StructuredOutput("regex", "a"))
    with pytest.raises(InvalidRequestError, match=r"no tokenizer\.json") as refused:
        engine.add_request("a", [1, 2], params)
    assert refused.value.param == "structured"
    engine.add_request("b", [1, 2], SamplingParams(temperature=0, max_tokens=2))
    assert engine.step()[0].new_token_ids == (3,)


def test_unconstrained_batches_compute_no_masks(
    engine: LLMEngine, tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*args: object) -> None:
        raise AssertionError("masks computed for an unconstrained batch")

    monkeypatch.setattr(ConstrainedDecoding, "_masks", fail)
    params = SamplingParams(temperature=1.0, seed=1, max_tokens=4)
    results = run(engine, {"a": ("def", params), "b": ("The", params)}, tokenizer)
    assert all(len(token_ids) == 4 for token_ids, _ in results.values())


def test_masks_match_llguidance_and_keep_the_models_logprobs(
    engine: LLMEngine, tokenizer: Tokenizer
) -> None:
    structured = StructuredOutput("json_schema", json.dumps(SCHEMA))
    params = SamplingParams(temperature=0, max_tokens=3, logprobs=2, structured=structured)
    engine.add_request("a", tokenizer.encode("def"), params)
    (first,) = engine.step()
    (sequence,) = engine.running
    assert sequence.matcher is not None
    pending = engine.constraints.start_masks([sequence])
    assert pending is not None
    masks = pending.result()
    vocab = engine.model_config.vocab_size
    reference = np.zeros((1, vocab), dtype=np.float32)
    bitmask = allocate_token_bitmask(1, vocab)
    words = np.frombuffer(sequence.matcher.compute_bitmask(), dtype=np.int32)
    bitmask[0] = words[: bitmask.shape[1]]  # llguidance pads its own copy by a word
    apply_token_bitmask_inplace(reference, bitmask)
    assert ((masks.bias == 0) == (reference == 0)).all()
    assert tokenizer.decode(list(first.new_token_ids)) == "{"
    # The logprob is the model's own: below zero although the grammar allowed nothing else.
    assert first.logprobs is not None and first.logprobs[0].logprob < 0


def test_masks_line_up_when_a_newcomer_only_scores_its_prompt(
    model_dir: Path, decoder: OnnxDecoder, tokenizer: Tokenizer
) -> None:
    plain = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    alone = run(LLMEngine(EngineConfig(model_path=model_dir), decoder), {"u": ("def", plain)},
                tokenizer)  # fmt: skip
    choices = ["alpha", "beta"]
    constrained = SamplingParams(
        temperature=0, max_tokens=8, structured=StructuredOutput("choice", json.dumps(choices))
    )
    requests = {
        "scored": ("The", SamplingParams(max_tokens=0, prompt_logprobs=1)),
        "c": ("def", constrained),
        "u": ("def", plain),
    }
    results = run(LLMEngine(EngineConfig(model_path=model_dir), decoder), requests, tokenizer)
    assert results["scored"] == ([], FinishReason.LENGTH)
    assert tokenizer.decode(results["c"][0]) in choices
    assert results["u"] == alone["u"]


class HandshakeDecoder:
    """The demo decoder, whose forward pass waits until the step's masks are computed (and the
    masks wait for the forward pass to begin): a step completes only if the two overlap."""

    def __init__(self, decoder: OnnxDecoder) -> None:
        self.decoder = decoder
        self.config = decoder.config
        self.ops = decoder.ops
        self.forward_started = threading.Event()
        self.masks_done = threading.Event()

    def forward(self, *args: Any, **kwargs: Any) -> ForwardResult:
        self.forward_started.set()
        assert self.masks_done.wait(timeout=10), "the masks were not computed during the forward"
        self.masks_done.clear()
        return self.decoder.forward(*args, **kwargs)

    def describe(self) -> str:
        return self.decoder.describe()


def test_masks_are_computed_while_the_model_runs(
    model_dir: Path,
    decoder: OnnxDecoder,
    tokenizer: Tokenizer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    handshake = HandshakeDecoder(decoder)
    masks = ConstrainedDecoding._masks

    def masks_during_forward(self: ConstrainedDecoding, *args: Any) -> TokenMasks:
        assert handshake.forward_started.wait(timeout=10), "the forward pass never began"
        handshake.forward_started.clear()
        result = masks(self, *args)
        handshake.masks_done.set()
        return result

    monkeypatch.setattr(ConstrainedDecoding, "_masks", masks_during_forward)
    engine = LLMEngine(EngineConfig(model_path=model_dir), handshake)
    choices = ["alpha", "beta"]
    params = SamplingParams(
        temperature=0, max_tokens=8, structured=StructuredOutput("choice", json.dumps(choices))
    )
    ((token_ids, finish_reason),) = run(engine, {"c": ("def", params)}, tokenizer).values()
    assert finish_reason == FinishReason.STOP
    assert tokenizer.decode(token_ids) in choices
