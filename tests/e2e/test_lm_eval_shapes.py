"""lm-eval's ``local-completions`` requests over real HTTP, parsed the way lm-eval parses them,
and the demo model's perplexity on a held-out text through the API.

The payloads are those of lm-eval 0.4's ``LocalCompletionsAPI._create_payload`` (loglikelihood:
tokenized prompts, ``echo``, ``logprobs: 1``, ``max_tokens: 1``; older clients and vLLM users
send ``max_tokens: 0``; generate_until: text prompts with ``stop``), and ``parse_logprobs`` /
``parse_generations`` below are copies of its parsers, so a shape lm-eval cannot read fails here.
"""

from __future__ import annotations

import inspect
import math
from operator import itemgetter
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from serve_app.engine import EngineConfig, LLMEngine, SamplingParams, load_decoder
from serve_app.text.tokenizer import Tokenizer
from serve_app.tools.corpus import split_documents

SEED = 1234  # lm-eval's default seed
ENDOFTEXT = 0  # the demo tokenizer's <|endoftext|>: lm-eval's prefix token for rolling windows
# (context, continuation) pairs, as a multiple-choice task would pose them.
PAIRS = [
    ("The return statement", " leaves the current function call"),
    ("A list is a mutable sequence type that", " can hold items of any type"),
    ("The break statement terminates", " the nearest enclosing loop"),
]
GENERATE_PROMPTS = ["The for statement is used to", "Raise an exception when", "def"]
STOP = ["\n\n", "."]


# lm-eval 0.4.13, lm_eval/models/openai_completions.py, LocalCompletionsAPI (verbatim logic)
def parse_logprobs(outputs: dict | list[dict], ctxlens: list[int]) -> list[tuple[float, bool]]:
    res = []
    if not isinstance(outputs, list):
        outputs = [outputs]
    for out in outputs:
        for choice, ctxlen in zip(
            sorted(out["choices"], key=itemgetter("index")), ctxlens, strict=False
        ):
            assert ctxlen > 0, "Context length must be greater than 0"
            logprobs = sum(choice["logprobs"]["token_logprobs"][ctxlen:-1])
            tokens_logprobs = choice["logprobs"]["token_logprobs"][ctxlen:-1]
            top_logprobs = choice["logprobs"]["top_logprobs"][ctxlen:-1]
            is_greedy = True
            for tok, top in zip(tokens_logprobs, top_logprobs, strict=False):
                if tok != max(top.values()):
                    is_greedy = False
                    break
            res.append((logprobs, is_greedy))
    return res


def parse_generations(outputs: dict | list[dict]) -> list[str]:
    res: list[str] = []
    if not isinstance(outputs, list):
        outputs = [outputs]
    for out in outputs:
        tmp = [None] * len(out["choices"])
        for choices in out["choices"]:
            tmp[choices["index"]] = choices["text"]
        res = res + tmp  # type: ignore[operator]
    return res


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> LLMEngine:
    """The engine in this process, over the same model: the reference the API must equal."""
    config = EngineConfig(model_path=model_dir, intra_op_num_threads=2)
    return LLMEngine(config, load_decoder(config))


def engine_run(engine: LLMEngine, prompt: list[int], params: SamplingParams) -> Any:
    """(prompt logprobs, generated ids) of one request run alone in ``engine``."""
    engine.add_request("reference", prompt, params)
    scored, generated = None, list[int]()
    while engine.has_work():
        for output in engine.step():
            scored = scored or output.prompt_logprobs
            generated.extend(output.new_token_ids)
    return scored, generated


def engine_loglikelihood(engine: LLMEngine, tokens: list[int], ctxlen: int) -> float:
    scored, _ = engine_run(engine, tokens, SamplingParams(max_tokens=0, prompt_logprobs=0))
    return sum(record.logprob for record in scored[ctxlen:])


def loglikelihood_payload(prompts: list[Any], max_tokens: int) -> dict[str, Any]:
    """lm-eval's ``_create_payload(generate=False)``."""
    return {
        "model": "demo",
        "prompt": prompts,
        "temperature": 0,
        "max_tokens": max_tokens,
        "logprobs": 1,
        "seed": SEED,
        "echo": True,
    }


def post(client: httpx.Client, payload: dict[str, Any]) -> dict[str, Any]:
    response = client.post("/v1/completions", json=payload)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def test_loglikelihood_of_tokenized_requests_equals_the_engine(
    client: httpx.Client, tokenizer: Tokenizer, engine: LLMEngine
) -> None:
    """lm-eval's default path: it tokenizes context and continuation itself, sends the ids, and
    sums the continuation's logprobs from ``ctxlen`` on (dropping the one generated token)."""
    encoded = [(tokenizer.encode(c), tokenizer.encode(x)) for c, x in PAIRS]
    inputs = [context + continuation for context, continuation in encoded]
    ctxlens = [len(context) for context, _ in encoded]
    body = post(client, loglikelihood_payload(inputs, max_tokens=1))

    results = parse_logprobs(body, ctxlens)
    assert len(results) == len(PAIRS)
    for (loglikelihood, is_greedy), tokens, ctxlen, choice in zip(
        results, inputs, ctxlens, body["choices"], strict=True
    ):
        logprobs = choice["logprobs"]
        assert len(logprobs["tokens"]) == len(tokens) + 1, "the prompt's tokens, then one more"
        assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
        assert logprobs["text_offset"][0] == 0
        assert choice["text"].startswith(tokenizer.decode(tokens))
        expected = engine_loglikelihood(engine, tokens, ctxlen)
        assert loglikelihood == pytest.approx(expected, rel=1e-4)
        assert loglikelihood < 0
        scored, _ = engine_run(engine, tokens, SamplingParams(max_tokens=0, prompt_logprobs=0))
        assert is_greedy == all(record.rank == 1 for record in scored[ctxlen:])


def test_loglikelihood_of_text_prompts_with_no_tokens_to_generate(
    client: httpx.Client, tokenizer: Tokenizer, engine: LLMEngine
) -> None:
    """``max_tokens: 0`` (vLLM-style clients): the answer is the scored prompt and nothing
    else, so the whole continuation is summed from ``ctxlen`` to the end."""
    texts = [context + continuation for context, continuation in PAIRS]
    body = post(client, loglikelihood_payload(texts, max_tokens=0))
    for text, (context, _), choice in zip(texts, PAIRS, body["choices"], strict=True):
        tokens, ctxlen = tokenizer.encode(text), len(tokenizer.encode(context))
        assert choice["text"] == text
        assert choice["finish_reason"] == "length"
        assert len(choice["logprobs"]["token_logprobs"]) == len(tokens)
        got = sum(choice["logprobs"]["token_logprobs"][ctxlen:])
        assert got == pytest.approx(engine_loglikelihood(engine, tokens, ctxlen), rel=1e-4)
    assert body["usage"]["completion_tokens"] == 0


def test_generate_until_stops_like_the_engine_greedy_text(
    client: httpx.Client, tokenizer: Tokenizer, engine: LLMEngine
) -> None:
    """lm-eval's ``_create_payload(generate=True)`` with ``until`` stops, and its parser."""
    payload = {
        "prompt": GENERATE_PROMPTS,
        "model": "demo",
        "max_tokens": 24,
        "temperature": 0,
        "stop": STOP,
        "seed": SEED,
    }
    generations = parse_generations(post(client, payload))
    assert len(generations) == len(GENERATE_PROMPTS)
    for prompt, generated in zip(GENERATE_PROMPTS, generations, strict=True):
        params = SamplingParams(temperature=0, max_tokens=24, seed=SEED)
        _, ids = engine_run(engine, tokenizer.encode(prompt), params)
        text = tokenizer.decode(ids)
        cut = min([text.index(s) for s in STOP if s in text], default=len(text))
        assert generated == text[:cut]


def held_out_text() -> str:
    """A pydoc topic the demo's training held out (see ``serve_app/tools/corpus.py``)."""
    from pydoc_data.topics import topics

    text = inspect.cleandoc(topics["dynamic-features"]).strip()
    assert split_documents([text]).held_out == [text], "the demo model was trained on it"
    return text


def test_held_out_perplexity_through_the_api_equals_the_engines(
    client: httpx.Client, tokenizer: Tokenizer, engine: LLMEngine
) -> None:
    """lm-eval's rolling loglikelihood in one window: ``<|endoftext|>`` as context, every
    token of the document scored."""
    tokens = [ENDOFTEXT, *tokenizer.encode(held_out_text())]
    body = post(client, loglikelihood_payload([tokens], max_tokens=1))
    ((loglikelihood, _),) = parse_logprobs(body, [1])
    scored = len(tokens) - 1
    perplexity = math.exp(-loglikelihood / scored)

    expected = math.exp(-engine_loglikelihood(engine, tokens, 1) / scored)
    assert perplexity == pytest.approx(expected, rel=1e-4)
    # Trained on neighbouring text, it must beat a uniform guess over its vocabulary by far.
    assert 1 < perplexity < tokenizer.vocab_size / 20
    print(f"demo model: held-out perplexity {perplexity:.4f} over {scored} tokens")


def test_the_openai_sdk_reads_echoed_logprobs_streamed_and_not(served_app: str) -> None:
    sdk = openai.OpenAI(base_url=f"{served_app}/v1", api_key="unused", max_retries=0)
    prompt = PAIRS[0][0] + PAIRS[0][1]
    whole = sdk.completions.create(
        model="demo", prompt=prompt, echo=True, logprobs=1, max_tokens=2, temperature=0
    )
    streamed = list(
        sdk.completions.create(
            model="demo",
            prompt=prompt,
            echo=True,
            logprobs=1,
            max_tokens=2,
            temperature=0,
            stream=True,
        )
    )
    (choice,) = whole.choices
    assert choice.text.startswith(prompt) and choice.logprobs is not None
    assert choice.logprobs.token_logprobs is not None
    assert choice.logprobs.token_logprobs[0] is None
    assert "".join(c.choices[0].text for c in streamed if c.choices) == choice.text
    tokens = [
        t
        for c in streamed
        if c.choices and c.choices[0].logprobs
        for t in c.choices[0].logprobs.tokens or []
    ]
    assert tokens == choice.logprobs.tokens


def test_vllm_prompt_logprobs_name_each_prompt_token_by_id(
    client: httpx.Client, tokenizer: Tokenizer, engine: LLMEngine
) -> None:
    tokens = tokenizer.encode(PAIRS[1][0] + PAIRS[1][1])
    payload = {"model": "demo", "prompt": tokens, "max_tokens": 0, "prompt_logprobs": 2}
    (choice,) = post(client, payload)["choices"]
    positions = choice["prompt_logprobs"]
    assert choice["text"] == "" and choice["logprobs"] is None
    assert len(positions) == len(tokens) and positions[0] is None
    scored, _ = engine_run(engine, tokens, SamplingParams(max_tokens=0, prompt_logprobs=2))
    for token, position, record in zip(tokens[1:], positions[1:], scored[1:], strict=True):
        assert 2 <= len(position) <= 3, "the top two, and the prompt token if not among them"
        mine = position[str(token)]
        assert mine["rank"] == record.rank
        assert mine["logprob"] == pytest.approx(record.logprob, rel=1e-4, abs=1e-5)
        assert mine["decoded_token"] == tokenizer.decode_token(token)
