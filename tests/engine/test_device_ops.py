"""KV-cache surgery on the model's device, checked on CPU against the numpy implementation.

On a GPU the engine regroups the cache with ``DeviceTensorOps`` (small onnxruntime graphs) so
it never leaves the device; the same graphs run on onnxruntime's CPU provider, so the logic is
covered here bit for bit, and the GPU run only has to confirm the placement (tests/gpu).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from serve_app.engine import EngineConfig, LLMEngine
from serve_app.engine.backends.device import Device
from serve_app.engine.backends.device_ops import DeviceTensorOps
from serve_app.engine.backends.host_ops import HostTensorOps
from serve_app.engine.backends.onnxruntime_decoder import OnnxDecoder
from serve_app.engine.decoder import ModelIO
from serve_app.text.tokenizer import Tokenizer
from tests.engine.test_engine import PROMPTS, greedy, tokens_of


def model_io(dtype: type) -> ModelIO:
    names = [f"past_key_values.{layer}.{kind}" for layer in range(2) for kind in ("key", "value")]
    return ModelIO(
        has_position_ids=True,
        past_names=names,
        present_names=[n.replace("past_key_values", "present") for n in names],
        kv_dtype=np.dtype(dtype),
        num_kv_heads=3,
        head_dim=4,
    )


def random_kv(io: ModelIO, rows: int, length: int, seed: int) -> list[ort.OrtValue]:
    rng = np.random.default_rng(seed)
    shape = (rows, io.num_kv_heads, length, io.head_dim)
    return [
        ort.OrtValue.ortvalue_from_numpy(rng.standard_normal(shape).astype(io.kv_dtype))
        for _ in io.past_names
    ]


def as_arrays(values: list[ort.OrtValue]) -> list[np.ndarray]:
    # Copies: an OrtValue made from numpy does not own its buffer past its own lifetime.
    return [value.numpy().copy() for value in values]


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_device_ops_equal_host_ops(dtype: type) -> None:
    io = model_io(dtype)
    device, host = DeviceTensorOps(io, Device("cpu")), HostTensorOps(io)
    short, long = random_kv(io, 3, 5, seed=1), random_kv(io, 2, 7, seed=2)

    for first, second, short_rows in [(short, long, slice(0, 3)), (long, short, slice(2, 5))]:
        merged = as_arrays(device.concat(first, second, 9))
        assert [m.shape for m in merged] == [(5, 3, 9, 4)] * 4
        for got, want in zip(merged, as_arrays(host.concat(first, second, 9)), strict=True):
            np.testing.assert_array_equal(got, want)
        assert not merged[0][short_rows, :, :4].any(), "left padding must be zeros"

    kept = as_arrays(device.select(short, [2, 0], 3))
    assert [k.shape for k in kept] == [(2, 3, 2, 4)] * 4
    for got, want in zip(kept, as_arrays(host.select(short, [2, 0], 3)), strict=True):
        np.testing.assert_array_equal(got, want)

    empty = device.empty(6)
    assert len(empty) == len(io.past_names)
    assert empty[0].shape() == [6, 3, 0, 4]

    logits = np.random.default_rng(3).standard_normal((2, 5, 11)).astype(dtype)
    rows = device.last_logits(ort.OrtValue.ortvalue_from_numpy(logits))
    assert rows.dtype == np.float32
    np.testing.assert_array_equal(rows, logits[:, -1, :].astype(np.float32))


def test_engine_on_the_device_path_generates_what_the_host_path_generates(
    model_dir: Path, tokenizer: Tokenizer
) -> None:
    """IOBinding runs and device ops, on CPU. Sequences join and leave mid-flight, so every
    op runs many times on real K/V; on the device path the longer prompts prefill in chunks."""
    config = EngineConfig(model_path=model_dir, intra_op_num_threads=2)
    on_device = OnnxDecoder(config)
    on_device.ops, on_device.run = (
        DeviceTensorOps(on_device.io, Device("cpu")),
        on_device.run_on_device,
    )
    engines = {
        "host": LLMEngine(config, OnnxDecoder(config)),
        "device": LLMEngine(config.model_copy(update={"max_prefill_tokens": 8}), on_device),
    }
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    lengths = [30, 5, 24, 1, 16, 9]
    arrivals = {0: [0, 1], 2: [2], 4: [3], 6: [4], 11: [5]}
    generated: dict[str, dict[int, list[int]]] = {}
    for name, engine in engines.items():
        tokens: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
        step = 0
        while step <= max(arrivals) or engine.has_work():
            for index in arrivals.get(step, []):
                engine.add_request(
                    str(index), prompts[index], greedy(lengths[index], ignore_eos=True)
                )
            for output in engine.step():
                tokens[int(output.request_id)].extend(tokens_of([output]))
            step += 1
        generated[name] = tokens
    assert generated["device"] == generated["host"]
    assert [len(t) for t in generated["device"].values()] == lengths
