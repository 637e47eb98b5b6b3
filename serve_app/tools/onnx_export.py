"""Export a torch decoder to the decoder-with-past ONNX layout and check the graph against torch.

The layout is the one ``optimum-cli export onnx --task text-generation-with-past`` writes:
``input_ids``, ``attention_mask``, ``position_ids``, ``past_key_values.N.key/value`` in;
``logits``, ``present.N.key/value`` out. Any module with the call shape of `Decoder` exports here:
the repository's own `LlamaDecoder`, and any transformers causal LM through `HFDecoder`.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn
from transformers import AutoModelForCausalLM, DynamicCache, PreTrainedModel

ONNX_OPSET = 17
KVCache = list[tuple[torch.Tensor, torch.Tensor]]
_ORT_FLOATS = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class Decoder(Protocol):
    """A causal LM called as ``(input_ids, attention_mask, position_ids, past)``.

    ``attention_mask`` covers past and new tokens; ``past`` (None: no cache) and the returned
    presents hold one (key, value) pair per layer, each [batch, kv_heads, length, head_dim].
    """

    def __call__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past: KVCache | None,
    ) -> tuple[torch.Tensor, KVCache]: ...

    def eval(self) -> nn.Module: ...


@dataclass(frozen=True)
class KVGeometry:
    """The shapes an export needs, read off one forward pass rather than an architecture config."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int

    @classmethod
    def probe(cls, decoder: Decoder) -> KVGeometry:
        """Run one token through `decoder` and read the geometry off its logits and cache."""
        one = torch.ones(1, 1, dtype=torch.int64)
        with torch.no_grad():
            logits, presents = decoder(one, one, torch.zeros_like(one), None)
        _, heads, _, head_dim = presents[0][0].shape
        return cls(len(presents), heads, head_dim, logits.shape[-1])

    def past_names(self) -> list[str]:
        """Cache input names, layer by layer, key before value."""
        return [
            f"past_key_values.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")
        ]

    def present_names(self) -> list[str]:
        """Cache output names in the same order."""
        return [f"present.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]


class HFDecoder(nn.Module):
    """A transformers causal LM behind the `Decoder` call shape, its cache a `DynamicCache`."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model
        # transformers 5.x renames the forward argument past_key_values to cache.
        parameters = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in parameters else "past_key_values"

    @classmethod
    def from_pretrained(cls, checkpoint_dir: Path) -> HFDecoder:
        """Load a checkpoint in fp32 with eager attention, whose masking traces to plain ops."""
        model = AutoModelForCausalLM.from_pretrained(
            checkpoint_dir, attn_implementation="eager", dtype=torch.float32
        )
        return cls(model).eval()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past: KVCache | None,
    ) -> tuple[torch.Tensor, KVCache]:
        """Logits for every position and the cache extended by `input_ids`."""
        # Any: transformers types its layers as a union that includes kinds without keys and
        # values (linear attention), which this layout cannot hold anyway.
        cache: Any = DynamicCache(past, config=self.model.config)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **{self._cache_arg: cache},
        )
        # The cache is updated in place, so its layers are the presents whatever the
        # output field is called in this transformers version.
        return out.logits, [(layer.keys, layer.values) for layer in cache.layers]


class _FlatDecoder(nn.Module):
    """Flat-argument wrapper giving the exporter optimum's input and output order."""

    def __init__(self, decoder: Decoder) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        *past_flat: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        past = [(past_flat[i], past_flat[i + 1]) for i in range(0, len(past_flat), 2)]
        logits, presents = self.decoder(input_ids, attention_mask, position_ids, past)
        return (logits, *[t for kv in presents for t in kv])


def export_decoder_with_past(decoder: Decoder, onnx_path: Path) -> None:
    """Trace `decoder` into `onnx_path` (fp32, opset 17); raises if the graph uses custom ops."""
    decoder.eval()
    geometry = KVGeometry.probe(decoder)
    past_names, present_names = geometry.past_names(), geometry.present_names()
    batch, seq, past_len = 2, 3, 4
    kv_shape = (batch, geometry.num_kv_heads, past_len, geometry.head_dim)
    args = (
        torch.randint(0, geometry.vocab_size, (batch, seq)),
        torch.ones(batch, past_len + seq, dtype=torch.int64),
        torch.arange(past_len, past_len + seq).expand(batch, seq).contiguous(),
        *[torch.zeros(kv_shape) for _ in past_names],
    )
    total = "past_sequence_length + sequence_length"
    dynamic_axes: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch_size", 1: "sequence_length"},
        "attention_mask": {0: "batch_size", 1: total},
        "position_ids": {0: "batch_size", 1: "sequence_length"},
        "logits": {0: "batch_size", 1: "sequence_length"},
        **{name: {0: "batch_size", 2: "past_sequence_length"} for name in past_names},
        **{name: {0: "batch_size", 2: total} for name in present_names},
    }
    # eval() too: export restores the wrapper's training flag onto the decoder afterwards.
    wrapper = _FlatDecoder(decoder).eval()
    # The tracer warns about every shape it turns into a constant; verify_decoder_with_past
    # is what proves the graph still matches torch at other shapes.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            args,
            str(onnx_path),
            input_names=["input_ids", "attention_mask", "position_ids", *past_names],
            output_names=["logits", *present_names],
            dynamic_axes=dynamic_axes,
            opset_version=ONNX_OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    onnx.checker.check_model(str(onnx_path))
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    custom = {node.op_type for node in graph.node if node.domain not in ("", "ai.onnx")}
    if custom:
        raise RuntimeError(f"ONNX export produced non-standard ops: {sorted(custom)}")


def verify_decoder_with_past(
    decoder: Decoder, onnx_path: Path, tolerance: float = 1e-4
) -> dict[str, float]:
    """Check the graph at `onnx_path` against torch; returns the max abs logit diff per check.

    (a) prefill logits equal torch's; (b) prefill then one cached decode step equals torch's full
    forward; (c) a left-padded batch equals each prompt run alone. A diff passes when it is at
    most `tolerance` times the largest logit (at least 1), so large models are held to the same
    relative precision as small ones. Raises RuntimeError on a mismatch or on any non-finite
    output (pad positions included). fp16 graphs are fed fp16 caches.
    """
    decoder.eval()
    geometry = KVGeometry.probe(decoder)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    past_names = geometry.past_names()
    kv_dtype = _ORT_FLOATS[next(i.type for i in session.get_inputs() if i.name == past_names[0])]
    generator = torch.Generator().manual_seed(1234)
    tokens = torch.randint(0, geometry.vocab_size, (2, 9), generator=generator)

    def run(
        input_ids: torch.Tensor, attention_mask: torch.Tensor, past: list[np.ndarray] | None = None
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        batch, seq = input_ids.shape
        if past is None:
            shape = (batch, geometry.num_kv_heads, 0, geometry.head_dim)
            past = [np.zeros(shape, kv_dtype)] * len(past_names)
        positions = _positions(attention_mask)[:, -seq:]
        feeds = {
            "input_ids": input_ids.numpy(),
            "attention_mask": attention_mask.numpy(),
            "position_ids": positions.numpy(),
            **dict(zip(past_names, past, strict=True)),
        }
        logits, *presents = session.run(None, feeds)
        if not all(np.isfinite(out).all() for out in (logits, *presents)):
            raise RuntimeError("ONNX self-check failed: non-finite logits or present K/V")
        return logits.astype(np.float32), presents

    ones = torch.ones_like(tokens)
    with torch.no_grad():
        reference = decoder(tokens, ones, _positions(ones), None)[0].numpy()
    scale = max(1.0, float(np.abs(reference).max()))
    onnx_logits, _ = run(tokens, ones)
    diffs = {"prefill_vs_torch": float(np.abs(onnx_logits - reference).max())}

    _, present = run(tokens[:, :8], ones[:, :8])
    step_logits, _ = run(tokens[:, 8:], ones, present)
    diffs["decode_vs_full"] = float(np.abs(step_logits[:, -1] - reference[:, -1]).max())

    long, short = tokens[0, :7], tokens[1, :4]
    batch_ids = torch.stack([long, torch.cat([torch.zeros(3, dtype=torch.int64), short])])
    mask = torch.tensor([[1] * 7, [0] * 3 + [1] * 4])
    batch_logits, _ = run(batch_ids, mask)
    alone_long, _ = run(long[None], ones[:1, :7])
    alone_short, _ = run(short[None], ones[:1, :4])
    diffs["left_padded_batch"] = max(
        float(np.abs(batch_logits[0] - alone_long[0]).max()),
        float(np.abs(batch_logits[1, 3:] - alone_short[0]).max()),
    )
    for name, diff in diffs.items():
        if not diff <= tolerance * scale:
            raise RuntimeError(
                f"ONNX self-check failed: {name} max abs logit diff {diff:.3g} > "
                f"{tolerance:g} x {scale:.3g} ({onnx_path})"
            )
    return diffs


def _positions(mask: torch.Tensor) -> torch.Tensor:
    # Pads get position 1 like transformers does; their logits are never read.
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
