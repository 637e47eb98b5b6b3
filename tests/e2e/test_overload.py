"""An overload burst against a service that holds very little: past its capacity, requests get
503 with ``Retry-After`` in the documented error shape at once, and every accepted one completes.

Capacity here is 1 model replica x (max_num_seqs 2 + max_waiting_seqs 2) = 4 requests in the
Batcher (``app.batcher_queue_bounds``), plus as many queued at the ingress: the ingress's gate
(``serve_app.admission``) lets 8 generation streams in at once.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from statistics import median

import httpx

APP_OVERRIDES = {
    "engine": {
        "max_num_seqs": 2,
        "max_waiting_seqs": 2,
        "intra_op_num_threads": 1,
        "allow_spinning": False,
    },
    "batcher": {"max_batch_size": 4},
}
BURST = 48  # 6x what the service holds, queue included
BURST_DEADLINE_S = 120.0  # nothing may hang: the whole burst ends well within this


@dataclass
class Outcome:
    status: int
    seconds: float
    retry_after: str | None
    body: dict


async def _one(http: httpx.AsyncClient, index: int, stream: bool) -> Outcome:
    # Sampled without a seed: neither cached nor coalesced, so every request is its own work.
    # Long enough that the first accepted ones still hold their places while the rest of the
    # burst arrives, however slowly a loaded machine lets it in.
    payload = {
        "model": "demo",
        "prompt": f"Request {index} of the burst:",
        "max_tokens": 192,
        "ignore_eos": True,
        "temperature": 1.0,
        "stream": stream,
    }
    started = time.perf_counter()
    if stream:
        async with http.stream("POST", "/v1/completions", json=payload) as response:
            text = (await response.aread()).decode()
        body = (
            {"events": text}
            if response.status_code == 200
            else httpx.Response(response.status_code, content=text).json()
        )
    else:
        response = await http.post("/v1/completions", json=payload)
        body = response.json()
    seconds = time.perf_counter() - started
    return Outcome(response.status_code, seconds, response.headers.get("retry-after"), body)


async def _burst(base_url: str) -> list[Outcome]:
    limits = httpx.Limits(max_connections=BURST, max_keepalive_connections=BURST)
    async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits) as http:
        calls = [_one(http, i, stream=i % 2 == 1) for i in range(BURST)]
        return await asyncio.wait_for(asyncio.gather(*calls), BURST_DEADLINE_S)


def test_a_burst_past_capacity_is_shed_with_503_and_every_accepted_request_completes(
    served_app: str,
) -> None:
    outcomes = asyncio.run(_burst(served_app))

    statuses = sorted({o.status for o in outcomes})
    assert statuses == [200, 503], statuses
    shed = [o for o in outcomes if o.status == 503]
    accepted = [o for o in outcomes if o.status == 200]
    assert len(shed) >= BURST // 2  # the service holds 8 at most; most of the burst is shed

    for outcome in shed:
        assert outcome.retry_after is not None and int(outcome.retry_after) >= 1
        error = outcome.body["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert (error["type"], error["code"]) == ("service_unavailable", "overloaded")

    for outcome in accepted:
        if "events" in outcome.body:  # a stream: generated to its end, no error event
            assert outcome.body["events"].rstrip().endswith("data: [DONE]")
            payloads = [line[6:] for line in outcome.body["events"].splitlines()
                        if line.startswith("data: ") and line != "data: [DONE]"]  # fmt: skip
            # An error event, not the text: a sampled answer may well say "error".
            assert not any("error" in json.loads(p) for p in payloads)
        else:
            assert outcome.body["choices"][0]["finish_reason"] in ("length", "stop")

    # Shedding is at once: a refusal does not wait for the work ahead of it.
    assert median(o.seconds for o in shed) < median(o.seconds for o in accepted)


def test_the_service_answers_normally_after_the_burst(served_app: str) -> None:
    response = httpx.post(
        f"{served_app}/v1/completions",
        json={"model": "demo", "prompt": "After the burst", "max_tokens": 4},
        timeout=60,
    )
    assert response.status_code == 200, response.text


async def _tokenize_while_full(base_url: str) -> httpx.Response:
    """The first refusal among bursts of 12 /tokenize calls while 8 long streams hold the
    Batcher's 4 slots and queue for them: more calls than the slots left and the queue hold
    (a call that waits for a slot gives up after half a second)."""
    limits = httpx.Limits(max_connections=32)
    async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits) as http:

        async def hold(index: int) -> None:
            payload = {"model": "demo", "prompt": f"Holder {index}", "max_tokens": 600,
                       "ignore_eos": True, "temperature": 1.0, "stream": True}  # fmt: skip
            async with http.stream("POST", "/v1/completions", json=payload) as response:
                await response.aread()

        async def tokenize() -> httpx.Response | None:
            try:
                return await http.post("/tokenize", json={"model": "demo", "prompt": "x"},
                                       timeout=0.5)  # fmt: skip
            except httpx.TimeoutException:
                return None  # waited for a slot

        holders = [asyncio.ensure_future(hold(i)) for i in range(8)]
        deadline = time.monotonic() + 60
        try:
            while time.monotonic() < deadline:
                answers = await asyncio.gather(*(tokenize() for _ in range(12)))
                refused = [a for a in answers if a is not None and a.status_code != 200]
                if refused:
                    return refused[0]
            raise AssertionError("/tokenize was never refused")
        finally:
            for holder in holders:
                holder.cancel()
            await asyncio.gather(*holders, return_exceptions=True)


def test_tokenize_against_a_full_batcher_is_the_documented_503(served_app: str) -> None:
    refused = asyncio.run(_tokenize_while_full(served_app))

    assert refused.status_code == 503, refused.text
    assert refused.headers["retry-after"] == "1"
    error = refused.json()["error"]  # not Serve's plain-text 503
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"]) == ("service_unavailable", "overloaded")
