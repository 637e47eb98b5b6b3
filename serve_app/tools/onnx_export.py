"""Export a torch decoder to the decoder-with-past ONNX layout and check the graph against torch.

The layout is the one ``optimum-cli export onnx --task text-generation-with-past`` writes:
``input_ids``, ``attention_mask``, ``position_ids``, ``past_key_values.N.key/value`` in;
``logits``, ``present.N.key/value`` out. Any module with the call shape of `Decoder` exports here:
the repository's own `LlamaDecoder`, and any transformers causal LM through `HFDecoder`.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, PreTrainedModel

ONNX_OPSET = 17
KVCache = list[tuple[torch.Tensor, torch.Tensor]]
_ORT_FLOATS = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class Decoder(Protocol):
    """A causal LM called as ``(input_ids, attention_mask, position_ids, past)``.

    ``attention_mask`` covers past and new tokens; ``past`` (None: no cache) and the returned
    presents hold one (key, value) pair per layer, each [batch, kv_heads, length, head_dim]:
    the whole sequence, never cut to a sliding window (the mask applies the window). A decoder
    with a sliding window says so in an ``attention_window`` attribute, so the self-check runs
    past it. Models that ignore ``position_ids`` (ALiBi) export without that input.
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

    @property
    def attention_window(self) -> int | None:
        """The sliding window of the model's local-attention layers; None if it has none."""
        config = self.model.config.get_text_config(decoder=True)
        window = getattr(config, "sliding_window", None)
        layer_types = getattr(config, "layer_types", None)
        if layer_types is not None and "sliding_attention" not in layer_types:
            return None  # e.g. Qwen2 with use_sliding_window false still names a window
        if getattr(config, "use_sliding_window", True) is False:
            return None
        return int(window) if window else None

    @classmethod
    def from_pretrained(cls, checkpoint_dir: Path) -> HFDecoder:
        """Load a checkpoint in fp32 with eager attention, whose masking traces to plain ops.

        Falcon with ALiBi is the exception: transformers 5's eager path adds the ALiBi bias twice
        (once itself, once inside the mask it is given), so it disagrees with the SDPA path that
        transformers uses by default and that matches the original model. Its SDPA path always
        gets a materialised mask, so it traces to plain ops too.
        """
        config = AutoConfig.from_pretrained(checkpoint_dir)
        falcon_alibi = config.model_type == "falcon" and getattr(config, "alibi", False)
        model = AutoModelForCausalLM.from_pretrained(
            checkpoint_dir,
            attn_implementation="sdpa" if falcon_alibi else "eager",
            dtype=torch.float32,
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
        # values (linear attention), which this layout cannot hold anyway. No config, so every
        # layer is a full DynamicLayer: given the config, transformers makes sliding-window layers
        # that cut the cache to the window, and a left-padded row's window would then depend on its
        # batch mates' lengths. The window is still applied, by the attention mask, which
        # transformers builds from the config's sliding_window whatever the cache.
        cache: Any = DynamicCache(past) if past else DynamicCache()
        with _traceable_alibi() if torch.jit.is_tracing() else contextlib.nullcontext():
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


@contextlib.contextmanager
def _traceable_alibi() -> Iterator[None]:
    """Swap Falcon's ALiBi builder for one the ONNX tracer types correctly, while tracing.

    Falcon multiplies bfloat16 slopes by int64 positions, which the tracer exports as a
    complex128 Mul that onnxruntime rejects. The swap computes the same bfloat16-rounded values
    with float32 arithmetic: a product of two bfloat16 numbers is exact in float32, so rounding
    it to bfloat16 once, as torch's bfloat16 Mul does, gives identical biases.
    """
    from transformers.models.falcon import modeling_falcon

    original = modeling_falcon.build_alibi_tensor

    def build_alibi_tensor(
        attention_mask: torch.Tensor, num_heads: int, dtype: torch.dtype
    ) -> torch.Tensor:
        batch_size, seq_length = attention_mask.shape
        slopes = torch.tensor(_alibi_slopes(num_heads), dtype=torch.float32)
        positions = ((attention_mask.cumsum(dim=-1) - 1) * attention_mask)[:, None, :]

        def bf16(x: torch.Tensor) -> torch.Tensor:
            return x.to(torch.bfloat16).to(torch.float32)

        alibi = bf16(bf16(slopes)[..., None] * bf16(positions.to(torch.float32)))
        return alibi.reshape(batch_size * num_heads, 1, seq_length).to(dtype)

    modeling_falcon.build_alibi_tensor = build_alibi_tensor
    try:
        yield
    finally:
        modeling_falcon.build_alibi_tensor = original


def _alibi_slopes(num_heads: int) -> list[float]:
    """The per-head ALiBi slopes of Falcon and Bloom, as float32 values."""
    closest = 2 ** math.floor(math.log2(num_heads))

    def powers(base_exponent: float, exponents: torch.Tensor) -> list[float]:
        base = torch.tensor(2 ** (-(2 ** -(base_exponent - 3))), dtype=torch.float32)
        return torch.pow(base, exponents).tolist()

    slopes = powers(math.log2(closest), torch.arange(1, 1 + closest, dtype=torch.int32))
    if closest != num_heads:
        extra = min(closest, num_heads - closest)
        slopes += powers(
            math.log2(2 * closest), torch.arange(1, 1 + 2 * extra, 2, dtype=torch.int32)
        )
    return slopes


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
    forward; (c) a left-padded batch, prefill and one decode step, equals each prompt run alone.
    The prompts are longer than the decoder's sliding window, if it has one, so the window is
    checked too. A diff passes when it is at most `tolerance` times the largest logit (at least
    1), so large models are held to the same relative precision as small ones. Raises
    RuntimeError on a mismatch or on any non-finite output (pad positions included). fp16 graphs
    are fed fp16 caches; inputs the graph lacks (``position_ids`` under ALiBi) are not fed.
    """
    decoder.eval()
    geometry = KVGeometry.probe(decoder)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    graph_inputs = {i.name for i in session.get_inputs()}
    past_names = geometry.past_names()
    kv_dtype = _ORT_FLOATS[next(i.type for i in session.get_inputs() if i.name == past_names[0])]
    window = getattr(decoder, "attention_window", None)
    length = max(9, window + 3) if window else 9
    generator = torch.Generator().manual_seed(1234)
    tokens = torch.randint(0, geometry.vocab_size, (2, length), generator=generator)

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
        feeds = {name: value for name, value in feeds.items() if name in graph_inputs}
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

    _, present = run(tokens[:, :-1], ones[:, :-1])
    step_logits, _ = run(tokens[:, -1:], ones, present)
    diffs["decode_vs_full"] = float(np.abs(step_logits[:, -1] - reference[:, -1]).max())

    # Row 0 is longer than the window; row 1 is short and left-padded to row 0's length.
    long, short, pads = tokens[0, : length - 2], tokens[1, :4], length - 6
    batch_ids = torch.stack([long, torch.cat([torch.zeros(pads, dtype=torch.int64), short])])
    mask = torch.tensor([[1] * (length - 2), [0] * pads + [1] * 4])
    batch_logits, batch_present = run(batch_ids, mask)
    alone_long, long_present = run(long[None], ones[:1, : length - 2])
    alone_short, short_present = run(short[None], ones[:1, :4])
    next_ids = tokens[:, -2:-1]
    batch_step, _ = run(next_ids, torch.cat([mask, ones[:, :1]], dim=1), batch_present)
    long_step, _ = run(next_ids[:1], ones[:1, : length - 1], long_present)
    short_step, _ = run(next_ids[1:], ones[:1, :5], short_present)
    diffs["left_padded_batch"] = max(
        float(np.abs(batch_logits[0] - alone_long[0]).max()),
        float(np.abs(batch_logits[1, pads:] - alone_short[0]).max()),
        float(np.abs(batch_step[0] - long_step[0]).max()),
        float(np.abs(batch_step[1] - short_step[0]).max()),
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
