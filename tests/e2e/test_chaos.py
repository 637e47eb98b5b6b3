"""The engine loop crashing inside a step, on a real application over HTTP.

The crash is the model's own: the test builds a copy of the demo model whose ONNX graph holds a
per-row table exported for at most ``MAX_ROWS`` batch rows (as a graph exported with a static
batch size does), while the engine may batch more. Up to ``MAX_ROWS`` concurrent sequences run
fine; one more makes onnxruntime fail inside the step. That failure is fatal for the engine
loop: every running stream ends with an error event, ``/health`` answers 503, and Serve
replaces the replica, whose fresh engine serves again.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
import ray
from onnx import helper, numpy_helper

from serve_app.config import AppArgs
from tests.e2e.conftest import ServeSession, app_args, wait_healthy

MAX_ROWS = 3  # the fragile model's batch limit: one sequence more fails the step
LONG = {"model": "demo", "prompt": "The", "max_tokens": 800, "ignore_eos": True,
        "temperature": 0.8, "stream": True}  # fmt: skip


def build_fragile_model(source: Path, target: Path, max_rows: int) -> None:
    """Copy ``source`` to ``target`` with a zero bias gathered per batch row from a table of
    ``max_rows`` entries and added to the logits: the same answers, until a step batches more
    than ``max_rows`` rows and the Gather's index is out of range at run time."""
    shutil.copytree(source, target)
    model = onnx.load(target / "model.onnx")
    graph = model.graph
    producer = next(node for node in graph.node if "logits" in node.output)
    producer.output[list(producer.output).index("logits")] = "logits_unguarded"
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.zeros(max_rows, dtype=np.float32), "row_bias"),
            numpy_helper.from_array(np.array(0, dtype=np.int64), "batch_axis"),
            numpy_helper.from_array(np.array(1, dtype=np.int64), "one"),
        ]
    )
    graph.node.extend(
        [
            helper.make_node("Shape", ["input_ids"], ["guard_shape"]),
            helper.make_node("Gather", ["guard_shape", "batch_axis"], ["guard_rows"]),
            helper.make_node("Sub", ["guard_rows", "one"], ["guard_last_row"]),
            helper.make_node("Gather", ["row_bias", "guard_last_row"], ["guard_bias"]),
            helper.make_node("Add", ["logits_unguarded", "guard_bias"], ["logits"]),
        ]
    )
    onnx.checker.check_model(model)
    onnx.save(model, target / "model.onnx")


@pytest.fixture(scope="module")
def fragile_app(
    model_dir: Path, serve_session: ServeSession, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The application serving the fragile model; discarded afterwards (replicas replaced)."""
    fragile = tmp_path_factory.mktemp("chaos") / "fragile"
    build_fragile_model(model_dir, fragile, MAX_ROWS)
    serve_session.deploy(AppArgs.model_validate(app_args(fragile)), None)
    yield serve_session.base_url
    serve_session.discard()


def model_replicas() -> set[str]:
    """The names of the live model replica actors."""
    actors = ray.util.list_named_actors(all_namespaces=True)
    return {actor["name"] for actor in actors if "LLMModel" in actor["name"]}


class Stream:
    """A streamed completion read on its own thread: its events, and when the first came."""

    def __init__(self, base_url: str) -> None:
        self.events: list[str] = []
        self.status = 0
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._read, args=(base_url,), daemon=True)
        self.thread.start()

    def _read(self, base_url: str) -> None:
        with (
            httpx.Client(base_url=base_url, timeout=60) as client,
            client.stream("POST", "/v1/completions", json=LONG) as response,
        ):
            self.status = response.status_code
            for line in response.iter_lines():
                if line.startswith("data: "):
                    self.events.append(line.removeprefix("data: "))
                    self.started.set()
        self.started.set()  # ended without an event: the assertions below say so


def test_a_failing_engine_step_ends_every_stream_and_the_replica_is_replaced(
    fragile_app: str,
) -> None:
    with httpx.Client(base_url=fragile_app, timeout=60) as client:
        # Up to MAX_ROWS sequences at once, the fragile model serves like the demo model.
        single = client.post("/v1/infer", json={"prompt": "The yield", "max_tokens": 4})
        assert single.status_code == 200 and single.json()["tokens"] == 4
        replicas_before = model_replicas()
        streams = [Stream(fragile_app) for _ in range(MAX_ROWS)]
        for stream in streams:
            assert stream.started.wait(60) and stream.status == 200 and stream.events
        # One sequence more: the next step batches MAX_ROWS + 1 rows and fails.
        extra = client.post("/v1/infer", json={"prompt": "One too many", "max_tokens": 4})
        for stream in streams:
            stream.thread.join(timeout=60)
            assert not stream.thread.is_alive()
        assert extra.status_code == 503, extra.text
        assert extra.json()["error"]["code"] == "model_failed"
        for stream in streams:
            # Each stream had begun: its failure is one final error event, then the stream ends.
            assert '"error"' in stream.events[-1], stream.events[-3:]
            assert "[DONE]" not in stream.events
            assert len(stream.events) < LONG["max_tokens"]  # ended early, not by max_tokens
        # The dead engine makes the replica unhealthy, then Serve starts a new one.
        health = client.get("/health")
        assert health.status_code == 503, health.text
        wait_healthy(fragile_app, timeout_s=90)
        assert model_replicas() - replicas_before  # a new replica answers, not the dead one
        again = client.post("/v1/infer", json={"prompt": "After the crash", "max_tokens": 4})
        assert again.status_code == 200 and again.json()["tokens"] == 4
