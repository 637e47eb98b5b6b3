"""One streaming request to an OpenAI-compatible endpoint, timed chunk by chunk.

Tokens per chunk: the growth of ``usage.completion_tokens`` when the server sends usage on every
chunk; else the number of entries in the chunk's ``logprobs`` (``--logprobs`` asks for them);
else one token per chunk that carries text, which undercounts chunks the server coalesced. A
chunk without text holds its tokens over to the next one with text. The final usage chunk gives
the exact completion count, used for TPOT and throughput.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any, Literal

import httpx

from serve_app.bench.dataset import BenchRequest
from serve_app.bench.trace import ChunkEvent, RequestTrace, TokenSource

Endpoint = Literal["completions", "chat"]
PATHS: dict[Endpoint, str] = {"completions": "/completions", "chat": "/chat/completions"}
MAX_ERROR_CHARS = 500


@dataclass(frozen=True)
class Target:
    """The endpoint and the sampling settings every request shares."""

    model: str
    endpoint: Endpoint = "completions"
    temperature: float = 0.0
    ignore_eos: bool = True
    logprobs: bool = False  # per-token logprobs make the token count of every chunk exact
    timeout_s: float = 300.0

    def body(self, request: BenchRequest) -> dict[str, Any]:
        """The JSON body of one streaming request."""
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": request.output_len,
            "temperature": self.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.ignore_eos:  # only when asked: strict servers reject the non-standard field
            body["ignore_eos"] = True
        if self.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": request.prompt}]
        else:
            body["prompt"] = request.prompt
        if self.logprobs:  # chat takes a flag, legacy completions the number of alternatives
            body["logprobs"] = True if self.endpoint == "chat" else 0
        return body


@dataclass(frozen=True)
class RawChunk:
    """What one streamed choice said about its tokens, before the counting rule is applied."""

    t: float
    has_text: bool
    usage_total: int | None  # cumulative completion tokens, when the chunk carries usage
    logprob_count: int | None  # entries in the chunk's logprobs, when present


def raw_chunk(t: float, payload: dict[str, Any], choice: dict[str, Any]) -> RawChunk:
    usage = payload.get("usage") or {}
    logprobs = choice.get("logprobs") or {}
    # Chat puts token logprobs under "content", legacy completions under "tokens".
    entries = logprobs.get("content", logprobs.get("tokens"))
    return RawChunk(
        t=t,
        has_text=bool(_choice_text(choice)),
        usage_total=usage.get("completion_tokens"),
        logprob_count=None if entries is None else len(entries),
    )


def book_tokens(raw: list[RawChunk]) -> tuple[list[ChunkEvent], TokenSource]:
    """Apply the tokens-per-chunk rule of the module docstring to one stream's chunks."""
    texts = [c for c in raw if c.has_text]
    if texts and all(c.usage_total is not None for c in texts):
        source: TokenSource = "usage"
    elif texts and all(c.logprob_count is not None for c in texts):
        source = "logprobs"
    else:
        source = "chunks"
    events: list[ChunkEvent] = []
    reported = pending = 0
    for chunk in raw:
        if source == "usage":
            total = reported if chunk.usage_total is None else chunk.usage_total
            count, reported = total - reported, total
        elif source == "logprobs":
            count = chunk.logprob_count or 0
        else:
            count = int(chunk.has_text)
        pending += count
        if chunk.has_text:
            # A chunk with text holds at least one token, or its gap would vanish from the ITL.
            events.append(ChunkEvent(t=chunk.t, tokens=max(pending, 1)))
            pending = 0
    return events, source


def _choice_text(choice: dict[str, Any]) -> str:
    if "delta" in choice:
        return choice["delta"].get("content") or ""
    return choice.get("text") or ""


async def stream_request(
    client: httpx.AsyncClient, target: Target, request: BenchRequest, start: float
) -> RequestTrace:
    """Send one request and time its chunks; failures come back as a trace with their status.

    ``start`` is the request's send time relative to the sweep point, kept in the trace.
    """
    trace = RequestTrace(start=start, input_len=request.input_len, max_tokens=request.output_len)
    sent = time.perf_counter()
    try:
        await asyncio.wait_for(_read_stream(client, target, request, trace, sent), target.timeout_s)
    except asyncio.TimeoutError:
        trace.status, trace.error = "timeout", f"no complete response in {target.timeout_s} s"
    except httpx.HTTPError as exc:
        trace.status, trace.error = "transport_error", f"{type(exc).__name__}: {exc}"
    except ValueError as exc:  # an event that is not JSON
        trace.status, trace.error = "bad_event", str(exc)[:MAX_ERROR_CHARS]
    trace.e2e = time.perf_counter() - sent
    if trace.ok and not trace.chunks:
        trace.status, trace.error = "no_output", "the stream carried no text"
    return trace


async def _read_stream(
    client: httpx.AsyncClient,
    target: Target,
    request: BenchRequest,
    trace: RequestTrace,
    sent: float,
) -> None:
    raw: list[RawChunk] = []
    path = PATHS[target.endpoint]
    async with client.stream("POST", path, json=target.body(request)) as response:
        if response.status_code != 200:
            trace.status = str(response.status_code)
            trace.error = (await response.aread()).decode(errors="replace")[:MAX_ERROR_CHARS]
            return
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line.removeprefix("data:").strip()
            if data == "[DONE]":
                break
            now = time.perf_counter() - sent
            payload = json.loads(data)
            if "error" in payload:  # the server failed after the stream had begun
                trace.status, trace.error = "sse_error", data[:MAX_ERROR_CHARS]
                return
            if payload.get("usage"):
                trace.prompt_tokens = payload["usage"].get("prompt_tokens")
                trace.completion_tokens = payload["usage"].get("completion_tokens")
            raw.extend(raw_chunk(now, payload, choice) for choice in payload.get("choices") or [])
    trace.chunks, trace.token_source = book_tokens(raw)
