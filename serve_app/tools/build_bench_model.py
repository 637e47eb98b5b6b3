"""Build a random-weight ~100M-parameter Llama for throughput benchmarks.

    python -m serve_app.tools.build_bench_model --out ~/.cache/serve_app/bench-llama-100m

Writes `model.onnx`, `config.json`, `generation_config.json` and tokenizer files to `--out`, and
the same weights as a Hugging Face checkpoint to `<out>/hf/` so other tools (TensorRT, ONNX
Runtime GenAI builders) start from identical weights. Then onnxruntime-genai's model builder
makes the fused-attention (GroupQueryAttention) fp32 version of those weights in `<out>/gqa/`,
checked against torch (`python -m serve_app.tools export --layout gqa`; needs the genai extra),
so the two layouts compare on one set of weights. A step whose output exists is not redone: a
second run over a built folder only adds `gqa/`. The outputs are large; do not commit them.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from serve_app.bench.inprocess import BENCH_MODEL, GQA_SUBDIR
from serve_app.tools.corpus import (
    ENDOFTEXT,
    IM_END,
    collect_documents,
    save_tokenizer_files,
    token_id,
    train_bpe_tokenizer,
)
from serve_app.tools.llama import (
    DecoderConfig,
    LlamaDecoder,
    compare_with_transformers,
    export_onnx,
    save_hf_checkpoint,
)

T = TypeVar("T")


def stage(name: str, action: Callable[[], T]) -> T:
    """Run one build stage, logging its name and duration."""
    print(f"[{name}] ...", flush=True)
    started = time.monotonic()
    value = action()
    print(f"[{name}] done in {time.monotonic() - started:.1f}s", flush=True)
    return value


def directory_mib(path: Path) -> float:
    """Total size of the files directly in `path`, in MiB."""
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file()) / 2**20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; the defaults give ~120M parameters (~85M without embeddings)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=BENCH_MODEL)
    parser.add_argument("--hidden-size", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--intermediate-size", type=int, default=2048)
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--context", type=int, default=2048, help="max_position_embeddings")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Build what `--out` lacks: the Optimum-layout model with its HF checkpoint, then the
    fused-attention build of that checkpoint."""
    args = parse_args(argv)
    started = time.monotonic()
    hf_dir = args.out / "hf"
    if (args.out / "model.onnx").is_file() and (hf_dir / "config.json").is_file():
        print(f"[optimum layout + hf checkpoint] already in {args.out}; kept", flush=True)
    else:
        build_optimum(args)
    gqa_dir = args.out / GQA_SUBDIR
    if (gqa_dir / "genai_config.json").is_file():
        print(f"[fused-attention build] already in {gqa_dir}; kept", flush=True)
    else:
        stage(
            f"fused-attention (GQA) fp32 build + check vs torch -> {gqa_dir}",
            lambda: build_gqa(hf_dir, gqa_dir),
        )
    print(
        f"wrote {args.out} ({directory_mib(args.out):.0f} MiB, hf/ {directory_mib(hf_dir):.0f} MiB,"
        f" {GQA_SUBDIR}/ {directory_mib(gqa_dir):.0f} MiB) in {time.monotonic() - started:.0f}s",
        flush=True,
    )


def build_gqa(hf_dir: Path, gqa_dir: Path) -> None:
    """The builder's fp32 fused-attention graph of the checkpoint, checked against torch."""
    from serve_app.tools.export import export_checkpoint  # its builder is in the genai extra

    result = export_checkpoint(hf_dir, gqa_dir, "fp32", layout="gqa")
    print(f"GQA fp32 vs torch, max abs logit diffs: {result.diffs['fp32']}", flush=True)


def build_optimum(args: argparse.Namespace) -> None:
    """Build tokenizer and random model, save the HF checkpoint, export and verify ONNX."""
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)

    documents = stage("corpus", collect_documents)
    tokenizer = stage(
        f"tokenizer (byte-level BPE, {args.vocab_size} ids)",
        lambda: train_bpe_tokenizer(documents, args.vocab_size),
    )
    eos = token_id(tokenizer, ENDOFTEXT)
    config = DecoderConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.context,
        tie_word_embeddings=False,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
    )

    def init_model() -> LlamaDecoder:
        model = LlamaDecoder(config)
        model.init_weights(std=0.02)
        return model.eval()

    model = stage("random init (std 0.02)", init_model)
    print(f"parameters: {sum(p.numel() for p in model.parameters()):,}", flush=True)
    stop_ids = [eos, token_id(tokenizer, IM_END)]
    hf_dir = args.out / "hf"

    def save_hf() -> float:
        save_hf_checkpoint(model, config, hf_dir, stop_ids)
        save_tokenizer_files(tokenizer, hf_dir, config.max_position_embeddings)
        return compare_with_transformers(model, hf_dir)

    hf_diff = stage(f"Hugging Face checkpoint -> {hf_dir}", save_hf)
    print(f"transformers max abs logit diff: {hf_diff:.2e}", flush=True)
    onnx_diffs = stage(
        f"ONNX export + self-check -> {args.out / 'model.onnx'}",
        lambda: export_onnx(model, config, args.out, stop_ids),
    )
    save_tokenizer_files(tokenizer, args.out, config.max_position_embeddings)
    print(f"ONNX self-check max abs diffs: {onnx_diffs}", flush=True)


if __name__ == "__main__":
    main()
