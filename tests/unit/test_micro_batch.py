"""``MicroBatch`` on the demo model's real tokenizer and chat template, fed scripted model steps."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from serve_app.engine import FinishReason, SamplingParams, SequenceOutput, TokenLogprob
from serve_app.messages import (
    ModelStep,
    PreparedRequest,
    RejectedRequest,
    RequestError,
    TextChunk,
    TokenText,
)
from serve_app.micro_batch import MicroBatch, StreamItem
from serve_app.text.chat_template import ChatTemplate
from serve_app.text.tokenizer import Tokenizer

PROMPT = "Once upon a time"
HI = [{"role": "user", "content": "Hi"}]
HI_RENDERED = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"  # the demo template's
HOLD_S = 3600.0  # a stream interval no test outlives: tokens are held back unless never held


class Engine:
    """Writes the outputs an engine step would, with each sequence's running token count."""

    def __init__(self) -> None:
        self._produced: Counter[str] = Counter()

    def output(
        self,
        request_id: str,
        token_ids: list[int],
        finish: FinishReason | None = None,
        logprobs: tuple[TokenLogprob, ...] | None = None,
    ) -> SequenceOutput:
        self._produced[request_id] += len(token_ids)
        return SequenceOutput(
            request_id, tuple(token_ids), logprobs, finish, 0, self._produced[request_id]
        )


def request(
    request_id: str,
    prompt: str | None = PROMPT,
    messages: list[dict[str, str]] | None = None,
    stop: list[str] | None = None,
) -> PreparedRequest:
    if messages is not None:
        prompt = None
    return PreparedRequest(request_id, SamplingParams(), prompt, messages, stop or [])


@pytest.fixture(scope="module")
def template(model_dir: Path) -> ChatTemplate:
    return ChatTemplate(model_dir)


def started(tokenizer: Tokenizer, template: ChatTemplate, *requests: PreparedRequest) -> MicroBatch:
    """A micro-batch whose first items (prompt counts, template errors) were already sent."""
    batch = MicroBatch(list(requests), tokenizer, template)
    batch.collect()
    return batch


def collect(batch: MicroBatch, interval_s: float = 0.0) -> dict[str, StreamItem]:
    """Each request's item of one ``collect``."""
    return dict(zip(batch.request_ids, batch.collect(interval_s), strict=True))


class CountingTokenizer(Tokenizer):
    """The real tokenizer, counting its batch calls."""

    batch_calls = 0

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        self.batch_calls += 1
        return super().encode_batch(texts)


def test_prompts_and_chat_messages_are_tokenized_in_one_call(
    model_dir: Path, tokenizer: Tokenizer, template: ChatTemplate
) -> None:
    counting = CountingTokenizer(model_dir)
    text, chat = request("text"), request("chat", messages=HI)
    batch = MicroBatch([text, chat], counting, template)

    assert counting.batch_calls == 1
    assert [(r.request_id, r.prompt_token_ids, r.params) for r in batch.runnable] == [
        ("text", tokenizer.encode(PROMPT), text.params),
        ("chat", tokenizer.encode(HI_RENDERED), chat.params),
    ]
    first = collect(batch)
    assert first == {
        "text": TextChunk("text", prompt_tokens=len(tokenizer.encode(PROMPT))),
        "chat": TextChunk("chat", prompt_tokens=len(tokenizer.encode(HI_RENDERED))),
    }


def test_chat_template_error_fails_only_that_request(
    tokenizer: Tokenizer, template: ChatTemplate
) -> None:
    no_content = [{"role": "user"}]
    batch = MicroBatch([request("good"), request("bad", messages=no_content)], tokenizer, template)

    assert [r.request_id for r in batch.runnable] == ["good"]
    first = collect(batch)
    bad = first["bad"]
    assert isinstance(bad, TextChunk) and bad.error is not None
    assert (bad.error.status, bad.error.param) == (400, "messages")
    assert "chat template" in bad.error.message
    assert (bad.text, bad.token_ids, bad.finish_reason) == ("", [], None)
    assert first["good"] == TextChunk("good", prompt_tokens=len(tokenizer.encode(PROMPT)))
    assert collect(batch)["bad"] is StopIteration


def test_rejected_requests_get_their_error_and_the_others_run(
    tokenizer: Tokenizer, template: ChatTemplate
) -> None:
    engine = Engine()
    batch = started(tokenizer, template, request("ok"), request("long"), request("busy"))
    batch.on_step(
        ModelStep(
            outputs=[],
            replica_id="replica-1",
            model_version="v2",
            rejected={
                "long": RejectedRequest("max_tokens exceeds the context", "max_tokens"),
                "busy": RejectedRequest("the waiting queue is full", None, status=503),
            },
        )
    )

    items = collect(batch)
    assert items["long"] == TextChunk(
        "long", error=RequestError(400, "max_tokens exceeds the context", param="max_tokens")
    )
    assert items["busy"] == TextChunk("busy", error=RequestError(503, "the waiting queue is full"))
    assert items["ok"] == TextChunk("ok")  # nothing new for it yet

    tokens = tokenizer.encode(" there was a cat")
    batch.on_step(ModelStep([engine.output("ok", tokens[:2])]))
    middle = collect(batch)
    assert middle["long"] is StopIteration and middle["busy"] is StopIteration
    assert isinstance(middle["ok"], TextChunk)
    assert (middle["ok"].text, middle["ok"].model_version) == (" there was", None)

    batch.on_step(ModelStep([engine.output("ok", tokens[2:], FinishReason.LENGTH)]))
    final = collect(batch)["ok"]
    assert isinstance(final, TextChunk)
    assert (final.text, final.finish_reason, final.model_version) == (" a cat", "length", "v2")
    assert final.completion_tokens == len(tokens)
    assert collect(batch)["ok"] is StopIteration


def test_streamed_text_is_the_decoding_of_all_tokens(
    tokenizer: Tokenizer, template: ChatTemplate
) -> None:
    text = "héllo wörld 🙂 ok"  # accents and the emoji are split over several byte tokens
    tokens = tokenizer.encode(text)
    engine, batch = Engine(), started(tokenizer, template, request("r"))

    chunks = []
    for i, token in enumerate(tokens):
        finish = FinishReason.STOP if i == len(tokens) - 1 else None
        batch.on_step(ModelStep([engine.output("r", [token], finish)]))
        chunk = collect(batch)["r"]
        assert isinstance(chunk, TextChunk)
        chunks.append(chunk)

    assert "".join(c.text for c in chunks) == tokenizer.decode(tokens) == text
    assert not any("\ufffd" in c.text for c in chunks)  # never half a character
    assert [t for c in chunks for t in c.token_ids] == tokens
    assert (chunks[-1].finish_reason, chunks[-1].completion_tokens) == ("stop", len(tokens))


@pytest.mark.parametrize(
    ("text", "stop", "expected"),
    [
        ("café", [], "caf\ufffd"),  # max_tokens cut "é" in half: its first byte still shows
        ("a cat", [" cats"], "a cat"),  # " cat" could have begun the stop string
    ],
    ids=["mid-character", "stop-string-prefix"],
)
def test_the_last_chunk_carries_the_text_held_back(
    text: str, stop: list[str], expected: str, tokenizer: Tokenizer, template: ChatTemplate
) -> None:
    tokens = tokenizer.encode(text)
    if not stop:
        tokens = tokens[:-1]
    engine, batch = Engine(), started(tokenizer, template, request("r", stop=stop))

    batch.on_step(ModelStep([engine.output("r", tokens[:-1])]))
    first = collect(batch)["r"]
    batch.on_step(ModelStep([engine.output("r", tokens[-1:], FinishReason.LENGTH)]))
    last = collect(batch)["r"]

    assert isinstance(first, TextChunk) and isinstance(last, TextChunk)
    assert first.text + last.text == expected == tokenizer.decode(tokens)
    assert last.finish_reason == "length"


def test_stop_string_cuts_the_text_and_marks_the_request_stopped(
    tokenizer: Tokenizer, template: ChatTemplate
) -> None:
    tokens = tokenizer.encode("one two three four")  # one, " two", " three", " fo", "ur"
    engine = Engine()
    batch = started(tokenizer, template, request("s", stop=[" three"]), request("other"))
    batch.on_step(ModelStep([], replica_id="replica-1", model_version="v1"))

    chunks = []
    for token in tokens[:3]:
        batch.on_step(ModelStep([engine.output("s", [token]), engine.output("other", [token])]))
        chunk = collect(batch)["s"]
        assert isinstance(chunk, TextChunk)
        chunks.append(chunk)

    assert "".join(c.text for c in chunks) == "one two"
    assert [(c.finish_reason, c.model_version) for c in chunks] == [
        (None, None),
        (None, None),
        ("stop", "v1"),
    ]
    assert batch.stopped == ["s"]  # the engine is still generating it

    # Until the abort lands, the engine's further tokens for it are dropped.
    batch.on_step(ModelStep([engine.output("s", tokens[3:]), engine.output("other", tokens[3:])]))
    items = collect(batch)
    assert items["s"] is StopIteration
    assert isinstance(items["other"], TextChunk) and items["other"].text == " four"


def test_stop_string_in_the_last_step_needs_no_abort(
    tokenizer: Tokenizer, template: ChatTemplate
) -> None:
    tokens = tokenizer.encode("one two three four")
    batch = started(tokenizer, template, request("s", stop=[" three"]))
    batch.on_step(ModelStep([Engine().output("s", tokens, FinishReason.LENGTH)]))

    chunk = collect(batch)["s"]
    assert isinstance(chunk, TextChunk)
    assert (chunk.text, chunk.finish_reason) == ("one two", "stop")
    assert batch.stopped == []  # the engine has already ended it


def test_logprobs_become_token_texts(tokenizer: Tokenizer, template: ChatTemplate) -> None:
    wor, ld = tokenizer.encode(" world")
    eos = 0  # special tokens keep their text in logprobs
    engine, batch = Engine(), started(tokenizer, template, request("r"))
    batch.on_step(
        ModelStep([engine.output("r", [wor], logprobs=(TokenLogprob(wor, -0.1, ((eos, -2.5),)),))])
    )
    assert collect(batch, HOLD_S)["r"] == TextChunk(
        "r",
        text=" wor",
        token_ids=[wor],
        logprobs=[TokenText(" wor", -0.1, [("<|endoftext|>", -2.5)])],
        prompt_tokens=len(tokenizer.encode(PROMPT)),
        completion_tokens=1,
    )

    batch.on_step(ModelStep([engine.output("r", [ld], logprobs=(TokenLogprob(ld, -0.2),))]))
    batch.on_step(
        ModelStep([engine.output("r", [eos], FinishReason.STOP, (TokenLogprob(eos, -0.3),))])
    )
    last = collect(batch)["r"]
    assert isinstance(last, TextChunk)
    assert last.logprobs == [  # held-back tokens keep their logprobs, in order
        TokenText("ld", -0.2, []),
        TokenText("<|endoftext|>", -0.3, []),
    ]


def test_collect_holds_back_tokens_of_a_stream_that_sent_recently(
    tokenizer: Tokenizer, template: ChatTemplate
) -> None:
    t1, t2, t3, t4 = tokenizer.encode(" there was a time")
    engine, batch = Engine(), started(tokenizer, template, request("a"), request("b"))

    batch.on_step(ModelStep([engine.output("a", [t1])]))
    first = collect(batch, HOLD_S)["a"]
    assert isinstance(first, TextChunk) and first.token_ids == [t1]  # first tokens go at once

    batch.on_step(ModelStep([engine.output("a", [t2]), engine.output("b", [t1])]))
    items = collect(batch, HOLD_S)
    assert items["a"] == TextChunk("a")  # held: it sent less than an interval ago
    assert isinstance(items["b"], TextChunk) and items["b"].token_ids == [t1]

    batch.on_step(ModelStep([engine.output("a", [t3])]))
    assert collect(batch, HOLD_S)["a"] == TextChunk("a")

    caught_up = collect(batch, 0.0)["a"]  # the interval has passed: all it accumulated goes out
    assert isinstance(caught_up, TextChunk)
    assert (caught_up.token_ids, caught_up.text) == ([t2, t3], " was a")

    batch.on_step(ModelStep([engine.output("a", [t4], FinishReason.LENGTH)]))
    ending = collect(batch, HOLD_S)["a"]  # endings are never held
    assert isinstance(ending, TextChunk)
    assert (ending.token_ids, ending.text, ending.finish_reason) == ([t4], " time", "length")
    assert collect(batch, HOLD_S)["a"] is StopIteration


def test_fail_unfinished_ends_every_request_still_generating(
    tokenizer: Tokenizer, template: ChatTemplate
) -> None:
    tokens = tokenizer.encode(" there was")
    engine = Engine()
    batch = started(tokenizer, template, request("done"), request("running"), request("idle"))
    batch.on_step(
        ModelStep(
            [
                engine.output("done", tokens, FinishReason.LENGTH),
                engine.output("running", tokens[:1]),
            ]
        )
    )
    error = RequestError(503, "the model replica failed; retry the request")
    batch.fail_unfinished(error)

    items = collect(batch)
    done = items["done"]
    assert isinstance(done, TextChunk)  # finished before the failure: its ending still goes out
    assert (done.text, done.finish_reason, done.error) == (" there was", "length", None)
    assert items["running"] == TextChunk("running", error=error)
    assert items["idle"] == TextChunk("idle", error=error)
    assert set(collect(batch).values()) == {StopIteration}
