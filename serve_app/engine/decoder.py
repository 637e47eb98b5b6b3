"""What every backend offers the engine: one forward pass over a decoder with a KV cache.

Tensors that stay on the model's device (the KV cache) are ``onnxruntime.OrtValue``s whatever
the backend, so the batch bookkeeping in ``kv_cache.py`` works the same on CPU and GPU. Only
token ids, masks and positions go in from the host, and only last-position logits come back
(every position's when a prefill scores its prompt).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import onnx
import onnxruntime as ort

from serve_app.engine.model_config import ModelConfig, ModelLoadError

_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_PRESENT = re.compile(r"^present\.(\d+)\.(key|value)$")
KV_DTYPES = {"float32": np.float32, "float16": np.float16}


@dataclass(frozen=True)
class ForwardResult:
    """Next-token logits for each row and the KV cache that now includes the input tokens."""

    logits: np.ndarray  # [batch, vocab] float32 on the host, at each row's last input position
    present: list[ort.OrtValue]  # on the model's device, in past-input order
    all_logits: np.ndarray | None = None  # [batch, tokens, vocab] float32, when asked for


class TensorOps(Protocol):
    """Row and column surgery on a batch's K/V tensors, done where the tensors live."""

    def empty(self, batch_size: int) -> list[ort.OrtValue]:
        """A zero-length cache for a prefill of ``batch_size`` rows."""
        ...

    def select(self, values: list[ort.OrtValue], rows: list[int], start: int) -> list[ort.OrtValue]:
        """Keep ``rows`` and the columns from ``start`` on."""
        ...

    def concat(
        self, first: list[ort.OrtValue], second: list[ort.OrtValue], length: int
    ) -> list[ort.OrtValue]:
        """``first``'s rows then ``second``'s, each left-padded with zeros to ``length`` columns."""
        ...

    def last_logits(self, logits: ort.OrtValue) -> np.ndarray:
        """``logits[:, -1, :]`` as float32 on the host: the only rows sampling needs."""
        ...

    def all_logits(self, logits: ort.OrtValue) -> np.ndarray:
        """Every position's logits as float32 on the host, for prompt logprobs."""
        ...


class Decoder(Protocol):
    """A loaded model on one device, as the engine drives it; ``backends/`` holds the real ones."""

    config: ModelConfig
    ops: TensorOps

    def forward(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        past: list[ort.OrtValue],
        *,
        all_positions: bool = False,
    ) -> ForwardResult:
        """Run the model over ``input_ids`` given the cache ``past``; ``all_positions`` also
        returns every input position's logits."""
        ...

    def describe(self) -> str:
        """The backend and device in words, e.g. for ``/v1/model_info``."""
        ...


@dataclass(frozen=True)
class ModelIO:
    """The tensor names and KV-cache geometry of a decoder-with-past model's signature."""

    has_position_ids: bool
    past_names: list[str]
    present_names: list[str]
    kv_dtype: np.dtype
    num_kv_heads: int
    head_dim: int

    @classmethod
    def from_signature(
        cls,
        inputs: dict[str, tuple[str, list[int | str | None]]],
        outputs: list[str],
        config: ModelConfig,
    ) -> ModelIO:
        """Read names and KV dims from ``{input: (element type, shape)}`` and output names.

        Element types are numpy names (``float16``); raises ``ModelLoadError`` on a signature
        that is not the decoder-with-past layout.
        """
        for required in ("input_ids", "attention_mask"):
            if required not in inputs:
                raise ModelLoadError(f"the model has no '{required}' input")
        if "logits" not in outputs:
            raise ModelLoadError("the model has no 'logits' output")
        past_names = _kv_names(list(inputs), _PAST, "past_key_values.N.key/value inputs")
        present_names = _kv_names(outputs, _PRESENT, "present.N.key/value outputs")
        if len(past_names) != len(present_names):
            raise ModelLoadError("past_key_values inputs and present outputs do not pair up")
        kv_type, kv_shape = inputs[past_names[0]]
        if kv_type not in KV_DTYPES:
            raise ModelLoadError(f"KV-cache element type {kv_type} is not supported")
        heads, head_dim = _kv_dims(kv_shape, config)
        return cls(
            has_position_ids="position_ids" in inputs,
            past_names=past_names,
            present_names=present_names,
            kv_dtype=np.dtype(KV_DTYPES[kv_type]),
            num_kv_heads=heads,
            head_dim=head_dim,
        )

    @property
    def num_layers(self) -> int:
        """Decoder layers (one key and one value tensor each)."""
        return len(self.past_names) // 2

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V one token occupies across all layers."""
        return len(self.past_names) * self.num_kv_heads * self.head_dim * self.kv_dtype.itemsize


def _kv_names(names: list[str], pattern: re.Pattern[str], what: str) -> list[str]:
    """Names ordered layer by layer, key before value."""
    found = {}
    for name in names:
        match = pattern.match(name)
        if match:
            found[(int(match[1]), match[2] == "value")] = name
    if not found:
        raise ModelLoadError(f"the model has no {what}; export it with its KV cache (with-past)")
    layers = max(layer for layer, _ in found) + 1
    try:
        return [found[(layer, is_value)] for layer in range(layers) for is_value in (False, True)]
    except KeyError as missing:
        raise ModelLoadError(f"the model's {what} skip {missing}") from None


def _kv_dims(shape: list[int | str | None], config: ModelConfig) -> tuple[int, int]:
    """(kv heads, head dim) from the graph when static, else from config.json."""
    heads = shape[1] if len(shape) == 4 and isinstance(shape[1], int) else config.num_kv_heads
    head_dim = shape[3] if len(shape) == 4 and isinstance(shape[3], int) else config.head_dim
    return int(heads), int(head_dim)


def read_onnx_signature(
    onnx_path: Path,
) -> tuple[dict[str, tuple[str, list[int | str | None]]], list[str]]:
    """``({input: (numpy element type, shape)}, output names)`` of an ONNX file, weights unread."""
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    inputs = {}
    for value in graph.input:
        tensor = value.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
        dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in tensor.shape.dim]
        inputs[value.name] = (dtype, list[int | str | None](dims))
    return inputs, [value.name for value in graph.output]


def count_parameters(onnx_path: Path) -> int:
    """Number of weights stored in the graph's initializers (external data is not read)."""
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    return sum(int(np.prod(init.dims, dtype=np.int64)) for init in graph.initializer)
