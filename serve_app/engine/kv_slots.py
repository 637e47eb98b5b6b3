"""The KV cache of a fused-attention model: rows of a preallocated buffer, one per sequence.

The decoder (``SlotDecoder``) owns one buffer per layer, ``[rows, kv_heads, context, head_dim]``
for keys and another for values, written in place by the model. A sequence claims a row when
it is prefilled and owns it until it leaves. The live rows are kept contiguous, ``[0, N)``, so
a decode step runs over the first N rows: when a sequence leaves, the last row's sequence moves
into the hole (one row copy per leave, never a copy of the whole cache). Newcomers claim the
rows after the live ones, so their prefill runs over one contiguous range too. A prompt
prefilled in chunks uses the spare last row meanwhile (nothing else can use it: the scheduler
admits nothing while a chunked prefill runs) and moves to its own row when it joins; a prompt
that reuses a cached prefix (``prefix_cache.py``) has that prefix written there first.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, TypeVar

import numpy as np

from serve_app.engine.decoder import SlotDecoder
from serve_app.engine.sequence import Sequence

Owner = TypeVar("Owner", bound=Hashable)


class KVSlots(Generic[Owner]):
    """Which owner holds which row of ``num_rows``; live rows are always ``[0, len(self))``."""

    def __init__(self, num_rows: int) -> None:
        self.num_rows = num_rows
        self._owners: list[Owner] = []  # row i belongs to _owners[i]
        self._rows: dict[Owner, int] = {}

    def __len__(self) -> int:
        return len(self._owners)

    @property
    def owners(self) -> list[Owner]:
        """The owners in row order (a copy)."""
        return list(self._owners)

    def row(self, owner: Owner) -> int:
        """The row ``owner`` holds."""
        return self._rows[owner]

    def claim(self, owner: Owner) -> int:
        """Give ``owner`` the first free row, right after the live ones."""
        if owner in self._rows:
            raise ValueError(f"{owner!r} already holds row {self._rows[owner]}")
        if len(self._owners) == self.num_rows:
            raise RuntimeError(f"all {self.num_rows} KV rows are taken")
        self._rows[owner] = len(self._owners)
        self._owners.append(owner)
        return self._rows[owner]

    def release(self, owner: Owner) -> tuple[int, int] | None:
        """Free ``owner``'s row; returns ``(source, destination)`` when the last row's owner
        moved into the hole (its K/V must be copied the same way), else ``None``."""
        hole = self._rows.pop(owner)
        last = self._owners.pop()
        if hole == len(self._owners):  # it held the last row
            return None
        self._owners[hole] = last
        self._rows[last] = hole
        return len(self._owners), hole


class SlotBatch:
    """The running batch of a ``SlotDecoder``: its sequences in row order and the calls that
    prefill, extend and decode them in place."""

    def __init__(self, decoder: SlotDecoder) -> None:
        self.decoder = decoder
        self.slots: KVSlots[Sequence] = KVSlots(decoder.num_rows)

    @property
    def sequences(self) -> list[Sequence]:
        """The live sequences, row by row (a copy)."""
        return self.slots.owners

    @property
    def spare_row(self) -> int:
        """The row a chunked prefill fills until it joins."""
        return self.slots.num_rows - 1

    def usage(self, *, prefilling: bool) -> float:
        """Fraction of the rows in use, counting the spare row while a chunked prefill fills it."""
        return (len(self.slots) + prefilling) / self.slots.num_rows

    def decode(self) -> np.ndarray:
        """Next-token logits of every live sequence, each fed its last token."""
        sequences = self.slots.owners
        input_ids = np.array([[s.last_token_id] for s in sequences], dtype=np.int64)
        lengths = np.array([s.length for s in sequences], dtype=np.int64)
        logits, _ = self.decoder.run_rows(0, input_ids, lengths)
        return logits

    def prefill(
        self, newcomers: list[Sequence], *, all_positions: bool
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Claim a row for each newcomer and prefill their prompts there, in one run."""
        first_row = len(self.slots)
        for seq in newcomers:
            self.slots.claim(seq)
        lengths = np.array([s.num_prompt_tokens for s in newcomers], dtype=np.int64)
        pad = self.decoder.config.pad_token_id
        input_ids = np.full((len(newcomers), int(lengths.max())), pad, dtype=np.int64)
        for row, seq in enumerate(newcomers):
            input_ids[row, : seq.num_prompt_tokens] = seq.prompt_token_ids  # right-padded
        return self.decoder.run_rows(first_row, input_ids, lengths, all_positions=all_positions)

    def prefill_chunk(
        self, seq: Sequence, start: int, end: int, *, all_positions: bool
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Prefill ``seq``'s prompt tokens ``[start, end)`` in the spare row, after the ones
        already there."""
        input_ids = np.array([seq.prompt_token_ids[start:end]], dtype=np.int64)
        lengths = np.array([end], dtype=np.int64)
        return self.decoder.run_rows(
            self.spare_row, input_ids, lengths, all_positions=all_positions
        )

    def write_prefix(self, kv: np.ndarray) -> None:
        """Put a reused prefix's K/V in the spare row, where the rest of its prompt is
        prefilled."""
        self.decoder.write_kv(self.spare_row, kv)

    def prompt_kv(self, seq: Sequence, start: int, end: int) -> np.ndarray:
        """A host copy of the K/V of ``seq``'s tokens ``[start, end)``, from its row."""
        return self.decoder.read_kv(self.slots.row(seq), start, end)

    def join_chunked(self, seq: Sequence) -> None:
        """Give a sequence prefilled in the spare row a row of its own."""
        row = self.slots.claim(seq)
        if row != self.spare_row:
            self.decoder.move_row(self.spare_row, row, seq.num_prompt_tokens)

    def release_finished(self) -> None:
        """Free the rows of finished sequences, filling each hole from the last row."""
        for seq in [s for s in self.slots.owners if s.finished]:
            move = self.slots.release(seq)
            if move is not None:
                source, destination = move
                # The moved sequence's last token is not in the cache yet (a decode feeds it).
                self.decoder.move_row(source, destination, self.slots.owners[destination].length)
