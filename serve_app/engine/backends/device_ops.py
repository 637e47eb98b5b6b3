"""``TensorOps`` on an accelerator: small onnxruntime graphs that gather, pad and slice in place.

A GPU-resident KV cache must be regrouped when sequences join or leave the batch. Copying it to
the host and back would cost more than the decode step, so the surgery runs as three tiny ONNX
graphs (Gather+Slice, Pad+Concat, Gather+Cast) on the model's own device, through IOBinding.
The graphs run on any onnxruntime device, so the CPU test suite checks them against numpy.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from serve_app.engine.backends.device import Device
from serve_app.engine.decoder import ModelIO

_OPSET = 17
_ELEMENT_TYPES = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float16): TensorProto.FLOAT16,
}
_ONNX_TYPES = {"tensor(float)": TensorProto.FLOAT, "tensor(float16)": TensorProto.FLOAT16}
_INT64_MAX = np.iinfo(np.int64).max


class DeviceTensorOps:
    """``TensorOps`` whose results stay on ``device`` (except ``last_logits``, which is sampled)."""

    def __init__(self, io: ModelIO, device: Device) -> None:
        self.io = io
        self.device = device
        count, element = len(io.past_names), _ELEMENT_TYPES[io.kv_dtype]
        self._select = self._session(_select_graph(count, element))
        self._concat = self._session(_concat_graph(count, element))
        self._last_logits: dict[str, ort.InferenceSession] = {}  # by logits element type
        self._all_logits: dict[str, ort.InferenceSession] = {}

    def empty(self, batch_size: int) -> list[ort.OrtValue]:
        """A zero-length cache for a prefill of ``batch_size`` rows."""
        shape = [batch_size, self.io.num_kv_heads, 0, self.io.head_dim]
        return [
            ort.OrtValue.ortvalue_from_shape_and_type(
                shape, self.io.kv_dtype.type, self.device.kind, self.device.index
            )
            for _ in self.io.past_names
        ]

    def select(self, values: list[ort.OrtValue], rows: list[int], start: int) -> list[ort.OrtValue]:
        """Keep ``rows`` and the columns from ``start`` on."""
        host = {
            "rows": np.asarray(rows, dtype=np.int64),
            "start": np.array([start], dtype=np.int64),
        }
        return self._run(self._select, values, host, on_device=True)

    def concat(
        self, first: list[ort.OrtValue], second: list[ort.OrtValue], length: int
    ) -> list[ort.OrtValue]:
        """``first``'s rows then ``second``'s, each left-padded with zeros to ``length`` columns."""
        host = {
            "pads_first": _left_pads(length - first[0].shape()[2]),
            "pads_second": _left_pads(length - second[0].shape()[2]),
        }
        return self._run(self._concat, [*first, *second], host, on_device=True)

    def from_host(self, arrays: list[np.ndarray]) -> list[ort.OrtValue]:
        """The arrays copied to ``device``."""
        return [
            ort.OrtValue.ortvalue_from_numpy(
                np.ascontiguousarray(array), self.device.kind, self.device.index
            )
            for array in arrays
        ]

    def last_logits(self, logits: ort.OrtValue) -> np.ndarray:
        """``logits[:, -1, :]`` as float32, copied to the host."""
        element = logits.data_type()  # e.g. "tensor(float16)"
        if element not in self._last_logits:
            self._last_logits[element] = self._session(_last_logits_graph(_ONNX_TYPES[element]))
        (row_logits,) = self._run(self._last_logits[element], [logits], {}, on_device=False)
        return row_logits.numpy()

    def all_logits(self, logits: ort.OrtValue) -> np.ndarray:
        """Every position's logits as float32, copied to the host."""
        element = logits.data_type()
        if element not in self._all_logits:
            self._all_logits[element] = self._session(_cast_logits_graph(_ONNX_TYPES[element]))
        (every,) = self._run(self._all_logits[element], [logits], {}, on_device=False)
        return every.numpy()

    def _session(self, graph: onnx.ModelProto) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        if self.device.is_gpu:
            providers: list[str | tuple[str, dict[str, str]]] = [
                ("CUDAExecutionProvider", {"device_id": str(self.device.index)})
            ]
        else:
            providers = ["CPUExecutionProvider"]
        return ort.InferenceSession(graph.SerializeToString(), options, providers=providers)

    def _run(
        self,
        session: ort.InferenceSession,
        tensors: list[ort.OrtValue],
        host_inputs: dict[str, np.ndarray],
        *,
        on_device: bool,
    ) -> list[ort.OrtValue]:
        binding = session.io_binding()
        tensor_names = [i.name for i in session.get_inputs() if i.name not in host_inputs]
        for name, value in zip(tensor_names, tensors, strict=True):
            binding.bind_ortvalue_input(name, value)
        for name, array in host_inputs.items():
            binding.bind_cpu_input(name, array)
        device = self.device if on_device else Device("cpu")
        for output in session.get_outputs():
            binding.bind_output(output.name, device.kind, device.index)
        session.run_with_iobinding(binding)
        outputs: list[ort.OrtValue] = binding.get_outputs()
        return outputs


def _left_pads(columns: int) -> np.ndarray:
    """``Pad`` amounts for a [batch, heads, length, dim] tensor: ``columns`` before axis 2."""
    return np.array([0, 0, columns, 0, 0, 0, 0, 0], dtype=np.int64)


def _kv_input(name: str, element: int, group: str) -> onnx.ValueInfoProto:
    """A K/V tensor; tensors of one ``group`` share their row and column counts."""
    dims = [f"{group}_rows", "heads", f"{group}_length", "dim"]
    return helper.make_tensor_value_info(name, element, dims)


def _model(
    nodes: list[onnx.NodeProto], inputs: list, outputs: list, inits: list
) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "tensor_ops", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", _OPSET)])
    model.ir_version = 8  # readable by every onnxruntime this package supports
    return model


def _select_graph(count: int, element: int) -> onnx.ModelProto:
    """out_i = kv_i[rows, :, start:, :]"""
    nodes, inputs, outputs = [], [], []
    for i in range(count):
        inputs.append(_kv_input(f"kv_{i}", element, "batch"))
        outputs.append(_kv_input(f"out_{i}", element, "kept"))
        nodes.append(helper.make_node("Gather", [f"kv_{i}", "rows"], [f"rows_{i}"], axis=0))
        nodes.append(helper.make_node("Slice", [f"rows_{i}", "start", "end", "axis"], [f"out_{i}"]))
    inputs.append(helper.make_tensor_value_info("rows", TensorProto.INT64, ["kept"]))
    inputs.append(helper.make_tensor_value_info("start", TensorProto.INT64, [1]))
    inits = [
        helper.make_tensor("end", TensorProto.INT64, [1], [_INT64_MAX]),
        helper.make_tensor("axis", TensorProto.INT64, [1], [2]),
    ]
    return _model(nodes, inputs, outputs, inits)


def _concat_graph(count: int, element: int) -> onnx.ModelProto:
    """out_i = concat(left_pad(first_i), left_pad(second_i)) along the batch axis."""
    nodes, outputs = [], []
    firsts = [_kv_input(f"first_{i}", element, "first") for i in range(count)]
    seconds = [_kv_input(f"second_{i}", element, "second") for i in range(count)]
    for i in range(count):
        nodes.append(helper.make_node("Pad", [f"first_{i}", "pads_first"], [f"padded_first_{i}"]))
        nodes.append(
            helper.make_node("Pad", [f"second_{i}", "pads_second"], [f"padded_second_{i}"])
        )
        nodes.append(
            helper.make_node(
                "Concat", [f"padded_first_{i}", f"padded_second_{i}"], [f"out_{i}"], axis=0
            )
        )
        outputs.append(_kv_input(f"out_{i}", element, "merged"))
    pads = [
        helper.make_tensor_value_info(name, TensorProto.INT64, [8])
        for name in ("pads_first", "pads_second")
    ]
    return _model(nodes, [*firsts, *seconds, *pads], outputs, [])


def _last_logits_graph(element: int) -> onnx.ModelProto:
    """out = float32(logits[:, -1, :])"""
    nodes = [
        helper.make_node("Gather", ["logits", "last"], ["last_logits"], axis=1),
        helper.make_node("Cast", ["last_logits"], ["out"], to=TensorProto.FLOAT),
    ]
    inputs = [helper.make_tensor_value_info("logits", element, ["batch", "tokens", "vocab"])]
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", "vocab"])]
    inits = [helper.make_tensor("last", TensorProto.INT64, [], [-1])]
    return _model(nodes, inputs, outputs, inits)


def _cast_logits_graph(element: int) -> onnx.ModelProto:
    """out = float32(logits)"""
    nodes = [helper.make_node("Cast", ["logits"], ["out"], to=TensorProto.FLOAT)]
    dims = ["batch", "tokens", "vocab"]
    inputs = [helper.make_tensor_value_info("logits", element, dims)]
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, dims)]
    return _model(nodes, inputs, outputs, [])
