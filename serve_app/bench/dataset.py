"""Random prompts of requested lengths, reproducible from a seed: text, or token ids."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Common English words that even the demo model's 4k-token BPE keeps whole (with the leading
# space), as larger vocabularies do, so a prompt of n words is about n tokens.
_WORD_TEXT = """
the of and to in is was for on are with as at be this have from or one had by word but not
what all were we when your can there use an each which do how their if will up other about
out many then them these so some would make like into time has look two more write go see
number no way could my than first been call who its now find long down get made may part
over new take only work know place year me back most very after just name man where help
through much before line right too mean old any same tell follow want show also around form
three set put end does another well must even such because turn here read need different us
try kind hand again change off point found still should high every add between own below
last keep tree never start under left while along might close next hard open example begin
always those both together group run until side state once stop without second real let
above list being
"""
WORDS = tuple(_WORD_TEXT.split())
FIRST_PROMPT_ID = 10  # keep clear of the special tokens (pad/bos/eos) at the start of the vocab


@dataclass(frozen=True)
class LengthRange:
    """Lengths drawn uniformly from ``mean * (1 - spread)`` to ``mean * (1 + spread)``."""

    mean: int
    spread: float

    @property
    def bounds(self) -> tuple[int, int]:
        """Inclusive lower and upper bound, never below 1."""
        low = max(1, round(self.mean * (1 - self.spread)))
        return low, max(low, round(self.mean * (1 + self.spread)))


@dataclass(frozen=True)
class BenchRequest:
    """One request of the dataset."""

    prompt: str
    input_len: int  # in words, about the prompt's token count
    output_len: int  # sent as max_tokens


def random_requests(
    count: int, input_len: LengthRange, output_len: LengthRange, seed: int
) -> list[BenchRequest]:
    """``count`` requests with distinct prompts, so a response cache never answers one."""
    rng = np.random.default_rng(seed)
    in_low, in_high = input_len.bounds
    out_low, out_high = output_len.bounds
    seen: set[str] = set()
    requests: list[BenchRequest] = []
    while len(requests) < count:
        n_words = int(rng.integers(in_low, in_high + 1))
        prompt = " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), size=n_words))
        if prompt in seen:  # only plausible for prompts of one or two words
            continue
        seen.add(prompt)
        output = int(rng.integers(out_low, out_high + 1))
        requests.append(BenchRequest(prompt=prompt, input_len=n_words, output_len=output))
    return requests


def prompt_ids(prompt_len: int, vocab_size: int, seed: int) -> np.ndarray:
    """Random token ids for an in-process prompt (int32; cast where int64 is needed)."""
    rng = np.random.default_rng(seed)
    return rng.integers(FIRST_PROMPT_ID, vocab_size, size=prompt_len).astype(np.int32)
