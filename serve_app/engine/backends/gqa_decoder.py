"""Fused-attention models from onnxruntime-genai's model builder, their KV cache in place.

The builder (``python -m serve_app.tools export --layout gqa``) writes ``genai_config.json``
beside a graph whose attention is the ``GroupQueryAttention`` contrib op. Given the same tensor
as ``past_key_values.N.key`` and ``present.N.key`` (past and present share a buffer), that op
appends the new tokens' K/V in place at each row's own length instead of copying the past into
a new present. So this decoder allocates the cache once: per layer a key and a value buffer of
``[max_num_seqs, kv_heads, context, head_dim]``, every run binding a contiguous range of rows
(a numpy view: the same memory) as both input and output. The graph has no ``position_ids``:
it takes each row's length from the attention mask's row sum and rotates by it. Runs on the
CPU execution provider; the buffers' size is checked against ``kv_cache_tokens`` at load.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort

from serve_app.engine.backends.onnxruntime_decoder import session_options
from serve_app.engine.config import EngineConfig
from serve_app.engine.decoder import ModelIO, graph_op_types
from serve_app.engine.errors import EngineError
from serve_app.engine.model_config import GENAI_CONFIG, ModelConfig, ModelLoadError

FUSED_ATTENTION = "GroupQueryAttention"
_NUMPY_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16"}


def genai_onnx_file(model_dir: Path) -> Path | None:
    """The decoder graph of a builder folder whose attention is fused, else ``None``."""
    genai_config = model_dir / GENAI_CONFIG
    if not genai_config.is_file():
        return None
    with genai_config.open(encoding="utf-8") as f:
        filename = json.load(f).get("model", {}).get("decoder", {}).get("filename", "model.onnx")
    onnx_path = model_dir / filename
    if not onnx_path.is_file() or FUSED_ATTENTION not in graph_op_types(onnx_path):
        return None
    return onnx_path


def kv_buffer_bytes(io: ModelIO, rows: int, row_length: int) -> int:
    """Bytes of every layer's K and V buffers for ``rows`` sequences of ``row_length``."""
    return rows * row_length * io.kv_bytes_per_token


class GQADecoder:
    """One onnxruntime session over a builder graph, and the KV rows it writes in place."""

    def __init__(self, config: EngineConfig) -> None:
        onnx_path = genai_onnx_file(config.model_path)
        if onnx_path is None:
            raise ModelLoadError(
                f"{config.model_path} is not a fused-attention model folder ({GENAI_CONFIG} "
                f"and a graph with {FUSED_ATTENTION})"
            )
        _check_cpu(config)
        self.config = ModelConfig.from_dir(config.model_path)
        self.session = ort.InferenceSession(
            str(onnx_path), sess_options=session_options(config), providers=["CPUExecutionProvider"]
        )
        inputs = {
            i.name: (_NUMPY_TYPES.get(i.type, i.type), list(i.shape))
            for i in self.session.get_inputs()
        }
        self.io = ModelIO.from_signature(
            inputs, [o.name for o in self.session.get_outputs()], self.config
        )
        self.num_rows = config.max_num_seqs
        self.row_length = self.config.context_length
        _check_budget(self.io, self.num_rows, self.row_length, config.kv_cache_tokens)
        shape = (self.num_rows, self.io.num_kv_heads, self.row_length, self.io.head_dim)
        # One buffer per past/present name pair, in ModelIO's order (layer by layer, K then V).
        self.buffers = [np.zeros(shape, dtype=self.io.kv_dtype) for _ in self.io.past_names]

    def describe(self) -> str:
        """The backend, provider and cache layout, e.g. for ``/v1/model_info``."""
        providers = ", ".join(self.session.get_providers())
        return f"onnxruntime ({providers}; GroupQueryAttention, {self.num_rows} KV rows in place)"

    def run_rows(
        self,
        first_row: int,
        input_ids: np.ndarray,
        lengths: np.ndarray,
        *,
        all_positions: bool = False,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Run ``input_ids`` over rows ``[first_row, first_row + batch)`` (see ``SlotDecoder``)."""
        batch, new = input_ids.shape
        # The graph reads each row's length as the mask's row sum and the total as its width;
        # a width equal to ``new`` marks a first prompt (no past in any row).
        width = int(lengths.max())
        mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", input_ids)
        binding.bind_cpu_input("attention_mask", mask)
        binding.bind_output("logits", "cpu")
        rows = slice(first_row, first_row + batch)
        views = [ort.OrtValue.ortvalue_from_numpy(buffer[rows]) for buffer in self.buffers]
        for past, present, view in zip(
            self.io.past_names, self.io.present_names, views, strict=True
        ):
            binding.bind_ortvalue_input(past, view)
            binding.bind_ortvalue_output(present, view)  # the same memory: written in place
        try:
            self.session.run_with_iobinding(binding)
        except Exception as exc:  # onnxruntime raises bare RuntimeError/Fail types
            raise EngineError(f"onnxruntime run failed: {exc}") from exc
        logits = binding.get_outputs()[0].numpy()
        num_new = np.minimum(lengths, new)  # a prefill row's prompt, else every new token
        last = logits[np.arange(batch), num_new - 1].astype(np.float32)
        if not all_positions:
            return last, None
        every = np.stack([np.roll(logits[row], new - n, axis=0) for row, n in enumerate(num_new)])
        return last, every.astype(np.float32)

    def move_row(self, source: int, destination: int, length: int) -> None:
        """Copy the first ``length`` cached tokens of row ``source`` into row ``destination``."""
        for buffer in self.buffers:
            buffer[destination, :, :length] = buffer[source, :, :length]

    def read_kv(self, row: int, start: int, end: int) -> np.ndarray:
        """A host copy of row ``row``'s K/V for tokens ``[start, end)`` (see ``SlotDecoder``)."""
        return np.stack([buffer[row, :, start:end] for buffer in self.buffers])

    def write_kv(self, row: int, kv: np.ndarray) -> None:
        """Write ``kv`` as row ``row``'s first tokens (a reused prefix)."""
        for buffer, tensor in zip(self.buffers, kv, strict=True):
            buffer[row, :, : tensor.shape[1]] = tensor


def _check_cpu(config: EngineConfig) -> None:
    """The in-place path runs on onnxruntime's CPU provider only, also where ``device: auto``
    would pick a GPU."""
    if config.backend != "onnxruntime":
        raise ModelLoadError(
            f"{config.model_path} is a fused-attention (GroupQueryAttention) model; the "
            f"{config.backend} backend serves only the Optimum layout (export it with "
            "python -m serve_app.tools export --layout optimum)"
        )
    providers = [p.name for p in config.execution_providers or []]
    if config.device == "cuda" or any(p != "CPUExecutionProvider" for p in providers):
        raise ModelLoadError(
            f"{config.model_path} is a fused-attention (GroupQueryAttention) model, which this "
            "engine runs on onnxruntime's CPU execution provider only; set engine.device to cpu "
            "or auto and leave execution_providers unset, or export the Optimum layout"
        )


def _check_budget(io: ModelIO, rows: int, row_length: int, kv_cache_tokens: int) -> None:
    """Refuse a KV buffer larger than the configured KV-cache budget, before allocating it."""
    if rows * row_length <= kv_cache_tokens:
        return
    gib = kv_buffer_bytes(io, rows, row_length) / 2**30
    raise ModelLoadError(
        f"the in-place KV cache needs {rows} rows (engine.max_num_seqs) x {row_length} tokens "
        f"(the model's context) = {rows * row_length} token slots, {gib:.2f} GiB "
        f"({io.num_layers} layers x 2 (K, V) x {io.num_kv_heads} KV heads x {io.head_dim} head "
        f"dim x {io.kv_dtype.itemsize} bytes per token), over engine.kv_cache_tokens "
        f"({kv_cache_tokens}); lower engine.max_num_seqs or raise engine.kv_cache_tokens"
    )
