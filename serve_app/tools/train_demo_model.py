"""Train the small demo Llama on Python's own documentation and export it for serving.

    python -m serve_app.tools.train_demo_model --out models/demo

Runs offline on two CPU cores in about 20 minutes and is reproducible from the seed (given the
same Python, whose docstrings are the corpus, and the same torch).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from tqdm import tqdm

from serve_app.tools.corpus import (
    ENDOFTEXT,
    IM_END,
    collect_documents,
    save_tokenizer_files,
    split_documents,
    token_id,
    train_bpe_tokenizer,
)
from serve_app.tools.llama import (
    DecoderConfig,
    LlamaDecoder,
    compare_with_transformers,
    export_onnx,
    greedy_generate,
    save_hf_checkpoint,
)

VOCAB_SIZE = 4096
SAMPLE_PROMPTS = [
    "The built-in function",
    "Return a new list",
    "This module provides",
    "Raise ValueError if",
]


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation settings recorded in the training report."""

    steps: int
    batch_size: int
    seq_len: int
    peak_lr: float
    min_lr_ratio: float
    warmup_steps: int
    weight_decay: float
    max_minutes: float
    eval_every: int
    seed: int
    bf16: bool


@dataclass
class TrainResult:
    """What the training loop did."""

    steps_done: int = 0
    tokens_seen: int = 0
    seconds: float = 0.0
    last_loss: float = math.nan
    stopped_by_time: bool = False
    held_out_curve: list[tuple[int, float]] = field(default_factory=list)


def demo_config(max_positions: int, eos_id: int) -> DecoderConfig:
    """The demo architecture: ~5.5M parameters, GQA with two query heads per KV head."""
    return DecoderConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=256,
        intermediate_size=704,  # ~2.75x hidden, a multiple of 64 as in Llama
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=max_positions,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )


def token_stream(tokenizer: Tokenizer, documents: list[str]) -> torch.Tensor:
    """All documents encoded and concatenated, each followed by `<|endoftext|>`."""
    eos = token_id(tokenizer, ENDOFTEXT)
    ids: list[int] = []
    for encoding in tokenizer.encode_batch(documents):
        ids.extend(encoding.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.int64)


def windows(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping [n, seq_len + 1] windows (inputs plus the shifted target)."""
    n = (len(stream) - 1) // seq_len
    starts = torch.arange(n) * seq_len
    return stream[starts[:, None] + torch.arange(seq_len + 1)]


def learning_rate(step: int, settings: TrainSettings) -> float:
    """Linear warmup, then cosine decay to `min_lr_ratio` of the peak."""
    if step < settings.warmup_steps:
        return settings.peak_lr * (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return settings.peak_lr * (settings.min_lr_ratio + (1 - settings.min_lr_ratio) * cosine)


@torch.no_grad()
def held_out_loss(model: LlamaDecoder, held_out: torch.Tensor) -> float:
    """Mean next-token cross-entropy (nats/token) over held-out windows."""
    model.eval()
    total, count = 0.0, 0
    for batch in held_out.split(16):
        logits, _ = model(batch[:, :-1])
        total += float(
            F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
        )
        count += batch[:, 1:].numel()
    model.train()
    return total / count


def unigram_loss(train_stream: torch.Tensor, held_out: torch.Tensor, vocab_size: int) -> float:
    """Cross-entropy of add-one-smoothed training-token frequencies on the same targets."""
    counts = torch.bincount(train_stream, minlength=vocab_size).double() + 1.0
    log_probs = (counts / counts.sum()).log()
    return float(-log_probs[held_out[:, 1:].flatten()].mean())


def train(
    model: LlamaDecoder,
    train_windows: torch.Tensor,
    held_out: torch.Tensor,
    settings: TrainSettings,
) -> TrainResult:
    """AdamW with warmup and cosine decay, stopping early if the time budget runs out."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]  # norm scales
    groups: list[dict[str, Any]] = [
        {"params": decay, "weight_decay": settings.weight_decay},
        {"params": no_decay},
    ]
    optimizer = torch.optim.AdamW(
        groups,
        lr=settings.peak_lr,
        betas=(0.9, 0.95),
        weight_decay=0.0,
    )
    order_rng = torch.Generator().manual_seed(settings.seed)
    order = torch.randperm(len(train_windows), generator=order_rng)
    cursor = 0
    result = TrainResult()
    deadline = time.monotonic() + settings.max_minutes * 60
    start = time.monotonic()
    model.train()
    progress = tqdm(range(settings.steps), desc="train", unit="step", dynamic_ncols=True)
    for step in progress:
        if time.monotonic() > deadline:
            result.stopped_by_time = True
            break
        if cursor + settings.batch_size > len(order):
            order = torch.randperm(len(train_windows), generator=order_rng)
            cursor = 0
        batch = train_windows[order[cursor : cursor + settings.batch_size]]
        cursor += settings.batch_size
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, settings)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=settings.bf16):
            logits, _ = model(batch[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        result.steps_done = step + 1
        result.tokens_seen += batch[:, 1:].numel()
        result.last_loss = loss.item()
        result.seconds = time.monotonic() - start
        postfix = {
            "loss": f"{result.last_loss:.3f}",
            "tok/s": f"{result.tokens_seen / result.seconds:.0f}",
        }
        if settings.eval_every and result.steps_done % settings.eval_every == 0:
            result.held_out_curve.append((result.steps_done, held_out_loss(model, held_out)))
            postfix["held_out"] = f"{result.held_out_curve[-1][1]:.3f}"
        progress.set_postfix(postfix)
    progress.close()
    return result


def write_model_card(out_dir: Path, report: dict[str, Any]) -> None:
    """A short README describing the model, its data and how to rebuild it."""
    cfg = report["config"]
    millions = report["parameters"] / 1e6
    text = f"""# demo: a tiny Llama trained on Python's documentation

A {millions:.1f}M-parameter Llama-architecture decoder with a {cfg["vocab_size"]}-token
byte-level BPE tokenizer: hidden size {cfg["hidden_size"]}, {cfg["num_hidden_layers"]} layers,
{cfg["num_attention_heads"]} query heads sharing {cfg["num_key_value_heads"]} key/value heads,
SwiGLU width {cfg["intermediate_size"]}, RoPE theta {cfg["rope_theta"]:g}, tied embeddings,
context {cfg["max_position_embeddings"]}. It exists to exercise the serving stack (tokenizer,
ChatML template, GQA, KV cache, batching) with real rather than random weights. It writes
documentation-flavoured English; it is not instruction-tuned and knows nothing reliably.

## Files

- `model.onnx`: float32 decoder with past (`input_ids`, `attention_mask`, `position_ids`,
  `past_key_values.{{i}}.key/value` in; `logits`, `present.{{i}}.key/value` out), the layout of
  `optimum-cli export onnx --task text-generation-with-past`.
- `config.json`, `generation_config.json`: Hugging Face Llama configuration.
- `tokenizer.json`, `tokenizer_config.json`: byte-level BPE; `<|endoftext|>` is bos/eos/pad;
  the chat template is ChatML (`<|im_start|>`, `<|im_end|>`), and generation also stops at
  `<|im_end|>`.
- `training_report.json`: settings, losses, timings and sample outputs.

## Data

Text that CPython {report["python"]} ships: every `pydoc_data.topics` entry and the docstrings
of standard-library modules, classes, functions and methods, deduplicated, in sorted order.
{report["documents"]["train"]} training and {report["documents"]["held_out"]} held-out documents
(held out by a hash of their text); {report["tokens"]["train_stream"]:,} training tokens.
`corpus_sha256` in the report identifies the exact corpus.

## Training and quality

{report["steps_done"]} AdamW steps of {report["settings"]["batch_size"]} x \
{report["settings"]["seq_len"]} tokens ({report["tokens_seen"]:,} tokens seen, about
{report["tokens_seen"] / report["tokens"]["train_stream"]:.0f} epochs), warmup then cosine decay,
bf16 autocast on {report["threads"]} CPU threads, {report["train_seconds"] / 60:.1f} minutes,
seed {report["settings"]["seed"]}.

| held-out cross-entropy (nats/token) | value |
|---|---|
| this model | {report["held_out_loss"]:.3f} |
| unigram baseline (add-one smoothed training frequencies) | {report["unigram_loss"]:.3f} |

## Reproduce

```
python -m serve_app.tools.train_demo_model --out models/demo
```

with the `train` and `export` extras installed (torch {report["torch"]}). The Hugging Face
checkpoint goes to `--hf-out` (default `~/.cache/serve_app/demo-hf`), which is not committed.
"""
    (out_dir / "README.md").write_text(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("models/demo"), help="serving files")
    parser.add_argument(
        "--hf-out",
        type=Path,
        default=Path.home() / ".cache/serve_app/demo-hf",
        help="Hugging Face checkpoint directory (not committed)",
    )
    parser.add_argument("--steps", type=int, default=1200, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256, help="training sequence length")
    parser.add_argument("--max-positions", type=int, default=1024, help="context length")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    parser.add_argument("--warmup-steps", type=int, default=50)
    parser.add_argument("--max-minutes", type=float, default=25.0, help="training time budget")
    parser.add_argument("--eval-every", type=int, default=200, help="0 disables")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-bf16", action="store_true", help="train in float32 (slower)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Build the corpus and tokenizer, train, evaluate, and export."""
    args = parse_args(argv)
    started = time.monotonic()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    settings = TrainSettings(
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        peak_lr=args.lr,
        min_lr_ratio=0.1,
        warmup_steps=args.warmup_steps,
        weight_decay=0.1,
        max_minutes=args.max_minutes,
        eval_every=args.eval_every,
        seed=args.seed,
        bf16=not args.no_bf16,
    )

    print("collecting corpus from the standard library ...", flush=True)
    documents = collect_documents()
    split = split_documents(documents)
    tokenizer = train_bpe_tokenizer(split.train, VOCAB_SIZE)
    train_stream = token_stream(tokenizer, split.train)
    held_out = windows(token_stream(tokenizer, split.held_out), settings.seq_len)
    print(
        f"{len(split.train)} train / {len(split.held_out)} held-out documents, "
        f"{len(train_stream):,} train tokens, {held_out[:, 1:].numel():,} held-out targets",
        flush=True,
    )

    eos = token_id(tokenizer, ENDOFTEXT)
    config = demo_config(args.max_positions, eos)
    model = LlamaDecoder(config)
    model.init_weights(std=0.02)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"model: {parameters:,} parameters", flush=True)
    result = train(model, windows(train_stream, settings.seq_len), held_out, settings)
    model.eval()
    model_loss = held_out_loss(model, held_out)
    baseline = unigram_loss(train_stream, held_out, config.vocab_size)
    print(f"held-out loss {model_loss:.3f} nats/token vs unigram {baseline:.3f}", flush=True)

    samples = {
        prompt: tokenizer.decode(greedy_generate(model, tokenizer.encode(prompt).ids, 40, eos))
        for prompt in SAMPLE_PROMPTS
    }
    for prompt, completion in samples.items():
        print(f"--- {prompt!r} -> {completion!r}", flush=True)

    stop_ids = [eos, token_id(tokenizer, IM_END)]
    save_hf_checkpoint(model, config, args.hf_out, stop_ids)
    save_tokenizer_files(tokenizer, args.hf_out, config.max_position_embeddings)
    hf_diff = compare_with_transformers(model, args.hf_out)
    print(f"Hugging Face checkpoint: {args.hf_out} (transformers max abs diff {hf_diff:.2e})")
    onnx_diffs = export_onnx(model, config, args.out, stop_ids)
    save_tokenizer_files(tokenizer, args.out, config.max_position_embeddings)
    onnx_path = args.out / "model.onnx"
    print(f"ONNX: {onnx_path} ({onnx_path.stat().st_size / 2**20:.1f} MiB), checks {onnx_diffs}")

    report = {
        "config": config.to_hf_dict(),
        "parameters": parameters,
        "settings": asdict(settings),
        "seed": args.seed,
        "threads": args.threads,
        "steps_done": result.steps_done,
        "stopped_by_time": result.stopped_by_time,
        "tokens_seen": result.tokens_seen,
        "train_seconds": round(result.seconds, 1),
        "total_seconds": round(time.monotonic() - started, 1),
        "final_train_loss": result.last_loss,
        "held_out_loss": model_loss,
        "unigram_loss": baseline,
        "held_out_curve": result.held_out_curve,
        "documents": {"train": len(split.train), "held_out": len(split.held_out)},
        "tokens": {
            "train_stream": len(train_stream),
            "held_out_targets": held_out[:, 1:].numel(),
        },
        "corpus_sha256": hashlib.sha256("\0".join(documents).encode()).hexdigest(),
        "transformers_max_abs_diff": hf_diff,
        "onnx_max_abs_diff": onnx_diffs,
        "samples": samples,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    (args.out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    write_model_card(args.out, report)
    print(f"wrote {args.out} in {report['total_seconds'] / 60:.1f} minutes")


if __name__ == "__main__":
    main()
