"""Streaming detokenization and stop strings on a real byte-level BPE tokenizer."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from serve_app.text.detokenizer import IncrementalDetokenizer, StopStringMatcher
from serve_app.text.tokenizer import Tokenizer

EOS = "<|endoftext|>"
# Emoji stay out of the training text, so they reach the tests as several byte tokens.
CORPUS = [
    "The quick brown fox jumps over the lazy dog.\nStreaming text one token at a time.",
    "Café, naïve, résumé, déjà vu, Ünïcödé and àccents everywhere.",
    "日本語のテキストと中文文本混合。東京は大きい都市です。",
    "def main() -> None:\n    print('hello, world')\n",
]
TEXTS = [
    "Hello, world! Streaming text one token at a time.",
    "Café naïve résumé: déjà vu, Ünïcödé.",
    "日本語のテキスト。中文文本と漢字",
    "Emoji 🎉🚀 and 👩\u200d💻 then 🇫🇷, done 😀",
    "  leading spaces\tand tabs\n\n    indented\r\nlast line ",
    "mixé 日本 🎉 text\nwith é and 👍🏽!",
]


@pytest.fixture(scope="module")
def hf_tokenizer() -> HFTokenizer:
    tokenizer = HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[EOS],
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer=trainer)
    return tokenizer


@pytest.fixture(scope="module")
def tokenizer(hf_tokenizer: HFTokenizer, tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    """The service's own tokenizer class over the freshly trained `tokenizer.json`."""
    model_dir: Path = tmp_path_factory.mktemp("byte_level_bpe")
    hf_tokenizer.save(str(model_dir / "tokenizer.json"))
    return Tokenizer(model_dir)


class CountingDecoder:
    """Records how many ids each decode call receives."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self.call_sizes: list[int] = []

    def decode(self, token_ids: list[int]) -> str:
        self.call_sizes.append(len(token_ids))
        return self._tokenizer.decode(token_ids)


def token_id(hf_tokenizer: HFTokenizer, token: str) -> int:
    """The id of a token that must be in the vocabulary."""
    found = hf_tokenizer.token_to_id(token)
    assert found is not None
    return int(found)


def stream(detokenizer: IncrementalDetokenizer, ids: Sequence[int], chunk: int) -> list[str]:
    """Deltas of feeding ``ids`` in chunks of ``chunk``, the flush last."""
    deltas = [detokenizer.add(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    return [*deltas, detokenizer.flush()]


def match_all(matcher: StopStringMatcher, deltas: Sequence[str]) -> tuple[str, bool]:
    """Everything the matcher emits for ``deltas`` and whether it stopped."""
    emitted, stopped = [], False
    for delta in deltas:
        text, stopped = matcher.feed(delta)
        emitted.append(text)
    if not stopped:
        emitted.append(matcher.flush())
    return "".join(emitted), stopped


@pytest.mark.parametrize("chunk", [1, 3])
@pytest.mark.parametrize("text", TEXTS)
def test_streamed_deltas_rebuild_the_text(tokenizer: Tokenizer, text: str, chunk: int) -> None:
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    deltas = stream(IncrementalDetokenizer(tokenizer), ids, chunk)
    assert "".join(deltas) == text
    assert not any("\ufffd" in delta for delta in deltas)


@pytest.mark.parametrize("character", ["🚀", "👍🏽", "ñ", "漢"])
def test_split_character_is_emitted_whole(tokenizer: Tokenizer, character: str) -> None:
    ids = tokenizer.encode(character)
    assert len(ids) > 1, "the character should span several byte tokens"
    detokenizer = IncrementalDetokenizer(tokenizer)
    deltas = [detokenizer.add([token_id]) for token_id in ids]
    assert "".join(deltas) == character
    assert "\ufffd" not in "".join(deltas)
    # Nothing comes out until the last byte of the (first) code point arrives.
    assert deltas[0] == ""


def test_flush_releases_a_truncated_character(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("ok 🚀")[:-1]
    detokenizer = IncrementalDetokenizer(tokenizer)
    assert detokenizer.add(ids) == "ok "
    tail = detokenizer.flush()
    assert tail.startswith("\ufffd")
    assert "ok " + tail == tokenizer.decode(ids)
    assert detokenizer.flush() == ""


def test_prompt_gives_context_but_is_not_emitted(tokenizer: Tokenizer) -> None:
    prompt = tokenizer.encode("Streaming text 日本語 one token")
    output = tokenizer.encode(" at a time 🎉 done.")
    deltas = stream(IncrementalDetokenizer(tokenizer, prompt), output, 1)
    full = tokenizer.decode(prompt + output)
    assert "".join(deltas) == full[len(tokenizer.decode(prompt)) :]


def test_character_split_between_prompt_and_output_stays_with_prompt(
    tokenizer: Tokenizer,
) -> None:
    prompt = tokenizer.encode("文本漢")
    assert tokenizer.decode(prompt[:-1]).endswith("\ufffd"), "漢 should end in a byte token"
    output = [prompt.pop(), *tokenizer.encode("字")]
    deltas = stream(IncrementalDetokenizer(tokenizer, prompt), output, 1)
    assert "".join(deltas) == "字"


def test_special_tokens_are_skipped(tokenizer: Tokenizer, hf_tokenizer: HFTokenizer) -> None:
    eos = token_id(hf_tokenizer, EOS)
    ids = [*tokenizer.encode("before 🎉"), eos, eos, *tokenizer.encode(" after"), eos]
    deltas = stream(IncrementalDetokenizer(tokenizer), ids, 1)
    assert "".join(deltas) == "before 🎉 after"


def test_work_per_token_stays_bounded(tokenizer: Tokenizer) -> None:
    prompt = tokenizer.encode(TEXTS[0])
    ids = tokenizer.encode(" ".join(TEXTS) * 20)[:2000]
    assert len(ids) == 2000
    decoder = CountingDecoder(tokenizer)
    deltas = stream(IncrementalDetokenizer(decoder, prompt), ids, 1)
    assert "".join(deltas) == tokenizer.decode(ids)
    assert max(decoder.call_sizes) <= 10
    assert len(decoder.call_sizes) <= 2 * len(ids) + 2


def test_invalid_bytes_do_not_grow_the_window(
    tokenizer: Tokenizer, hf_tokenizer: HFTokenizer
) -> None:
    # "ð" is the byte-level symbol of 0xF0, a UTF-8 lead byte that nothing here completes.
    lead_byte = token_id(hf_tokenizer, "ð")
    ids = [lead_byte] * 2000
    decoder = CountingDecoder(tokenizer)
    deltas = stream(IncrementalDetokenizer(decoder), ids, 1)
    assert "".join(deltas) == tokenizer.decode(ids)
    assert max(decoder.call_sizes) <= 40


def test_stop_split_across_deltas_is_never_emitted() -> None:
    matcher = StopStringMatcher(["STOP"])
    assert matcher.feed("Hello wo") == ("Hello wo", False)
    assert matcher.feed("rld ST") == ("rld ", False)
    assert matcher.feed("O") == ("", False)
    assert matcher.feed("P and more") == ("", True)
    assert matcher.feed("later text") == ("", True)
    assert matcher.flush() == ""


def test_partial_match_is_released_when_it_is_not_a_stop() -> None:
    matcher = StopStringMatcher(["END"])
    assert matcher.feed("the EN") == ("the ", False)
    assert matcher.feed("JOY E") == ("ENJOY ", False)
    assert matcher.flush() == "E"


def test_stop_at_the_very_start() -> None:
    matcher = StopStringMatcher(["###"])
    assert matcher.feed("### and then") == ("", True)
    assert matcher.feed("more") == ("", True)


def test_no_stop_strings_pass_text_through_at_once() -> None:
    for matcher in (StopStringMatcher([]), StopStringMatcher([""])):
        assert matcher.feed("a") == ("a", False)
        assert matcher.feed("🎉 b") == ("🎉 b", False)
        assert matcher.flush() == ""


@pytest.mark.parametrize(
    ("stop", "text", "expected"),
    [
        (["ab", "abc"], "xxabcd", "xx"),  # a stop that is a prefix of another completes first
        (["bc", "abcd"], "xabcd", "xa"),  # the first stop to complete wins
        (["b", "ab"], "xab", "x"),  # completing together, the earlier start wins
        (["aab"], "aaab", "a"),  # the held tail restarts inside itself
        (["。", "🛑"], "日本語です。次の文", "日本語です"),
        (["🛑"], "go 🛑 stop", "go "),
        (["é!"], "café café!", "café caf"),
        (["\n\n"], "a\nb\n\nc", "a\nb"),
    ],
)
def test_output_is_cut_before_the_first_stop(stop: list[str], text: str, expected: str) -> None:
    whole = match_all(StopStringMatcher(stop), [text])
    by_character = match_all(StopStringMatcher(stop), list(text))
    assert whole == by_character == (expected, True)


def test_text_without_a_stop_comes_out_whole() -> None:
    text = "the STO and ST and S"
    assert match_all(StopStringMatcher(["STOP"]), list(text)) == (text, False)


@pytest.mark.parametrize("chunk", [1, 3])
@pytest.mark.parametrize("stop", ["STOP", "日本", "🎉 d", "\n\n", "é!"])
def test_detokenizer_into_matcher(tokenizer: Tokenizer, stop: str, chunk: int) -> None:
    full_text = "Intro 🚀 line\nnaïve é!? 日本語 🎉 done\n\nSTOP here, then more text."
    ids = tokenizer.encode(full_text)
    detokenizer = IncrementalDetokenizer(tokenizer)
    matcher = StopStringMatcher(["never seen", stop])
    emitted, stopped = match_all(matcher, stream(detokenizer, ids, chunk))
    assert stopped
    assert emitted == full_text[: full_text.index(stop)]
