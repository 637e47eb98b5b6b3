"""A tiny deterministic ``Decoder`` for engine tests: no model file, a step in microseconds.

Its KV cache is one layer of one head of width one that holds each token id plus one (so
padding reads as zero), regrouped by the real host ``TensorOps``. Every step reads each row
back from that cache: the next token is (the row's first token + the row's length) mod VOCAB,
so a prompt of consecutive ids keeps counting (5, 6, 7 -> 8, 9, ...), and a row that lost,
gained or swapped tokens when sequences joined or left shows in the output. A row out of line
with its attention mask or positions fails the step. Logits fall off in id order after the
chosen token, so when it is banned the next id wins.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort

from serve_app.engine import EngineConfig, LLMEngine, ModelConfig
from serve_app.engine.backends.host_ops import HostTensorOps
from serve_app.engine.decoder import ForwardResult, ModelIO

VOCAB = 32
EOS = 0
CONTEXT = 64

MODEL_CONFIG = ModelConfig(
    model_type="fake",
    num_layers=1,
    num_heads=1,
    num_kv_heads=1,
    head_dim=1,
    vocab_size=VOCAB,
    context_length=CONTEXT,
    eos_token_ids=(EOS,),
    bos_token_id=None,
    pad_token_id=EOS,
    tie_word_embeddings=False,
)
MODEL_IO = ModelIO(
    has_position_ids=True,
    past_names=["past_key_values.0.key", "past_key_values.0.value"],
    present_names=["present.0.key", "present.0.value"],
    kv_dtype=np.dtype(np.float32),
    num_kv_heads=1,
    head_dim=1,
)


def continuation(prompt: list[int], num_tokens: int) -> list[int]:
    """What the fake generates greedily after ``prompt`` when nothing stops it."""
    return [(prompt[0] + len(prompt) + i) % VOCAB for i in range(num_tokens)]


class FakeDecoder:
    """The ``Decoder`` described above; ``gate``, when given, is acquired once per forward pass,
    so a test decides when each step may finish."""

    def __init__(self, gate: threading.Semaphore | None = None) -> None:
        self.config = MODEL_CONFIG
        self.ops = HostTensorOps(MODEL_IO)
        self.gate = gate
        self.forward_shapes: list[tuple[int, int]] = []  # (rows, input tokens) of each call

    def forward(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        past: list[ort.OrtValue],
        *,
        all_positions: bool = False,
    ) -> ForwardResult:
        """Append the input to the cache and score each row's next token (the last position's
        only, whatever ``all_positions`` asks)."""
        if self.gate is not None and not self.gate.acquire(timeout=10):
            raise TimeoutError("the test never let this step finish")
        self.forward_shapes.append((input_ids.shape[0], input_ids.shape[1]))
        width = input_ids.shape[1]
        new_mask = attention_mask[:, -width:]
        expected_positions = attention_mask.cumsum(axis=1)[:, -width:] - 1
        assert (position_ids[new_mask == 1] == expected_positions[new_mask == 1]).all()
        new = ((input_ids + 1) * new_mask).astype(np.float32)[:, None, :, None]
        present = [
            ort.OrtValue.ortvalue_from_numpy(np.concatenate([value.numpy(), new], axis=2))
            for value in past
        ]
        rows = present[0].numpy()[:, 0, :, 0]
        assert ((rows > 0) == (attention_mask == 1)).all(), "cache rows and mask disagree"
        next_ids = np.array([(int(r[r > 0][0]) - 1 + int((r > 0).sum())) % VOCAB for r in rows])
        distance = (np.arange(VOCAB)[None, :] - next_ids[:, None]) % VOCAB
        return ForwardResult(logits=-distance.astype(np.float32), present=present)

    def describe(self) -> str:
        """The fake's name, as a backend would report itself."""
        return "fake (cpu)"


def fake_engine(decoder: FakeDecoder | None = None, **limits: int) -> LLMEngine:
    """An ``LLMEngine`` over ``decoder`` (a new ``FakeDecoder`` if none) with engine ``limits``."""
    config = EngineConfig(model_path=Path("fake-model"), intra_op_num_threads=1, **limits)
    return LLMEngine(config, decoder or FakeDecoder())
