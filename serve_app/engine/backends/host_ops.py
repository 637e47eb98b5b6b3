"""``TensorOps`` for a KV cache in host memory: numpy views of the OrtValues, no copies to a device.

The onnxruntime backend uses them on the CPU, where the IOBinding and small-graph surgery of
``device_ops.py`` would only add overhead.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from serve_app.engine.decoder import ModelIO


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

    def from_host(self, arrays: list[np.ndarray]) -> list[ort.OrtValue]:
        """The arrays as OrtValues over their own memory."""
        return [_from_numpy(array) for array in arrays]

    def last_logits(self, logits: ort.OrtValue) -> np.ndarray:
        """``logits[:, -1, :]`` as float32."""
        return logits.numpy()[:, -1, :].astype(np.float32, copy=False)

    def all_logits(self, logits: ort.OrtValue) -> np.ndarray:
        """Every position's logits as float32."""
        return logits.numpy().astype(np.float32, copy=False)


def _from_numpy(array: np.ndarray) -> ort.OrtValue:
    # onnxruntime wraps the buffer without copying, so it must be contiguous.
    return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array))
