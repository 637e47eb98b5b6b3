"""Admission control: which waiting sequences join the running batch at the next step."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from serve_app.engine.sequence import Sequence


class Scheduler:
    """A FIFO queue of waiting sequences and the rules for admitting them.

    A sequence is admitted only if the batch can reach its worst case (every member at its
    ``max_length``) within ``kv_cache_tokens`` slots, so the running batch never has to be
    preempted. Admission is strictly first-in first-out: a large request at the head is not
    overtaken by smaller ones behind it. One step's newcomers hold at most
    ``max_prefill_tokens`` prompt tokens (count x longest prompt), except that the first is
    always admitted: a prompt over that budget is admitted alone, and the engine prefills it
    in chunks.
    """

    def __init__(self, max_num_seqs: int, kv_cache_tokens: int, max_prefill_tokens: int) -> None:
        self.max_num_seqs = max_num_seqs
        self.kv_cache_tokens = kv_cache_tokens
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Sequence] = deque()

    def add(self, sequence: Sequence) -> None:
        """Queue a sequence behind the ones already waiting."""
        self.waiting.append(sequence)

    def remove(self, request_id: str) -> Sequence | None:
        """Take a waiting sequence out of the queue, if it is there."""
        for sequence in self.waiting:
            if sequence.request_id == request_id:
                self.waiting.remove(sequence)
                return sequence
        return None

    def fits_alone(self, sequence: Sequence) -> bool:
        """Whether the sequence could ever be admitted, even into an empty batch."""
        return sequence.max_length <= self.kv_cache_tokens

    def admit(
        self,
        running: list[Sequence],
        alone: Callable[[Sequence, list[Sequence]], bool] = lambda _seq, _admitted: False,
    ) -> list[Sequence]:
        """Pop the waiting sequences that join the batch at this step. One for which
        ``alone(candidate, admitted so far)`` holds (it reuses a cached prefix, or one that a
        sequence admitted before it will store) is admitted only first, and then alone."""
        admitted: list[Sequence] = []
        peak_length = max((s.max_length for s in running), default=0)
        longest_prompt = 0
        while self.waiting and len(running) + len(admitted) < self.max_num_seqs:
            candidate = self.waiting[0]
            batch_size = len(running) + len(admitted) + 1
            if batch_size * max(peak_length, candidate.max_length) > self.kv_cache_tokens:
                break
            prompt = max(longest_prompt, candidate.num_prompt_tokens)
            by_itself = alone(candidate, admitted)
            if admitted and (by_itself or (len(admitted) + 1) * prompt > self.max_prefill_tokens):
                break
            admitted.append(self.waiting.popleft())
            if by_itself:
                break
            peak_length = max(peak_length, candidate.max_length)
            longest_prompt = prompt
        return admitted
