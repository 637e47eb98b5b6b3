"""The KV cache of the running batch: one contiguous tensor pair per layer, left-padded.

Rows are sequences; columns are token positions, right-aligned so every row's newest token
sits in the last column. A sequence joining the batch is merged in (rows appended, the shorter
side padded on the left); a sequence leaving is dropped by gathering the remaining rows, and
columns that became padding in every row are trimmed. Decode steps need no copies here: the
model's ``present`` outputs become the next step's ``past`` inputs as they are. The tensor
surgery itself is the model's ``TensorOps``, so the tensors never leave their device.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from serve_app.engine.decoder import ModelIO, TensorOps


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


class HostTensorOps:
    """``TensorOps`` for tensors in host memory, done with numpy views of the OrtValues."""

    def __init__(self, io: ModelIO) -> None:
        self.io = io

    def empty(self, batch_size: int) -> list[ort.OrtValue]:
        """A zero-length cache for a prefill of ``batch_size`` rows."""
        shape = (batch_size, self.io.num_kv_heads, 0, self.io.head_dim)
        return [_from_numpy(np.zeros(shape, self.io.kv_dtype)) for _ in self.io.past_names]

    def select(self, values: list[ort.OrtValue], rows: list[int], start: int) -> list[ort.OrtValue]:
        """Keep ``rows`` and the columns from ``start`` on."""
        return [_from_numpy(value.numpy()[rows, :, start:, :]) for value in values]

    def concat(
        self, first: list[ort.OrtValue], second: list[ort.OrtValue], length: int
    ) -> list[ort.OrtValue]:
        """``first``'s rows then ``second``'s, each left-padded with zeros to ``length`` columns."""
        merged_values = []
        for a, b in zip(first, second, strict=True):
            a_np, b_np = a.numpy(), b.numpy()
            rows = a_np.shape[0] + b_np.shape[0]
            merged = np.zeros((rows, a_np.shape[1], length, a_np.shape[3]), dtype=a_np.dtype)
            merged[: a_np.shape[0], :, length - a_np.shape[2] :] = a_np
            merged[a_np.shape[0] :, :, length - b_np.shape[2] :] = b_np
            merged_values.append(_from_numpy(merged))
        return merged_values

    def last_logits(self, logits: ort.OrtValue) -> np.ndarray:
        """``logits[:, -1, :]`` as float32."""
        return logits.numpy()[:, -1, :].astype(np.float32, copy=False)


def _from_numpy(array: np.ndarray) -> ort.OrtValue:
    # onnxruntime wraps the buffer without copying, so it must be contiguous.
    return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array))
