"""What every backend offers the engine: one forward pass over a decoder with a KV cache.

Tensors that stay on the model's device (the KV cache) are ``onnxruntime.OrtValue``s whatever
the backend, so the batch bookkeeping in ``kv_cache.py`` works the same on CPU and GPU. Only
token ids, masks and positions go in from the host, and only last-position logits come back
(every position's when a prefill scores its prompt). A fused-attention model (onnxruntime-genai's
builder layout) is a ``SlotDecoder`` instead: its cache stays in rows it owns, written in place.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
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

    def from_host(self, arrays: list[np.ndarray]) -> list[ort.OrtValue]:
        """Host arrays as tensors where the cache lives (a reused prefix's K/V)."""
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


@runtime_checkable
class SlotDecoder(Protocol):
    """A fused-attention model whose KV cache is ``num_rows`` preallocated rows it owns and
    writes in place (``kv_slots.py`` assigns them); ``backends/gqa_decoder.py`` is the real one.
    """

    config: ModelConfig
    num_rows: int

    def run_rows(
        self,
        first_row: int,
        input_ids: np.ndarray,
        lengths: np.ndarray,
        *,
        all_positions: bool = False,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Run ``input_ids`` ``[batch, new]`` over rows ``[first_row, first_row + batch)``;
        ``lengths`` is each row's token count once they are in.

        Either no row has a past (a prefill: rows right-padded, ``lengths`` their prompts) or
        every row gets ``new`` tokens after ``lengths - new`` cached ones (several only when
        ``batch`` is 1). Returns each row's logits at its last new token ``[batch, vocab]``
        and, with ``all_positions``, every new position's ``[batch, new, vocab]``, each row's
        right-aligned (padding first), both float32 on the host.
        """
        ...

    def move_row(self, source: int, destination: int, length: int) -> None:
        """Copy the first ``length`` cached tokens of row ``source`` into row ``destination``."""
        ...

    def read_kv(self, row: int, start: int, end: int) -> np.ndarray:
        """A host copy of row ``row``'s K/V for tokens ``[start, end)``, ``[K/V tensors
        (layer by layer, key then value), kv heads, end - start, head dim]``."""
        ...

    def write_kv(self, row: int, kv: np.ndarray) -> None:
        """Write ``kv`` (as ``read_kv`` returns it) as row ``row``'s first tokens."""
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
    import onnx  # imported here: it takes about a second (ml_dtypes), which every replica paid

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    inputs = {}
    for value in graph.input:
        tensor = value.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
        dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in tensor.shape.dim]
        inputs[value.name] = (dtype, list[int | str | None](dims))
    return inputs, [value.name for value in graph.output]


def count_parameters(onnx_path: Path) -> int:
    """Number of weights stored in the graph's initializers (external data is not read).

    Reads the protobuf wire format itself (``ModelProto.graph`` is field 7,
    ``GraphProto.initializer`` field 5, ``TensorProto.dims`` field 1): importing onnx for this
    took about a second of each model replica's start, up to five on a busy machine.
    """
    data = memoryview(onnx_path.read_bytes())
    total = 0
    for graph in _messages(data, 7, onnx_path):
        for tensor in _messages(graph, 5, onnx_path):
            total += math.prod(_dims(tensor, onnx_path))
    return total


def graph_op_types(onnx_path: Path) -> set[str]:
    """The operator types of the graph's nodes (``GraphProto.node`` is field 1,
    ``NodeProto.op_type`` field 4), read without onnx like ``count_parameters``."""
    data = memoryview(onnx_path.read_bytes())
    types: set[str] = set()
    for graph in _messages(data, 7, onnx_path):
        for node in _messages(graph, 1, onnx_path):
            types.update(bytes(v).decode() for v in _messages(node, 4, onnx_path))
    return types


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    """The varint at ``pos`` and the position after it."""
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf: memoryview, path: Path) -> Iterator[tuple[int, int, int | memoryview]]:
    """(field number, wire type, value) of each field of the protobuf message in ``buf``."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        wire = key & 7
        value: int | memoryview
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire in (1, 5):  # fixed 64 or 32 bits
            size = 8 if wire == 1 else 4
            value, pos = buf[pos : pos + size], pos + size
        elif wire == 2:  # length-delimited: a message, bytes, or packed numbers
            size, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + size], pos + size
        else:
            raise ModelLoadError(f"{path} is not an ONNX model (protobuf wire type {wire})")
        yield key >> 3, wire, value


def _messages(buf: memoryview, number: int, path: Path) -> Iterator[memoryview]:
    for field, wire, value in _fields(buf, path):
        if field == number and wire == 2 and isinstance(value, memoryview):
            yield value


def _dims(tensor: memoryview, path: Path) -> list[int]:
    """A TensorProto's dims, written one varint per field or packed into one field."""
    dims = []
    for field, _wire, value in _fields(tensor, path):
        if field != 1:
            continue
        if isinstance(value, int):
            dims.append(value)
            continue
        pos = 0
        while pos < len(value):
            dim, pos = _varint(value, pos)
            dims.append(dim)
    return dims
