"""Engine configuration: one strict pydantic model."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

GraphOptimization = Literal["disable", "basic", "extended", "all"]
Backend = Literal["onnxruntime", "tensorrt"]
DeviceChoice = Literal["auto", "cpu", "cuda"]


class ExecutionProvider(BaseModel):
    """An onnxruntime execution provider and its options, passed through unchanged."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        description="Provider name, e.g. CPUExecutionProvider, CUDAExecutionProvider."
    )
    options: dict[str, str | int | float | bool] = Field(
        default_factory=dict, description="Provider options as onnxruntime documents them."
    )


class EngineOptions(BaseModel):
    """How the engine runs a model and how much work it takes on at once."""

    model_config = ConfigDict(extra="forbid")

    backend: Backend = Field(
        default="onnxruntime",
        description="What runs the model: onnxruntime (CPU, CUDA or TensorRT execution "
        "providers) or a native TensorRT engine built from the same ONNX file.",
    )
    device: DeviceChoice = Field(
        default="auto",
        description="Where the model and its KV cache live; auto picks the GPU when this "
        "replica has one and the backend can use it.",
    )
    device_id: int = Field(default=0, ge=0, description="CUDA device index when on a GPU.")
    execution_providers: list[ExecutionProvider] | None = Field(
        default=None,
        description="onnxruntime execution providers in priority order; unset: CUDA then CPU "
        "on a GPU, CPU otherwise. List TensorrtExecutionProvider first to use TensorRT inside "
        "onnxruntime; its shape profiles and engine cache are filled in unless given.",
    )
    tensorrt_cache_dir: Path = Field(
        default_factory=lambda: Path.home() / ".cache" / "serve_app" / "tensorrt",
        description="Where TensorRT engines (execution provider and native) are cached.",
    )
    max_num_seqs: int = Field(default=64, ge=1, description="Most sequences decoded in one step.")
    kv_cache_tokens: int = Field(
        default=65536,
        ge=1,
        description="KV-cache budget in token slots (batch size x padded length) across the batch.",
    )
    max_waiting_seqs: int = Field(
        default=256,
        ge=0,
        description="Sequences allowed to wait for admission beyond those the running batch "
        "has room for; past it requests are refused at once (HTTP 503 with Retry-After) "
        "instead of queueing without bound.",
    )
    max_prefill_tokens: int = Field(
        default=4096,
        ge=1,
        description="Most prompt tokens (batch x padded prompt length) prefilled in one step, "
        "so newcomers delay running sequences by at most one bounded step; a longer prompt is "
        "prefilled alone in chunks of this many tokens over several steps, between decode "
        "steps of the running batch. TensorRT's prefill shape profile is sized from it; the "
        "TensorRT backends do not prefill in chunks and refuse longer prompts.",
    )
    prefix_cache_tokens: int = Field(
        default=4096,
        ge=0,
        description="Prompt tokens whose KV the engine keeps for reuse, in blocks of 16 (0: no "
        "prefix reuse). A prompt that starts with a cached block-aligned prefix (exact token "
        "match) copies its KV in and prefills only the rest; least recently used blocks go "
        "first. Held in host memory beside the KV cache: this many tokens x the model's KV "
        "bytes per token. Not with the TensorRT backends, which do not prefill over a past.",
    )
    intra_op_num_threads: int = Field(
        default_factory=lambda: os.cpu_count() or 1,
        ge=0,
        description="onnxruntime threads inside one operator (0: onnxruntime's default).",
    )
    graph_optimization: GraphOptimization = Field(
        default="all", description="onnxruntime graph optimization level."
    )
    allow_spinning: bool = Field(
        default=True,
        description="Let idle onnxruntime threads spin for lower latency; turn off on shared CPUs.",
    )
    seed: int = Field(default=0, ge=0, description="Seeds sampling for requests that give no seed.")

    @property
    def prefills_in_chunks(self) -> bool:
        """Whether a prompt longer than ``max_prefill_tokens`` is prefilled over several steps.

        TensorRT's shape profiles (``backends/tensorrt_profiles.py``) hold a prefill over an
        empty cache and a one-token decode, not several tokens over a non-empty cache.
        """
        providers = self.execution_providers or []
        tensorrt_ep = any(p.name == "TensorrtExecutionProvider" for p in providers)
        return self.backend != "tensorrt" and not tensorrt_ep


class EngineConfig(EngineOptions):
    """Engine options plus the model to load."""

    model_path: Path = Field(
        description="Directory with model.onnx, config.json and tokenizer files (or a folder "
        "from onnxruntime-genai's model builder, recognised by its genai_config.json)."
    )
    onnx_file: str = Field(
        default="model.onnx",
        description="ONNX file name inside model_path (a builder folder's genai_config.json "
        "names its own).",
    )
