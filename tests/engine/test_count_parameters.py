"""``count_parameters`` reads the ONNX protobuf itself: it must count what onnx counts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from serve_app.engine.decoder import count_parameters
from serve_app.engine.model_config import ModelLoadError


def _onnx_count(path: Path) -> int:
    graph = onnx.load(str(path), load_external_data=False).graph
    return sum(int(np.prod(init.dims, dtype=np.int64)) for init in graph.initializer)


def test_counts_what_onnx_counts_with_scalars_empty_and_external_weights(tmp_path: Path) -> None:
    inits = [
        numpy_helper.from_array(np.ones((300, 70), np.float32), "big"),  # multi-byte varint dims
        numpy_helper.from_array(np.ones((2, 3, 4), np.float16), "cube"),
        numpy_helper.from_array(np.array(5, np.int64), "scalar"),
        numpy_helper.from_array(np.ones((0, 8), np.float32), "empty"),
    ]
    node = helper.make_node("Identity", ["x"], ["y"])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    model = helper.make_model(helper.make_graph([node], "g", [x], [y], initializer=inits))
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="weights", size_threshold=1024)
    assert (tmp_path / "weights").stat().st_size >= 300 * 70 * 4  # "big" is not in model.onnx
    assert count_parameters(path) == _onnx_count(path) == 300 * 70 + 24 + 1 + 0


def test_counts_packed_dims(tmp_path: Path) -> None:
    """proto2 writers put one varint per dim; a packed writer puts them all in one field."""
    tensor = bytes([0x0A, 3, 3, 0xAC, 0x02])  # dims (field 1, packed): [3, 300]
    graph = bytes([0x2A, len(tensor)]) + tensor  # initializer (field 5)
    path = tmp_path / "model.onnx"
    path.write_bytes(bytes([0x3A, len(graph)]) + graph)  # graph (field 7)
    assert count_parameters(path) == 900 == _onnx_count(path)


def test_a_file_that_is_not_protobuf_is_a_model_load_error(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(bytes([0x0B]))  # field 1, wire type 3 (a group): never in ONNX
    with pytest.raises(ModelLoadError, match="not an ONNX model"):
        count_parameters(path)
