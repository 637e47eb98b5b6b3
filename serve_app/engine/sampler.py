"""Vectorized token sampling over a batch of sequences.

Each row is processed in the order vLLM and Hugging Face use: penalties, then the min_tokens
ban on stop tokens, then a structured row's grammar mask, then greedy argmax or temperature,
top-k, top-p and min-p filtering and a draw. Every sequence owns its random generator and draws
exactly one number per step, so a seeded request samples the same tokens whatever else shares
the batch. Logprobs always describe the model's own distribution, before penalties, filters and
grammar masks (vLLM's default ``raw_logprobs``): a constrained token may have a low logprob.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from serve_app.engine.constrained import TokenMasks
from serve_app.engine.sequence import Sequence, TokenLogprob


@dataclass(frozen=True)
class SamplerOutput:
    """The token chosen for each row and, where asked, its logprob record."""

    token_ids: np.ndarray  # [batch] int64
    logprobs: list[TokenLogprob | None]


class Sampler:
    """Chooses the next token of every sequence in a batch from its logits."""

    def __init__(self, vocab_size: int, eos_token_ids: tuple[int, ...]) -> None:
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids

    def __call__(
        self, logits: np.ndarray, sequences: list[Sequence], masks: TokenMasks | None = None
    ) -> SamplerOutput:
        """Sample one token per row of ``logits`` ([batch, vocab]) for ``sequences``, each
        constrained row (``masks``) among the tokens its grammar allows. With ``masks`` and no
        row asking for logprobs, ``logits`` is masked in place rather than copied."""
        raw = logits
        if any(s.params.has_penalties or len(s.output_token_ids) < s.params.min_tokens
               for s in sequences):  # fmt: skip
            logits = logits.copy()  # keep the raw logits for logprobs
            self._apply_penalties(logits, sequences)
            self._ban_early_stop(logits, sequences)
        if masks is not None:
            if logits is raw and any(s.params.logprobs is not None for s in sequences):
                logits = logits.copy()  # keep the raw logits for logprobs
            masks.apply(logits)
        greedy = np.array([s.params.greedy for s in sequences], dtype=bool)
        if greedy.all():  # the common serving case: one argmax, no per-row work
            token_ids = logits.argmax(axis=1)
            return SamplerOutput(token_ids, _logprobs(raw, token_ids, sequences))
        token_ids = np.empty(len(sequences), dtype=np.int64)
        if greedy.any():
            token_ids[greedy] = logits[greedy].argmax(axis=1)
        sampled_rows = np.flatnonzero(~greedy)
        if sampled_rows.size:
            token_ids[sampled_rows] = _sample(
                logits[sampled_rows], [sequences[i] for i in sampled_rows]
            )
        return SamplerOutput(token_ids, _logprobs(raw, token_ids, sequences))

    def _apply_penalties(self, logits: np.ndarray, sequences: list[Sequence]) -> None:
        for row, seq in enumerate(sequences):
            params = seq.params
            if not params.has_penalties:
                continue
            counts = np.bincount(seq.output_token_ids, minlength=self.vocab_size)[: self.vocab_size]
            if params.repetition_penalty != 1.0:
                seen = counts > 0
                seen[np.asarray(seq.prompt_token_ids, dtype=np.int64)] = True
                scores = logits[row, seen]
                logits[row, seen] = np.where(
                    scores > 0,
                    scores / params.repetition_penalty,
                    scores * params.repetition_penalty,
                )
            logits[row] -= params.frequency_penalty * counts + params.presence_penalty * (
                counts > 0
            )

    def _ban_early_stop(self, logits: np.ndarray, sequences: list[Sequence]) -> None:
        for row, seq in enumerate(sequences):
            # A grammar decides where structured output ends; banning its end could leave no token.
            if len(seq.output_token_ids) < seq.params.min_tokens and seq.matcher is None:
                banned = list(seq.params.stop_token_ids)
                if not seq.params.ignore_eos:
                    banned.extend(self.eos_token_ids)
                logits[row, banned] = -np.inf


def _sample(logits: np.ndarray, sequences: list[Sequence]) -> np.ndarray:
    """Temperature, top-k, top-p and min-p filtering, then one inverse-CDF draw per row."""
    params = [s.params for s in sequences]
    temperature = np.array([p.temperature for p in params], dtype=np.float32)
    logits = logits / temperature[:, None]
    top_k = np.array([p.top_k for p in params])
    top_p = np.array([p.top_p for p in params], dtype=np.float32)
    needs_sort = np.flatnonzero((top_k > 0) | (top_p < 1.0))
    if needs_sort.size:
        logits[needs_sort] = _top_k_top_p(logits[needs_sort], top_k[needs_sort], top_p[needs_sort])
    probs = _softmax(logits)
    min_p = np.array([p.min_p for p in params], dtype=np.float32)
    if (min_p > 0).any():
        probs = np.where(probs < min_p[:, None] * probs.max(axis=1, keepdims=True), 0.0, probs)
    cdf = np.cumsum(probs, axis=1)
    draws = np.array([s.rng.random() for s in sequences]) * cdf[:, -1]
    choice = (cdf < draws[:, None]).sum(axis=1)
    # A draw landing exactly on the total would step past the last token with mass.
    return np.minimum(choice, _last_nonzero(probs))


def _top_k_top_p(logits: np.ndarray, top_k: np.ndarray, top_p: np.ndarray) -> np.ndarray:
    """Mask every logit below each row's top-k and top-p cutoff with -inf."""
    descending = -np.sort(-logits, axis=1)
    vocab = logits.shape[1]
    k = np.where(top_k > 0, np.minimum(top_k, vocab), vocab)
    rows = np.arange(logits.shape[0])
    kth = descending[rows, k - 1]
    descending = np.where(np.arange(vocab) < k[:, None], descending, -np.inf)
    cumulative = np.cumsum(_softmax(descending), axis=1)
    # Keep the smallest prefix whose mass reaches top_p; its last logit is the cutoff.
    last_kept = np.minimum((cumulative < top_p[:, None]).sum(axis=1), k - 1)
    cutoff = np.maximum(kth, descending[rows, last_kept])
    return np.where(logits < cutoff[:, None], -np.inf, logits)


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    result: np.ndarray = shifted / shifted.sum(axis=1, keepdims=True)
    return result


def _last_nonzero(probs: np.ndarray) -> np.ndarray:
    vocab = probs.shape[1]
    return vocab - 1 - (probs[:, ::-1] > 0).argmax(axis=1)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    result: np.ndarray = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return result


def _logprobs(
    raw_logits: np.ndarray, token_ids: np.ndarray, sequences: list[Sequence]
) -> list[TokenLogprob | None]:
    """Logprobs under the model's own distribution (before penalties and filters)."""
    records: list[TokenLogprob | None] = []
    for row, seq in enumerate(sequences):
        n_top = seq.params.logprobs
        if n_top is None:
            records.append(None)
            continue
        logprobs = _log_softmax(raw_logits[row])
        token = int(token_ids[row])
        records.append(TokenLogprob(token, float(logprobs[token]), _top(logprobs, n_top)))
    return records


def prompt_logprobs(
    logits: np.ndarray, token_ids: list[int], n_top: int
) -> tuple[TokenLogprob | None, ...]:
    """Each prompt token's logprob given the tokens before it, under the model's distribution.

    ``logits`` ([len(token_ids), vocab]) are the model's at each prompt position; position
    ``i`` predicts token ``i + 1``, so the first token has no record (``None``).
    """
    logprobs = _log_softmax(logits[:-1].astype(np.float32, copy=False))
    targets = np.asarray(token_ids[1:], dtype=np.int64)
    chosen = logprobs[np.arange(targets.size), targets]
    ranks = (logprobs > chosen[:, None]).sum(axis=1) + 1
    records: list[TokenLogprob | None] = [None]
    for position, token in enumerate(targets.tolist()):
        top = _top(logprobs[position], n_top)
        records.append(TokenLogprob(token, float(chosen[position]), top, rank=int(ranks[position])))
    return tuple(records)


def _top(logprobs: np.ndarray, n_top: int) -> tuple[tuple[int, float], ...]:
    """The ``n_top`` most likely tokens of one position, most likely first."""
    if not n_top:
        return ()
    best = np.argpartition(-logprobs, n_top - 1)[:n_top]
    best = best[np.argsort(-logprobs[best], kind="stable")]
    return tuple((int(i), float(logprobs[i])) for i in best)
