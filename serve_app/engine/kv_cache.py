"""The KV cache of the running batch: one contiguous tensor pair per layer, left-padded.

Rows are sequences; columns are token positions, right-aligned so every row's newest token
sits in the last column. A sequence joining the batch is merged in (rows appended, the shorter
side padded on the left); a sequence leaving is dropped by gathering the remaining rows, and
columns that became padding in every row are trimmed. Decode steps need no copies here: the
model's ``present`` outputs become the next step's ``past`` inputs as they are. The tensor
surgery itself is the decoder's ``TensorOps`` (``backends/``), so the tensors never leave
their device.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from serve_app.engine.decoder import TensorOps


class BatchKVCache:
    """K/V tensors ``[batch, kv_heads, padded_length, head_dim]`` and their attention mask."""

    def __init__(
        self, values: list[ort.OrtValue], attention_mask: np.ndarray, ops: TensorOps
    ) -> None:
        self.values = values
        self.attention_mask = attention_mask  # [batch, padded_length] int64, 0 marks padding
        self.ops = ops

    @property
    def batch_size(self) -> int:
        """Number of rows (sequences)."""
        return int(self.attention_mask.shape[0])

    @property
    def padded_length(self) -> int:
        """Number of columns (token positions) every row occupies."""
        return int(self.attention_mask.shape[1])

    @property
    def num_slots(self) -> int:
        """Token slots allocated: batch size times padded length."""
        return self.batch_size * self.padded_length

    def decode_mask(self) -> np.ndarray:
        """The attention mask for a decode step: the cache's mask plus the new token's column."""
        ones = np.ones((self.batch_size, 1), dtype=np.int64)
        return np.concatenate([self.attention_mask, ones], axis=1)

    def advance(self, present: list[ort.OrtValue], attention_mask: np.ndarray) -> None:
        """Take the model's ``present`` outputs as the cache after a step."""
        self.values = present
        self.attention_mask = attention_mask

    def select(self, rows: list[int]) -> BatchKVCache:
        """A cache holding only ``rows``, with all-padding leading columns trimmed."""
        mask = self.attention_mask[rows]
        start = self.padded_length - int(mask.sum(axis=1).max(initial=0))
        values = self.ops.select(self.values, rows, start)
        return BatchKVCache(values, np.ascontiguousarray(mask[:, start:]), self.ops)

    @staticmethod
    def concat(first: BatchKVCache, second: BatchKVCache) -> BatchKVCache:
        """One cache with ``first``'s rows, then ``second``'s, padded to a common length."""
        length = max(first.padded_length, second.padded_length)
        mask = np.zeros((first.batch_size + second.batch_size, length), dtype=np.int64)
        mask[: first.batch_size, length - first.padded_length :] = first.attention_mask
        mask[first.batch_size :, length - second.padded_length :] = second.attention_mask
        return BatchKVCache(first.ops.concat(first.values, second.values, length), mask, first.ops)
