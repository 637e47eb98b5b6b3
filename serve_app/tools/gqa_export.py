"""The fused-attention layout: onnxruntime-genai's model builder, driven as the exporter.

``python -m serve_app.tools export --layout gqa CHECKPOINT_DIR OUT_DIR --dtype fp32|int4``
writes the builder's ``model.onnx`` (+ ``model.onnx.data``), whose attention is the
``GroupQueryAttention`` contrib op with past and present sharing one buffer, and its
``genai_config.json``; then the checkpoint's ``config.json``, ``generation_config.json`` and
tokenizer files beside them, as the engine reads them for either layout. The engine recognises
the folder by ``genai_config.json`` and the fused op and keeps its KV cache in place
(docs/ENGINE.md, "Fused-attention models"). An fp32 build is checked against torch through the
engine's own decoder, over a prompt longer than the checkpoint's sliding window if it has one
(the builder does not window every architecture that transformers does: Mistral, for one); int4
changes the logits, so it is not checked. Needs the ``genai`` extra (onnxruntime-genai).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from serve_app.engine.backends.gqa_decoder import GQADecoder
from serve_app.engine.config import EngineConfig
from serve_app.engine.model_config import ModelConfig
from serve_app.tools.model_dir import copy_served_files
from serve_app.tools.onnx_export import HFDecoder

# Our dtype names -> the builder's precision; fp16 and bf16 builds target GPUs, where the
# engine's in-place path does not run (yet).
PRECISIONS = {"fp32": "fp32", "int4": "int4"}


def build_gqa(checkpoint_dir: Path, out_dir: Path, dtype: str) -> None:
    """Run the model builder on ``checkpoint_dir`` into ``out_dir`` (for onnxruntime's CPU
    provider) and copy the served config and tokenizer files."""
    # Imported here: the builder is in the genai extra, and it imports torch and transformers.
    from onnxruntime_genai.models.builder import create_model, parse_extra_options

    # The checkpoint is a local folder, so the Hub must never be contacted.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(dir=out_dir) as cache:
        args = (None, str(checkpoint_dir), str(out_dir), PRECISIONS[dtype], "cpu", cache)
        create_model(*args, **parse_extra_options(*args, []))
    copy_served_files(checkpoint_dir, out_dir)


def verify_gqa(checkpoint_dir: Path, out_dir: Path, tolerance: float) -> dict[str, float]:
    """Check the built graph, run as the engine runs it, against torch; returns the max abs
    logit diff of each check.

    (a) a prefill's logits at every position, (b) one decode step over that cache against
    torch's full forward. The prompt is longer than the checkpoint's sliding window, if it has
    one. A diff passes when it is at most ``tolerance`` times the largest logit (at least 1).
    Raises RuntimeError naming the check on a mismatch or a non-finite logit.
    """
    reference = HFDecoder.from_pretrained(checkpoint_dir)
    window = reference.attention_window
    model = ModelConfig.from_dir(out_dir)
    length = min(model.context_length - 1, max(9, window + 3) if window else 9)
    generator = torch.Generator().manual_seed(1234)
    tokens = torch.randint(0, model.vocab_size, (1, length + 1), generator=generator)
    with torch.no_grad():
        expected, _ = reference(
            tokens, torch.ones_like(tokens), torch.arange(length + 1)[None], None
        )
    config = EngineConfig(model_path=out_dir, max_num_seqs=1, kv_cache_tokens=model.context_length)
    decoder = GQADecoder(config)
    ids = tokens.numpy()
    _, prefill = decoder.run_rows(0, ids[:, :length], np.array([length]), all_positions=True)
    assert prefill is not None
    decode, _ = decoder.run_rows(0, ids[:, length:], np.array([length + 1]))
    scale = max(1.0, float(expected.abs().max()))
    diffs = {
        "prefill": _max_diff(prefill[0], expected[0, :length].numpy()),
        "decode": _max_diff(decode[0], expected[0, length].numpy()),
    }
    for check, diff in diffs.items():
        if not diff <= tolerance * scale:  # NaN fails too
            raise RuntimeError(
                f"the built graph disagrees with torch ({check}: max abs logit diff {diff:.3g} "
                f"over {length} tokens, sliding window {window}; allowed {tolerance * scale:.3g})"
            )
    return diffs


def _max_diff(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max())
