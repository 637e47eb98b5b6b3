"""A decoder-with-past ONNX model run by onnxruntime.

The layout is the one ``optimum-cli export onnx --task text-generation-with-past`` writes:
``input_ids``, ``attention_mask``, optional ``position_ids`` and ``past_key_values.N.key/value``
in; ``logits`` and ``present.N.key/value`` out. Names and KV shapes are read from the graph.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from serve_app.engine.config import EngineConfig
from serve_app.engine.errors import EngineError
from serve_app.engine.model_config import ModelConfig, ModelLoadError

_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_PRESENT = re.compile(r"^present\.(\d+)\.(key|value)$")
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
_OPTIMIZATION = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


@dataclass(frozen=True)
class ForwardResult:
    """Next-token logits for each row and the KV cache that now includes the input tokens."""

    logits: np.ndarray  # [batch, vocab] float32, at each row's last input position
    present: list[ort.OrtValue]  # in past-input order


class OnnxDecoder:
    """One onnxruntime session over a decoder-with-past model."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = ModelConfig.from_dir(config.model_path)
        onnx_path = config.model_path / config.onnx_file
        if not onnx_path.is_file():
            raise ModelLoadError(f"{config.onnx_file} not found in {config.model_path}")
        self.session = ort.InferenceSession(
            str(onnx_path),
            sess_options=_session_options(config),
            providers=_providers(config),
        )
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = [o.name for o in self.session.get_outputs()]
        for required in ("input_ids", "attention_mask"):
            if required not in inputs:
                raise ModelLoadError(f"{onnx_path.name} has no '{required}' input")
        if "logits" not in outputs:
            raise ModelLoadError(f"{onnx_path.name} has no 'logits' output")
        self.has_position_ids = "position_ids" in inputs
        self.past_names = _kv_names(list(inputs), _PAST, "past_key_values.N.key/value inputs")
        self.present_names = _kv_names(outputs, _PRESENT, "present.N.key/value outputs")
        if len(self.past_names) != len(self.present_names):
            raise ModelLoadError("past_key_values inputs and present outputs do not pair up")
        first_past = inputs[self.past_names[0]]
        self.kv_dtype = np.dtype(_ORT_TYPES.get(first_past.type, np.float32))
        self.num_kv_heads, self.head_dim = _kv_dims(first_past.shape, self.config)
        self.num_layers = len(self.past_names) // 2
        self._output_names = ["logits", *self.present_names]

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V one token occupies across all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.kv_dtype.itemsize

    def empty_past(self, batch_size: int) -> list[ort.OrtValue]:
        """A zero-length KV cache for a prefill of ``batch_size`` rows."""
        empty = np.zeros((batch_size, self.num_kv_heads, 0, self.head_dim), dtype=self.kv_dtype)
        return [ort.OrtValue.ortvalue_from_numpy(empty) for _ in self.past_names]

    def forward(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        past: list[ort.OrtValue],
    ) -> ForwardResult:
        """Run the model over ``input_ids`` given the cache ``past``."""
        feeds = {
            "input_ids": ort.OrtValue.ortvalue_from_numpy(input_ids),
            "attention_mask": ort.OrtValue.ortvalue_from_numpy(attention_mask),
        }
        if self.has_position_ids:
            feeds["position_ids"] = ort.OrtValue.ortvalue_from_numpy(position_ids)
        feeds.update(zip(self.past_names, past, strict=True))
        try:
            outputs = self.session.run_with_ort_values(self._output_names, feeds)
        except Exception as exc:  # onnxruntime raises bare RuntimeError/Fail types
            raise EngineError(f"onnxruntime run failed: {exc}") from exc
        logits = outputs[0].numpy()[:, -1, :]
        return ForwardResult(
            logits=logits.astype(np.float32, copy=False), present=list(outputs[1:])
        )


def count_parameters(onnx_path: Path) -> int:
    """Number of weights stored in the graph's initializers (external data is not read)."""
    import onnx  # only needed for this count; keeps engine import light

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    return sum(int(np.prod(init.dims, dtype=np.int64)) for init in graph.initializer)


def _session_options(config: EngineConfig) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = _OPTIMIZATION[config.graph_optimization]
    options.intra_op_num_threads = config.intra_op_num_threads
    options.inter_op_num_threads = 1  # one sequential graph; parallelism lives inside operators
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry(
        "session.intra_op.allow_spinning", "1" if config.allow_spinning else "0"
    )
    return options


def _providers(config: EngineConfig) -> list[tuple[str, dict[str, str]]]:
    available = ort.get_available_providers()
    chosen = []
    for provider in config.execution_providers:
        if provider.name not in available:
            raise ModelLoadError(
                f"execution provider {provider.name} is not available in this onnxruntime build "
                f"(available: {', '.join(available)})"
            )
        chosen.append((provider.name, {k: str(v) for k, v in provider.options.items()}))
    return chosen


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
