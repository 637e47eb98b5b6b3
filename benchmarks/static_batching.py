"""Baseline for the serving benchmark: static batching with ``@serve.batch``, as Ray's docs show.

One deployment gathers up to ``max_batch_size`` requests, prefills them together and decodes the
whole batch until its longest request is done; requests that arrive meanwhile wait for the next
batch, and finished rows keep their seats. Tokens stream out per step (Ray's "streaming batched
requests" pattern). It serves ``POST /v1/completions`` (streaming only) on the same ONNX model and
tokenizer, so ``python -m serve_app.bench`` can drive it like the real service:

    python benchmarks/static_batching.py --model-path models/demo --port 8001

(No ``from __future__ import annotations``: FastAPI reads the route signature at runtime.)
"""

import argparse
import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import ray
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from ray import serve

from serve_app.app import SERVE_ENV
from serve_app.engine import EngineConfig
from serve_app.engine.backends.onnxruntime_decoder import OnnxDecoder
from serve_app.engine.kv_cache import BatchKVCache
from serve_app.text.tokenizer import Tokenizer

app = FastAPI()


def _chunk(text: str, finish_reason: str | None, usage: dict[str, int] | None = None) -> str:
    choices = [] if usage else [{"index": 0, "text": text, "finish_reason": finish_reason}]
    payload = {"id": "static", "object": "text_completion", "created": int(time.time()),
               "model": "demo", "choices": choices, "usage": usage}  # fmt: skip
    return f"data: {json.dumps(payload)}\n\n"


@serve.deployment(max_ongoing_requests=1024, ray_actor_options={"num_cpus": 0})
@serve.ingress(app)
class StaticBatchLLM:
    """Greedy generation in static batches."""

    def __init__(self, model_path: str, threads: int) -> None:
        config = EngineConfig(model_path=Path(model_path), intra_op_num_threads=threads)
        self.model = OnnxDecoder(config)
        self.tokenizer = Tokenizer(Path(model_path))
        self.eos = set(self.model.config.eos_token_ids)

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> StreamingResponse:
        """Stream one request's text as OpenAI chunks."""
        body = await request.json()
        prompt_ids = self.tokenizer.encode(body["prompt"])
        max_tokens, ignore_eos = int(body.get("max_tokens", 16)), bool(body.get("ignore_eos"))

        async def events() -> AsyncIterator[str]:
            produced = 0
            async for token_id in self.generate((prompt_ids, max_tokens, ignore_eos)):
                produced += 1
                yield _chunk(self.tokenizer.decode([token_id]), None)
            yield _chunk("", "length")
            usage = {"prompt_tokens": len(prompt_ids), "completion_tokens": produced,
                     "total_tokens": len(prompt_ids) + produced}  # fmt: skip
            yield _chunk("", None, usage)
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def generate(self, batch: list[tuple[list[int], int, bool]]) -> AsyncIterator[list[Any]]:
        """Prefill the batch, then decode every row until the longest request is done."""
        rows = len(batch)
        longest_prompt = max(len(ids) for ids, _, _ in batch)
        input_ids = np.zeros((rows, longest_prompt), dtype=np.int64)
        mask = np.zeros_like(input_ids)
        for row, (ids, _, _) in enumerate(batch):
            input_ids[row, longest_prompt - len(ids) :] = ids
            mask[row, longest_prompt - len(ids) :] = 1
        positions = np.maximum(mask.cumsum(axis=1) - 1, 0)
        result = self.model.forward(input_ids, mask, positions, self.model.ops.empty(rows))
        cache = BatchKVCache(result.present, mask, self.model.ops)
        lengths = mask.sum(axis=1)
        done = [False] * rows
        for step in range(max(max_tokens for _, max_tokens, _ in batch)):
            tokens = result.logits.argmax(axis=1)
            items: list[Any] = []
            for row, (_, max_tokens, ignore_eos) in enumerate(batch):
                if done[row]:
                    items.append(StopIteration)
                    continue
                items.append(int(tokens[row]))
                if step + 1 >= max_tokens or (not ignore_eos and int(tokens[row]) in self.eos):
                    done[row] = True
            yield items
            if all(done):
                return
            decode_mask = cache.decode_mask()
            result = self.model.forward(
                tokens[:, None].astype(np.int64), decode_mask, lengths[:, None], cache.values
            )
            cache.advance(result.present, decode_mask)
            lengths = lengths + 1


def main() -> None:
    """Serve the baseline until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", default="models/demo")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    os.environ.update(SERVE_ENV)  # as the shipped configs set it
    ray.init(num_cpus=8, include_dashboard=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    deployment = StaticBatchLLM.bind(str(Path(args.model_path).resolve()), args.threads)
    serve.run(deployment, name="static", route_prefix="/", blocking=True)


if __name__ == "__main__":
    main()
