"""Unit tests of the response cache's store, key and cacheability rule (no Ray)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from serve_app.clients.response_cache import ResponseCacheClient
from serve_app.stores.response_store import (
    CachedChoice,
    CachedResponse,
    LRUResponseStore,
    cache_key,
    is_cacheable,
)
from tests.unit.fakes import HangingHandle


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def response(text: str = "hello", n_tokens: int = 2) -> CachedResponse:
    choice = CachedChoice(text=text, finish_reason="stop", token_ids=list(range(n_tokens)))
    return CachedResponse(choices=[choice], prompt_tokens=3, completion_tokens=n_tokens)


def store(
    max_entries: int = 100, max_bytes: int = 1 << 20, ttl_s: float = 60.0
) -> LRUResponseStore:
    return LRUResponseStore(max_entries, max_bytes, ttl_s, clock=FakeClock())


def test_put_then_get_returns_the_response() -> None:
    s = store()
    s.put("k", response("cached text"))
    assert s.get("k") == response("cached text")


def test_entry_bound_evicts_least_recently_used() -> None:
    s = store(max_entries=2)
    s.put("a", response("a"))
    s.put("b", response("b"))
    assert s.get("a") is not None  # "a" becomes most recent, so "b" is the LRU entry
    s.put("c", response("c"))
    assert s.get("b") is None
    assert s.get("a") is not None
    assert s.get("c") is not None
    assert s.stats().evictions == 1


def test_byte_bound_evicts_until_it_fits() -> None:
    one = response("x" * 100)
    s = store(max_bytes=2 * one.size_bytes + 10)
    s.put("a", one)
    s.put("b", one)
    s.put("c", one)
    assert s.get("a") is None
    assert s.stats().entries == 2
    assert s.stats().bytes == 2 * one.size_bytes


def test_entry_larger_than_max_bytes_is_not_stored() -> None:
    small, big = response("x"), response("y" * 10_000)
    s = store(max_bytes=big.size_bytes - 1)
    s.put("small", small)
    s.put("big", big)
    assert s.get("big") is None
    assert s.get("small") == small  # an oversize entry evicts nothing
    assert s.stats().evictions == 0


def test_size_counts_utf8_bytes_and_token_ids() -> None:
    ascii_, accented = response("e" * 10, n_tokens=0), response("é" * 10, n_tokens=0)
    assert accented.size_bytes - ascii_.size_bytes == 10
    assert response(n_tokens=5).size_bytes - response(n_tokens=1).size_bytes == 32


def test_replacing_a_key_keeps_bytes_exact() -> None:
    s = store()
    s.put("k", response("short"))
    s.put("k", response("a much longer text"))
    assert s.stats().entries == 1
    assert s.stats().bytes == response("a much longer text").size_bytes


def test_expired_entry_is_a_miss_and_is_removed() -> None:
    clock = FakeClock()
    s = LRUResponseStore(10, 1 << 20, ttl_s=5.0, clock=clock)
    s.put("k", response())
    clock.now += 4.9
    assert s.get("k") is not None
    clock.now += 0.1
    assert s.get("k") is None
    assert s.stats().entries == 0
    assert s.stats().bytes == 0


def test_shrinking_bounds_evicts_at_once() -> None:
    s = store()
    for key in "abcd":
        s.put(key, response(key))
    s.resize(max_entries=1, max_bytes=1 << 20, ttl_s=60.0)
    assert s.stats().entries == 1
    assert s.get("d") is not None
    assert s.stats().evictions == 3


def test_stats_count_hits_and_misses() -> None:
    s = store()
    s.put("k", response())
    s.get("k")
    s.get("k")
    s.get("missing")
    stats = s.stats()
    assert (stats.hits, stats.misses, stats.entries) == (2, 1, 1)
    assert stats.bytes == response().size_bytes


PAYLOAD: dict[str, Any] = {
    "prompt": "Once upon a time",
    "temperature": 0.0,
    "top_p": 1.0,
    "max_tokens": 16,
    "seed": None,
    "stop": ["\n"],
}


def test_cache_key_ignores_dict_order() -> None:
    reordered = dict(reversed(list(PAYLOAD.items())))
    assert cache_key("v1", PAYLOAD) == cache_key("v1", reordered)
    assert len(cache_key("v1", PAYLOAD)) == 64


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("prompt", "Once upon a time!"),
        ("temperature", 0.5),
        ("top_p", 0.9),
        ("max_tokens", 17),
        ("seed", 7),
        ("stop", ["."]),
    ],
)
def test_cache_key_changes_with_any_request_field(field: str, value: Any) -> None:
    assert cache_key("v1", PAYLOAD) != cache_key("v1", {**PAYLOAD, field: value})


def test_cache_key_changes_with_model_version() -> None:
    assert cache_key("v1", PAYLOAD) != cache_key("v2", PAYLOAD)


def test_cache_key_rejects_a_payload_that_shadows_the_version() -> None:
    with pytest.raises(ValueError, match="model_version"):
        cache_key("v1", {**PAYLOAD, "model_version": "v2"})


@pytest.mark.parametrize(
    ("temperature", "seed", "expected"),
    [(0.0, None, True), (0.0, 3, True), (0.7, 3, True), (0.7, None, False), (1.0, None, False)],
)
def test_is_cacheable_only_for_deterministic_requests(
    temperature: float, seed: int | None, expected: bool
) -> None:
    assert is_cacheable(temperature, seed) is expected


def test_client_times_out_to_a_miss_and_cancels_the_request() -> None:
    handle = HangingHandle()
    client = ResponseCacheClient(handle, timeout_s=0.05)  # type: ignore[arg-type]
    assert asyncio.run(client.lookup({"prompt": "k"})) is None
    asyncio.run(client.store("v1", {"prompt": "k"}, response()))
    assert client.errors == 2
    assert (client.hits, client.misses) == (0, 0)
    assert all(r.cancelled for r in handle.responses)


def test_disabled_client_is_a_silent_miss() -> None:
    client = ResponseCacheClient(None)
    assert asyncio.run(client.lookup({"prompt": "k"})) is None
    asyncio.run(client.store("v1", {"prompt": "k"}, response()))
    assert (client.hits, client.misses, client.errors) == (0, 0, 0)
