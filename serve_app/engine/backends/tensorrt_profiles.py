"""TensorRT optimization profiles for a decoder with past: one for prefill, one for decode.

TensorRT picks kernels per profile and sizes activation memory for each profile's largest
shapes, so the two phases get separate profiles: prefill runs many tokens over an empty cache,
decode runs one token per row over a cache up to the context length. Both the onnxruntime
TensorRT execution provider and the native TensorRT backend use these shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

from serve_app.engine.decoder import ModelIO

Shape = tuple[int, ...]


@dataclass(frozen=True)
class ShapeRange:
    """The smallest, tuned-for and largest shape one input takes within a profile."""

    min: Shape
    opt: Shape
    max: Shape


@dataclass(frozen=True)
class ShapeProfile:
    """One optimization profile: a shape range for every model input."""

    name: str
    inputs: dict[str, ShapeRange]


def decoder_profiles(
    io: ModelIO, max_batch: int, max_prefill_tokens: int, context_length: int
) -> list[ShapeProfile]:
    """The prefill and decode profiles for a deployment's batch and context limits."""
    heads, dim = io.num_kv_heads, io.head_dim
    prompt = max(1, min(context_length - 1, max_prefill_tokens))
    prefill_batch = max(1, min(max_batch, max_prefill_tokens))
    opt_prompt = min(prompt, 128)
    tokens = ShapeRange((1, 1), (1, opt_prompt), (prefill_batch, prompt))
    prefill = {"input_ids": tokens, "attention_mask": tokens}
    empty = (heads, 0, dim)
    prefill.update({name: ShapeRange((1, *empty), (1, *empty), (prefill_batch, *empty))
                    for name in io.past_names})  # fmt: skip

    opt_batch, opt_past = max(1, max_batch // 2), max(1, (context_length - 1) // 2)
    step = ShapeRange((1, 1), (opt_batch, 1), (max_batch, 1))
    past = ShapeRange(
        (1, heads, 1, dim),
        (opt_batch, heads, opt_past, dim),
        (max_batch, heads, context_length - 1, dim),
    )
    mask = ShapeRange((1, 2), (opt_batch, opt_past + 1), (max_batch, context_length))
    decode = {"input_ids": step, "attention_mask": mask}
    decode.update({name: past for name in io.past_names})
    if io.has_position_ids:
        prefill["position_ids"] = tokens
        decode["position_ids"] = step
    return [ShapeProfile("prefill", prefill), ShapeProfile("decode", decode)]


def tensorrt_provider_shapes(profiles: list[ShapeProfile]) -> dict[str, str]:
    """``trt_profile_{min,opt,max}_shapes`` options; an input repeated once per profile."""
    options = {}
    for bound in ("min", "opt", "max"):
        entries = [
            f"{name}:{'x'.join(str(d) for d in getattr(shape_range, bound))}"
            for profile in profiles
            for name, shape_range in profile.inputs.items()
        ]
        options[f"trt_profile_{bound}_shapes"] = ",".join(entries)
    return options
